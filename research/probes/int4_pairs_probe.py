"""Development probe (GPU): int4 W4A16 kernels in chains of 18 on cold (18 layers) and L2-hot (one layer) weights.

    git show ee6185f:kernels/triton_kernels.py > /tmp/pair_kernels.py
    python research/probes/int4_pairs_probe.py /tmp/pair_kernels.py --out research/results/int4_nibble_pairs_chains.json

Loads the kernel module given (commit ee6185f held the even/odd nibble-pair variants with the inline-PTX bf16
dequant, later reverted as no faster) and times every tile config, plus a few extra warp/tile settings, for
the expert MLP's GeGLU gate+up and down projection at M = 10. Results: research/results/int4_nibble_pairs.json
(`chains_us_per_kernel`); docs/backends.md reads them.
"""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from evalkit.backends.quant import int4_pack, time_cuda_ms  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("kernels", help="path of a kernels/triton_kernels.py version (e.g. commit ee6185f's)")
ap.add_argument("--out", required=True)
ap.add_argument("--no-extra", action="store_true", help="only the module's own configs (its config tuples may differ)")
args = ap.parse_args()
spec = importlib.util.spec_from_file_location("pair_kernels", args.kernels)
pk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pk)

dev = torch.device("cuda"); torch.manual_seed(0)
def us(fn):
    ms, mode = time_cuda_ms(fn, 30); assert mode == "graph"; return ms / 18 * 1000
layers = [[int4_pack(torch.randn(4096, 1024, device=dev), 128) for _ in range(2)] for _ in range(18)]  # gate, up
down = [int4_pack(torch.randn(1024, 4096, device=dev), 128) for _ in range(18)]
x = torch.randn(10, 1024, device=dev, dtype=torch.bfloat16)
h = torch.randn(10, 4096, device=dev, dtype=torch.bfloat16)
extra = {  # more warps / stages for the pair variant
    "n32k128s2pw8": (32, 128, 2, 8, 3, "p"), "n64k128s2psw8": (64, 128, 2, 8, 3, "ps"), "n128k128s1ps": (128, 128, 1, 4, 3, "ps"),
    "n64k128s1ps": (64, 128, 1, 4, 3, "ps"), "n32k128s1p": (32, 128, 1, 4, 3, "p"), "n16k128s2p": (16, 128, 2, 4, 3, "p"),
    "n16k128s1p": (16, 128, 1, 4, 3, "p"), "n32k128s1pw2": (32, 128, 1, 2, 3, "p"), "n16k128s4pw2": (16, 128, 4, 2, 3, "p"),
    "n32k64s2p": (32, 64, 2, 4, 4, "p"), "n64k64s2ps": (64, 64, 2, 4, 4, "ps"),
    "n32k256s2w8": (32, 256, 2, 8, 3, ""), "n16k256s1": (16, 256, 1, 4, 3, ""), "n16k128s1w2": (16, 128, 1, 2, 4, ""),
}
if not args.no_extra:
    pk.W4A16_CONFIGS.update(extra)
res = {}
ref = torch.nn.functional.gelu(x.float() @ pk.int4_dequant(layers[0][0][0], layers[0][0][1], 128).float().t(), approximate="tanh") * (x.float() @ pk.int4_dequant(layers[0][1][0], layers[0][1][1], 128).float().t())
for c in pk.W4A16_CONFIGS:
    if not pk.w4a16_config_fits(c, 4096, 1024, 128): continue
    try:
        g, u = layers[0]
        y = pk.w4a16_geglu(x, g[0], u[0], g[1], u[1], 128, c)
        err = float((y.float() - ref).norm() / ref.norm())
        cold = us(lambda c=c: [pk.w4a16_geglu(x, g[0], u[0], g[1], u[1], 128, c) for g, u in layers])
        hot = us(lambda c=c: [pk.w4a16_geglu(x, g[0], u[0], g[1], u[1], 128, c) for _ in range(18)])
        res[f"gu:{c}"] = dict(cold=cold, hot=hot, err=err)
        print(f"gu {c:>16} cold {cold:6.2f} hot {hot:6.2f} err {err:.1e}", flush=True)
    except Exception as e:
        res[f"gu:{c}"] = repr(e)[:200]; print("gu", c, repr(e)[:200], flush=True)
for c in pk.W4A16_CONFIGS:
    if not pk.w4a16_config_fits(c, 1024, 4096, 128): continue
    try:
        cold = us(lambda c=c: [pk.w4a16_gemm(h, d[0], d[1], 128, c) for d in down])
        hot = us(lambda c=c: [pk.w4a16_gemm(h, down[0][0], down[0][1], 128, c) for _ in range(18)])
        res[f"down:{c}"] = dict(cold=cold, hot=hot)
        print(f"down {c:>16} cold {cold:6.2f} hot {hot:6.2f}", flush=True)
    except Exception as e:
        res[f"down:{c}"] = repr(e)[:200]; print("down", c, repr(e)[:200], flush=True)
tg = [torch.ops.aten._convert_weight_to_int4pack(d[0], 8) for d in down]
res["down:tinygemm"] = dict(cold=us(lambda: [torch.ops.aten._weight_int4pack_mm(h, t, 128, d[1]) for t, d in zip(tg, down)]),
                            hot=us(lambda: [torch.ops.aten._weight_int4pack_mm(h, tg[0], 128, down[0][1]) for _ in range(18)]))
print("down tinygemm", res["down:tinygemm"])
Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), us_per_kernel=res), indent=1))
