"""One action-expert decoder layer at M <= 16 with its adaRMS norms and gated residual adds folded into the fp8
mma GEMMs (`fp8` backend, `options.fuse_norms`, on by default; `false` runs the plain layer).

Why it is the default: with the expert's attention launched as a programmatic dependent too, every launch of the
fused layer streams its weights in while its predecessor runs, where the plain layer's q|k|v and GeGLU follow an
ordinary inductor norm kernel; so the fused layer is the faster one (compile + CUDA graphs; docs/backends.md has
the measurements of each version).

The plain layer (evalkit/policies/pi05/layers.py) runs, per denoise step,

    norm1 -> q|k|v GEMM -> attention -> o_proj GEMM -> (x + gate1 * .) and norm2 -> GeGLU GEMM -> down GEMM -> (h + gate2 * .)

Under torch.compile the two "add + norm" pieces become one inductor kernel each: 360 launches per π0.5 call
(18 layers x 2 x 10 steps) of ~1.5 µs that move 20 KB, plus their launch gaps, at M = 10. Here they go into
our kernels (kernels/mma_small_m.cu, fp8_mma_gemm's EPI flags): the q|k|v and GeGLU kernels norm their input
rows themselves (each CTA covers all of K: it sums the squares across its warps), and the o_proj and down
kernels add the gated residual in their epilogue. Four launches and the attention per layer, no norm kernels.
Written by us: no library GEMM takes an adaRMS prologue.

The fused path runs only where every part already runs our mma kernel (the per-shape choices that the plain
forward makes first): q|k|v stacked (`FusedQKV`), gate|up fused (`Fp8GemmaMLP`), o_proj and down_proj on
`cuda_mma`, batch 1 (one modulation row per kernel). Whether it runs is decided like every kernel choice here
(`evalkit.backends.quant.choose_kernel`): the fused layer is checked against the plain layer's output (same kernels,
same roundings: relative error ~1e-3; a dropped residual or norm is ~100 %) and timed against it, once per
shape. Every part is read from the layer at call time, so fault backends that swap `layer.mlp` or replace
scales act on the fused path too (or, when the part is no longer ours, the plain forward runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evalkit.backends.fp8 import Fp8GemmaMLP, Fp8Linear
from evalkit.backends.fused_qkv import FusedQKV
from evalkit.backends.quant import choose_kernel
from evalkit.kernels import mma_small_m


@dataclass(frozen=True)
class FusedPlan:
    """The mma configs the fused layer launches (those the plain forward's choices picked)."""

    qkv: str
    o_proj: str
    geglu: str
    down: str


_PLANS: dict[tuple, FusedPlan] = {}
NOTE_NORM = "; fused expert layer (M<=16, batch 1, where checked and faster): the adaRMS norm before it runs inside this launch"
NOTE_RESID = "; fused expert layer (M<=16, batch 1, where checked and faster): the gated residual add after it runs in this launch's epilogue"


def _config(choice: str, prefix: str, part: str) -> str:
    kind, _, cfg = choice.partition(":")
    if kind != prefix:
        raise ValueError(f"{part} runs '{choice}', not our mma kernel: nothing to fold into")
    return cfg


class FusedFp8ExpertLayer:
    """Callable (x, ctx) -> layer output, or None where the fused path does not apply (the layer then runs plain)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def eligible(self, x: torch.Tensor, ctx) -> bool:
        from evalkit.policies.pi05.layers import AdaRMSNorm

        layer = self.layer
        att, mlp = layer.self_attn, layer.mlp
        return (ctx.mods is not None and ctx.read_cache and x.dim() == 3 and x.shape[0] == 1
                and x.shape[1] <= mma_small_m.MAX_M and x.dtype == torch.bfloat16 and x.is_cuda
                and isinstance(layer.input_layernorm, AdaRMSNorm) and isinstance(layer.post_attention_layernorm, AdaRMSNorm)
                and isinstance(att.qkv, FusedQKV) and att.qkv.kind == "fp8"
                and isinstance(att.o_proj, Fp8Linear) and bool(att.o_proj.mma_configs) and att.o_proj.bias is None
                and type(mlp) is Fp8GemmaMLP and mlp.mma and bool(mlp.down_proj.mma_configs) and mlp.down_proj.bias is None)

    def plan(self, x2: torch.Tensor) -> FusedPlan:
        """The configs from the parts' cached choices (made by the plain forward, which choose_kernel runs first)."""
        layer = self.layer
        att, mlp = layer.self_attn, layer.mlp
        o, d = att.o_proj, mlp.down_proj
        m, width = x2.shape
        a2 = x2.new_zeros((m, o.in_features))
        g2 = x2.new_zeros((m, d.in_features))
        plan = FusedPlan(qkv=_config(att.qkv.choice(x2), "fused_mma", "q|k|v"),
                         o_proj=_config(o.small_m_choice(a2, lambda: o._scaled_mm(a2)), "cuda_mma", "o_proj"),
                         geglu=_config(mlp._small_m_choice(x2), "fused_mma", "gate|up"),
                         down=_config(d.small_m_choice(g2, lambda: d._scaled_mm(g2)), "cuda_mma", "down_proj"))
        for part, cfg in (("q|k|v", plan.qkv), ("gate|up", plan.geglu)):
            if not mma_small_m.fp8_norm_fits(cfg, width):
                raise ValueError(f"{part} config {cfg} splits K across CTAs: the norm cannot be folded in")
        return plan

    def fused_forward(self, x: torch.Tensor, ctx, plan: FusedPlan) -> torch.Tensor:
        layer = self.layer
        att, mlp = layer.self_attn, layer.mlp
        i = att.layer_idx
        b, t, width = x.shape
        x2 = x.reshape(-1, width)
        mod1, mod2 = ctx.mod(2 * i), ctx.mod(2 * i + 1)
        qkv = att.qkv.current()
        y = mma_small_m.fp8_mma_gemm(x2, qkv["mma_words"], qkv["wscale"], plan.qkv, att.qkv.parts[0].pdl, att.qkv.l2_next,
                                     norm=(mod1, t, layer.input_layernorm.eps))
        q, k, v = torch.split(y.view(b, t, -1), att.qkv.splits, dim=-1)
        a2 = att.attend(q, k, v, ctx).reshape(b * t, -1)
        o = att.o_proj
        h2 = mma_small_m.fp8_mma_gemm(a2, o.mma_words, o.wscale, plan.o_proj, o.pdl, o.l2_next, residual=(x2, mod1, t))
        g, d = mlp.gate_proj, mlp.down_proj
        gu_scales = mlp.current_gu()[1]
        f2 = mma_small_m.fp8_mma_geglu(h2, g.mma_words, mlp.up_proj.mma_words, gu_scales, plan.geglu, g.pdl, mlp.l2_next,
                                       norm=(mod2, t, layer.post_attention_layernorm.eps))
        out = mma_small_m.fp8_mma_gemm(f2, d.mma_words, d.wscale, plan.down, d.pdl, d.l2_next, residual=(h2, mod2, t))
        return out.view(b, t, width)

    def __call__(self, x: torch.Tensor, ctx) -> torch.Tensor | None:
        if not self.eligible(x, ctx):
            return None
        m, width = x.shape[1], x.shape[2]
        key = ("fp8layer", x.device.index, width, m, self.layer.self_attn.o_proj.in_features, self.layer.mlp.down_proj.in_features)

        def fused() -> torch.Tensor:
            return self.fused_forward(x, ctx, self.cached_plan(key, x))

        choice = choose_kernel(key, {"plain": lambda: self.layer.plain_forward(x, ctx), "fused": fused}, reference="plain")
        return fused() if choice == "fused" else None

    def cached_plan(self, key: tuple, x: torch.Tensor) -> FusedPlan:
        """plan() once per shape key (its configs come from the parts' cached per-shape choices)."""
        plan = _PLANS.get(key)
        if plan is None:
            plan = _PLANS[key] = self.plan(x.reshape(-1, x.shape[-1]))
        return plan


def install(model: nn.Module) -> int:
    """Set `fused` on every adaRMS decoder layer (the action expert's) whose parts are native fp8; returns how many.
    The per-call checks (`eligible`, the parts' kernel choices) decide whether the fused path runs."""
    from evalkit.policies.pi05.layers import AdaRMSNorm

    n = 0
    for mod in model.modules():
        if not hasattr(mod, "fused") or not isinstance(getattr(mod, "input_layernorm", None), AdaRMSNorm):
            continue
        att, mlp = mod.self_attn, mod.mlp
        if isinstance(att.qkv, FusedQKV) and att.qkv.kind == "fp8" and type(mlp) is Fp8GemmaMLP and mlp.mma:
            mod.fused = FusedFp8ExpertLayer(mod)
            for part in (*att.qkv.parts, mlp.gate_proj, mlp.up_proj):
                part.kernel += NOTE_NORM
            for part in (att.o_proj, mlp.down_proj):
                part.kernel += NOTE_RESID
            n += 1
    return n
