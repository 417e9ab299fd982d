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
    return torch.nan_to_num(cos, nan=0.0).clamp(-1.0, 1.0).cpu().numpy()  # NaN/inf outputs: no agreement


def sqnr_db_per_row(ref, cand) -> np.ndarray:
    """Signal-to-quantization-noise ratio 10 log10(|ref|^2 / |ref - cand|^2) per row; inf when identical."""
    r, c = _rows(ref), _rows(cand).to(_rows(ref).device)
    sig = (r * r).sum(dim=1)
    noise = ((r - c) ** 2).sum(dim=1)
    out = []
    for s, n in zip(sig.tolist(), noise.tolist()):
        if not (math.isfinite(s) and math.isfinite(n)):
            out.append(-math.inf)  # NaN/inf outputs: no signal survives
        else:
            out.append(math.inf if n == 0 else (-math.inf if s == 0 else 10 * math.log10(s / n)))
    return np.array(out)


def sqnr_db(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """SQNR of a whole tensor (e.g. a weight matrix)."""
    r = ref.detach().to(torch.float64).flatten()
    c = cand.detach().to(device=r.device, dtype=torch.float64).flatten()
    noise = float(((r - c) ** 2).sum())
    sig = float((r * r).sum())
    if not (math.isfinite(noise) and math.isfinite(sig)):
        return -math.inf  # NaN/inf weights
    if noise == 0:
        return math.inf
    return -math.inf if sig == 0 else 10 * math.log10(sig / noise)


def update_agreement_per_row(x_in, ref_out, cand_out, floor_eps: float = 4.0) -> np.ndarray:
    """How well a residual layer's output agrees with the reference, measured against the layer's own update.

    Both layers got the same input x (teacher forcing). With update u = ref_out - x and error
    e = cand_out - ref_out, the score is 1 / sqrt(1 + |e|^2 / max(|u|, floor)^2): the cosine between
    the two updates when the error is orthogonal to u (and, unlike a cosine, it also sees scale errors).
    A residual stream hides a missing branch (out = h vs h + mlp(h) keeps cosine ~0.99), the update does not.
    floor = floor_eps x machine epsilon of the coarser dtype x |ref_out|: an update smaller than the rounding
    of the residual stream cannot be resolved, so rounding noise is not called a divergence.
    """
    r = _rows(ref_out)
    x = _rows(x_in).to(r.device)
    c = _rows(cand_out).to(r.device)
    dtypes = [t.dtype for t in (ref_out, cand_out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    eps = max([torch.finfo(d).eps for d in dtypes] or [torch.finfo(torch.float32).eps])
    u = (r - x).norm(dim=1)
    e = (c - r).norm(dim=1)
    scale = torch.maximum(u, floor_eps * eps * r.norm(dim=1)).clamp_min(1e-300)
    return torch.nan_to_num(1.0 / torch.sqrt(1.0 + (e / scale) ** 2), nan=0.0).cpu().numpy()  # NaN: diverged
