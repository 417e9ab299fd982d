"""Development probe (GPU): where our int4 mma pair spends its ~9 us per expert MLP at M = 10, by ablation.

    python research/probes/int4_ablation_probe.py --out research/results/int4_ablation_probe.json

research/probes/mlp_chain_floor_probe.py bounds a two-kernel MLP at ~3 us per MLP when its kernels do no math; ours take
~9. Here the int4 kernel's source (kernels/mma_small_m.cu, its int4 part only) is recompiled with one step
taken out at a time -- the results are wrong on purpose, only the time counts -- and the chain of 18 MLPs
(GeGLU t1w16s1 + down t1w8s1, the int4 backend's choice at M = 10 on H200; PDL on) is timed as bench's other
chains are (CUDA graph, cold weights, median of 30):

  no_wait    griddepcontrol.wait dropped: the kernel no longer waits for its predecessor
  no_x       x fragments made up from indices instead of loaded after the wait
  no_dequant weights fed to the MMA as raw bits (no nibble -> bf16 arithmetic)
  no_mma     MMAs replaced by one XOR-add per fragment (dequant kept)
  no_reduce  the cross-warp reduction dropped (warp 0 stores its own partial)
  skeleton   no_x + no_mma + no_reduce: weight loads, the wait, a store
  tree_reduce  the reduction as before reduce_store_parallel (a tree through shared memory, warp 0's epilogue)

Register counts of each compiled kernel are recorded beside (an ablation changes them, and with them how many
CTAs fit an SM). Not part of the backends.
"""
import argparse
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from evalkit.kernels import mma_small_m  # noqa: E402
from evalkit.backends.quant import int4_pack, time_cuda_ms  # noqa: E402
from evalkit.provenance import git_sha, package_versions  # noqa: E402

GU_CFG, DN_CFG = "t1w16s1", "t1w8s1"
# (text in the int4 kernel, its replacement) per ablation; each must occur exactly once in the int4 part
EDITS = {
    "no_wait": [("    wait_for_previous_kernel();\n", '    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");\n')],
    "no_x": [("xf[mh][p][h] = m < M ? ld_l2(reinterpret_cast<const u32x4*>(x + (size_t)m * K + k)) : u32x4{0, 0, 0, 0};",
              "xf[mh][p][h] = u32x4{(u32)m, (u32)k, 0u, 0u};")],
    "no_dequant": [("                        dequant_fragment(wv[e], sz, a);\n",
                    "                        a[0] = wv[e]; a[1] = sz.x; a[2] = sz.y; a[3] = wv[e] ^ sz.z;\n")],
    "no_mma": [("                        mma_bf16(acc + ((mat * NT + t) * MT + mh) * 4, a, b0, b1);\n",
                "                        acc[((mat * NT + t) * MT + mh) * 4] += __uint_as_float((a[0] ^ a[1] ^ a[2] ^ a[3] ^ b0 ^ b1) & 0x3F800000u);\n")],
    "no_reduce": [("    if (!reduce_warps<NACC, WARPS>(acc, red, warp, lane)) return;\n    store_out<NMAT, NT, MT, SPLIT>",
                   "    if (warp != 0) return;\n    store_out<NMAT, NT, MT, SPLIT>")],
}
# the cross-warp reduction as it was before reduce_store_parallel (a tree through shared memory, warp 0's epilogue)
EDITS["tree_reduce"] = [("    constexpr bool PAR = parallel_epilogue<NMAT, NT, MT, WARPS, SPLIT>();\n", "    constexpr bool PAR = false;\n")]
EDITS["no_reduce"] = EDITS["tree_reduce"] + EDITS["no_reduce"]  # the edit is in the tree path: make it the one that runs
EDITS["skeleton"] = EDITS["no_x"] + EDITS["no_mma"] + EDITS["no_reduce"]
FP8_PART = "// ================================================================================================ fp8 (W8A8)"


ORIGINAL_SOURCE = mma_small_m.SOURCE.read_text()


def ablated_source(name: str) -> str:
    src = ORIGINAL_SOURCE
    int4_part, rest = src.split(FP8_PART, 1)
    for old, new in EDITS.get(name, []):
        assert int4_part.count(old) == 1, (name, old)
        int4_part = int4_part.replace(old, new)
    return int4_part + FP8_PART + rest


def num_regs(kern) -> int:
    out = ctypes.c_int()
    res = mma_small_m._libcuda().cuFuncGetAttribute(ctypes.byref(out), 4, kern.func)  # NUM_REGS (kern.func is a c_void_p)
    return out.value if res == 0 else -1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t0 = time.time()

    def packed(n: int, k: int):
        return mma_small_m.pack_mma(*int4_pack(torch.randn(n, k, device=dev) * k ** -0.5, 128), 128)

    layers = [(packed(4096, 1024), packed(4096, 1024), packed(1024, 4096)) for _ in range(18)]
    x = torch.randn(10, 1024, device=dev, dtype=torch.bfloat16)

    def chain():
        return [mma_small_m.int4_mma_gemm(mma_small_m.int4_mma_geglu(x, g[0], u[0], g[1], u[1], 128, GU_CFG), d[0], d[1], 128, DN_CFG)
                for g, u, d in layers]

    sha, dirty = git_sha()
    result = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(), "versions": package_versions(),
              "git_sha": sha, "git_dirty": dirty, "configs": {"gate_up": GU_CFG, "down": DN_CFG}, "m": 10, "rows": {}}
    original = mma_small_m.SOURCE
    tmp = Path(tempfile.mkdtemp())
    try:
        for name in ["base", *EDITS]:
            path = tmp / f"mma_small_m_{name}.cu"
            path.write_text(ablated_source(name))
            mma_small_m.SOURCE = path
            mma_small_m._KERNELS.clear()
            ms, mode = time_cuda_ms(chain, 30)
            regs = {k[0]: num_regs(v) for k, v in mma_small_m._KERNELS.items()}
            result["rows"][name] = {"us_per_mlp": ms / 18 * 1000, "mode": mode, "registers": regs}
            print(f"{name:>11} {ms / 18 * 1000:6.2f} us/MLP ({mode})  registers {regs}", flush=True)
    finally:
        mma_small_m.SOURCE = original
        mma_small_m._KERNELS.clear()
    result["elapsed_s"] = time.time() - t0
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
