"""Check that the installed simulator (mujoco + robosuite) runs LIBERO correctly: every task of the given suites.

    MUJOCO_GL=osmesa python scripts/gpu_rollouts/sim_check.py --suites libero_spatial libero_object \
        libero_goal libero_10 libero_90 --out bench/results/sim_check.json

Per task: the env builds; official init states have the simulator's state size (1 + nq + nv) and
`set_init_state` reproduces them exactly; `check_success` answers; 10 settle steps plus `--steps` steps of
a fixed small action sequence keep the state finite; MuJoCo raises none of its runtime warnings
(`data.warning`: bad qacc, contact buffer full, ...); no Python warning mentions the model. One JSON
row per task, and a summary per suite. Runs on the GPU machine as well (MUJOCO_GL=egl).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def check_task(spec, task_id: int, steps: int, init_ids: list[int]) -> dict:
    import mujoco
    import numpy as np

    from evalkit.suites.env import SETTLE_ACTION, LiberoEnv

    t0 = time.perf_counter()
    row: dict = {"suite": spec.libero_name, "task_id": task_id, "problems": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = LiberoEnv(spec, task_id, render=False)
        try:
            m, d = env.raw.sim.model._model, env.raw.sim.data._data
            row["init_state_size"] = int(env.init_states.shape[1])
            row["sim_state_size"] = int(1 + m.nq + m.nv)
            if row["init_state_size"] != row["sim_state_size"]:
                row["problems"].append(f"init state size {row['init_state_size']} != 1 + nq + nv = {row['sim_state_size']}")
            rng = np.random.default_rng(task_id)
            actions = np.clip(rng.normal(0, 0.3, (steps, 7)), -1, 1)
            for i in init_ids:
                env.reset(i)  # reset, set_init_state and the settle steps
                env.raw.set_init_state(env.init_states[i])
                if not np.array_equal(env.raw.get_sim_state(), env.init_states[i]):
                    row["problems"].append(f"init state {i} not reproduced by set_init_state")
                for _ in range(spec.num_steps_wait):
                    env.raw.step(SETTLE_ACTION)
                success = []
                for a in actions:
                    obs, ok = env.step(a)
                    success.append(ok)
                    if not np.all(np.isfinite(obs.state)):
                        row["problems"].append(f"init state {i}: non-finite state")
                        break
                row[f"success_any_{i}"] = bool(any(success))
                bad = {mujoco.mjtWarning(k).name: int(w.number) for k, w in enumerate(d.warning) if w.number}
                if bad:
                    row["problems"].append(f"init state {i}: MuJoCo warnings {bad}")
        finally:
            env.close()
    model_warnings = [str(w.message)[:200] for w in caught if "model" in str(w.message).lower()]
    if model_warnings:
        row["problems"].append(f"warnings: {model_warnings[:3]}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", nargs="+", default=["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"])
    ap.add_argument("--tasks", type=int, nargs="*", default=None, help="task ids (default: all of each suite)")
    ap.add_argument("--inits", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    from evalkit.provenance import package_versions
    from evalkit.suites.specs import get_suite

    rows = []
    for name in args.suites:
        spec = get_suite(name)
        for t in (args.tasks if args.tasks is not None else spec.task_ids):
            row = check_task(spec, t, args.steps, args.inits)
            rows.append(row)
            print(f"{name} task {t}: {'ok' if not row['problems'] else row['problems']} ({row['seconds']} s)", flush=True)
    summary = {s: {"tasks": sum(r["suite"] == s for r in rows), "tasks_with_problems": sum(bool(r["problems"]) for r in rows if r["suite"] == s)}
               for s in args.suites}
    out = {"versions": package_versions(), "mujoco_gl": os.environ.get("MUJOCO_GL"), "command": " ".join(sys.argv),
           "steps": args.steps, "inits": args.inits, "summary": summary, "rows": rows}
    print(json.dumps({"versions": out["versions"], "summary": summary}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    sys.exit(1 if any(r["problems"] for r in rows) else 0)


if __name__ == "__main__":
    main()
