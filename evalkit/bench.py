"""python -m evalkit.bench: latency only, no simulator.

    python -m evalkit.bench policy=pi05_tiny backend=bf16 denoise_steps=[1,3,10] views=[1,2] batch=1 calls=50

Any policy config under conf/policy/ x backend x denoise_steps x views x batch. Synthetic observations
(random 224x224 views, random state, a fixed instruction) go through the policy's full `predict`, so
host pre/post-processing is part of end-to-end. Prints a table, writes JSON, logs an MLflow run.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from evalkit.cli_args import opt, parse, split_group
from evalkit.config import load_policy_file
from evalkit.errors import EXIT_BAD_INPUT, BadInput, CapabilityError
from evalkit.latency import LatencyReport, measure
from evalkit.policies.base import ObsBatch, Observation

INSTRUCTION = "put the black bowl on the plate"


@dataclass
class BenchOptions:
    policy: str = opt("pi05_tiny", "a conf/policy/<name>.yaml")
    backend: str = opt("bf16", "a conf/backend/<name>.yaml (or registered backend)")
    denoise_steps: list[int] = opt([10], "denoise steps to time, e.g. [1,3,10]")
    views: list[int] = opt([2], "camera views to time, e.g. [1,2]")
    batch: int = opt(1, "observations per policy call")
    calls: int = opt(50, "timed calls per row (< 50: percentiles above p90 are rough)")
    warmup: int = opt(5, "untimed calls before timing")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    compile: bool = opt(False, "torch.compile the policy after the backend (CUDA only)")
    cuda_graph: bool = opt(False, "capture the policy in CUDA graphs (CUDA only)")
    out: Optional[str] = opt(None, "JSON path (default bench/results/bench_<policy>_<backend>.json)")
    mlflow: bool = opt(True, "log one MLflow run per row")


def synthetic_batch(batch: int, seed: int = 0) -> ObsBatch:
    rng = np.random.default_rng(seed)
    return ObsBatch([
        Observation(
            state=rng.uniform(-1, 1, 8).astype(np.float32), instruction=INSTRUCTION, episode_key=f"bench/{i}", step=0,
            agentview=rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            wrist=rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        )
        for i in range(batch)
    ])


def time_policy(policy, obs: ObsBatch, device: torch.device, calls: int, warmup: int) -> LatencyReport:
    """Per-stage timing when the policy's predict takes a timer; else the whole call as one stage."""
    if "timer" in inspect.signature(policy.predict).parameters:
        return measure(lambda t: policy.predict(obs, noise_seed=0, timer=t), device, calls, warmup)

    def whole(t):
        with t.stage("predict"):
            policy.predict(obs, noise_seed=0)

    return measure(whole, device, calls, warmup, notes=["policy exposes no stages: one 'predict' stage"])


