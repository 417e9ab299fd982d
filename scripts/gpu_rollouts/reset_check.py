"""Check cheap resets against robosuite's hard reset on every task of some suites (physics only), on any machine.

    python scripts/gpu_rollouts/reset_check.py --suites libero_spatial libero_object libero_goal libero_10 \
        --out /tmp/reset_check.json

Per task, two state-only envs run the same episodes out of order (default 0, 3, 1): one with a hard reset every
episode, one with cheap resets after its first (suites/seeding.py). After the settle steps and after 20 steps of
fixed pseudo-random actions every model array, qpos, qvel, qacc_warmstart, act, the float32 state and the
privileged dict must be bit-identical. A task that differs belongs in `HARD_RESET_ONLY` (suites/env.py) with the
reason. tests/test_cheap_reset.py runs the same comparison on a few tasks; this script covers whole suites. Exit
code 0: all identical, 1: some task differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _snapshot(env, obs) -> dict[str, np.ndarray]:
    from evalkit.suites.seeding import model_arrays

    m, d = env.raw.sim.model._model, env.raw.sim.data._data
    out = {f"model.{k}": v.copy() for k, v in model_arrays(m, assets=False).items()}
    out.update({k: getattr(d, k).copy() for k in ("qpos", "qvel", "qacc_warmstart", "act")})
    out["state"] = obs.state.copy()
    out.update({f"privileged.{k}": v.copy() for k, v in obs.privileged.items()})
    return out


def _episodes(spec, task: int, order: list[int], cheap: bool, actions: np.ndarray) -> tuple[dict, list[float]]:
    from evalkit.suites.env import LiberoEnv

    env = LiberoEnv(spec, task, render=False, cheap_resets=cheap)
    out, seconds = {}, []
    try:
        for i in order:
            obs = env.reset(i)
            seconds.append(env.last_reset_s)
            first = _snapshot(env, obs)
            for a in actions:
                obs, _ = env.step(a)
            out[i] = {"first": first, "after": _snapshot(env, obs), "kind": env.last_reset_kind}
    finally:
        env.close()
    return out, seconds


def check_task(spec, task: int, order: list[int], actions: np.ndarray) -> dict:
    hard, hard_s = _episodes(spec, task, order, False, actions)
    cheap, cheap_s = _episodes(spec, task, order, True, actions)
    differ: dict[str, float] = {}
    for i in order:
        for phase in ("first", "after"):
            a, b = hard[i][phase], cheap[i][phase]
            for k in a.keys() | b.keys():
                if k not in a or k not in b or a[k].shape != b[k].shape:
                    differ[f"{i}/{phase}/{k}"] = float("inf")
                elif not np.array_equal(a[k], b[k]):
                    differ[f"{i}/{phase}/{k}"] = float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max())
    kinds = [cheap[i]["kind"] for i in order]
    return {"identical": not differ, "differ": differ, "cheap_kinds": kinds,
            "hard_reset_s": hard_s, "cheap_env_reset_s": cheap_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", nargs="+", default=["libero_spatial", "libero_object", "libero_goal", "libero_10"])
    ap.add_argument("--tasks", nargs="*", type=int, default=None, help="task ids (default: all of each suite)")
    ap.add_argument("--seed-mode", default="openpi", choices=["openpi", "independent"])
    ap.add_argument("--order", nargs="+", type=int, default=[0, 3, 1])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    from evalkit.suites.specs import customize, get_suite

    actions = np.random.default_rng(22).uniform(-1.0, 1.0, (args.steps, 7))
    rows, t0 = {}, time.perf_counter()
    for suite in args.suites:
        spec = customize(get_suite(suite), seed_mode=args.seed_mode)
        for task in args.tasks if args.tasks is not None else spec.task_ids:
            row = check_task(spec, task, args.order, actions)
            rows[f"{suite}/{task}"] = row
            worst = max(row["differ"].items(), key=lambda kv: kv[1], default=None)
            verdict = "identical" if row["identical"] else f"DIFFERS ({len(row['differ'])} fields, worst {worst})"
            resets = ", ".join(f"{s:.2f}" for s in row["cheap_env_reset_s"])
            print(f"{suite:15s} task {task:2d}: {verdict}; cheap env resets {resets} s", flush=True)
    report = {"seed_mode": args.seed_mode, "order": args.order, "steps": args.steps, "tasks": rows,
              "all_identical": all(r["identical"] for r in rows.values()), "seconds": time.perf_counter() - t0}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print(f"{sum(r['identical'] for r in rows.values())} of {len(rows)} tasks identical ({report['seconds']:.0f} s)")
    sys.exit(0 if report["all_identical"] else 1)


if __name__ == "__main__":
    main()
