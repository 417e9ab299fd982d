#!/usr/bin/env bash
# Rollout throughput on the lent GPU machine (issue: a full evaluation night on one GPU box), as one detached
# pipeline (it outlives a device call while the machine stays warm; `poll` copies results to $OUT).
#
# Here first (CPU machine): bash scripts/gpu_rollouts/prepare.sh
# Then: run(command="WAIT=560 bash scripts/gpu_rollouts/throughput.sh start", carry=[".carry"]),
#       and run(command="WAIT=560 bash scripts/gpu_rollouts/throughput.sh poll", carry=[".carry"]) until DONE.
# PARTS (default "scaling rows tests"):
#   scaling  bench/step_scaling.py: ms per still step with 1, 4, 8, 12, 16 processes stepping at once
#   rows     bench/throughput.py, one run: noop, reference (CUDA graphs) and true-size π0.5 (random weights, bf16,
#            CUDA graphs, 2 cameras), 10 tasks x TRIALS (default 20) each, one worker per core
#   tests    the GPU tests of the π0.5 graph keys and the decode kernel's whole-call check
#   wide     the reference row again with WIDE_WORKERS (default 20) workers: more workers than cores
#   render   a still robot rendering both cameras every step: 1 worker, then one per core (EGL under contention)
set -uo pipefail
WORK=${WORK:-/tmp/evalkit_throughput}
OUT=${OUT:-/tmp/evalkit_gpu_out}

pipeline() {
  echo "$(date +%T) start" >> "$WORK/status"
  source scripts/gpu_rollouts/setup.sh || { echo "setup failed" >> "$WORK/status"; touch "$WORK/DONE"; exit 2; }
  lscpu > "$WORK/lscpu.txt"
  W=${WORKERS:-$(nproc)}
  T=${TRIALS:-20}
  B="python3 bench/throughput.py suite=libero_spatial tasks=[] device=cuda trials=$T"
  for part in ${PARTS:-scaling rows tests}; do
    echo "$(date +%T) $part" >> "$WORK/status"
    case $part in
      scaling) python3 bench/step_scaling.py procs=[1,4,8,12,16] steps=200 out=$WORK/step_scaling_gpu.json ;;
      rows)    $B workers=$W rows=[noop,reference:cuda_graph=true,pi05] out=$WORK/throughput_gpu.json ;;
      tests)   python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_pi05_graphs_gpu.py \
                 "tests/test_decode_attention_gpu.py::test_pi05_actions_match_sdpa" ;;
      wide)    $B workers=${WIDE_WORKERS:-20} rows=[reference:cuda_graph=true] out=$WORK/throughput_gpu_wide.json ;;
      render)  R="rows=[noop:needs_images=true] trials=2"
               $B $R workers=1 tasks=[0] out=$WORK/throughput_render_1w.json
               $B $R workers=$W out=$WORK/throughput_render_16w.json ;;
    esac > "$WORK/$part.log" 2>&1
    rc=$?; echo "$(date +%T) $part: exit $rc" >> "$WORK/status"
  done
  touch "$WORK/DONE"
}

collect() {
  mkdir -p "$OUT"
  cp "$WORK"/*.json "$OUT"/ 2>/dev/null
  (cd "$WORK" && tar -cf "$OUT/logs.tar" status ./*.log lscpu.txt 2>/dev/null)
  report 12
}

source scripts/gpu_rollouts/detached.sh
detached_main "$@"
