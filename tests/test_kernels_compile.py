"""Our Triton kernels (decode attention, the fp8/int8 activation quantization, the int4 GEMMs and unpack)
compiled for Hopper (sm_90) on the CPU machine, with Triton's own frontend and ptxas: a kernel that does not
compile for the GPU (the interpreter that runs kernels on CPU checks neither types across branches nor
registers) or that spills to local memory where it must not fails here, before any GPU run. The decode
attention kernel once did both (docs/field_notes.md)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")  # the dev extra installs it; CUDA builds of torch bring their own

from evalkit.kernels import decode_attention as da  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

POINTERS = {"mask_ptr": "*i1", "ws_o_ptr": "*fp32", "ws_ml_ptr": "*fp32", "cnt_ptr": "*i32"}


def compile_sm90(fn, constexprs: dict, num_warps: int, pointers: dict[str, str], floats: set[str],
                 divisible: set[str] = frozenset(), options: dict | None = None, asm: str | None = None):
    """(registers, stack bytes) per thread of fn compiled for sm_90; other pointers bf16, other scalars i32.
    divisible: the arguments (pointers too) to specialize as multiples of 16, as Triton's launcher does for the
    real ones (vector loads); asm: also return that form of the code ("ptx")."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*bf16")
        else:
            sig[name] = "fp32" if name in floats else "i32"
        if name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                         target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, **(options or {})})
    usage = resource_usage(out.asm["cubin"])
    return usage if asm is None else (*usage, out.asm[asm])


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread of the one kernel in a cubin (cuobjdump, shipped with Triton)."""
    path = Path(tempfile.mkdtemp()) / "k.cubin"
    path.write_bytes(cubin)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage)[1]), int(re.search(r"STACK:(\d+)", usage)[1])


# what Triton's launcher specializes as multiples of 16 at π0.5's shapes (16-byte aligned tensors, strides of 256)
DECODE_DIVISIBLE = {"q_ptr", "k_ptr", "v_ptr", "mask_ptr", "o_ptr", "ws_o_ptr", "ws_ml_ptr", "cnt_ptr", "kn_ptr", "vn_ptr",
                    "cos_ptr", "sin_ptr", "sq_b", "sq_t", "sk_b", "sk_h", "sk_s", "sv_b", "sv_h", "sv_s", "so_b", "so_t",
                    "skn_b", "skn_t", "svn_b", "svn_t", "sc_b", "sc_t"}


def decode_consts(new: bool, has_mask: bool, pdl: bool) -> dict:
    """π0.5's shape: head_dim 256, 10 queries in a 16-row tile, 64-key blocks, 10 splits."""
    return dict(NSPLIT=10, KEYS=da.DEFAULT_KEYS_PER_SPLIT, BLOCK_M=16, BLOCK_N=da.DEFAULT_BLOCK_N, D=256,
                HAS_MASK=has_mask, PREC="tf32", NEW=new, PDL=pdl)


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("new", [True, False])  # the model's form (raw projections, RoPE inside) and the plain one
@pytest.mark.parametrize("has_mask", [True, False])
def test_decode_attention_compiles_for_hopper_without_spills(new, has_mask, pdl):
    """At the default warps, both without the launcher's specializations and with them (its vector loads)."""
    for divisible in (set(), DECODE_DIVISIBLE):
        regs, stack = compile_sm90(da._decode_attn_kernel, decode_consts(new, has_mask, pdl), da.DEFAULT_WARPS,
                                   POINTERS, {"qk_scale"}, divisible, {"launch_pdl": pdl})
        assert stack == 0, f"{regs} registers and {stack} bytes of stack per thread: the tiles spill"


