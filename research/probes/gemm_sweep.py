"""Each backend's kernels on π0.5's targeted linear shapes across M, plus stacked-MLP timings (GPU).

    PYTHONUNBUFFERED=1 python research/probes/gemm_sweep.py --out research/results/gemm_sweep.json

Part 1 (sweep): one Linear of each distinct shape of the prefix MLP (2048->16384, 16384->2048) and the
expert MLP (1024->4096, 4096->1024), M in {1,10,50,256,712,968,4096,65536}: time (CUDA-graph replay,
median), TFLOP/s and GB/s, the floor max(FLOPs/peak, bytes/bandwidth) from measured ceilings, and the
error vs the bf16 output and vs an fp32 reference at every M (the last rows are checked separately: the
largest M catches 32-bit index overflow).
Part 2 (stacked): 18 GemmaMLPs (GeGLU, as in π0.5) run back to back in one CUDA graph, prefix at
M = 712 and 968 tokens, expert at M = 10 and 50: time, ratio to bf16 in the same run, weight-read floor.
Writes JSON after every row so a cut-short run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evalkit.backends.base import module_weight_bytes  # noqa: E402
from evalkit.backends.quant import CHOICE_LOG, KERNEL_CHOICE  # noqa: E402
from evalkit.backends.registry import get_backend  # noqa: E402
from evalkit.latency.floors import copy_bandwidth_gbs, matmul_peak_tflops  # noqa: E402
from bench.gpu_timing import graph_ms, read_bytes  # noqa: E402

SHAPES = {
    "prefix_mlp": [("gate_proj|up_proj", 2048, 16384), ("down_proj", 16384, 2048)],
    "expert_mlp": [("gate_proj|up_proj", 1024, 4096), ("down_proj", 4096, 1024)],
}
MS = [1, 10, 50, 256, 712, 968, 4096, 65536]
# label -> (backend name, options, which peak bounds its math)
VARIANTS = {
    "bf16": ("bf16", {}, "bf16"),
    "fp8": ("fp8", {}, "fp8"),
    "fp8_weight_only": ("fp8_weight_only", {}, "bf16"),
    "int8": ("int8", {}, "int8"),
    "int8_weight_only": ("int8_weight_only", {}, "bf16"),
    "int4": ("int4", {"mma_layers": "all"}, "bf16"),  # all: the per-linear sweep puts every shape under prefix.layers
    "int4:tinygemm": ("int4", {"kernel": "tinygemm"}, "bf16"),
    "int4:dequant_cublas": ("int4", {"kernel": "dequant_cublas"}, "bf16"),
    "int4:triton_w4a16": ("int4", {"kernel": "triton_w4a16"}, "bf16"),
    "int4:no_pdl": ("int4", {"pdl": False, "mma_layers": "all"}, "bf16"),  # our cuda_mma kernel launched plainly (no programmatic dependent launch)
    "sparse24": ("sparse24", {}, "bf16"),
    "sparse24:int8": ("sparse24", {"dtype": "int8"}, "int8"),
}
SMALL_M_ONLY = {"int4:triton_w4a16"}  # a small-M kernel: not timed where it is not meant to run
STACK = {"prefix_mlp": (2048, 16384, [712, 968]), "expert_mlp": (1024, 4096, [10, 50])}


def fp8_peak_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
    sa, sb = torch.ones(n, 1, device="cuda"), torch.ones(1, n, device="cuda")
    ms = graph_ms(lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True), 20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def int8_peak_tops(n: int = 8192) -> float:
    a = torch.randint(-127, 127, (n, n), device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 127, (n, n), device="cuda", dtype=torch.int8).t()
    ms = graph_ms(lambda: torch._int_mm(a, b), 20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def make_linear_module(label: str, w: torch.Tensor) -> nn.Module:
    """One Linear turned into `label`'s module (through the backend itself, so the sweep times what runs)."""
    name, opts, _ = VARIANTS[label]
    holder = nn.Module()
    holder.prefix = nn.Module()
    holder.prefix.layers = nn.ModuleList([nn.Module()])
    holder.prefix.layers[0].mlp = nn.Module()
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
    holder.prefix.layers[0].mlp.up_proj = lin
    report = get_backend(name, targets="prefix_mlp", **opts).apply(holder)
    mod = holder.prefix.layers[0].mlp.up_proj
    mod._bench_kernel = next(r.kernel for r in report.modules if r.name.endswith("up_proj"))
    return mod


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def sweep(result: dict, save, labels: list[str], sets: list[str], ms_list: list[int]) -> None:
    peaks = result["ceilings"]
    for set_name in sets:
        for shape_name, k, n in SHAPES[set_name]:
            torch.manual_seed(0)
            w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
            for label in labels:
                try:
                    mod = make_linear_module(label, w)
                except Exception as e:  # a backend the GPU cannot run: recorded, others go on
                    result["sweep_errors"].append({"set": set_name, "shape": shape_name, "backend": label, "error": repr(e)[:500]})
                    print(f"  {label}: {e}")
                    continue
                wbytes = module_weight_bytes(mod)
                for m in ms_list:
                    if label in SMALL_M_ONLY and m > 256:
                        continue
                    try:
                        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                        with torch.no_grad():
                            ref32 = x.float() @ w.float().t()
                            y_bf16 = x @ w.t()
                            y = mod(x)
                            ms = graph_ms(lambda: mod(x))
                        tail = slice(max(0, m - 1024), m)
                        peak = peaks[{"bf16": "bf16_tflops", "fp8": "fp8_tflops", "int8": "int8_tops"}[VARIANTS[label][2]]]
                        flops, nbytes = 2 * m * k * n, wbytes + 2 * m * k + 2 * m * n
                        floor = max(flops / (peak * 1e12), nbytes / (peaks["copy_gbs"] * 1e9)) * 1e3
                        row = {
                            "set": set_name, "shape": shape_name, "K": k, "N": n, "M": m, "backend": label,
                            "kernel": getattr(mod, "_bench_kernel", ""), "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12,
                            "gbs": nbytes / (ms * 1e-3) / 1e9, "floor_ms": floor, "x_floor": ms / floor,
                            "weight_bytes": wbytes, "rel_err_vs_bf16": rel(y, y_bf16), "rel_err_vs_fp32": rel(y, ref32),
                            "tail_rel_err_vs_fp32": rel(y[tail], ref32[tail]), "finite": bool(torch.isfinite(y).all()),
                        }
                        if hasattr(mod, "choose"):
                            row["kernel_choice"] = mod.choose(x)
                        result["sweep"].append(row)
                        print(f"{set_name:>10} {shape_name:>18} M={m:>6} {label:>20} {ms * 1e3:9.1f} us "
                              f"{row['tflops']:7.1f} TF/s {row['gbs']:7.0f} GB/s x_floor {row['x_floor']:5.2f} "
                              f"err_bf16 {row['rel_err_vs_bf16']:.4f} tail {row['tail_rel_err_vs_fp32']:.4f}", flush=True)
                        del x, ref32, y_bf16, y
                    except Exception as e:
                        traceback.print_exc()
                        result["sweep_errors"].append({"set": set_name, "shape": shape_name, "M": m, "backend": label, "error": repr(e)[:500]})
                    torch.cuda.empty_cache()
                    save()
                del mod
                torch.cuda.empty_cache()


