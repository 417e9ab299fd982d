"""True-size π0.5 latency on one GPU: bf16 eager vs torch.compile vs CUDA graphs, per stage, with floors.

    PYTHONUNBUFFERED=1 python bench/latency_pi05.py --out bench/results/latency_pi05.json

Random init (init=random), batch 1, views 1 and 2, denoise_steps 1/3/5/10, bf16 via backends' `bf16` cast.
In the same run: measured bf16 matmul peak (8192^3) and device copy bandwidth, and per stage the floor
max(FLOPs / peak, bytes / bandwidth) (evalkit/policies/pi05/cost.py says what is counted).
Every variant's actions are compared with bf16 eager's (same noise) so a fast variant that computes
something else shows up. Writes the JSON after every variant: a run cut short keeps what it measured.
`--variant tiny --device cpu` runs the same script on the tiny model (eager only) to check its logic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evalkit.backends.registry import get_backend  # noqa: E402

from evalkit.bench import synthetic_batch  # noqa: E402
from evalkit.latency import measure  # noqa: E402
from evalkit.latency.floors import copy_bandwidth_gbs, matmul_peak_tflops  # noqa: E402
from evalkit.policies.pi05.cost import pi05_work  # noqa: E402
from evalkit.policies.pi05.policy import build  # noqa: E402
from evalkit.provenance import git_sha, package_versions  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/latency_pi05.json")
    ap.add_argument("--variant", default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--views", default="2,1")
    ap.add_argument("--steps", default="10,5,3,1")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="eager,cuda_graph,compile+cuda_graph,compile")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for encode/prefill")
    ap.add_argument("--expert-compile-mode", default="max-autotune-no-cudagraphs",
                    help="torch.compile mode for the expert step (skinny GEMMs gain from autotuning)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="skip variants that would start after this")
    args = ap.parse_args()
    t_start = time.time()
    device = torch.device(args.device)
    views_list = [int(v) for v in args.views.split(",")]
    steps_list = [int(s) for s in args.steps.split(",")]
    modes = args.modes.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sha, dirty = git_sha()
    result: dict = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {**package_versions(), "torch": torch.__version__, "cuda": torch.version.cuda},
        "git_sha": sha, "git_dirty": dirty, "batch": 1, "calls": args.calls, "warmup": args.warmup,
        "rows": [], "skipped": [], "errors": [],
    }

    def save():
        result["elapsed_s"] = round(time.time() - t_start, 1)
        out.write_text(json.dumps(result, indent=2))

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        peak = matmul_peak_tflops(device)
        bw = copy_bandwidth_gbs(device)
        result["floors"] = {"matmul_bf16_tflops": peak, "copy_gbs_read_plus_write": bw}
        print(f"measured: bf16 matmul {peak:.0f} TFLOP/s, copy {bw:.0f} GB/s")
    else:
        peak, bw = 1.0, 10.0  # placeholders so the CPU logic check runs; not reported as floors
        result["floors"] = None
    save()

    t0 = time.time()
    policy = build({"kind": "pi05", "variant": args.variant, "init": "random", "tokenizer": "bytes",
                    "num_views": 2, "denoise_steps": 10}, device)
    breport = get_backend("bf16").apply(policy.model)
    result["build_s"] = round(time.time() - t0, 1)
    result["weight_bytes_bf16"] = breport.weight_bytes_after
    result["params"] = sum(p.numel() for p in policy.model.parameters())
    obs = synthetic_batch(1)
    prompt_tokens = int(policy.preprocess(obs)["tokens"].shape[1])
    result["prompt_tokens"] = prompt_tokens
    result["instruction"] = obs.observations[0].instruction
    print(f"built pi05 {args.variant}: {result['params'] / 1e9:.2f} B params in {result['build_s']} s; "
          f"prompt {prompt_tokens} tokens")

    reference: dict[tuple[int, int], np.ndarray] = {}
    graphs_for_mode: dict[str, object] = {}
    for mode in modes:
        if "compile" in mode and device.type != "cuda":
            result["skipped"].append({"mode": mode, "why": "compile/cuda_graph are GPU-only"})
            continue
        if mode == "cuda_graph" and device.type != "cuda":
            result["skipped"].append({"mode": mode, "why": "GPU-only"})
            continue
        if "compile" in mode:
            policy.enable_compile(mode=args.compile_mode, expert_mode=args.expert_compile_mode)
            result["compile_modes"] = {"encode_prefill": args.compile_mode or "default",
                                       "expert": args.expert_compile_mode or "default"}
        if "cuda_graph" in mode:
            from evalkit.policies.pi05.graphs import GraphedSampler

            graphs_for_mode[mode] = policy._graphs = GraphedSampler(policy.model, device)
        else:
            policy._graphs = None
        for views in views_list:
            for steps in steps_list:
                if time.time() - t_start > args.budget_s:
                    result["skipped"].append({"mode": mode, "views": views, "steps": steps, "why": "time budget"})
                    continue
                policy.num_views, policy.denoise_steps = views, steps
                try:
                    t1 = time.time()
                    first = policy.predict(obs, noise_seed=0)  # compiles / captures on first use
                    first_call_s = time.time() - t1
                    calls_before = policy.model.expert_calls
                    rep = measure(lambda t: policy.predict(obs, noise_seed=0, timer=t), device, args.calls,
                                  args.warmup)
                    expert_runs = (policy.model.expert_calls - calls_before) / (args.calls + args.warmup)
                except Exception as e:  # record and go on: one broken variant must not lose the others
                    traceback.print_exc()
                    result["errors"].append({"mode": mode, "views": views, "steps": steps, "error": repr(e)[:2000]})
                    save()
                    continue
                key = (views, steps)
                if mode == "eager":
                    reference[key] = first
                ref = reference.get(key)
                rel = None if ref is None else float(np.linalg.norm(first - ref) / (np.linalg.norm(ref) + 1e-12))
                work, prefix_len = pi05_work(policy.model, 1, views, prompt_tokens, steps)
                floors = {k: w.floor_ms(peak, bw) for k, w in work.items()}
                floor_total = sum(floors.values())
                st = rep.stages
                gpu_ms = sum(st[s].p50 for s in ("encode", "prefill", "time_cond", "denoise") if s in st)
                row = {
                    "mode": mode, "views": views, "denoise_steps": steps, "prefix_tokens": prefix_len,
                    "first_call_s": round(first_call_s, 2), "expert_runs_per_call": expert_runs,
                    "action_rel_err_vs_eager": rel,
                    "e2e_ms": {"p50": rep.end_to_end.p50, "p90": rep.end_to_end.p90, "p99": rep.end_to_end.p99,
                               "std": rep.end_to_end.std},
                    "stage_ms_p50": {k: v.p50 for k, v in st.items()},
                    "denoise_step_ms_p50": st["denoise"].p50 / steps if "denoise" in st else None,
                    "work": {k: {"gflop": w.flops / 1e9, "mbytes": w.bytes / 1e6} for k, w in work.items()},
                    "floor_ms": {**floors, "total": floor_total} if device.type == "cuda" else None,
                    "e2e_over_floor": rep.end_to_end.p50 / floor_total if device.type == "cuda" else None,
                    "gpu_stages_over_floor": gpu_ms / floor_total if device.type == "cuda" else None,
                    "latency": rep.to_dict(),
                }
                result["rows"].append(row)
                save()
                print(f"{mode:>20} views={views} steps={steps:>2} e2e p50 {rep.end_to_end.p50:7.2f} ms "
                      f"(enc {st['encode'].p50:.2f} pre {st['prefill'].p50:.2f} den {st['denoise'].p50:.2f}"
                      f"{' tc %.2f' % st['time_cond'].p50 if 'time_cond' in st else ''}) "
                      f"floor {floor_total:.2f} ms  rel_err {rel}  first {first_call_s:.1f}s", flush=True)
    save()
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    print(f"\n{result['device']}  floors: {result.get('floors')}  prompt tokens {result.get('prompt_tokens')}")
    hdr = (f"{'mode':>20} {'V':>2} {'N':>3} {'pre':>6} {'encode':>7} {'prefill':>7} {'t_cond':>6} {'denoise':>8} "
           f"{'/step':>6} {'post':>6} {'e2e p50':>8} {'p99':>7} {'floor':>6} {'x floor':>7}")
    print(hdr)
    for r in result["rows"]:
        s = r["stage_ms_p50"]
        fl = r["floor_ms"]["total"] if r["floor_ms"] else float("nan")
        print(f"{r['mode']:>20} {r['views']:>2} {r['denoise_steps']:>3} {s.get('pre', 0):6.2f} "
              f"{s.get('encode', 0):7.2f} {s.get('prefill', 0):7.2f} {s.get('time_cond', 0):6.2f} "
              f"{s.get('denoise', 0):8.2f} {r['denoise_step_ms_p50'] or 0:6.2f} "
              f"{s.get('post', 0):6.2f} {r['e2e_ms']['p50']:8.2f} {r['e2e_ms']['p99']:7.2f} {fl:6.2f} "
              f"{(r['e2e_over_floor'] or float('nan')):7.2f}")
    for e in result["errors"]:
        print("ERROR", e)


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(os.cpu_count() or 8))
    raise SystemExit(main())