@pytest.mark.parametrize("new", [True, False])
def test_decode_attention_under_pdl_loads_the_cache_before_its_wait_and_q_after(new):
    """Programmatic dependent launch: every program first lets the next kernel launch. In the new-keys form the
    cached-key programs load their K/V block and mask before griddepcontrol.wait (nothing in the step writes
    them) and the query after it (the previous kernel writes it); the plain form waits before its first load.
    Read off the sm_90 PTX: the new-keys program's branch comes first, then the cached keys' branch."""
    *_, ptx = compile_sm90(da._decode_attn_kernel, decode_consts(new, True, True), da.DEFAULT_WARPS, POINTERS,
                           {"qk_scale"}, DECODE_DIVISIBLE, {"launch_pdl": True}, asm="ptx")
    lines = [ln.strip() for ln in ptx.splitlines()]
    trigger = [i for i, ln in enumerate(lines) if ln.startswith("griddepcontrol.launch_dependents")]
    waits = [i for i, ln in enumerate(lines) if ln.startswith("griddepcontrol.wait")]
    loads = [i for i, ln in enumerate(lines) if re.match(r"(@%p\d+ )?ld\.global", ln)]
    assert len(trigger) == 1 and trigger[0] < loads[0]
    assert len(waits) == (2 if new else 1)
    cached_wait = waits[-1]
    # the cached keys' branch (the plain form has no other: from the trigger on)
    branch = max([i for i, ln in enumerate(lines[:cached_wait]) if ln.startswith("$L__BB")] + trigger)
    before = [i for i in loads if branch < i < cached_wait]
    vec_before = [i for i in before if ".v4." in lines[i]]
    if new:
        # K and V tiles [64, 256] bf16 in 16-byte loads over 256 threads: 8 each, and the mask's bytes
        assert len(vec_before) == 16, f"{len(vec_before)} vector loads before the cached keys' wait"
        after = [i for i in loads if cached_wait < i < cached_wait + 400]
        assert after, "the query is loaded after the wait"
    else:
        assert not before, "the plain form loads before it waits"
    plain = compile_sm90(da._decode_attn_kernel, decode_consts(new, True, False), da.DEFAULT_WARPS, POINTERS,
                         {"qk_scale"}, DECODE_DIVISIBLE, asm="ptx")[-1]
    assert "griddepcontrol" not in plain


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])  # fp32 models take IEEE fp32 dots
def test_decode_attention_at_tiny_head_dim_compiles(dtype):
    """pi05_tiny's head_dim 16 (the smallest tl.dot takes)."""
    consts = dict(NSPLIT=3, KEYS=64, BLOCK_M=16, BLOCK_N=64, D=16, HAS_MASK=True,
                  PREC="ieee" if dtype == "fp32" else "tf32", NEW=True, PDL=True)
    data = {n: f"*{dtype}" for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "kn_ptr", "vn_ptr", "cos_ptr", "sin_ptr")}
    compile_sm90(da._decode_attn_kernel, consts, da.DEFAULT_WARPS, {**POINTERS, **data}, {"qk_scale"})


FP8_OUT = {"q_ptr": "*fp8e4nv", "s_ptr": "*fp32"}


@pytest.mark.parametrize("block,warps,one_pass", [(16384, 16, True), (4096, 4, True), (4096, 8, False)])
def test_geglu_quant_fp8_compiles_without_spills(block, warps, one_pass):
    """The fp8 prefix MLP's gelu*up + per-token quantization, as geglu_quant_fp8 launches it (I = 16384, 4096)."""
    from evalkit.kernels import triton_kernels as tk

    _, stack = compile_sm90(tk._geglu_quant_kernel, dict(BLOCK=block, ONE_PASS=one_pass), warps, FP8_OUT, set())
    assert stack == 0


@pytest.mark.parametrize("int8", [False, True])
def test_rowwise_quant_compiles_without_spills(int8):
    from evalkit.kernels import triton_kernels as tk

    consts = dict(QMAX=127.0 if int8 else 448.0, IS_INT8=int8, BLOCK=4096)
    _, stack = compile_sm90(tk._rowwise_quant_kernel, consts, 8, {"q_ptr": "*i8" if int8 else "*fp8e4nv", "s_ptr": "*fp32"}, set())
    assert stack == 0


