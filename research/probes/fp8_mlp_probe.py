"""Development probe (GPU): the fp8 expert MLP at M = 10 as two launches (fp8_mma_geglu + the down GEMM the
chooser picks) vs one (fp8_mma_mlp, GeGLU + grid barrier + down, per warp count), in chains of 18 MLPs
(one CUDA graph, L2 flushed before each replay), and alone, as the chooser times them.

    python research/probes/fp8_mlp_probe.py --out research/results/fp8_mlp_probe.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from evalkit.backends.quant import CHOICE_LOG, KERNEL_CHOICE, time_cuda_ms  # noqa: E402
from evalkit.backends.registry import get_backend  # noqa: E402
from evalkit.policies.pi05.layers import GemmaMLP  # noqa: E402
from evalkit.provenance import package_versions  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--m", type=int, default=10)
ap.add_argument("--depth", type=int, default=18)
args = ap.parse_args()
torch.manual_seed(0)
root = nn.Module()
root.expert = nn.Module()
root.expert.layers = nn.ModuleList()
for _ in range(args.depth):
    shell = nn.Module()
    shell.mlp = GemmaMLP(1024, 4096)
    root.expert.layers.append(shell)
root = root.cuda().to(torch.bfloat16)
get_backend("fp8", targets="expert_mlp", whole_mlp=True).apply(root)
mlps = [layer.mlp for layer in root.expert.layers]
x = torch.randn(args.m, 1024, device="cuda", dtype=torch.bfloat16)
t0 = time.time()
with torch.no_grad():
    mlps[0](x)  # the chooser runs here
    key = ("fp8mlp", 0, 4096, 1024, args.m)
    log = {k: v for k, v in CHOICE_LOG[key].items()}
    chosen = KERNEL_CHOICE[key]
    print("chooser:", chosen, log, flush=True)
    rows = {}
    for cand in [c for c, v in log.items() if isinstance(v, float)]:
        KERNEL_CHOICE[key] = cand

        def chain():
            h = x
            for mlp in mlps:
                h = mlp(h) * 0.5
            return h

        ms, mode = time_cuda_ms(chain)
        rows[cand] = {"chain_us_per_mlp": ms / args.depth * 1000, "alone_us": log[cand] * 1000, "mode": mode}
        print(f"{cand:22} chain {ms / args.depth * 1000:6.2f} us per MLP   alone {log[cand] * 1000:6.2f} us  ({mode})", flush=True)
    KERNEL_CHOICE[key] = chosen
Path(args.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
                                      "versions": package_versions(), "m": args.m, "depth": args.depth, "chosen": chosen,
                                      "choice_log": {k: v for k, v in log.items()}, "rows": rows,
                                      "elapsed_s": time.time() - t0}, indent=1))