def stacked(result: dict, save, labels: list[str], depth: int, sets: list[str]) -> None:
    from evalkit.policies.pi05.layers import GemmaMLP

    peaks = result["ceilings"]
    for set_name, (width, mlp_dim, ms_list) in STACK.items():
        if set_name not in sets:
            continue
        stack_name = set_name.split("_")[0]
        base_ms: dict[int, float] = {}
        base_out: dict[int, torch.Tensor] = {}
        for label in labels:
            name, opts, peak_kind = VARIANTS[label]
            try:
                torch.manual_seed(1)
                holder = nn.Module()
                setattr(holder, stack_name, nn.Module())
                layers = nn.ModuleList()
                for _ in range(depth):
                    shell = nn.Module()
                    with torch.device("cuda"):  # init on the GPU: CPU init of 18 x 100M weights takes long
                        shell.mlp = GemmaMLP(width, mlp_dim).to(torch.bfloat16)
                    for lin in (shell.mlp.gate_proj, shell.mlp.up_proj, shell.mlp.down_proj):
                        nn.init.normal_(lin.weight, 0.0, lin.in_features**-0.5)
                    layers.append(shell)
                getattr(holder, stack_name).layers = layers
                report = get_backend(name, targets=set_name, **opts).apply(holder)
            except Exception as e:
                result["stacked_errors"].append({"set": set_name, "backend": label, "error": repr(e)[:500]})
                print(f"  stacked {label}: {e}")
                continue
            wbytes = module_weight_bytes(holder)
            rbytes = read_bytes(holder)
            kernels = sorted({r.kernel for r in report.modules if ".mlp." in r.name})
            for m in ms_list:
                if label in SMALL_M_ONLY and m > 64:
                    continue
                try:
                    torch.manual_seed(2)
                    x = torch.randn(m, width, device="cuda", dtype=torch.bfloat16)

                    def run():  # every layer's MLP on the same input: no residual growth, same work as the model
                        return [layer.mlp(x) for layer in layers]

                    with torch.no_grad():
                        out = torch.cat([o.float().flatten() for o in run()])
                        ms = graph_ms(run)
                    if label == "bf16":
                        base_ms[m], base_out[m] = ms, out
                    flops = depth * 3 * 2 * m * width * mlp_dim
                    peak = peaks[{"bf16": "bf16_tflops", "fp8": "fp8_tflops", "int8": "int8_tops"}[peak_kind]]
                    read_floor = rbytes / (peaks["copy_gbs"] * 1e9) * 1e3
                    floor = max(flops / (peak * 1e12) * 1e3, read_floor)
                    row = {
                        "set": set_name, "depth": depth, "M": m, "backend": label, "kernels": kernels, "ms": ms,
                        "speedup_vs_bf16": base_ms[m] / ms if m in base_ms else None,
                        "weight_bytes": wbytes, "read_bytes": rbytes, "weight_read_floor_ms": read_floor, "floor_ms": floor,
                        "x_weight_read_floor": ms / read_floor, "x_floor": ms / floor,
                        "out_cosine_vs_bf16": float(torch.nn.functional.cosine_similarity(out.float().flatten(), base_out[m].float().flatten(), dim=0)) if m in base_out else None,
                    }
                    if label.startswith(("int4", "int8_weight_only", "fp8")):
                        row["kernel_choices"] = {str(k): v for k, v in KERNEL_CHOICE.items() if k[4] == m}
                        row["kernel_choice_log"] = {str(k): v for k, v in CHOICE_LOG.items() if k[4] == m}
                    result["stacked"].append(row)
                    print(f"STACK {set_name:>10} x{depth} M={m:>4} {label:>20} {ms:8.3f} ms  x{row['speedup_vs_bf16'] or 0:5.2f} vs bf16  "
                          f"{row['x_weight_read_floor']:5.2f}x read floor  floor {floor:.3f} ms  cos {row['out_cosine_vs_bf16']}", flush=True)
                except Exception as e:
                    traceback.print_exc()
                    result["stacked_errors"].append({"set": set_name, "M": m, "backend": label, "error": repr(e)[:500]})
                save()
            del holder, layers
            torch.cuda.empty_cache()