def test_every_int4_triton_config_compiles():
    """Every config the int4 chooser may time compiles for sm_90 (a config that does not would only be excluded
    at run time, with its error in the choice log). Some spill (the GeGLU n32k256 ones 280-288 bytes, large-M
    m128n256k64 552 bytes, offline ptxas): they stay candidates, the timing decides; the unpack kernel does not."""
    from evalkit.kernels import triton_kernels as tk

    ptrs = {"wa_ptr": "*u8", "wb_ptr": "*u8", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    for name, (bn, bk, split, warps, _) in tk.W4A16_CONFIGS.items():
        for geglu in (False, True):
            consts = dict(GROUP=128, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, NG=max(1, bk // 128), SPLIT=split, GEGLU=geglu)
            compile_sm90(tk._w4a16_splitk_kernel, consts, warps, ptrs, set())
    for name, (bm, bn, bk, warps, _) in tk.W4A16_LARGE_M_CONFIGS.items():
        consts = dict(GROUP=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NG=max(1, bk // 128), SPLIT=1, GEGLU=False)
        compile_sm90(tk._w4a16_splitk_kernel, consts, warps, ptrs, set())
    _, stack = compile_sm90(tk._int4_dequant_kernel, dict(GROUP=128, BLOCK_N=32, BLOCK_K=128, NG=1), 4, {"w_ptr": "*u8"}, set())
    assert stack == 0


# ------------------------------------------------------------------------------------------------ CUDA (NVRTC)
EXPERT_SHAPES = [(4096, 1024), (1024, 4096), (2048, 1024), (256, 1024), (1024, 2048), (2560, 1024)]  # N, K at M = 10


def _nvrtc_or_skip():
    from evalkit.kernels import mma_small_m

    try:
        mma_small_m._nvrtc()
    except RuntimeError as e:  # the dev extra installs nvidia-cuda-nvrtc; without it this module cannot check
        pytest.skip(str(e))
    return mma_small_m


def test_every_mma_kernel_instance_compiles_for_hopper():
    """Every instance of our M <= 16 CUDA kernels that a launch at π0.5's expert shapes can ask for (each config
    that tiles the shape; M <= 8 and <= 16; plain and GeGLU; the one-launch MLP), compiled by NVRTC for sm_90
    as the GPU run does it: a template or syntax error in mma_small_m.cu fails here, not on the device."""
    mm = _nvrtc_or_skip()
    instances = set()
    for n, k in EXPERT_SHAPES:
        for m in (1, 16):
            for nmat in (1, 2):
                instances |= {mm.int4_instance(m, nmat, c, k, 128) for c in mm.CONFIGS if mm.config_fits(c, n, k, 128)}
                instances |= {mm.fp8_instance(m, nmat, c, k) for c in mm.FP8_CONFIGS if mm.fp8_config_fits(c, n, k)}
    instances |= {mm.fp8_mlp_instance(m, 1024, 4096, c, 132) for c in mm.FP8_MLP_CONFIGS for m in (1, 16)}
    instances |= fused_layer_instances(mm)
    assert len(instances) > 50
    for inst in sorted(instances):
        cubin, name = mm.compile_cubin(inst, "sm_90")
        assert cubin and name.startswith("_Z"), inst


def fused_layer_instances(mm) -> set[str]:
    """The fp8 instances the fused expert layer can launch (evalkit/policies/pi05/fused_layer.py): the adaRMS norm folded
    into q|k|v (N = 2560) and gate|up (GeGLU, N = 4096) at K = 1024 where a CTA covers all of K; the gated residual
    add in o_proj's (K = 2048) and down's (K = 4096) epilogue, every config."""
    out = set()
    for m in (1, 16):
        for n, nmat in ((2560, 1), (4096, 2)):
            out |= {mm.fp8_instance(m, nmat, c, 1024, mm.EPI_NORM) for c in mm.FP8_CONFIGS
                    if mm.fp8_config_fits(c, n, 1024) and mm.fp8_norm_fits(c, 1024)}
        for k in (2048, 4096):
            out |= {mm.fp8_instance(m, 1, c, k, mm.EPI_RESID) for c in mm.FP8_CONFIGS if mm.fp8_config_fits(c, 1024, k)}
    return out


def test_the_fused_layer_kernels_at_the_profiled_configs_do_not_spill():
    """The norm and residual variants of the configs the profile ran (q|k|v t2w8s1, GeGLU t1w8s1, o_proj t1w8s1,
    down t1w8s2) use no local memory, and the norm variants stay within 128 registers, so two 8-warp CTAs fit an
    SM (the GeGLU grid is 256 CTAs: at one CTA per SM it would take two waves on 132 SMs)."""
    mm = _nvrtc_or_skip()
    for inst, max_regs in ((mm.fp8_instance(16, 1, "t2w8s1", 1024, mm.EPI_NORM), 128),
                           (mm.fp8_instance(16, 2, "t1w8s1", 1024, mm.EPI_NORM), 128),
                           (mm.fp8_instance(16, 1, "t1w8s1", 2048, mm.EPI_RESID), 255),
                           (mm.fp8_instance(16, 1, "t1w8s2", 4096, mm.EPI_RESID), 255)):
        regs, stack = resource_usage(mm.compile_cubin(inst, "sm_90")[0])
        assert stack == 0 and regs <= max_regs, f"{inst}: {regs} registers, {stack} bytes of stack"


def test_the_mma_kernels_the_profile_ran_do_not_spill():
    """The fp8 instances the committed π0.5 kernel profile ran (research/results/pi05_kernel_profile.json) use no
    local memory. (Other configs do spill -- the 16- and 32-warp ones with 8 blocks per warp, up to 400 bytes
    -- and stay candidates: the chooser's timing decides.)"""
    import json

    mm = _nvrtc_or_skip()
    prof = json.loads((Path(__file__).resolve().parents[1] / "research" / "results" / "pi05_kernel_profile.json").read_text())
    ran = {re.sub(r"\s", "", m[1]) for b in prof["backends"].values() for kern in b["kernels"]
           for m in [re.search(r"((?:fp8|int4)_mma_\w+<[\d, ]+>)", kern["kernel"])] if m}
    assert ran, "the profile names no mma kernel"
    for inst in sorted(ran):
        regs, stack = resource_usage(mm.compile_cubin(inst, "sm_90")[0])
        assert stack == 0, f"{inst}: {regs} registers, {stack} bytes of stack"
