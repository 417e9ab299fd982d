"""Development probe (GPU): what small kernels cost in a dependent chain, and an alternative int4 layout.

    PYTHONUNBUFFERED=1 python research/probes/int4_chain_probe.py --out research/results/int4_chain_probe.json

Every number is one CUDA-graph replay of an 18-layer (or 36-kernel) chain after an L2 flush, median of 30:
empty kernels (launch floor), bf16 expert-MLP GEMMs, tinygemm int4, our Triton int4 kernels
(`cur:*`, whatever kernels/triton_kernels.py holds when it runs) and `w4t`, a K-major int4 layout kernel
defined here (measured slower; kept here, not in backends/). Written to explain why int4 at M = 10 is
launch-bound (docs/backends.md); not part of the backends.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    print("error: research/probes/int4_chain_probe.py needs a CUDA GPU with Triton", file=sys.stderr)
    raise SystemExit(2)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evalkit.backends.quant import int4_pack, time_cuda_ms  # noqa: E402
from evalkit.kernels.triton_kernels import _counters, w4a16_geglu, w4a16_gemm  # noqa: E402


def chain_ms(fn, reps: int = 30) -> float:
    ms, mode = time_cuda_ms(fn, reps)  # graph replays after an L2 flush, median
    assert mode == "graph", "a probe chain must capture"
    return ms


@triton.jit
def w4t(x_ptr, wa_ptr, wb_ptr, sza_ptr, szb_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, M_PAD, stride_xm, stride_wk, stride_ym,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, GEGLU: tl.constexpr):
    pid_n = tl.program_id(0); pid_s = tl.program_id(1); pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    shift = (1 - offs_k % 2) * 4
    k_slice = K // SPLIT
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_s * k_slice, (pid_s + 1) * k_slice, BLOCK_K):
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=offs_m[:, None] < M, other=0.0)
        woff = ((k0 + offs_k)[:, None] // 2) * stride_wk + offs_n[None, :]
        szo = ((k0 // GROUP) * N + offs_n) * 2
        b = tl.load(wa_ptr + woff)
        w = (((b >> shift[:, None]) & 0xF).to(tl.float32) - 8.0) * tl.load(sza_ptr + szo).to(tl.float32)[None, :] + tl.load(sza_ptr + szo + 1).to(tl.float32)[None, :]
        acc_a += tl.dot(x, w.to(tl.bfloat16))
        if GEGLU:
            b2 = tl.load(wb_ptr + woff)
            w2 = (((b2 >> shift[:, None]) & 0xF).to(tl.float32) - 8.0) * tl.load(szb_ptr + szo).to(tl.float32)[None, :] + tl.load(szb_ptr + szo + 1).to(tl.float32)[None, :]
            acc_b += tl.dot(x, w2.to(tl.bfloat16))
    y_offs = offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT == 1:
        if GEGLU:
            a = 0.7978845608028654 * (acc_a + 0.044715 * acc_a * acc_a * acc_a)
            acc_a = 0.5 * acc_a * (2.0 * tl.sigmoid(2.0 * a)) * acc_b
        tl.store(y_ptr + y_offs, acc_a.to(tl.bfloat16), mask=offs_m[:, None] < M)
    else:
        plane = M_PAD * N
        nout = 2 if GEGLU else 1
        ws_offs = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_s * nout * plane + ws_offs, acc_a)
        if GEGLU:
            tl.store(ws_ptr + (pid_s * nout + 1) * plane + ws_offs, acc_b)
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT):
                acc_a += tl.load(ws_ptr + s * nout * plane + ws_offs, cache_modifier=".cg")
                if GEGLU:
                    acc_b += tl.load(ws_ptr + (s * nout + 1) * plane + ws_offs, cache_modifier=".cg")
            if GEGLU:
                a = 0.7978845608028654 * (acc_a + 0.044715 * acc_a * acc_a * acc_a)
                acc_a = 0.5 * acc_a * (2.0 * tl.sigmoid(2.0 * a)) * acc_b
            tl.store(y_ptr + y_offs, acc_a.to(tl.bfloat16), mask=offs_m[:, None] < M)
            tl.atomic_xchg(cnt_ptr + tile, 0)

def w4t_call(x, wa, wb, sza, szb, cfg):
    bn, bk, split, warps, stages = cfg
    m, k = x.shape; n = wa.shape[1]
    y = torch.empty((m, n), device=x.device, dtype=torch.bfloat16)
    ws = torch.empty((split, 2 if wb is not None else 1, 16, n), device=x.device, dtype=torch.float32)
    cnt = _counters(x.device, n // bn)
    w4t[(n // bn, split, 1)](x, wa, wb if wb is not None else wa, sza, szb if szb is not None else sza, y, ws, cnt, m, n, k, 16,
                              x.stride(0), wa.stride(0), y.stride(0), GROUP=128, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split,
                              GEGLU=wb is not None, num_warps=warps, num_stages=stages)
    return y

@triton.jit
def stream_read(src_ptr, out_ptr, n_per_prog, BLOCK: tl.constexpr):
    """Read a contiguous int32 chunk per program and write one sum: the cost of reading a buffer, nothing else."""
    base = tl.program_id(0).to(tl.int64) * n_per_prog
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, n_per_prog, BLOCK):
        acc += tl.load(src_ptr + base + i + tl.arange(0, BLOCK))
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


def stream_part(dev: torch.device) -> dict:
    """Per-kernel cost of reading 1-8 MiB in a chain of 18 cold reads (what an int4 expert GEMM must at least
    pay), by grid size; and our GeGLU kernel on cold (18 layers) vs L2-hot (one layer 18 times) weights."""
    res = {}
    sink = torch.empty(4096, device=dev, dtype=torch.int32)
    for mib in (1, 2, 4, 8):
        n = mib * (1 << 18)  # int32 elements
        bufs = [torch.randint(0, 7, (n,), device=dev, dtype=torch.int32) for _ in range(18)]
        for progs in (128, 256, 512, 1024, 2048):
            per = n // progs  # every byte is read: n and progs are powers of two
            fn = lambda per=per, progs=progs, bufs=bufs: [stream_read[(progs,)](b, sink, per, BLOCK=min(1024, per), num_warps=4) for b in bufs]
            res[f"read{mib}MiB:p{progs}"] = chain_ms(fn) / 18 * 1000  # us per kernel
        del bufs
    layers = [[int4_pack(torch.randn(4096, 1024, device=dev), 128) for _ in range(2)] for _ in range(18)]
    x = torch.randn(10, 1024, device=dev, dtype=torch.bfloat16)
    for c in ("n32k256s2", "n32k256s1", "n64k128s4"):
        res[f"geglu:{c}:cold"] = chain_ms(lambda c=c: [w4a16_geglu(x, g[0], u[0], g[1], u[1], 128, c) for g, u in layers]) / 18 * 1000
        g, u = layers[0]
        res[f"geglu:{c}:hot"] = chain_ms(lambda c=c: [w4a16_geglu(x, g[0], u[0], g[1], u[1], 128, c) for _ in range(18)]) / 18 * 1000
    return res


ap = argparse.ArgumentParser()
ap.add_argument("--out", default="research/results/int4_chain_probe.json")
ap.add_argument("--part", default="all", choices=("all", "stream"), help="stream: only the read-cost chains (microseconds per kernel)")
args = ap.parse_args()
if args.part == "stream":
    if not torch.cuda.is_available():
        print("error: research/probes/int4_chain_probe.py needs a CUDA GPU", file=sys.stderr)
        raise SystemExit(2)
    res = stream_part(torch.device("cuda"))
    for k, v in res.items():
        print(f"{k:>28} {v:8.2f} us/kernel")
    Path(args.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
                                          "versions": {"torch": torch.__version__, "triton": triton.__version__},
                                          "us_per_kernel": res}, indent=1))
    raise SystemExit(0)
if not torch.cuda.is_available():
    print("error: research/probes/int4_chain_probe.py needs a CUDA GPU", file=sys.stderr)
    raise SystemExit(2)
out = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
       "versions": {"torch": torch.__version__, "triton": triton.__version__}}
dev = torch.device("cuda")
torch.manual_seed(0)
L = 18
# 1. launch floor: chain of tiny kernels
t = torch.zeros(16, device=dev)
out["chain36_tiny_ms"] = chain_ms(lambda: [t.add_(1) for _ in range(36)])
# 2. read floor: chain of 36 sums over distinct 2 MiB buffers (cold)
bufs = [torch.randint(0, 255, (4096, 512), device=dev, dtype=torch.uint8) for _ in range(36)]
out["chain36_sum2MB_ms"] = chain_ms(lambda: [b.sum(dtype=torch.int32) for b in bufs])
fbufs = [torch.randn(4096 * 256, device=dev) for _ in range(36)]  # 4 MiB fp32 each
out["chain36_sum4MBf32_ms"] = chain_ms(lambda: [b.sum() for b in fbufs])
# 3. layers
layers = []
for _ in range(L):
    ws = []
    for (n, k) in ((4096, 1024), (4096, 1024), (1024, 4096)):
        w = torch.randn(n, k, device=dev) * k ** -0.5
        p, sz = int4_pack(w, 128)
        ws.append(dict(w=w.to(torch.bfloat16), p=p, pt=p.t().contiguous(), sz=sz))
    layers.append(ws)
x = torch.randn(10, 1024, device=dev, dtype=torch.bfloat16)
out["bf16_ms"] = chain_ms(lambda: [F.linear(F.gelu(F.linear(x, g["w"]), approximate="tanh") * F.linear(x, u["w"]), d["w"]) for g, u, d in layers])
# reference correctness for layer 0
g, u, d = layers[0]
ref = F.linear(F.gelu(F.linear(x.float(), g["w"].float()), approximate="tanh") * F.linear(x.float(), u["w"].float()), d["w"].float())
res = {}
for gc in ["n32k256s2", "n64k128s4"]:
    for dc in ["n32k256s8", "n32k128s8"]:
        fn = lambda gc=gc, dc=dc: [w4a16_gemm(w4a16_geglu(x, g["p"], u["p"], g["sz"], u["sz"], 128, gc), d["p"], d["sz"], 128, dc) for g, u, d in layers]
        try:
            res[f"cur:{gc}+{dc}"] = chain_ms(fn)
        except Exception as e:
            res[f"cur:{gc}+{dc}"] = repr(e)[:100]
TCFG = {"n32k64s1": (32, 64, 1, 4, 3), "n32k128s1": (32, 128, 1, 4, 3), "n64k128s1": (64, 128, 1, 4, 3), "n32k128s2": (32, 128, 2, 4, 3),
        "n64k128s2": (64, 128, 2, 4, 3), "n32k128s4": (32, 128, 4, 4, 3), "n16k128s2": (16, 128, 2, 4, 3), "n32k64s4": (32, 64, 4, 4, 3),
        "n32k128s8": (32, 128, 8, 4, 3), "n64k128s8": (64, 128, 8, 4, 3), "n32k128s16": (32, 128, 16, 4, 2), "n16k128s16": (16, 128, 16, 4, 2),
        "n64k128s4": (64, 128, 4, 4, 3), "n128k128s4": (128, 128, 4, 4, 3), "n128k128s8": (128, 128, 8, 8, 3)}
# t: correctness
h = w4t_call(x, g["pt"], u["pt"], g["sz"], u["sz"], TCFG["n32k128s2"])
yv = w4t_call(h, d["pt"], None, d["sz"], None, TCFG["n32k128s8"])
out["w4t_rel_err_vs_fp32"] = float((yv.float() - ref).norm() / ref.norm())
yc = w4a16_gemm(w4a16_geglu(x, g["p"], u["p"], g["sz"], u["sz"], 128, "n32k256s2"), d["p"], d["sz"], 128, "n32k256s8")
out["cur_rel_err_vs_fp32"] = float((yc.float() - ref).norm() / ref.norm())
single = {}
for name, cfg in TCFG.items():
    for which, (n, k) in (("gu", (4096, 1024)), ("down", (1024, 4096))):
        if n % cfg[0] or k % (cfg[1] * cfg[2]): continue
        if which == "gu":
            fn = lambda cfg=cfg: [w4t_call(x, g["pt"], u["pt"], g["sz"], u["sz"], cfg) for g, u, d in layers]
        else:
            hh = torch.randn(10, 4096, device=dev, dtype=torch.bfloat16)
            fn = lambda cfg=cfg, hh=hh: [w4t_call(hh, d["pt"], None, d["sz"], None, cfg) for g, u, d in layers]
        try:
            single[f"w4t:{which}:{name}"] = chain_ms(fn)
        except Exception as e:
            single[f"w4t:{which}:{name}"] = repr(e)[:120]
for which, cfgs in (("gu", ["n32k256s1", "n32k256s2", "n64k128s4", "n16k256s4"]), ("down", ["n32k256s8", "n32k128s8", "n32k256s4", "n32k256s16"])):
    for c in cfgs:
        if which == "gu":
            fn = lambda c=c: [w4a16_geglu(x, g["p"], u["p"], g["sz"], u["sz"], 128, c) for g, u, d in layers]
        else:
            hh = torch.randn(10, 4096, device=dev, dtype=torch.bfloat16)
            fn = lambda c=c, hh=hh: [w4a16_gemm(hh, d["p"], d["sz"], 128, c) for g, u, d in layers]
        single[f"cur:{which}:{c}"] = chain_ms(fn)
hh = torch.randn(10, 4096, device=dev, dtype=torch.bfloat16)
tg = [torch.ops.aten._convert_weight_to_int4pack(d["p"], 8) for g, u, d in layers]
single["tinygemm:down"] = chain_ms(lambda: [torch.ops.aten._weight_int4pack_mm(hh, t, 128, d["sz"]) for t, (g, u, d) in zip(tg, layers)])
single["bf16:down"] = chain_ms(lambda: [F.linear(hh, d["w"]) for g, u, d in layers])
single["bf16:gu"] = chain_ms(lambda: [F.gelu(F.linear(x, g["w"]), approximate="tanh") * F.linear(x, u["w"]) for g, u, d in layers])
out["pairs"] = res; out["single_18"] = single
for section in ("pairs", "single_18"):
    for k, v in out[section].items():
        print(f"{section:>10} {k:>28} {v if isinstance(v, str) else f'{v:.3f} ms'}")
Path(args.out).write_text(json.dumps(out, indent=1))
