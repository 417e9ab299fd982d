"""Reading precisions out of text (report rows, backend names) and the storage evidence the silent-fallback check
adds beside what it measures (evalkit/fidelity/run.py: the check itself compares outputs, never trusts rows).
"""

from __future__ import annotations

import re

from evalkit.backends.verify import storage_mismatches, storage_tensor  # noqa: F401  (re-exported for the checks)

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


def claimed_low_precision(report, reference_bits: int) -> list:
    """Report rows that claim weights or activations below the reference precision."""
    rows = []
    for r in getattr(report, "modules", []) or []:
        bits = [b for b in (precision_bits(r.weight_dtype), precision_bits(r.activation_precision)) if b is not None]
        if bits and min(bits) < reference_bits:
            rows.append(r)
    return rows
