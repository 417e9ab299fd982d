"""Development probe (GPU): our CUDA int4 mma kernel (kernels/mma_small_m.py) in chains of 18 expert MLPs at M = 10.

    python research/probes/int4_mma_chain_probe.py --out research/results/int4_mma_chains.json

Every pair of (GeGLU gate+up config, down-projection config), with and without programmatic dependent launch,
timed as one CUDA graph of 18 MLPs on cold weights (each MLP on the same input, as research/probes/gemm_sweep.py's
stacked part does): microseconds per MLP. The int4 backend chooses configs by timing one kernel alone
(`backends/quant.py:choose_kernel`); this shows whether that choice is also the best in a chain, where PDL
overlaps each kernel's weight loads with its predecessor.
"""
import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from evalkit.kernels import mma_small_m  # noqa: E402
from evalkit.backends.quant import int4_pack, time_cuda_ms  # noqa: E402
from evalkit.provenance import package_versions  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--m", type=int, default=10)
args = ap.parse_args()

dev = torch.device("cuda")
torch.manual_seed(0)
t0 = time.time()


def packed(n: int, k: int):
    return mma_small_m.pack_mma(*int4_pack(torch.randn(n, k, device=dev), 128), 128)


layers = [(packed(4096, 1024), packed(4096, 1024), packed(1024, 4096)) for _ in range(18)]  # gate, up, down
x = torch.randn(args.m, 1024, device=dev, dtype=torch.bfloat16)
gu_cfgs = [c for c in mma_small_m.CONFIGS if mma_small_m.config_fits(c, 4096, 1024, 128)]
dn_cfgs = [c for c in mma_small_m.CONFIGS if mma_small_m.config_fits(c, 1024, 4096, 128)]


def chain(gu: str, dn: str, pdl: bool):
    def run():
        return [mma_small_m.int4_mma_gemm(mma_small_m.int4_mma_geglu(x, g[0], u[0], g[1], u[1], 128, gu, pdl), d[0], d[1], 128, dn, pdl)
                for g, u, d in layers]
    return run


rows = []
for pdl in (True, False):
    for gu, dn in itertools.product(gu_cfgs, dn_cfgs):
        ms, mode = time_cuda_ms(chain(gu, dn, pdl), 20)
        rows.append(dict(gate_up=gu, down=dn, pdl=pdl, us_per_mlp=ms / 18 * 1000, mode=mode))
        print(f"pdl={pdl!s:5} gu {gu:8} down {dn:8} {ms / 18 * 1000:6.2f} us/MLP ({mode})", flush=True)
best = {str(p): min((r for r in rows if r["pdl"] == p), key=lambda r: r["us_per_mlp"]) for p in (True, False)}
print("best", best)
Path(args.out).write_text(json.dumps(dict(
    command="python " + " ".join(sys.argv), device=torch.cuda.get_device_name(), versions=package_versions(),
    m=args.m, rows=rows, best=best, elapsed_s=time.time() - t0), indent=1))
