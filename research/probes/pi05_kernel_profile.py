"""Development probe (GPU): where one π0.5 call spends its GPU time, kernel by kernel (torch.profiler / CUPTI).

    python research/probes/pi05_kernel_profile.py --compile --backends "bf16,int4[expert]" --out research/results/pi05_kernel_profile.json

True-size π0.5 (random init), batch 1, 2 views, 10 denoise steps, CUDA graphs (and torch.compile with
--compile), as bench/backends.py runs it. For each backend: GPU microseconds per call summed by kernel name,
largest first, with launch counts per call. Kernel names are grouped by a short family label (first 60
characters) so inductor's generated names stay readable.
"""
import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from evalkit.backends.quant import KERNEL_CHOICE  # noqa: E402
from evalkit.backends.registry import get_backend  # noqa: E402
from bench.backends import VARIANTS  # noqa: E402
from evalkit.bench import synthetic_batch  # noqa: E402
from evalkit.policies.pi05.policy import build  # noqa: E402
from evalkit.provenance import package_versions  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--backends", default="bf16,int4[expert]")
ap.add_argument("--compile", action="store_true")
ap.add_argument("--calls", type=int, default=5)
ap.add_argument("--top", type=int, default=25)
args = ap.parse_args()

dev = torch.device("cuda")
obs = synthetic_batch(1)
result = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(), "versions": package_versions(),
          "compile": args.compile, "calls": args.calls, "backends": {}}
t0 = time.time()
for label in [b for b in args.backends.split(",") if b]:
    torch._dynamo.reset()  # each backend compiles afresh (past the recompile limit dynamo would run eager)
    torch.manual_seed(0)
    policy = build({"kind": "pi05", "variant": "full", "init": "random", "tokenizer": "bytes", "num_views": 2,
                    "denoise_steps": 10, "seed": 0, "dtype": "bfloat16"}, dev)
    if VARIANTS[label] is None:  # fp8(prefix)+int4(expert)
        get_backend("fp8", targets="prefix_mlp").apply(policy.model)
        get_backend("int4", targets="expert").apply(policy.model)
    else:
        name, opts = VARIANTS[label]
        get_backend(name, **opts).apply(policy.model)
    policy.predict(obs, noise_seed=0)  # eager: kernel choices
    if args.compile:
        policy.enable_compile()
    for _ in range(3):
        policy.predict(obs, noise_seed=0)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            policy.predict(obs, noise_seed=0)
        torch.cuda.synchronize()
    us, n = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            key = e.name[:60]
            us[key] += e.device_time / args.calls
            n[key] += 1
    total = sum(us.values())
    rows = sorted(({"kernel": k, "us_per_call": v, "launches_per_call": n[k] / args.calls} for k, v in us.items()),
                  key=lambda r: -r["us_per_call"])
    result["backends"][label] = {"gpu_us_per_call": total, "launches_per_call": sum(n.values()) / args.calls, "kernels": rows,
                                 "kernel_choices": {str(k): v for k, v in KERNEL_CHOICE.items()}}  # (kind, dev, N, K, M, ..) -> kernel
    print(f"\n{label}: {total / 1000:.2f} ms GPU time per call, {sum(n.values()) / args.calls:.0f} kernels per call")
    for r in rows[:args.top]:
        print(f"  {r['us_per_call']:8.1f} us  {r['launches_per_call']:6.0f}x  {r['kernel']}")
    for k, v in KERNEL_CHOICE.items():
        print(f"  choice {k}: {v}")
    del policy
    torch.cuda.empty_cache()
result["elapsed_s"] = time.time() - t0
Path(args.out).write_text(json.dumps(result, indent=1))
