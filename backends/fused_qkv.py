"""q, k and v of one attention layer as one GEMM at M <= 16 (the denoise loop), for `int4` and `fp8`.

At M = 10 each of the expert's GEMMs costs a fixed few microseconds of launch, dependency wait and grid
completion, whatever its size; q (N = 2048), k and v (N = 256 each) read the same x. Stacking their weights
along N makes one launch of our mma kernel (`kernels/mma_small_m.cu`) with N = 2560 instead of three.

The stack is built from the three projections' own fragment-ordered tensors (`mma_words`, plus `mma_sz` for
int4 or `wscale` for fp8); those become views of it, so no byte is stored twice, and if a projection's tensor
is replaced (a fault backend's unit scales, say) the stack is rebuilt from the projections on the next call:
what runs is always what they hold. Whether the fused launch runs is decided like every kernel choice here:
timed once per shape against the three projections' own chosen kernels, each candidate first checked against
its exact math (`evalkit.backends.quant.choose_kernel`).

Installed by the backends' `post_replace` as `GemmaAttention.qkv` (a plain attribute, not a submodule, so
the model's modules and state_dict are unchanged).
"""

from __future__ import annotations

from typing import Callable

import torch
from evalkit.backends.quant import choose_kernel
from evalkit.kernels import mma_small_m
from torch import nn

# per kind: the projection tensors to stack, the launch, the configs that tile [N, K]
_KINDS: dict[str, tuple[tuple[str, ...], Callable, Callable]] = {
    "int4": (("mma_words", "mma_sz"),
             lambda x2, t, p, cfg, pf: mma_small_m.int4_mma_gemm(x2, t["mma_words"], t["mma_sz"], p.group, cfg, p.pdl, pf),
             lambda p, n: [c for c in mma_small_m.CONFIGS if mma_small_m.config_fits(c, n, p.in_features, p.group)]),
    "fp8": (("mma_words", "wscale"),
            lambda x2, t, p, cfg, pf: mma_small_m.fp8_mma_gemm(x2, t["mma_words"], t["wscale"], cfg, p.pdl, pf),
            lambda p, n: [c for c in mma_small_m.FP8_CONFIGS if mma_small_m.fp8_config_fits(c, n, p.in_features)]),
}


class FusedQKV:
    """Callable x -> (q, k, v): one mma launch over the stacked q|k|v weights where that measures faster."""

    l2_next: tuple = (None, None)  # L2 prefetch hint the launch accepts; no backend sets it

    def __init__(self, kind: str, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module) -> None:
        self.kind, self.parts = kind, (q_proj, k_proj, v_proj)
        self.names, self.launch, configs = _KINDS[kind]
        self.splits = [p.out_features for p in self.parts]
        self.configs = configs(q_proj, sum(self.splits))
        self._stack()
        note = f"; q|k|v stacked: one cuda:{kind}_mma_gemm launch (N={sum(self.splits)}) at M<={mma_small_m.MAX_M} where faster (timed once, checked)"
        for p in self.parts:
            p.kernel += note

    @staticmethod
    def applies(kind: str, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module) -> bool:
        """All three carry the mma packing (made for the expert's layers), no bias, the same K."""
        parts = (q_proj, k_proj, v_proj)
        return (all(getattr(p, "mma_words", None) is not None and getattr(p, "bias", None) is None for p in parts)
                and len({p.in_features for p in parts}) == 1
                and (kind != "int4" or len({p.group for p in parts}) == 1))

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(p, n) for n in self.names for p in self.parts)

    def _stack(self) -> None:
        self.stacked = {}
        for n in self.names:
            dim = 1 if n == "wscale" else 0  # wscale is [1, N]; the fragment tensors lead with N/16
            cat = torch.cat([getattr(p, n) for p in self.parts], dim=dim)
            self.stacked[n] = cat
            sizes = [getattr(p, n).shape[dim] for p in self.parts]
            for p, view in zip(self.parts, torch.split(cat, sizes, dim=dim)):
                setattr(p, n, view)
        self._from = self._tensors()

    def _fused(self, x2: torch.Tensor, cfg: str, prefetch: tuple = (None, None)) -> torch.Tensor:
        return self.launch(x2, self.stacked, self.parts[0], cfg, prefetch)

    def _per_linear(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x2) for p in self.parts], dim=-1)

    def choice(self, x2: torch.Tensor) -> str:
        if x2.shape[0] > mma_small_m.MAX_M or not self.configs:
            return "per_linear"
        q = self.parts[0]
        key = (f"{self.kind}qkv", x2.device.index, tuple(self.splits), q.in_features, x2.shape[0])
        cands, refs = {"per_linear": lambda: self._per_linear(x2)}, {}
        for cfg in self.configs:
            cands[f"fused_mma:{cfg}"] = lambda cfg=cfg: self._fused(x2, cfg)
            if self.kind == "fp8":  # x scaled per K slice: its exact math, not the per-token projections (int4 matches them)
                refs[f"fused_mma:{cfg}"] = lambda cfg=cfg: torch.cat([p.mma_reference(x2, cfg) for p in self.parts], dim=-1)
        return choose_kernel(key, cands, reference="per_linear", own_refs=refs)

    def current(self) -> dict[str, torch.Tensor]:
        """The stacked tensors, rebuilt first if a projection's tensor was replaced."""
        if any(a is not b for a, b in zip(self._tensors(), self._from)):
            self._stack()
        return self.stacked

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.current()
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        choice = self.choice(x2)
        if choice == "per_linear":
            return tuple(p(x) for p in self.parts)
        y = self._fused(x2, choice.partition(":")[2], self.l2_next).reshape(*x.shape[:-1], -1)
        return tuple(torch.split(y, self.splits, dim=-1))


def install(model: nn.Module, kind: str, is_part: Callable[[nn.Module], bool]) -> int:
    """Set `qkv` on every attention module with a `qkv` slot whose q/k/v projections qualify; returns how many."""
    n = 0
    for mod in model.modules():
        if not hasattr(mod, "qkv"):
            continue
        parts = [getattr(mod, p, None) for p in ("q_proj", "k_proj", "v_proj")]
        if all(p is not None and is_part(p) for p in parts) and FusedQKV.applies(kind, *parts):
            mod.qkv = FusedQKV(kind, *parts)
            n += 1
    return n
