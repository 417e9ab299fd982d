"""The native GPU engines on pi05_tiny-shaped work (run on the device machine: `pytest -m gpu tests/test_backends_gpu.py`).

Same checks as the CPU tests: the report matches the module state, each kernel computes what its
module stores (so a scale the kernel drops fails here), and nothing falls back silently.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from evalkit.backends.quant import QuantLinear, fake_quant_fp8_rows
from evalkit.backends.registry import get_backend
from evalkit.backends.verify import verify_report
from torch import nn

from tests.conftest import quant_linear_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NATIVE = [("fp8", {}), ("fp8_weight_only", {}), ("int8", {}), ("int8_weight_only", {}), ("int4", {}),
          ("int4", {"kernel": "tinygemm"}), ("int4", {"kernel": "dequant_cublas"}), ("sparse24", {})]
TRITON_INT4 = [("int4", {"kernel": f"triton_w4a16:{c}"}) for c in ("n16k128s1", "n32k256s1", "n32k256s2")]
MMA_INT4 = [("int4", {"kernel": "cuda_mma"}), ("int4", {"kernel": "cuda_mma:t1w8s1"}), ("int4", {"kernel": "cuda_mma", "pdl": False})]
WIDTH, MLP_DIM = 512, 1024  # K = 512 and 1024: room for the split-K configs


def mlp_stack(depth: int = 2, width: int = WIDTH, mlp_dim: int = MLP_DIM) -> nn.Module:
    from evalkit.policies.pi05.layers import GemmaMLP

    root = nn.Module()
    root.prefix = nn.Module()
    root.prefix.layers = nn.ModuleList()
    for _ in range(depth):
        shell = nn.Module()
        shell.mlp = GemmaMLP(width, mlp_dim)
        root.prefix.layers.append(shell)
    return root.cuda()


@pytest.mark.parametrize("name,opts", NATIVE + TRITON_INT4 + MMA_INT4, ids=[f"{n}-{o.get('kernel', 'auto')}" for n, o in NATIVE + TRITON_INT4 + MMA_INT4])
@pytest.mark.parametrize("m", [1, 10, 50, 712, 4099])
def test_native_kernels_match_stored_weights(name, opts, m):
    if str(opts.get("kernel", "")).startswith("triton") and m > 64:
        pytest.skip("small-M kernel")
    if str(opts.get("kernel", "")).startswith("cuda_mma") and m > 16:
        pytest.skip("M <= 16 kernel")
    torch.manual_seed(0)
    model = mlp_stack()
    report = get_backend(name, targets="prefix_mlp", **opts).apply(model)
    assert verify_report(model, report) == []
    assert report.latency_representative
    for n, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            x = torch.randn(m, mod.in_features, device="cuda", dtype=torch.bfloat16)
            got = mod(x).float()
            assert torch.isfinite(got).all()
            want = quant_linear_reference(mod, x.float())
            err = float((got - want).norm() / want.norm())
            assert err < 0.02, f"{name} {n} M={m}: kernel vs stored weights {err}"


def test_fp8_native_really_uses_fp8_storage_and_scaled_mm():
    model = mlp_stack()
    report = get_backend("fp8", targets="prefix_mlp").apply(model)
    rows = [r for r in report.modules if ".mlp." in r.name]
    assert all("torch._scaled_mm" in r.kernel and r.weight_dtype.startswith("torch.float8_e4m3fn") for r in rows)
    assert any("compute capability" in n for n in report.notes)


def fused_mlp_case(backend: str, fused_cls: type, m: int, **opts):
    """The backend on a two-layer MLP stack (report checked against the modules): layer 0's MLP, which must be
    the backend's fused GeGLU wrapper, the report and an [m, WIDTH] bf16 input."""
    torch.manual_seed(0)
    model = mlp_stack()
    report = get_backend(backend, targets="prefix_mlp", **opts).apply(model)
    assert verify_report(model, report) == []
    mlp = model.prefix.layers[0].mlp
    assert isinstance(mlp, fused_cls)
    return mlp, report, torch.randn(m, WIDTH, device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize("m", [1, 10, 712])
def test_fused_fp8_mlp_matches_its_stored_weights(m):
    from evalkit.backends.fp8 import Fp8GemmaMLP

    mlp, report, x = fused_mlp_case("fp8", Fp8GemmaMLP, m)
    assert any("fused 2 GeGLU" in n for n in report.notes)
    xq = fake_quant_fp8_rows(x.float())
    g = F.linear(xq, mlp.gate_proj.dequantized_weight()).to(torch.bfloat16).float()
    u = F.linear(xq, mlp.up_proj.dequantized_weight()).to(torch.bfloat16).float()
    h = fake_quant_fp8_rows(F.gelu(g, approximate="tanh") * u)
    want = F.linear(h, mlp.down_proj.dequantized_weight())
    got = mlp(x).float()
    assert float((got - want).norm() / want.norm()) < 0.03
    # gate and up run as one GEMM over stacked weights the children view (bytes counted once) ...
    assert mlp.gate_proj.qweight.untyped_storage().data_ptr() == mlp.up_proj.qweight.untyped_storage().data_ptr()
    # ... and what runs follows the children: unit scales injected into them reach the stacked GEMM
    for p in (mlp.gate_proj, mlp.up_proj):
        p.ignore_scales()
    g = F.linear(xq, mlp.gate_proj.dequantized_weight()).to(torch.bfloat16).float()
    u = F.linear(xq, mlp.up_proj.dequantized_weight()).to(torch.bfloat16).float()
    want = F.linear(fake_quant_fp8_rows(F.gelu(g, approximate="tanh") * u), mlp.down_proj.dequantized_weight())
    got = mlp(x).float()
    assert float((got - want).norm() / want.norm()) < 0.03


@pytest.mark.parametrize("k", [1024, 16384, 20000])  # one pass (row in registers) up to 16384, two passes above
def test_geglu_quant_fp8_against_torch(k):
    from evalkit.kernels.triton_kernels import geglu_quant_fp8

    torch.manual_seed(0)
    gu = torch.randn(7, 2 * k, device="cuda", dtype=torch.bfloat16)
    g, u = gu[:, :k], gu[:, k:]  # strided row views, as the stacked gate|up GEMM's output
    q, s = geglu_quant_fp8(g, u)
    h = F.gelu(g.float(), approximate="tanh") * u.float()
    assert torch.allclose(s[:, 0], h.abs().amax(-1) / 448.0, rtol=1e-5)
    want = fake_quant_fp8_rows(h)
    assert float((q.float() * s - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("m", [1, 10, 50])
def test_fused_int4_mlp_matches_its_stored_weights(m):
    from evalkit.backends.int4 import Int4GemmaMLP

    mlp, _, x = fused_mlp_case("int4", Int4GemmaMLP, m, mma_layers="all")
    g = F.linear(x.float(), mlp.gate_proj.dequantized_weight())
    u = F.linear(x.float(), mlp.up_proj.dequantized_weight())
    want = F.linear((F.gelu(g, approximate="tanh") * u).to(torch.bfloat16).float(), mlp.down_proj.dequantized_weight())
    fused = [mlp._fused_triton(x, c) for c in mlp.gate_proj.triton_configs()]
    assert len(fused) >= 3  # a split-K config included
    if m <= 16:
        mma = [mlp._fused_mma(x, c) for c in mlp.gate_proj.mma_configs()]
        assert len(mma) >= 3
        fused += mma
    for got in fused + [mlp._per_linear(x), mlp(x)]:
        assert float((got.float() - want).norm() / want.norm()) < 0.02


def int4_case(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random [n, k] weight as the int4 backend stores it (packed nibbles, bf16 scales+zeros) and the fp32
    weight those hold, the reference for the kernels."""
    from evalkit.backends.quant import dequant_int4_groups, int4_pack, unpack_nibbles

    packed, sz = int4_pack(torch.randn(n, k, device="cuda"), 128)
    return packed, sz, dequant_int4_groups(unpack_nibbles(packed), sz[..., 0].t(), sz[..., 1].t(), 128)


def check_repeated_and_replayed(run, wants: tuple[torch.Tensor, ...], label: str, tol: float = 1e-2) -> None:
    """run() twice eagerly and three times as CUDA-graph replays; each output against its reference (the
    split-K arrival counters must be left at zero by every launch for the later calls to be right)."""
    from evalkit.backends.quant import capture_cuda_graph

    outs = [run(), run()]
    g, captured = capture_cuda_graph(run)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        outs.append(tuple(t.clone() for t in captured))
    for out in outs:
        for got, want in zip(out, wants):
            assert float((got.float() - want).norm() / want.norm()) < tol, label


@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 4096)])  # the expert MLP's shapes
@pytest.mark.parametrize("m", [1, 10, 50])
def test_split_k_int4_kernels_at_expert_shapes_also_in_graph_replays(n, k, m):
    """Every split-K config: the plain and GeGLU kernels against the dequantized weights, called repeatedly
    and replayed in a CUDA graph (the arrival counters must be left at zero by every launch)."""
    from evalkit.kernels.triton_kernels import (
        W4A16_CONFIGS,
        w4a16_config_fits,
        w4a16_geglu,
        w4a16_gemm,
    )

    torch.manual_seed(0)
    (qa, sza, wa), (qb, szb, wb) = (int4_case(n, k) for _ in range(2))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x.float(), wa)
    want_g = F.gelu(want, approximate="tanh") * F.linear(x.float(), wb)
    configs = [c for c in W4A16_CONFIGS if w4a16_config_fits(c, n, k, 128)]
    assert any(W4A16_CONFIGS[c][2] > 1 for c in configs)
    for c in configs:
        run = lambda c=c: (w4a16_gemm(x, qa, sza, 128, c), w4a16_geglu(x, qa, qb, sza, szb, 128, c))
        check_repeated_and_replayed(run, (want, want_g), c)


@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 4096)])
@pytest.mark.parametrize("m", [65, 712, 4099])
def test_large_m_int4_kernels_and_dequant(n, k, m):
    """The prefill paths: every large-M tile config and the one-kernel unpack, against the dequantized weights."""
    from evalkit.kernels.triton_kernels import (
        W4A16_LARGE_M_CONFIGS,
        int4_dequant,
        w4a16_config_fits,
        w4a16_gemm,
    )

    torch.manual_seed(0)
    packed, sz, w = int4_case(n, k)
    torch.testing.assert_close(int4_dequant(packed, sz, 128, torch.float32), w, rtol=1e-6, atol=1e-6)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x.float(), w)
    configs = [c for c in W4A16_LARGE_M_CONFIGS if w4a16_config_fits(c, n, k, 128)]
    assert configs
    for c in configs:
        got = w4a16_gemm(x, packed, sz, 128, c).float()
        assert float((got - want).norm() / want.norm()) < 1e-2, c


@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 4096)])  # the expert MLP's shapes
@pytest.mark.parametrize("m", [1, 8, 10, 16])
def test_int4_mma_kernel_every_config_also_in_graph_replays(n, k, m):
    """Our CUDA mma kernel (plain and GeGLU), every config that tiles the shape (split ones included), against
    the dequantized weights: called repeatedly and replayed in a CUDA graph (split counters reset)."""
    from evalkit.kernels import mma_small_m

    torch.manual_seed(0)
    (qa, sza, wa), (qb, szb, wb) = (int4_case(n, k) for _ in range(2))
    (pa, spa), (pb, spb) = mma_small_m.pack_mma(qa, sza, 128), mma_small_m.pack_mma(qb, szb, 128)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x.float(), wa)
    want_g = F.gelu(want, approximate="tanh") * F.linear(x.float(), wb)
    configs = [c for c in mma_small_m.CONFIGS if mma_small_m.config_fits(c, n, k, 128)]
    assert any(mma_small_m.parse_config(c)[2] > 1 for c in configs) and len(configs) >= 6
    for c in configs:
        run = lambda c=c: (mma_small_m.int4_mma_gemm(x, pa, spa, 128, c), mma_small_m.int4_mma_geglu(x, pa, pb, spa, spb, 128, c))
        check_repeated_and_replayed(run, (want, want_g), c)


def test_int4_mma_kernel_applies_replaced_scales_and_compiles():
    """fault_ignored_scale's unit scales reach the mma packing (what runs is what scales_zeros holds), and the
    custom op runs under torch.compile(fullgraph=True)."""
    from evalkit.kernels import mma_small_m

    torch.manual_seed(0)
    model = mlp_stack(depth=1)
    get_backend("int4", targets="prefix_mlp", kernel="cuda_mma").apply(model)
    mod = model.prefix.layers[0].mlp.gate_proj
    x = torch.randn(10, mod.in_features, device="cuda", dtype=torch.bfloat16)
    before = mod(x).float()
    mod.ignore_scales()
    after = mod(x).float()
    want = quant_linear_reference(mod, x.float())
    assert float((after - want).norm() / want.norm()) < 0.02
    assert float((after - before).norm() / before.norm()) > 0.5
    compiled = torch.compile(lambda t: mma_small_m.int4_mma_gemm(t, mod.mma_words, mod.mma_sz, 128, "t1w4s1"), fullgraph=True)
    torch.testing.assert_close(compiled(x), mod(x))


def test_int4_mma_packing_only_where_m_is_small_by_default():
    """The mma kernel's extra packing is made for the action expert's layers (M = horizon x batch), not for the
    prefix (M = prefix tokens), unless options.mma_layers or a forced cuda_mma kernel asks for it."""
    from evalkit.backends.int4 import Int4Linear

    def packed(targets: str, **opts) -> dict[str, bool]:
        root = nn.Module()
        for stack in ("prefix", "expert"):
            setattr(root, stack, mlp_stack(depth=1).prefix)
        root.cuda()
        get_backend("int4", targets=targets, **opts).apply(root)
        return {n: hasattr(m, "mma_words") for n, m in root.named_modules() if isinstance(m, Int4Linear)}

    default = packed("prefix_mlp,expert_mlp")
    assert default and all(v == n.startswith("expert.") for n, v in default.items())
    assert all(packed("prefix_mlp", mma_layers="all").values())
    assert not any(packed("expert_mlp", mma_layers="none").values())


@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 4096), (2048, 1024), (256, 1024)])  # expert MLP and attention shapes
@pytest.mark.parametrize("m", [1, 10, 16])
def test_fp8_mma_kernel_every_config_also_in_graph_replays(n, k, m):
    """Our fp8 M <= 16 kernel (x quantized per token inside it), plain and GeGLU, every config that tiles the
    shape, against the same W8A8 math in fp32 torch; repeated and replayed in a CUDA graph."""
    from evalkit.backends.quant import quant_fp8_rows
    from evalkit.kernels import mma_small_m

    torch.manual_seed(0)
    (qa, sa), (qb, sb) = quant_fp8_rows(torch.randn(n, k, device="cuda")), quant_fp8_rows(torch.randn(n, k, device="cuda"))
    pa, pb = mma_small_m.pack_fp8_mma(qa), mma_small_m.pack_fp8_mma(qb)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    s_gu = torch.cat([sa, sb]).contiguous()
    configs = [c for c in mma_small_m.FP8_CONFIGS if mma_small_m.fp8_config_fits(c, n, k)]
    assert configs
    for c in configs:  # x scales per token and per warp K slice (the config's)
        xdq = mma_small_m.fake_quant_fp8_slices(x, mma_small_m.fp8_kslice(c, k))
        want = (xdq @ qa.float().t()) * sa[None, :]
        want_g = F.gelu(want, approximate="tanh") * ((xdq @ qb.float().t()) * sb[None, :])
        run = lambda c=c: (mma_small_m.fp8_mma_gemm(x, pa, sa, c), mma_small_m.fp8_mma_geglu(x, pa, pb, s_gu, c))
        check_repeated_and_replayed(run, (want, want_g), c)


@pytest.mark.parametrize("d,f", [(1024, 4096), (WIDTH, MLP_DIM)])  # the expert MLP; the tests' stack
@pytest.mark.parametrize("m", [1, 10, 16])
def test_fp8_whole_mlp_kernel_is_the_two_launch_math_also_in_graph_replays(d, f, m):
    """fp8_mma_mlp (GeGLU, grid barrier, down in one launch), every warp count that tiles the shape: bit-identical
    to fp8_mma_geglu + fp8_mma_gemm under the configs it reproduces, near the fp32 math of the same scaling, and
    right again after repeated launches and CUDA-graph replays (the barrier's generation and the split-K
    counters carry over between launches)."""
    from evalkit.backends.quant import quant_fp8_rows
    from evalkit.kernels import mma_small_m

    torch.manual_seed(0)
    (qg, sg), (qu, su), (qd, sd) = (quant_fp8_rows(torch.randn(n, k, device="cuda") * 0.05)
                                    for n, k in ((f, d), (f, d), (d, f)))
    pg, pu, pd = (mma_small_m.pack_fp8_mma(q) for q in (qg, qu, qd))
    s_gu = torch.cat([sg, su]).contiguous()
    x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    plans = [c for c in mma_small_m.FP8_MLP_CONFIGS if mma_small_m.fp8_mlp_plan(d, f, c)]
    assert plans
    for w in plans:
        c1, c2 = mma_small_m.fp8_mlp_configs(d, f, w)
        two = mma_small_m.fp8_mma_gemm(mma_small_m.fp8_mma_geglu(x, pg, pu, s_gu, c1), pd, sd, c2)
        one = mma_small_m.fp8_mma_mlp(x, pg, pu, s_gu, pd, sd, w)
        assert torch.equal(one, two), w
        x1 = mma_small_m.fake_quant_fp8_slices(x, mma_small_m.fp8_kslice(c1, d))
        g, u = (x1 @ qg.float().t()) * sg[None, :], (x1 @ qu.float().t()) * su[None, :]
        h = (F.gelu(g, approximate="tanh") * u).to(torch.bfloat16)
        want = (mma_small_m.fake_quant_fp8_slices(h, mma_small_m.fp8_kslice(c2, f)) @ qd.float().t()) * sd[None, :]
        # two e4m3 roundings (x, h): an e4m3 step is 6 %, so a few elements rounded the other way by fp32
        # summation order move a 1-row output by ~1 %
        check_repeated_and_replayed(lambda w=w: (mma_small_m.fp8_mma_mlp(x, pg, pu, s_gu, pd, sd, w),), (want,), w, 3e-2)


def test_fp8_backend_uses_the_mma_kernel_on_the_expert_and_matches_its_weights():
    """fp8 on an expert-named stack: the fragment copy exists there only, the M = 10 forward (whatever the
    chooser picks) matches the stored e4m3 weights, and the chooser timed the mma candidates."""
    from evalkit.backends.fp8 import Fp8Linear
    from evalkit.backends.quant import CHOICE_LOG, KERNEL_CHOICE
    from evalkit.kernels import mma_small_m

    torch.manual_seed(0)
    root = nn.Module()
    for stack in ("prefix", "expert"):
        setattr(root, stack, mlp_stack(depth=1).prefix)
    root.cuda()
    report = get_backend("fp8", targets="prefix_mlp,expert_mlp").apply(root)
    assert verify_report(root, report) == []
    mods = {n: m for n, m in root.named_modules() if isinstance(m, Fp8Linear)}
    assert all(hasattr(m, "mma_words") == n.startswith("expert.") for n, m in mods.items())
    mlp = root.expert.layers[0].mlp
    x = torch.randn(10, WIDTH, device="cuda", dtype=torch.bfloat16)
    got = mlp(x).float()

    def reference(lin, x2, choice):  # what lin computes under a kernel choice, from its stored tensors
        if choice.startswith(("cuda_mma:", "fused_mma:")):  # x scaled per token and per the config's K slice
            return lin.mma_reference(x2, choice.partition(":")[2])
        return quant_linear_reference(lin, x2.float())

    def want_for(choice):
        g, u = reference(mlp.gate_proj, x, choice), reference(mlp.up_proj, x, choice)
        h = (F.gelu(g, approximate="tanh") * u).to(torch.bfloat16)
        down = mlp.down_proj
        return reference(down, h, KERNEL_CHOICE.get(("fp8", 0, down.out_features, down.in_features, 10), "scaled_mm")).float()

    mlp_choice = KERNEL_CHOICE[("fp8mlp", 0, mlp.gate_proj.out_features, WIDTH, 10)]
    want = want_for(mlp_choice)
    assert float((got - want).norm() / want.norm()) < 0.03, mlp_choice
    for cfg in mlp.gate_proj.mma_configs:  # every fused mma candidate, whatever the chooser kept
        h = mma_small_m.fp8_mma_geglu(x, mlp.gate_proj.mma_words, mlp.up_proj.mma_words, mlp._gu[1], cfg)
        alt = mlp.down_proj(h).float()
        want = want_for(f"fused_mma:{cfg}")
        assert float((alt - want).norm() / want.norm()) < 0.03, cfg
    logs = [v for k, v in CHOICE_LOG.items() if k[0] == "fp8mlp" and k[4] == 10]
    assert logs and any(name.startswith("fused_mma:") and isinstance(t, float) for name, t in logs[-1].items())


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_fused_qkv_matches_each_projection_and_follows_replaced_scales(kind):
    """q|k|v stacked into one mma launch (backends/fused_qkv.py) on an expert attention layer: every config
    against the projections' exact math, the chooser's pick through GemmaAttention.qkv, no byte stored twice,
    and a projection whose scales are replaced afterwards (fault_ignored_scale) is what runs."""
    from evalkit.backends.fused_qkv import FusedQKV

    from evalkit.policies.pi05.config import GemmaSize
    from evalkit.policies.pi05.layers import GemmaAttention

    torch.manual_seed(0)
    size = GemmaSize(width=WIDTH, depth=1, mlp_dim=MLP_DIM, num_heads=8, num_kv_heads=1, head_dim=64)
    root = nn.Module()
    root.expert = nn.Module()
    root.expert.layers = nn.ModuleList([nn.Module()])
    root.expert.layers[0].self_attn = GemmaAttention(size, 0)
    root.cuda()
    report = get_backend(kind, targets="expert_attn").apply(root)
    assert verify_report(root, report) == []
    attn = root.expert.layers[0].self_attn
    qkv = attn.qkv
    assert isinstance(qkv, FusedQKV) and qkv.configs and "q|k|v stacked" in report.modules[0].kernel
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    stack = qkv.stacked["mma_words"]
    assert all(p.mma_words.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr() for p in parts)
    x = torch.randn(1, 10, WIDTH, device="cuda", dtype=torch.bfloat16)
    x2 = x.reshape(10, WIDTH)

    def want(cfg: str) -> torch.Tensor:
        if kind == "fp8":  # the mma kernel scales x per token and per K slice
            return torch.cat([p.mma_reference(x2, cfg) for p in parts], dim=-1)
        return torch.cat([quant_linear_reference(p, x2.float()) for p in parts], dim=-1)

    for cfg in qkv.configs:
        got, ref = qkv._fused(x2, cfg).float(), want(cfg)
        assert float((got - ref).norm() / ref.norm()) < 1e-2, cfg
    q, k, v = qkv(x)
    assert q.shape == (1, 10, 512) and k.shape == v.shape == (1, 10, 64)
    attn.k_proj.ignore_scales()
    qkv(x)  # sees the replaced scale tensor and rebuilds the stack from the projections
    for cfg in qkv.configs:
        got, ref = qkv._fused(x2, cfg).float(), want(cfg)
        assert float((got - ref).norm() / ref.norm()) < 1e-2, cfg
        assert float((got[:, 512:576] - k.reshape(10, 64).float()).norm() / k.float().norm()) > 0.5, cfg


@pytest.mark.parametrize("how", ["triton", "inductor"])
def test_fp8_mlp_under_compile_matches_eager(how):
    """Under torch.compile the GeGLU + per-token quantization runs as our Triton kernel (a custom op) or as
    torch ops for inductor (options.compiled_geglu_quant); either way the MLP computes what it does eagerly."""
    torch.manual_seed(0)
    model = mlp_stack(depth=1)
    get_backend("fp8", targets="prefix_mlp", compiled_geglu_quant=how).apply(model)
    mlp = model.prefix.layers[0].mlp
    assert mlp.compiled_geglu_quant == how
    x = torch.randn(96, WIDTH, device="cuda", dtype=torch.bfloat16)
    eager = mlp(x).float()
    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True)(x).float()
    assert float((compiled - eager).norm() / eager.norm()) < 1e-2
    with pytest.raises(Exception, match="compiled_geglu_quant"):
        get_backend("fp8", targets="prefix_mlp", compiled_geglu_quant="cuda").apply(mlp_stack(depth=1))


