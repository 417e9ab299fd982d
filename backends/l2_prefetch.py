"""Chain L2 prefetches through the action expert's GEMMs: each of our mma launches pulls the weights of the
next one into L2 (`int4`, `fp8`; `backend.options.l2_prefetch=true`; off by default, see the measurement below).

At M = 10 every GEMM of the denoise loop reads its weights from HBM on its critical path: the kernels between
two GEMMs (norms, RoPE, attention) are not launched as programmatic dependents, so a GEMM's weight loads can
only start once the kernel before it has finished. Our kernels (`backends/mma_small_m.cu:prefetch_l2`) take up
to two extra regions and issue bulk L2 prefetches for them right after their own loads; handing each launch
the next launch's weights moves that read off the critical path (the regions are hints: a prefetch of a
tensor the next kernel does not read, say when the chooser picked another kernel, costs bandwidth, not
correctness). The last GEMM of the last layer prefetches the first layer's, for the next denoise step.

Measured (H200, π0.5 compile + CUDA graphs, bench/backends.py, same run): it did not pay. fp8[prefix mlp+expert]
15.12 ms with the chain vs 14.81 ms without, int4[expert] 15.09 vs 14.84 ms: the extra reads compete with the
kernels that run meanwhile, and each GEMM's fixed cost (launch, dependency wait, x from L2, reduction, grid
completion) is most of its time at M = 10 (docs/backends.md). Kept as an option for other GPUs and shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from backends.targets import decoder_layers


def _regions(obj) -> tuple[torch.Tensor, ...]:
    """The packed weights a launcher's mma kernel reads (the tensors that matter: scales are small)."""
    if hasattr(obj, "stacked"):  # FusedQKV
        return (obj.stacked["mma_words"],)
    if hasattr(obj, "gate_proj"):  # a GeGLU wrapper: its fused launch reads gate and up
        return obj.gate_proj.mma_words, obj.up_proj.mma_words
    return (obj.mma_words,)


def _launchers(layer: nn.Module) -> list:
    """The objects that launch this layer's mma GEMMs, in the order they run."""
    out = []
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is not None:
        if getattr(attn, "qkv", None) is not None:
            out.append(attn.qkv)
        else:
            out += [getattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")]
        out.append(attn.o_proj)
    if mlp is not None:
        fused = hasattr(mlp, "l2_next") and hasattr(mlp.gate_proj, "mma_words") and hasattr(mlp.up_proj, "mma_words")
        out += [mlp] if fused else [mlp.gate_proj, mlp.up_proj]
        out.append(mlp.down_proj)
    return [o for o in out if hasattr(o, "l2_next") and (hasattr(o, "stacked") or hasattr(o, "gate_proj")
                                                         or getattr(o, "mma_words", None) is not None)]


def chain(model: nn.Module) -> int:
    """Set `l2_next` on every expert mma launcher to the next one's weights; returns how many were chained."""
    seq = [o for layer in decoder_layers(model, ("expert",)).get("expert", []) for o in _launchers(layer)]
    for i, obj in enumerate(seq):
        nxt = _regions(seq[(i + 1) % len(seq)])
        obj.l2_next = tuple(nxt) + (None,) * (2 - len(nxt))
    return len(seq) if len(seq) > 1 else 0
