"""Rollout throughput: episodes/min of evalkit's engine, and where the workers' time goes.

One row per policy, each running its own episodes (every task x `trials` official init states) through
the engine exactly as `python -m evalkit` does (task-affine scheduling, cheap resets, batching window):
episodes/min over the engine's wall time (env builds included), ms per env step, the workers' idle
share, env builds and resets per episode, policy batch sizes and how long a batch waited, and the
success rate with its Wilson interval.

    python bench/throughput.py                                   # noop + reference, 2 tasks x 2 trials
    python bench/throughput.py rows=[noop,reference,pi05] tasks=[] trials=20 workers=16 device=cuda

Rows are policies of conf/policy/, with policy overrides after colons (`noop:needs_images=true`: a still
robot rendering both cameras, to time rendering alone); `pi05` runs true-size π0.5 from random weights in bf16 with its
2 cameras (`policy.init=random policy.tokenizer=bytes`; CUDA graphs on a GPU): latency work, not success.
`bare=true` adds, for the first row, a bare LIBERO loop over the same episodes (raw OffScreenRenderEnv,
a hard reset each episode, a still action for the policy's episode lengths): evalkit's cost and gain.
Writes bench/results/throughput_<cpu|gpu>.json (or out=PATH).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

os.environ.setdefault("MUJOCO_GL", "osmesa")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evalkit.cli_args import opt, parse  # noqa: E402

STILL = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
# what a row name adds to conf/policy/<name>.yaml (pi05 has no checkpoint here: true-size random weights)
ROW_OVERRIDES = {"pi05": ["init=random", "tokenizer=bytes", "dtype=bfloat16"]}


@dataclass
class Options:
    suite: str = opt("libero_spatial", "LIBERO suite")
    rows: list[str] = opt(["noop", "reference"], "policies, one row each (conf/policy/NAME.yaml)")
    tasks: list[int] = opt([0, 1], "task ids ([] = every task of the suite)")
    trials: int = opt(2, "episodes per task (init states 0..trials-1)")
    max_steps: Optional[int] = opt(None, "episode step limit (null: the suite's)")
    workers: int = opt(2, "env worker processes (0: one per core)")
    batch_window_ms: float = opt(50.0, "the engine's batching window")
    device: str = opt("auto", "auto | cpu | cuda")
    cuda_graph: bool = opt(True, "pi05 row on CUDA: capture its stages as CUDA graphs")
    bare: bool = opt(False, "also time a bare LIBERO loop over the first row's episodes")
    out: Optional[str] = opt(None, "JSON path (default bench/results/throughput_<cpu|gpu>.json)")


def _bare_worker(args) -> int:
    """The loop a user writes by hand: raw OffScreenRenderEnv kept per task, a hard reset every episode."""
    libero_name, episodes, wait, render, res = args
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    suite = benchmark.get_benchmark_dict()[libero_name](task_order_index=0)
    env, env_task = None, None
    for task_id, init_id, steps in episodes:
        if env_task != task_id:
            if env is not None:
                env.close()
            task = suite.get_task(task_id)
            bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
            env = OffScreenRenderEnv(bddl_file_name=bddl, use_camera_obs=render, has_offscreen_renderer=True,
                                     camera_heights=res, camera_widths=res)
            init_states, env_task = suite.get_task_init_states(task_id), task_id
        env.seed(7)
        env.reset()
        env.set_init_state(init_states[init_id])
        for _ in range(wait + steps):
            env.step(STILL)
        env.check_success()
    if env is not None:
        env.close()
    return len(episodes)


def bare_loop(spec, records, workers: int, render: bool) -> float:
    """Episodes/min of a bare loop over `records`' episodes with their step counts, in `workers` processes."""
    eps = sorted((r.task_id, r.init_state_id, r.steps) for r in records)
    shards = [eps[i::workers] for i in range(workers)]
    from evalkit.rollout.engine import worker_environment

    t = time.perf_counter()
    with worker_environment(), mp.get_context("spawn").Pool(workers) as pool:  # the engine's thread settings
        n = sum(pool.map(_bare_worker, [(spec.libero_name, s, spec.num_steps_wait, render, spec.resolution)
                                        for s in shards]))
    return n / (time.perf_counter() - t) * 60.0


def build_row_policy(row: str, device: str, cuda_graph: bool):
    import torch

    from evalkit.config import load_policy_file
    from evalkit.policies.registry import build_policy

    name, *extra = row.split(":")
    over = list(ROW_OVERRIDES.get(name, [])) + extra
    if name == "pi05" and device.startswith("cuda") and cuda_graph:
        over.append("cuda_graph=true")
    cfg = load_policy_file(name, over)
    cfg.setdefault("name", row)
    cfg.setdefault("denoise_steps", 10)
    return build_policy(cfg, torch.device(device)), cfg


