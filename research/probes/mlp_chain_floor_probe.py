"""Development probe (GPU): the least an int4 expert MLP at M = 10 can cost in a chain of dependent kernels.

    python research/probes/mlp_chain_floor_probe.py --out research/results/mlp_chain_floor_probe.json

Issue 4 asks for the int4 expert MLPs within 2x of their weight-read floor (bytes / copy bandwidth, 1.6 us per
MLP on an H200). Our kernels take ~8.8 us per MLP. This probe measures what *any* kernel design pays, with
kernels that do no math at all: each program reads its share of the MLP's weight bytes (before
`griddepcontrol.wait` under programmatic dependent launch, as our kernels do), then takes the dependent step
every GEMM has -- an L2 read of the predecessor's output, one store. Shapes of the chain, 18 MLPs in one CUDA
graph on cold weights (median of 30 replays after an L2 flush, bench's usual timing):

  two:     two kernels per MLP (gate|up 4 MiB, then down 2 MiB), the structure of our int4 path
  one:     one kernel per MLP reading all 6 MiB (no barrier: a lower bound for any one-launch MLP)
  barrier: one kernel per MLP with a grid-wide barrier between its two phases (what a one-launch MLP needs)
  empty:   two kernels per MLP that read nothing (the launch + dependency cost alone)
  reduce:  one kernel per MLP without a barrier: every program adds a partial of all 10 x 1024 outputs with fp32
           atomics and the last one to arrive converts them (a split-K down projection over the GeGLU's slices)

each with PDL on and off, and beside them our int4 mma pair and bf16 (cuBLAS) on real 1024 x 4096 MLPs in the
same run. Written in Triton (no library measures this); not part of the backends.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    print("error: research/probes/mlp_chain_floor_probe.py needs a CUDA GPU with Triton", file=sys.stderr)
    raise SystemExit(2)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from evalkit.kernels import mma_small_m  # noqa: E402
from evalkit.backends.quant import int4_pack, time_cuda_ms  # noqa: E402
from evalkit.latency.floors import copy_bandwidth_gbs  # noqa: E402
from evalkit.provenance import git_sha, package_versions  # noqa: E402

LAYERS = 18
OUTPUTS = 10 * 1024  # the down projection's outputs at M = 10: each split-K program adds a partial of every one
X_WORDS = 2048  # 8 KB of the predecessor's output read on the dependent path (x is 10 x 1024 bf16 = 20 KB; arange needs a power of 2)


@triton.jit
def read_then_step(w_ptr, w2_ptr, x_in, x_out, bar_ptr, PER: tl.constexpr, PER2: tl.constexpr, PDL: tl.constexpr,
                   BARRIER: tl.constexpr, XN: tl.constexpr):
    """Read PER (+ PER2) int32 of weights per program, wait for the predecessor, read XN words it wrote, store."""
    pid = tl.program_id(0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.sum(tl.load(w_ptr + pid.to(tl.int64) * PER + tl.arange(0, PER), cache_modifier=".cg"), 0)
    acc2 = 0
    if PER2 > 0:
        acc2 = tl.sum(tl.load(w2_ptr + pid.to(tl.int64) * PER2 + tl.arange(0, PER2), cache_modifier=".cg"), 0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    acc += tl.sum(tl.load(x_in + tl.arange(0, XN), cache_modifier=".cg"), 0)
    if BARRIER:
        # phase 1's output (h) visible, then a grid-wide barrier: a count that only grows, each program waits
        # for the next multiple of the grid size (graph replays need no reset)
        tl.store(x_out + XN + pid, acc)
        tl.debug_barrier()
        n = tl.num_programs(0)
        old = tl.atomic_add(bar_ptr, 1, sem="acq_rel")
        target = old - old % n + n
        cur = tl.atomic_add(bar_ptr, 0, sem="acquire")
        while cur < target:
            cur = tl.atomic_add(bar_ptr, 0, sem="acquire")
        acc += tl.sum(tl.load(x_out + XN + tl.arange(0, XN), cache_modifier=".cg"), 0)
    tl.store(x_out + pid, acc + acc2)


@triton.jit
def read_then_reduce(w_ptr, w2_ptr, x_in, x_out, acc_ptr, cnt_ptr, PER: tl.constexpr, PER2: tl.constexpr, PDL: tl.constexpr,
                     XN: tl.constexpr, OUTS: tl.constexpr, OUTS_P2: tl.constexpr):
    """The one-launch MLP without a barrier (split-K down): read the weights, wait, read x, add a partial of every
    output (OUTS fp32) into acc with atomics; the program that arrives last at cnt converts acc, stores and
    re-zeroes it (so replays need no reset)."""
    pid = tl.program_id(0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    s = tl.sum(tl.load(w_ptr + pid.to(tl.int64) * PER + tl.arange(0, PER), cache_modifier=".cg"), 0)
    s += tl.sum(tl.load(w2_ptr + pid.to(tl.int64) * PER2 + tl.arange(0, PER2), cache_modifier=".cg"), 0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    s += tl.sum(tl.load(x_in + tl.arange(0, XN), cache_modifier=".cg"), 0)
    offs = tl.arange(0, OUTS_P2)
    tl.atomic_add(acc_ptr + offs, tl.zeros([OUTS_P2], tl.float32) + s.to(tl.float32), mask=offs < OUTS, sem="relaxed")
    tl.debug_barrier()
    n = tl.num_programs(0)
    if tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == n - 1:
        v = tl.load(acc_ptr + offs, mask=offs < OUTS, other=0.0, cache_modifier=".cg")
        tl.store(x_out + offs, v.to(tl.int32), mask=offs < XN)
        tl.store(acc_ptr + offs, tl.zeros([OUTS_P2], tl.float32), mask=offs < OUTS)
        tl.atomic_xchg(cnt_ptr, 0)


def chain_us_per_mlp(fn) -> float:
    ms, mode = time_cuda_ms(fn, 30)
    assert mode == "graph", "the probe chains must capture"
    return ms / LAYERS * 1000


def probe(dev: torch.device, progs: int) -> dict:
    mib = 1 << 18  # int32 words in 1 MiB
    gu = [torch.randint(0, 7, (4 * mib,), device=dev, dtype=torch.int32) for _ in range(LAYERS)]
    dn = [torch.randint(0, 7, (2 * mib,), device=dev, dtype=torch.int32) for _ in range(LAYERS)]
    xs = [torch.zeros(2 * X_WORDS + 4096, device=dev, dtype=torch.int32) for _ in range(2)]
    bar = torch.zeros(1, device=dev, dtype=torch.int64)
    tiny = torch.zeros(progs * 16, device=dev, dtype=torch.int32)
    per_gu, per_dn = 4 * mib // progs, 2 * mib // progs

    def launch(w, w2, per, per2, i, pdl, barrier=False):
        read_then_step[(progs,)](w, w2, xs[i % 2], xs[(i + 1) % 2], bar, PER=per, PER2=per2, PDL=pdl, BARRIER=barrier,
                                 XN=X_WORDS, num_warps=4, launch_pdl=pdl)

    shapes = {
        "two": lambda pdl: [(launch(g, g, per_gu, 0, 2 * i, pdl), launch(d, d, per_dn, 0, 2 * i + 1, pdl)) for i, (g, d) in enumerate(zip(gu, dn))],
        "one": lambda pdl: [launch(g, d, per_gu, per_dn, i, pdl) for i, (g, d) in enumerate(zip(gu, dn))],
        "barrier": lambda pdl: [launch(g, d, per_gu, per_dn, i, pdl, barrier=True) for i, (g, d) in enumerate(zip(gu, dn))],
        "empty": lambda pdl: [(launch(tiny, tiny, 16, 0, 2 * i, pdl), launch(tiny, tiny, 16, 0, 2 * i + 1, pdl)) for i in range(LAYERS)],
    }
    acc = torch.zeros(OUTPUTS, device=dev, dtype=torch.float32)
    cnt = torch.zeros(1, device=dev, dtype=torch.int32)

    def launch_reduce(w, w2, i, pdl):
        read_then_reduce[(progs,)](w, w2, xs[i % 2], xs[(i + 1) % 2], acc, cnt, PER=per_gu, PER2=per_dn, PDL=pdl, XN=X_WORDS,
                                   OUTS=OUTPUTS, OUTS_P2=triton.next_power_of_2(OUTPUTS), num_warps=4, launch_pdl=pdl)

    shapes["reduce"] = lambda pdl: [launch_reduce(g, d, i, pdl) for i, (g, d) in enumerate(zip(gu, dn))]
    out = {}
    for name, fn in shapes.items():
        for pdl in (True, False):
            key = f"{name}:p{progs}:{'pdl' if pdl else 'no_pdl'}"
            out[key] = chain_us_per_mlp(lambda fn=fn, pdl=pdl: fn(pdl))
            print(f"{key:>24} {out[key]:7.2f} us/MLP", flush=True)
    return out


def real_mlps(dev: torch.device) -> dict:
    """Our int4 mma pair (the configs the int4 backend chose at M = 10 on H200) and bf16, same chain and timing."""
    def layer():
        ws = [torch.randn(n, k, device=dev) * k ** -0.5 for n, k in ((4096, 1024), (4096, 1024), (1024, 4096))]
        return [w.to(torch.bfloat16) for w in ws], [mma_small_m.pack_mma(*int4_pack(w, 128), 128) for w in ws]
    layers = [layer() for _ in range(LAYERS)]
    x = torch.randn(10, 1024, device=dev, dtype=torch.bfloat16)
    out = {"bf16": chain_us_per_mlp(lambda: [F.linear(F.gelu(F.linear(x, g), approximate="tanh") * F.linear(x, u), d)
                                             for (g, u, d), _ in layers])}
    for pdl in (True, False):
        out[f"int4_mma:{'pdl' if pdl else 'no_pdl'}"] = chain_us_per_mlp(lambda pdl=pdl: [
            mma_small_m.int4_mma_gemm(mma_small_m.int4_mma_geglu(x, g[0], u[0], g[1], u[1], 128, "t1w16s1", pdl), d[0], d[1], 128, "t1w8s1", pdl)
            for _, (g, u, d) in layers])
    for k, v in out.items():
        print(f"{k:>24} {v:7.2f} us/MLP", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--progs", default="128,256,512", help="programs per kernel (each reads an equal share)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: research/probes/mlp_chain_floor_probe.py needs a CUDA GPU", file=sys.stderr)
        raise SystemExit(2)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t0 = time.time()
    gbs = copy_bandwidth_gbs(dev)
    sha, dirty = git_sha()
    # the int4 MLP's real read bytes: gate, up (4096 x 1024) and down (1024 x 4096) nibbles + bf16 scale and zero per 128
    int4_bytes = 3 * 4096 * 1024 // 2 + 3 * 4096 * 1024 // 128 * 4
    result = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(), "versions": package_versions(),
              "git_sha": sha, "git_dirty": dirty,
              "copy_gbs": gbs, "probe_bytes_per_mlp": 6 << 20, "probe_floor_us_per_mlp": (6 << 20) / (gbs * 1e9) * 1e6,
              "int4_read_bytes_per_mlp": int4_bytes, "int4_floor_us_per_mlp": int4_bytes / (gbs * 1e9) * 1e6,
              "us_per_mlp": {}}
    print(f"copy {gbs:.0f} GB/s; probe floor {result['probe_floor_us_per_mlp']:.2f} us/MLP; "
          f"int4 floor {result['int4_floor_us_per_mlp']:.2f} us/MLP", flush=True)
    out_path = Path(args.out)
    for progs in (int(p) for p in args.progs.split(",")):
        result["us_per_mlp"].update(probe(dev, progs))
        out_path.write_text(json.dumps(result, indent=1))  # kept as it goes: a later part may hang
    result["us_per_mlp"].update(real_mlps(dev))
    result["elapsed_s"] = time.time() - t0
    out_path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
