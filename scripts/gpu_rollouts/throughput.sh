#!/usr/bin/env bash
# Rollout throughput on the lent GPU machine (issue: a full evaluation night on one GPU box), results under $OUT.
#
# Here first (CPU machine): bash scripts/gpu_rollouts/prepare.sh
# Then: run(command="bash scripts/gpu_rollouts/throughput.sh", carry=[".carry"])
# PART=main     noop and reference rows, 10 tasks x TRIALS (default 20) each, 16 workers, state-only
# PART=render   a still robot rendering both cameras: 1 worker, then 16 workers with the driver's default
#               yield and with __GL_YIELD=USLEEP (EGL under contention)
# PART=pi05     true-size π0.5 (random weights, bf16, CUDA graphs, 2 cameras), 10 tasks x TRIALS_PI05
set -uo pipefail
OUT=${OUT:-/tmp/evalkit_gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/throughput_log.txt") 2>&1
source scripts/gpu_rollouts/setup.sh || exit 2
W=${WORKERS:-$(nproc)}
T=${TRIALS:-20}
B="python3 bench/throughput.py suite=libero_spatial tasks=[] workers=$W device=cuda"
for part in ${PART:-main render pi05}; do
  echo "== $part ($(( $(date +%s) - t0 )) s)"
  case $part in
    main)   timeout ${MAIN_TIMEOUT:-330} $B rows=[noop,reference] trials=$T out=$OUT/throughput_gpu.json ;;
    render) R="rows=[noop:needs_images=true] trials=${TRIALS_RENDER:-2}"
            timeout 200 $B $R workers=1 tasks=[0] out=$OUT/throughput_render_1w.json
            timeout 200 $B $R out=$OUT/throughput_render_16w.json
            __GL_YIELD=USLEEP timeout 200 $B $R out=$OUT/throughput_render_16w_usleep.json ;;
    pi05)   timeout ${PI05_TIMEOUT:-400} $B rows=[pi05] trials=${TRIALS_PI05:-10} out=$OUT/throughput_gpu_pi05.json ;;
  esac
done
echo "total: $(( $(date +%s) - t0 )) s"
