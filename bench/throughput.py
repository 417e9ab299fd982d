"""Rollout throughput: evalkit's engine vs a bare LIBERO loop over the same envs and steps.

Both sides run the same episodes (official init states, settle steps, then `max_steps` steps of a
still action, so every episode has exactly the same length) in the same number of processes.
evalkit adds: observation processing, pipes to the main process, batched policy calls, the journal.

    python bench/throughput.py --workers 1 2 --tasks 0 1 --trials 2 --max-steps 100 [--policy noop|reference]

Prints a table and writes bench/results/throughput_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("MUJOCO_GL", "osmesa")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STILL = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)


def _bare_worker(args) -> int:
    """A loop a user would write by hand: raw OffScreenRenderEnv, no evalkit code in the step loop."""
    libero_name, episodes, max_steps, wait, render = args
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    suite = benchmark.get_benchmark_dict()[libero_name](task_order_index=0)
    env, env_task = None, None
    for task_id, init_id in episodes:
        if env_task != task_id:
            if env is not None:
                env.close()
            task = suite.get_task(task_id)
            bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
            env = OffScreenRenderEnv(bddl_file_name=bddl, use_camera_obs=render, has_offscreen_renderer=True,
                                     camera_heights=256, camera_widths=256)
            init_states, env_task = suite.get_task_init_states(task_id), task_id
        env.seed(7)
        env.reset()
        env.set_init_state(init_states[init_id])
        for _ in range(wait + max_steps):
            env.step(STILL)
        env.check_success()
    if env is not None:
        env.close()
    return len(episodes)


def bare_loop(spec, workers: int, render: bool) -> float:
    eps = spec.episodes()
    shards = [eps[i::workers] for i in range(workers)]  # each process keeps its envs, as evalkit's workers do
    from evalkit.rollout.engine import worker_environment

    t = time.perf_counter()
    with worker_environment(), mp.get_context("spawn").Pool(workers) as pool:  # same thread settings as evalkit's
        n = sum(pool.map(_bare_worker, [(spec.libero_name, s, spec.max_steps, spec.num_steps_wait, render) for s in shards]))
    return n / (time.perf_counter() - t) * 60.0


def evalkit_loop(spec, workers: int, policy) -> tuple[float, float]:
    from evalkit.rollout.engine import RolloutOptions, run_rollouts
    from evalkit.rollout.journal import Journal

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        res = run_rollouts(policy, spec, Journal(Path(d) / "e.jsonl"), RolloutOptions(workers=workers, video_mode="none"))
        wall = time.perf_counter() - t
    return len(res.records) / wall * 60.0, sum(res.policy_call_s) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="libero_spatial")
    ap.add_argument("--tasks", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--policy", default="noop", help="noop (still robot, fixed episode length) or a policy kind")
    ap.add_argument("--render", action="store_true", help="render both cameras in both loops (image policies)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from evalkit.suites.specs import customize, get_suite

    from evalkit.policies.noop import NoopPolicy
    from evalkit.provenance import device_name, package_versions

    spec = customize(get_suite(args.suite), tasks=args.tasks, trials=args.trials, max_steps=args.max_steps)
    if args.policy == "noop":
        policy = NoopPolicy(needs_images=args.render)
    else:
        import torch

        from evalkit.policies.registry import build_policy

        policy = build_policy({"kind": args.policy, "name": args.policy, "denoise_steps": 10},
                              torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for w in args.workers:
        bare = bare_loop(spec, w, args.render)
        ek, policy_share = evalkit_loop(spec, w, policy)
        rows.append({"workers": w, "bare_eps_per_min": bare, "evalkit_eps_per_min": ek, "ratio": ek / bare,
                     "policy_share_of_wall": policy_share})
    print(f"\n{'workers':>7} {'bare ep/min':>12} {'evalkit ep/min':>15} {'ratio':>6} {'policy share':>13}")
    for r in rows:
        print(f"{r['workers']:>7} {r['bare_eps_per_min']:>12.2f} {r['evalkit_eps_per_min']:>15.2f} {r['ratio']:>6.2f}"
              f" {r['policy_share_of_wall']:>13.1%}")
    dev = "cuda" if args.policy != "noop" and __import__("torch").cuda.is_available() else "cpu"
    out = Path(args.out or REPO / "bench" / "results" / f"throughput_{'gpu' if dev == 'cuda' else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "throughput", "command": " ".join(["python", *sys.argv]), "device": device_name(dev),
        "host": platform.node(), "cpu_count": os.cpu_count(), "versions": package_versions(),
        "suite": spec.name, "tasks": list(spec.task_ids), "trials": spec.trials, "max_steps": spec.max_steps,
        "policy": args.policy, "render": args.render, "rows": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
