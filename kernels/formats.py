"""Number formats the kernels read: e4m3 rows with per-row scales, packed int4 nibbles."""

from __future__ import annotations

import torch

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def quant_fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric e4m3 per row: q [R, C] float8_e4m3fn, scale [R] fp32 with t ≈ q * scale."""
    t32 = t.float()
    scale = (t32.abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-12)
    q = (t32 / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fake_quant_fp8_rows(x: torch.Tensor) -> torch.Tensor:
    q, s = quant_fp8_rows(x)
    return q.float() * s[..., None]


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p >> 4, p & 0xF], dim=-1).reshape(p.shape[0], -1)