def _triton_version() -> str:
    from evalkit.kernels.triton_kernels import triton_available

    return triton_available() or "not installed"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="research/results/gemm_sweep.json")
    ap.add_argument("--backends", default=",".join(VARIANTS))
    ap.add_argument("--sets", default="prefix_mlp,expert_mlp")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--parts", default="stacked,sweep")
    ap.add_argument("--depth", type=int, default=18)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: research/probes/gemm_sweep.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from evalkit.provenance import git_sha, package_versions

    t0 = time.time()
    dev = torch.device("cuda")
    sha, dirty = git_sha()
    result: dict = {
        "command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(dev),
        "capability": list(torch.cuda.get_device_capability(dev)),
        "versions": {**package_versions(), "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _triton_version()},
        "git_sha": sha, "git_dirty": dirty, "ceilings": {}, "stacked": [], "stacked_errors": [], "sweep": [], "sweep_errors": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        result["elapsed_s"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(result, indent=2))

    result["ceilings"] = {
        "bf16_tflops": matmul_peak_tflops(dev), "fp8_tflops": fp8_peak_tflops(), "int8_tops": int8_peak_tops(),
        "copy_gbs": copy_bandwidth_gbs(dev),
    }
    print("ceilings", result["ceilings"], flush=True)
    save()
    labels = [b for b in args.backends.split(",") if b]
    if "stacked" in args.parts:
        stacked(result, save, labels, args.depth, args.sets.split(","))
    if "sweep" in args.parts:
        sweep(result, save, labels, args.sets.split(","), [int(m) for m in args.ms.split(",")])
    save()
    print_tables(result)
    return 0


def print_tables(result: dict) -> None:
    print(f"\n{result['device']} ceilings {result['ceilings']}")
    print(f"{'stack':>10} {'M':>5} {'backend':>20} {'ms':>8} {'x bf16':>7} {'x read floor':>12} {'x floor':>8} {'cos':>8}")
    for r in result["stacked"]:
        print(f"{r['set']:>10} {r['M']:>5} {r['backend']:>20} {r['ms']:8.3f} {r['speedup_vs_bf16'] or 0:7.2f} "
              f"{r['x_weight_read_floor']:12.2f} {r['x_floor']:8.2f} {r['out_cosine_vs_bf16'] or 0:8.5f}")
    for e in result["stacked_errors"] + result["sweep_errors"]:
        print("ERROR", e)


if __name__ == "__main__":
    raise SystemExit(main())
