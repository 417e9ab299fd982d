"""The fp8 expert layer with its adaRMS norms and gated residual adds folded into our mma kernels
(evalkit/policies/pi05/fused_layer.py; run on the device machine: `pytest -m gpu tests/test_fused_expert_layer_gpu.py`).

At π0.5's true expert shapes: each folded kernel against the unfused math it replaces, the whole layer against
the plain layer (eager, compiled, in CUDA-graph replays), and the faults still acting on the fused path."""

from __future__ import annotations

import pytest
import torch
from evalkit.backends.fp8 import Fp8Linear
from evalkit.backends.quant import CHOICE_LOG, KERNEL_CHOICE
from evalkit.backends.registry import get_backend
from evalkit.kernels import mma_small_m
from torch import nn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WIDTH, MLP, HEADS, HEAD_DIM, T, PREFIX = 1024, 4096, 8, 256, 10, 545
EPS = 1e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def fp8_linear(n: int, k: int, seed: int) -> Fp8Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=False).cuda()
    return Fp8Linear(lin, torch.bfloat16, emulated=False, mma_pack=True)


def modulation(width: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (0.3 * torch.randn(1, 3 * width, device="cuda", generator=g)).to(torch.bfloat16)


@pytest.mark.parametrize("n,cfg", [(2560, "t2w8s1"), (2560, "t1w8s1"), (1024, "t1w4s1"), (1024, "t1w16s1")])
@pytest.mark.parametrize("m", [1, 10, 16])
def test_norm_folded_into_the_gemm_is_the_norm_then_the_gemm(n, cfg, m):
    from evalkit.policies.pi05.layers import ada_rms_norm

    lin = fp8_linear(n, WIDTH, 0)
    x = (3 * torch.randn(m, WIDTH, device="cuda")).to(torch.bfloat16)
    mod = modulation(WIDTH, 1)
    normed = ada_rms_norm(x, mod, EPS)[0]
    want = lin.mma_reference(normed, cfg)
    got = mma_small_m.fp8_mma_gemm(x, lin.mma_words, lin.wscale, cfg, norm=(mod, T if m <= T else m, EPS))
    assert rel(got, want) < 1e-2
    unnormed = lin.mma_reference(x, cfg)
    assert rel(unnormed, want) > 0.1  # the check above could tell a skipped norm apart
    with pytest.raises(ValueError, match="cannot fold the norm"):
        mma_small_m.fp8_mma_gemm(x, lin.mma_words, lin.wscale, "t1w8s2", norm=(mod, max(m, T), EPS))


@pytest.mark.parametrize("m", [1, 10])
def test_norm_folded_into_the_geglu_kernel(m):
    from evalkit.backends.fp8 import Fp8GemmaMLP

    from evalkit.policies.pi05.layers import ada_rms_norm

    gate, up, down = fp8_linear(MLP, WIDTH, 0), fp8_linear(MLP, WIDTH, 1), fp8_linear(WIDTH, MLP, 2)
    mlp = Fp8GemmaMLP(gate, up, down)
    x = (3 * torch.randn(m, WIDTH, device="cuda")).to(torch.bfloat16)
    mod = modulation(WIDTH, 3)
    for cfg in ("t1w8s1", "t1w4s1"):
        want = mlp._geglu_reference(ada_rms_norm(x, mod, EPS)[0], cfg)
        got = mma_small_m.fp8_mma_geglu(x, gate.mma_words, up.mma_words, mlp.current_gu()[1], cfg, norm=(mod, T, EPS))
        assert rel(got, want) < 2e-2, cfg


@pytest.mark.parametrize("k,cfg", [(2048, "t1w8s1"), (2048, "t1w8s2"), (4096, "t1w8s2"), (4096, "t1w16s2"), (4096, "t1w8s4")])
@pytest.mark.parametrize("m", [1, 10, 16])
def test_gated_residual_add_in_the_epilogue(k, cfg, m):
    lin = fp8_linear(WIDTH, k, 4)
    if not mma_small_m.fp8_config_fits(cfg, WIDTH, k):
        pytest.skip(f"{cfg} does not tile K={k}")
    a = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    resid = (4 * torch.randn(m, WIDTH, device="cuda")).to(torch.bfloat16)
    mod = modulation(WIDTH, 5)
    gate = mod[:, 2 * WIDTH:]
    want = resid + lin.mma_reference(a, cfg).to(torch.bfloat16) * gate  # the unfused layer's bf16 ops
    got = mma_small_m.fp8_mma_gemm(a, lin.mma_words, lin.wscale, cfg, residual=(resid, mod, max(m, T)))
    assert rel(got, want) < 1e-2
    assert rel(resid, want) > 0.02  # the projection's share is large enough to be seen (tolerance above: 1e-2)
    # in graph replays, with new inputs each time (split-K counters reset, PDL inside a graph)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mma_small_m.fp8_mma_gemm(a, lin.mma_words, lin.wscale, cfg, residual=(resid, mod, max(m, T)))
    for seed in range(3):
        torch.manual_seed(seed + 10)
        a.copy_(torch.randn_like(a, dtype=torch.float32).to(torch.bfloat16))
        resid.copy_(torch.randn_like(resid, dtype=torch.float32).to(torch.bfloat16))
        graph.replay()
        want = resid + lin.mma_reference(a, cfg).to(torch.bfloat16) * gate
        assert rel(out, want) < 1e-2, seed


# ------------------------------------------------------------------------------------------------ the layer
def expert_stack(depth: int = 2) -> tuple[nn.Module, object, torch.Tensor]:
    """root.expert: π0.5's true-size expert (2 layers) in bf16 on the GPU, with fp8 on every expert linear;
    the context of one denoise step over a random prefix cache; its input."""
    from evalkit.policies.pi05.config import GemmaSize
    from evalkit.policies.pi05.layers import AttnContext, GemmaStack, rope_tables

    torch.manual_seed(0)
    size = GemmaSize(width=WIDTH, depth=depth, mlp_dim=MLP, num_heads=HEADS, num_kv_heads=1, head_dim=HEAD_DIM)
    root = nn.Module()
    root.expert = GemmaStack(size, EPS, adaptive=True, vocab_size=None)
    for p in root.parameters():  # Gemma-like scales: residual stream O(1), small norm weights
        nn.init.normal_(p, std=0.02)
    root = root.to("cuda", torch.bfloat16)
    report = get_backend("fp8", targets="expert", fuse_norms=True).apply(root)
    assert any("adaRMS norms" in n for n in report.notes), report.notes
    cond = torch.randn(1, WIDTH, device="cuda", dtype=torch.bfloat16)
    mods = tuple(n.modulation(cond).contiguous() for n in root.expert.adaptive_norms())
    pos = torch.arange(PREFIX, PREFIX + T, device="cuda")[None]
    cos, sin = rope_tables(pos, HEAD_DIM, 10000.0, torch.bfloat16)
    cache = {i: (torch.randn(1, 1, PREFIX + T, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
                 torch.randn(1, 1, PREFIX + T, HEAD_DIM, device="cuda", dtype=torch.bfloat16)) for i in range(depth)}
    ctx = AttnContext(cos=cos, sin=sin, cache=cache, read_cache=True, mods=mods, decode_impl="triton")
    x = torch.randn(1, T, WIDTH, device="cuda", dtype=torch.bfloat16)
    return root, ctx, x


def plain(stack: nn.Module, x: torch.Tensor, ctx) -> torch.Tensor:
    """GemmaStack.forward with every layer on its plain forward (the final norm included)."""
    for layer in stack.layers:
        x = layer.plain_forward(x, ctx)
    return stack.norm(x, ctx.cond, ctx.mod(2 * len(stack.layers)))[0]


@torch.no_grad()  # as the policy runs it
def test_fused_layer_is_the_plain_layer_eager_compiled_and_replayed():
    root, ctx, x = expert_stack()
    stack = root.expert
    want = plain(stack, x, ctx)
    got = stack(x, ctx)  # the first call checks and times fused vs plain
    key = next(k for k in KERNEL_CHOICE if k[0] == "fp8layer")
    log = CHOICE_LOG[key]
    assert isinstance(log["fused"], float), log  # it passed its check against the plain layer
    layer = stack.layers[0]
    fused = layer.fused.fused_forward(x, ctx, layer.fused.plan(x.reshape(-1, WIDTH)))
    assert rel(fused, layer.plain_forward(x, ctx)) < 1e-2
    assert rel(got, plain(stack, x, ctx)) < 1e-2 and rel(want, got) < 1e-2
    compiled = torch.compile(lambda inp: stack(inp, ctx), dynamic=False)
    assert rel(compiled(x), want) < 1e-2
    static = x.clone()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        compiled(static)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out = compiled(static)
    for seed in range(2):
        torch.manual_seed(seed + 1)
        static.copy_(torch.randn_like(static))
        graph.replay()
        assert rel(out, plain(stack, static, ctx)) < 1e-2, seed


@torch.no_grad()
def test_faults_still_act_on_the_fused_path():
    root, ctx, x = expert_stack()
    stack = root.expert
    layer0, layer1 = stack.layers
    stack(x, ctx)  # the parts' kernel choices (and the layer's) on real inputs first
    clean = layer1.fused.fused_forward(x, ctx, layer1.fused.plan(x.reshape(-1, WIDTH)))
    # every layer runs layer 0's MLP: the fused path reads layer.mlp at call time
    layer1.mlp = layer0.mlp
    shared = layer1.fused.fused_forward(x, ctx, layer1.fused.plan(x.reshape(-1, WIDTH)))
    assert rel(shared, clean) > 0.05
    assert rel(shared, layer1.plain_forward(x, ctx)) < 1e-2
    # scales replaced by ones: the stacks are rebuilt from the projections, the fused kernels use them
    for mod in layer1.modules():
        if isinstance(mod, Fp8Linear):
            mod.ignore_scales()
    ignored = layer1.fused.fused_forward(x, ctx, layer1.fused.plan(x.reshape(-1, WIDTH)))
    assert rel(ignored, shared) > 0.5
    assert rel(ignored, layer1.plain_forward(x, ctx)) < 1e-2
