#!/usr/bin/env bash
# Sourced by the GPU pipelines (scripts/gpu_rollouts/throughput.sh, scripts/reference/gpu_pipeline.sh) once they
# have defined `pipeline` (writes under $WORK, touches $WORK/DONE at the end) and `collect` (copies to $OUT).
#   start     run the pipeline detached (setsid: it outlives the device call while the machine stays warm),
#             wait WAIT seconds (default 560), collect
#   poll      wait up to WAIT seconds for DONE, collect
#   pipeline  the pipeline itself, in the foreground

# what every collect ends with: the card's name, the logs' last LINES lines, the pipeline's status lines
report() {
  nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/device.txt"
  tail -n "${1:-3}" "$WORK"/*.log 2>/dev/null | cut -c1-300
  cat "$WORK/status" 2>/dev/null
}

detached_main() {
  case ${1:-poll} in
    start)
      rm -rf "$WORK"; mkdir -p "$WORK"
      setsid bash "$0" pipeline > "$WORK/pipeline.log" 2>&1 < /dev/null &
      sleep "${WAIT:-560}"; collect ;;
    pipeline) pipeline ;;
    poll)
      for _ in $(seq "${WAIT:-560}"); do [ -f "$WORK/DONE" ] && break; sleep 1; done
      collect ;;
  esac
}