def run(args: BenchOptions, policy_overrides: list[str] | None = None) -> dict[str, Any]:
    from evalkit.backends.registry import get_backend
    from evalkit.policies.registry import build_policy

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device={args.device} but no CUDA GPU is visible")
    steps_list, views_list = list(args.denoise_steps), list(args.views)
    if not steps_list or not views_list:
        raise BadInput("denoise_steps and views need at least one value each")
    cfg = load_policy_file(args.policy, policy_overrides or [])
    cfg["denoise_steps"] = steps_list[0]
    # compile / graphs are switched on after the backend has rewritten the model
    want_compile = bool(cfg.pop("compile", False)) or args.compile
    want_graph = bool(cfg.pop("cuda_graph", False)) or args.cuda_graph
    if (want_compile or want_graph) and device.type != "cuda":
        raise CapabilityError(f"compile/cuda_graph need a CUDA GPU; device is {device}")
    policy = build_policy(cfg, device)
    if not isinstance(getattr(policy, "model", None), torch.nn.Module):
        raise BadInput(f"policy '{args.policy}' has no torch model for backend '{args.backend}' to transform")
    backend = get_backend(args.backend)
    backend.check_requirements(device)
    breport = backend.apply(policy.model)
    if want_compile:
        policy.enable_compile()
    if want_graph:
        policy.enable_cuda_graph()
    rows = []
    for views in views_list:
        if hasattr(policy, "num_views"):
            policy.num_views = views
        elif views != views_list[0]:
            continue
        obs = synthetic_batch(args.batch)
        for steps in steps_list:
            if hasattr(policy, "denoise_steps"):
                policy.denoise_steps = steps
            rep = time_policy(policy, obs, device, args.calls, args.warmup)
            rows.append({"policy": args.policy, "backend": args.backend, "views": views, "batch": args.batch,
                         "denoise_steps": steps, "compile": want_compile, "cuda_graph": want_graph,
                         "latency": rep.to_dict(), "metrics": rep.metrics()})
    from evalkit.provenance import device_name, git_sha, package_versions

    sha, dirty = git_sha()
    return {
        "command": " ".join(["python -m evalkit.bench", *sys.argv[1:]]),
        "device": device_name(str(device)),
        "versions": package_versions(),
        "git_sha": sha, "git_dirty": dirty,
        "policy_cfg": cfg,
        "backend_report": {"backend": breport.backend, "weight_bytes_after": breport.weight_bytes_after,
                           "by_precision": breport.summary_by_precision(), "notes": breport.notes},
        "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = result["rows"]
    order = ["pre", "encode", "prefill", "time_cond", "denoise", "post"]
    seen = {s for r in rows for s in r["latency"]["stages"]}
    stages = [s for s in order if s in seen] + sorted(seen - set(order))
    t = Table(title=f"latency (ms, p50 over calls) on {result['device']}")
    for col in ["views", "steps", "batch", *stages, "e2e p50", "p90", "p99", "std"]:
        t.add_column(col, justify="right")
    for r in rows:
        lat = r["latency"]
        e = lat["end_to_end"]
        t.add_row(str(r["views"]), str(r["denoise_steps"]), str(r["batch"]),
                  *[f"{lat['stages'][s]['p50']:.2f}" if s in lat["stages"] else "-" for s in stages],
                  f"{e['p50']:.2f}", f"{e['p90']:.2f}", f"{e['p99']:.2f}", f"{e['std']:.2f}")
    Console(width=200).print(t)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, policy_overrides = split_group(argv, "policy")
        args = parse(BenchOptions, rest, prog="python -m evalkit.bench", about="latency only, no simulator",
                     extra=[("policy.KEY", "override a key of the policy's yaml, e.g. policy.init=random")])
        if args.calls < 50:
            print(f"[evalkit.bench] note: calls={args.calls} < 50; percentiles above p90 are rough")
        if args.batch < 1:
            raise BadInput("batch must be >= 1")
        t0 = time.time()
        result = run(args, policy_overrides)
        result["wall_s"] = time.time() - t0
    except (BadInput, CapabilityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(args.out or f"bench/results/bench_{args.policy}_{args.backend}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"wrote {out}")
    if args.mlflow:
        try:
            from evalkit.tracking import log_bench_run
        except ImportError as e:  # the tracking module is optional for a latency-only run
            print(f"[evalkit.bench] MLflow logging skipped: {e}")
        else:
            for r in result["rows"]:
                params = {"policy": r["policy"], "backend": r["backend"], "denoise_steps": r["denoise_steps"],
                          "views": r["views"], "batch": r["batch"], "compile": r["compile"],
                          "cuda_graph": r["cuda_graph"], "device": result["device"], "git_sha": result["git_sha"]}
                run_id = log_bench_run(params, r["metrics"], str(out))
                if run_id:
                    print(f"MLflow run {run_id} (views={r['views']}, steps={r['denoise_steps']})")
    return 0


if __name__ == "__main__":
    from evalkit.errors import exit_with

    exit_with(main)
