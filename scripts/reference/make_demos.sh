#!/usr/bin/env bash
# Scripted-expert demonstrations for the reference policy, all four suites, filled round by round
# (ROUND more successful episodes per task each round, up to MAX) so a run stopped early stays balanced.
# Resumable: finished episodes are skipped. Usage: bash scripts/reference/make_demos.sh [MAX] [ROUND] [WORKERS]
set -euo pipefail
MAX=${1:-40}; ROUND=${2:-10}; WORKERS=${3:-2}
SUITES=${SUITES:-"libero_goal libero_10 libero_spatial libero_object"}
export MUJOCO_GL=${MUJOCO_GL:-osmesa} OMP_NUM_THREADS=1
for ((k = ROUND; k <= MAX; k += ROUND)); do
  for s in $SUITES; do
    python -m evalkit.demos suite="$s" episodes_per_task="$k" workers="$WORKERS" out="data/demos/$s"
  done
done
