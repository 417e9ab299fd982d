#!/usr/bin/env bash
# The reference policies' GPU work in one detached pipeline on the lent GPU machine (results under $WORK, which
# outlives a call while the machine stays warm; `poll` copies it to $OUT):
#   1. policy=reference: train on the packed demos carried in .carry/reference/reference.npz (packed on the CPU
#      machine: python -m evalkit.train pack_only=true), then the denoise-step table on libero_spatial.
#   2. policy=reference_vision: render libero_spatial demos with both cameras (EGL, two renderers of one worker per
#      task), train, then evaluate on libero_spatial.
# Here first: bash scripts/gpu_rollouts/prepare.sh (SUITE=libero_spatial) and the pack above, then
#   run(command="bash scripts/reference/gpu_pipeline.sh start", carry=[".carry"]) and ... poll, until DONE
#   (call again within the machine's idle release: the pipeline lives as long as the machine).
# PARTS=vision VIS_INIT=references/reference_vision VIS_SEED=... VIS_SECONDS=...: only the vision policy, resuming its
# weights on demos of new seeds.
set -uo pipefail
WORK=${WORK:-/tmp/evalkit_reference}
OUT=${OUT:-/tmp/evalkit_gpu_out}
REF_SECONDS=${REF_SECONDS:-450}
VIS_SECONDS=${VIS_SECONDS:-420}
VIS_EPISODES=${VIS_EPISODES:-20}          # per renderer: twice this per task
EVAL_WORKERS=${EVAL_WORKERS:-16}
DENOISE=${DENOISE:-"1 2 3 5 10"}
TRIALS=${TRIALS:-20}
PARTS=${PARTS:-"reference vision"}          # which of the two to run
VIS_INIT=${VIS_INIT:-}                       # e.g. references/reference_vision: resume its training (init_from)
VIS_SEED=${VIS_SEED:-100000}                 # the renderers' seed namespaces: VIS_SEED and VIS_SEED + 100000 (a
                                             # resumed training takes new ones: new scenes, not last session's)

pipeline() {
  echo "$(date +%T) start" >> "$WORK/status"
  source scripts/gpu_rollouts/setup.sh || { echo "setup failed" >> "$WORK/status"; touch "$WORK/DONE"; exit 2; }
  echo "$(date +%T) setup done" >> "$WORK/status"
  export OMP_NUM_THREADS=1
  run() { python3 -m evalkit tracking=offline video=none quiet=true "$@"; }
  (  # policy=reference: train, then the denoise table (the GPU box's CPU cores step the envs)
    [[ " $PARTS " == *" reference "* ]] || exit 0
    python3 -m evalkit.train packed=.carry/reference/reference.npz out="$WORK/reference_policy" device=cuda \
      max_seconds="$REF_SECONDS" > "$WORK/reference_train.log" 2>&1 || exit 1
    for k in $DENOISE; do
      run policy=reference policy.checkpoint="$WORK/reference_policy" suite=libero_spatial suite.trials=10 \
        hydra.run.dir="$WORK/runs/denoise_$k" \
        denoise_steps="$k" workers=8 > "$WORK/denoise_$k.log" 2>&1
      cp "$WORK/runs/denoise_$k/summary.json" "$WORK/denoise_$k.summary.json"
    done
  ) &
  ref=$!
  (  # policy=reference_vision: render, train, evaluate
    [[ " $PARTS " == *" vision "* ]] || exit 0
    # two renderers of 10 workers each (one task a worker, other seed namespaces): 20 processes keep the 16
    # cores busy where one pool of 16 would leave 6 idle on its last 4 of 10 tasks
    dirs=(); pids=()
    for i in 0 1; do
      python3 -m evalkit.demos suite=libero_spatial images=true episodes_per_task="$VIS_EPISODES" workers=10 \
        seed=$((VIS_SEED + 100000 * i)) out=data/demos_images/libero_spatial_$i > "$WORK/vision_demos_$i.log" 2>&1 &
      dirs+=("data/demos_images/libero_spatial_$i"); pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || exit 1; done
    echo "$(date +%T) vision demos rendered" >> "$WORK/status"
    python3 -m evalkit.train config=conf/train/reference_vision.yaml out="$WORK/reference_vision" device=cuda \
      "data=[$(IFS=,; echo "${dirs[*]}")]" max_seconds="$VIS_SECONDS" ${VIS_INIT:+init_from=$VIS_INIT} \
      > "$WORK/vision_train.log" 2>&1 || exit 1
    echo "$(date +%T) vision trained" >> "$WORK/status"
    run policy=reference_vision policy.checkpoint="$WORK/reference_vision" suite=libero_spatial \
      suite.trials="$TRIALS" workers="$EVAL_WORKERS" hydra.run.dir="$WORK/runs/vision_eval" > "$WORK/vision_eval.log" 2>&1
    cp "$WORK/runs/vision_eval/summary.json" "$WORK/vision_eval.summary.json"
  ) &
  vis=$!
  wait $ref; echo "$(date +%T) reference: exit $?" >> "$WORK/status"
  wait $vis; echo "$(date +%T) vision: exit $?" >> "$WORK/status"
  touch "$WORK/DONE"
}

collect() {  # one tar (the device tool returns a limited number of files): checkpoints, logs, summaries
  mkdir -p "$OUT"
  (cd "$WORK" && tar -cf "$OUT/results.tar" status ./*.log ./*.summary.json reference_policy reference_vision \
    runs/*/summary.json runs/*/episodes.csv 2>/dev/null)
  report 3
}

source scripts/gpu_rollouts/detached.sh
detached_main "$@"
