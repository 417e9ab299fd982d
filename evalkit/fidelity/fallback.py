"""Silent-fallback check: what a BackendReport claims vs what the model holds and computes.

A backend that claims a lower precision than the reference (fp8, int8, int4, ...) must store its weights
in the claimed dtype, and its outputs must not be bit-identical to the reference's (a real change in
precision always changes some bits).
"""

from __future__ import annotations

import re

import torch
from torch import nn

# most specific first: "torch.uint8 (int4 x2 nibble-packed)" is a 4-bit claim
_BITS = [
    (r"int4|uint4|nf4|fp4|e2m1|nvfp4|mxfp4", 4),
    (r"float8|fp8|e4m3|e5m2|int8|uint8", 8),
    (r"bfloat16|bf16|float16|fp16|half", 16),
    (r"float32|fp32|tf32", 32),
    (r"float64|fp64|double", 64),
]


def precision_bits(text: str | None) -> int | None:
    """Bits of the lowest precision a report string names (None when it names none)."""
    if not text:
        return None
    t = text.lower()
    for pattern, bits in _BITS:
        if re.search(pattern, t):
            return bits
    return None


def storage_tensor(mod: nn.Module) -> torch.Tensor | None:
    """The tensor that holds a module's weights (the backends' `weight_store` / `_evalkit_desc` contract)."""
    store = getattr(mod, "weight_store", None)
    desc = getattr(mod, "_evalkit_desc", None)
    name = store if isinstance(store, str) else (desc.get("weight_store") if isinstance(desc, dict) else "weight")
    t = getattr(mod, name, None)
    return t if isinstance(t, torch.Tensor) else None


def claimed_low_precision(report, reference_bits: int) -> list:
    """Report rows that claim weights or activations below the reference precision."""
    rows = []
    for r in getattr(report, "modules", []) or []:
        bits = [b for b in (precision_bits(r.weight_dtype), precision_bits(r.activation_precision)) if b is not None]
        if bits and min(bits) < reference_bits:
            rows.append(r)
    return rows


def storage_mismatches(model: nn.Module, rows: list) -> list[str]:
    """Claimed rows whose module is missing or stores its weights in another dtype than claimed."""
    problems = []
    for r in rows:
        try:
            mod = model.get_submodule(r.name)
        except AttributeError:
            problems.append(f"{r.name}: in the report, not in the model")
            continue
        t = storage_tensor(mod)
        claimed = r.weight_dtype.split(" ", 1)[0]
        actual = None if t is None else str(t.dtype)
        if actual != claimed:
            problems.append(f"{r.name}: claims {claimed}, stores {actual}")
    return problems
