"""Rotary position embedding applied to [B, heads, T, D] tensors (Gemma's rotate-half convention)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, heads, T, D]; cos/sin [B, T, D]
    return x * cos[:, None] + rotate_half(x) * sin[:, None]
