#!/usr/bin/env bash
# Run a LIBERO suite on the lent GPU machine (device tool), from the repo root, results under $OUT.
#
# Build here first (CPU machine, once; .carry/ is git-ignored and travels with `carry`):
#   bash scripts/gpu_rollouts/prepare.sh            # wheels, EGL debs, site.tar.xz (<= 64 MiB in all)
# Then, through the device tool:
#   run(command="bash scripts/gpu_rollouts/run.sh", carry=[".carry"])
# Knobs (environment): POLICY (noop|reference|...), WORKERS (default: all cores), SUITE, TRIALS,
# MAX_STEPS (default: the suite's), BENCH_TRIALS.
set -uo pipefail
OUT=${OUT:-/tmp/evalkit_gpu_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/run_log.txt") 2>&1
POLICY=${POLICY:-noop}
SUITE=${SUITE:-libero_spatial}
WORKERS=${WORKERS:-$(nproc)}
source scripts/gpu_rollouts/setup.sh || exit 2  # EGL loaders, the bundle, PYTHONPATH; prints versions

# 3. Rendering smoke test: one env with both cameras through EGL.
python3 - <<'EOF' || { echo "EGL/LIBERO smoke test failed"; exit 3; }
import time
import numpy as np
from evalkit.suites.env import LiberoEnv
from evalkit.suites.specs import get_suite
spec = get_suite("libero_spatial")
t = time.perf_counter(); env = LiberoEnv(spec, 0, render=True); obs = env.reset(0, 7)
print(f"smoke: env built+reset {time.perf_counter() - t:.1f} s, image {obs.agentview.shape} mean {obs.agentview.mean():.1f}")
t = time.perf_counter()
for _ in range(20): obs, _ = env.step(np.array([0, 0, 0, 0, 0, 0, -1.0]))
print(f"smoke: {(time.perf_counter() - t) / 20 * 1e3:.1f} ms/step with two 256x256 cameras (EGL)")
env.close()
EOF

# 4. The throughput benchmark (bench/throughput.py): the engine's episodes/min and where the time goes
#    (scripts/gpu_rollouts/throughput.sh runs the full set of rows).
BENCH_TRIALS=${BENCH_TRIALS:-2}
timeout ${BENCH_TIMEOUT:-200} python3 bench/throughput.py suite="$SUITE" rows=[$POLICY] tasks=[] workers="$WORKERS" \
    trials="$BENCH_TRIALS" device=cuda ${MAX_STEPS:+max_steps=$MAX_STEPS} \
    out="$OUT/throughput_gpu.json" || echo "throughput benchmark failed or timed out (rc $?)"

# 5. The suite through the CLI, one worker per core, policy batched on the GPU (needs pandas + pyarrow there).
if python3 -c "import pandas, pyarrow" 2>/dev/null; then
  timeout ${RUN_TIMEOUT:-200} python3 -m evalkit policy="$POLICY" suite="$SUITE" workers="$WORKERS" tracking=offline \
      device=cuda video=none quiet=true ${TRIALS:+suite.trials=$TRIALS} ${MAX_STEPS:+suite.max_steps=$MAX_STEPS} \
      hydra.run.dir=/tmp/evalkit_run && cp /tmp/evalkit_run/summary.json "$OUT/summary.json"
else
  echo "pandas/pyarrow not on this machine: skipping the CLI run (episodes.parquet needs them)"
fi
echo "total: $(( $(date +%s) - t0 )) s"
