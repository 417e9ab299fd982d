"""Similarity measures for fidelity checks; torch does the math (float64 reductions for stable dB values)."""

from __future__ import annotations

import math

import numpy as np
import torch


def _rows(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    t = t.detach().to(torch.float64)
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def cosine_per_row(ref, cand) -> np.ndarray:
    """Cosine similarity per leading index (probe / batch row) of two same-shaped tensors.

    Two all-zero rows count as identical (1.0); one zero row against a non-zero one as 0.0.
    """
    r, c = _rows(ref), _rows(cand).to(_rows(ref).device)
    if r.shape != c.shape:
        raise ValueError(f"shapes differ: reference {tuple(r.shape)} vs candidate {tuple(c.shape)}")
    nr, nc = r.norm(dim=1), c.norm(dim=1)
    dot = (r * c).sum(dim=1)
    cos = torch.where((nr > 0) & (nc > 0), dot / (nr * nc).clamp_min(1e-300), torch.where((nr == 0) & (nc == 0), 1.0, 0.0))
    return cos.clamp(-1.0, 1.0).cpu().numpy()


def sqnr_db_per_row(ref, cand) -> np.ndarray:
    """Signal-to-quantization-noise ratio 10 log10(|ref|^2 / |ref - cand|^2) per row; inf when identical."""
    r, c = _rows(ref), _rows(cand).to(_rows(ref).device)
    sig = (r * r).sum(dim=1)
    noise = ((r - c) ** 2).sum(dim=1)
    out = []
    for s, n in zip(sig.tolist(), noise.tolist()):
        out.append(math.inf if n == 0 else (-math.inf if s == 0 else 10 * math.log10(s / n)))
    return np.array(out)


def sqnr_db(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """SQNR of a whole tensor (e.g. a weight matrix)."""
    r = ref.detach().to(torch.float64).flatten()
    c = cand.detach().to(device=r.device, dtype=torch.float64).flatten()
    noise = float(((r - c) ** 2).sum())
    sig = float((r * r).sum())
    if noise == 0:
        return math.inf
    return -math.inf if sig == 0 else 10 * math.log10(sig / noise)
