#!/usr/bin/env bash
# First-observation parity on the GPU machine (EGL) against the CPU dump committed in tests/data/ (OSMesa).
# Build .carry/ here first (bash scripts/gpu_rollouts/prepare.sh), then through the device tool:
#   run(command="bash scripts/gpu_rollouts/first_obs.sh", carry=[".carry"])
# Writes $OUT/first_obs_parity.json (per case and field: identical, or max |diff| and the share of pixels that
# differ) and $OUT/sim_check_gpu.json (the pin's load/step check on the bundled suite, libero_spatial).
set -uo pipefail
OUT=${OUT:-/tmp/evalkit_gpu_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/first_obs_log.txt") 2>&1
source scripts/gpu_rollouts/setup.sh || exit 2
python3 scripts/gpu_rollouts/first_obs_parity.py compare --ref tests/data/first_obs_cpu.npz --out "$OUT/first_obs_parity.json"
rc=$?
timeout ${CHECK_TIMEOUT:-300} python3 scripts/gpu_rollouts/sim_check.py --suites libero_spatial --inits 0 --steps 100 \
    --out "$OUT/sim_check_gpu.json" | tail -n 15
echo "first-observation parity rc=$rc (0: bit-identical physics and images); total $(( $(date +%s) - t0 )) s"
exit $rc