def run_row(name: str, spec, o: Options, device: str) -> tuple[dict, list]:
    from evalkit.rollout.engine import RolloutOptions, run_rollouts
    from evalkit.rollout.journal import Journal
    from evalkit.stats import wilson_interval

    t = time.perf_counter()
    policy, cfg = build_row_policy(name, device, o.cuda_graph)
    build_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        res = run_rollouts(policy, spec, Journal(Path(d) / "e.jsonl"),
                           RolloutOptions(workers=o.workers, video_mode="none", batch_window_ms=o.batch_window_ms))
    k, n = sum(r.success for r in res.records), len(res.records)
    lo, hi = wilson_interval(k, n)
    row = {"policy": name, "policy_cfg": cfg, "cameras": 2 if policy.needs_images else 0,
           "policy_build_s": round(build_s, 2), **res.stats(),
           "success": k / n if n else None, "success_ci95": [lo, hi],
           "steps_mean": float(np.mean([r.steps for r in res.records])) if n else None}
    graphs = getattr(policy, "_graphs", None)
    if graphs is not None:  # CUDA-graph keys captured during the row (each capture stalls every waiting worker)
        row["graph_captures"], row["graph_capture_s"] = graphs.captures, round(graphs.capture_s, 2)
    return row, res.records


def _numba_on() -> bool | str:
    """Whether robosuite's numba path is on (its ENABLE_NUMBA macro and numba importable)."""
    try:
        import numba  # noqa: F401
        import robosuite.macros as macros
    except Exception as e:  # robosuite imports numba itself: without it robosuite does not import
        return f"unavailable: {type(e).__name__}: {e}"
    return bool(macros.ENABLE_NUMBA)


def main(argv: list[str] | None = None) -> None:
    o = parse(Options, sys.argv[1:] if argv is None else argv, prog="python bench/throughput.py",
              about=__doc__.splitlines()[0])
    from evalkit.config import resolve_device
    from evalkit.provenance import device_name, package_versions
    from evalkit.suites.specs import customize, get_suite

    device = resolve_device(o.device)
    o.workers = o.workers or os.cpu_count() or 1
    import torch

    # as `python -m evalkit` does: the main process's math threads would fight the env workers for the cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - o.workers))
    base = get_suite(o.suite)
    spec = customize(base, tasks=o.tasks or list(base.task_ids), trials=o.trials, max_steps=o.max_steps)
    rows = []
    for name in o.rows:
        row, records = run_row(name, spec, o, device)
        if o.bare and not rows:
            row["bare_episodes_per_min"] = round(bare_loop(spec, records, o.workers, bool(row["cameras"])), 2)
        rows.append(row)
        print(f"{name}: {row['episodes']} episodes, {row['episodes_per_min']} ep/min", flush=True)

    head = ("policy", "episodes", "ep/min", "ms/step", "idle", "builds/ep", "resets", "batch", "wait p50/p95 ms",
            "success")
    print("\n" + " | ".join(head))
    for r in rows:
        lo, hi = r["success_ci95"]
        print(" | ".join([
            r["policy"], str(r["episodes"]), f"{r['episodes_per_min']:.1f}", f"{r['ms_per_step']:.1f}",
            f"{r['idle_share']:.0%}", f"{r['env_builds_per_episode']:.2f}", str(r["resets"]),
            f"{r['batch_mean']:.1f} (max {r['batch_max']})", f"{r['batch_wait_ms_p50']:.0f}/{r['batch_wait_ms_p95']:.0f}",
            f"{r['success']:.1%} [{lo:.1%}, {hi:.1%}]"]))
        if "bare_episodes_per_min" in r:
            print(f"  bare LIBERO loop, same episodes: {r['bare_episodes_per_min']} ep/min")
    out = Path(o.out or REPO / "bench" / "results" / f"throughput_{'gpu' if device.startswith('cuda') else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "throughput", "command": " ".join(["python", "bench/throughput.py", *(argv or sys.argv[1:])]),
        "device": device_name(device), "host": platform.node(), "cpu_count": os.cpu_count(),
        "versions": package_versions(), "robosuite_numba": _numba_on(), "env": {k: os.environ.get(k) for k in ("MUJOCO_GL", "__GL_YIELD")},
        "options": asdict(o), "suite": spec.name, "tasks": list(spec.task_ids), "trials": spec.trials,
        "rows": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    from evalkit.errors import BadInput

    try:
        main()
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
