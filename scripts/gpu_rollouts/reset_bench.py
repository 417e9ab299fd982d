"""What a reset and a step cost: robosuite's hard reset vs evalkit's cheap reset, and a step with and without the
offscreen render context, on any machine (CPU OSMesa here, EGL on the GPU machine).

    python scripts/gpu_rollouts/reset_bench.py --out bench/results/reset_cost_cpu.json

Per suite (one task each, default task 0), state-only envs under seed_mode=openpi, episodes in order:
- `hard`: an env with `cheap_resets=False`, reset seconds of episodes 0..N-1 (each recompiles the model);
- `cheap`: an env with cheap resets, episodes 1..N (its episode 0 is the hard reset that takes the snapshot);
- `hard with context`: hard resets of a state-only env that has an offscreen render context, as every env had
  before (LIBERO's OffScreenRenderEnv makes one, and each hard reset recreates it);
all as `LiberoEnv.last_reset_s` (reset + set_init_state + the settle steps, what a worker waits for) and with the
settle steps left out (`num_steps_wait=0`: the reset alone). Step time: one still action, median over `--steps`
steps, for a state-only env without a render context (what `render=False` builds now), the same env with a context
attached (what it was before: LIBERO's OffScreenRenderEnv always made one) and, for the first suite, a rendered env
(both cameras). Medians, with min and max. Prints a table, writes JSON with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
STILL = np.array([0, 0, 0, 0, 0, 0, -1.0])


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def reset_seconds(spec, task: int, cheap: bool, episodes: int, context: bool = False) -> list[float]:
    from evalkit.suites.env import LiberoEnv

    env = LiberoEnv(spec, task, render=False, cheap_resets=cheap)
    # context: the state-only env as it was (LIBERO's OffScreenRenderEnv), whose hard reset recreates the context
    env.raw.env.has_offscreen_renderer = context
    try:
        out = []
        for i in range(episodes + (1 if cheap else 0)):
            env.reset(i)
            if env.last_reset_kind == ("cheap" if cheap else "hard"):
                out.append(env.last_reset_s)
        return out
    finally:
        env.close()


def step_ms(spec, task: int, render: bool, context: bool, steps: int) -> list[float]:
    from evalkit.suites.env import LiberoEnv

    env = LiberoEnv(spec, task, render=render)
    try:
        env.reset(0)
        if context and env.raw.sim._render_context_offscreen is None:
            env._attach_render_context()  # the state-only env as it was: a context, no camera obs
        assert (env.raw.sim._render_context_offscreen is not None) == (context or render)
        out = []
        for _ in range(steps):
            t = time.perf_counter()
            env.step(STILL)
            out.append((time.perf_counter() - t) * 1e3)
        return out
    finally:
        env.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", nargs="+", default=["libero_spatial", "libero_object", "libero_goal", "libero_10"])
    ap.add_argument("--task", type=int, default=0)
    ap.add_argument("--episodes", type=int, default=5, help="timed resets per kind")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per step-time row")
    ap.add_argument("--rendered-steps", type=int, default=20, help="timed steps of the rendered row (slow on CPU)")
    ap.add_argument("--device", default=None, help="machine description for the JSON (default: from platform)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    from evalkit.provenance import package_versions
    from evalkit.suites.specs import customize, get_suite

    rows = []
    for n, suite in enumerate(args.suites):
        spec = customize(get_suite(suite), seed_mode="openpi")
        bare = customize(spec, num_steps_wait=0)
        row = {"suite": suite, "task": args.task, "settle_steps": spec.num_steps_wait}
        for kind in ("hard", "cheap"):
            row[f"{kind}_reset_s"] = _stats(reset_seconds(spec, args.task, kind == "cheap", args.episodes))
            row[f"{kind}_reset_no_settle_s"] = _stats(reset_seconds(bare, args.task, kind == "cheap", args.episodes))
        row["hard_reset_with_context_s"] = _stats(reset_seconds(spec, args.task, False, args.episodes, context=True))
        row["step_ms_no_context"] = _stats(step_ms(spec, args.task, False, False, args.steps))
        row["step_ms_with_context"] = _stats(step_ms(spec, args.task, False, True, args.steps))
        if n == 0:
            row["step_ms_rendered_2_cameras"] = _stats(step_ms(spec, args.task, True, True, args.rendered_steps))
            row["resolution"] = spec.resolution
        rows.append(row)
        print(f"{suite:15s} task {args.task}: reset hard {row['hard_reset_s']['median']:.2f} s "
              f"(with a render context {row['hard_reset_with_context_s']['median']:.2f} s), cheap "
              f"{row['cheap_reset_s']['median']:.3f} s (no settle: {row['hard_reset_no_settle_s']['median']:.2f} / "
              f"{row['cheap_reset_no_settle_s']['median']:.3f} s); step {row['step_ms_no_context']['median']:.1f} ms "
              f"without context, {row['step_ms_with_context']['median']:.1f} ms with", flush=True)
    import robosuite.utils.transform_utils as T
    from robosuite import macros

    try:
        from numba.core.dispatcher import Dispatcher

        numba_on = bool(macros.ENABLE_NUMBA) and isinstance(T.mat2quat, Dispatcher)
    except ImportError:
        numba_on = False
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device or f"{platform.node()} ({os.cpu_count()} cores, MUJOCO_GL={os.environ.get('MUJOCO_GL')})",
        "load_average_at_end": os.getloadavg(),
        "versions": package_versions(),
        "robosuite_numba": numba_on,
        "rows": rows,
    }
    print("\n| suite (task) | hard reset s, with context (before) | hard reset s | cheap reset s | hard / cheap, no settle s "
          "| step ms: no context | with context |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['suite']} ({r['task']}) | {r['hard_reset_with_context_s']['median']:.2f} | "
              f"{r['hard_reset_s']['median']:.2f} | {r['cheap_reset_s']['median']:.3f} | "
              f"{r['hard_reset_no_settle_s']['median']:.2f} / {r['cheap_reset_no_settle_s']['median']:.3f} | "
              f"{r['step_ms_no_context']['median']:.1f} | {r['step_ms_with_context']['median']:.1f} |")
    if rows and "step_ms_rendered_2_cameras" in rows[0]:
        print(f"rendered ({rows[0]['suite']}, 2 cameras {rows[0]['resolution']} px): "
              f"{rows[0]['step_ms_rendered_2_cameras']['median']:.0f} ms/step")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
