"""Similarity measures for fidelity checks; torch does the math (float64 reductions for stable dB values)."""

from __future__ import annotations

import math

import numpy as np
import torch

# An update smaller than FLOOR_EPS machine epsilons of the output cannot be told from the rounding of the residual
# stream: a 16-bit candidate that only rounds differently then scores 20 log10(8 sqrt(12)) = 28.8 dB, above the
# 16-bit layer budget; the free-running hidden-state check (no floor) still sees errors of that size.
FLOOR_EPS = 8.0


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


def update_agreement_per_row(x_in, ref_out, cand_out, floor_eps: float = FLOOR_EPS) -> np.ndarray:
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


def update_sqnr_db_per_row(x_in, ref_out, cand_out, floor_eps: float = FLOOR_EPS) -> np.ndarray:
    """`update_agreement_per_row` in dB: 10 log10(|update|^2 / |error|^2) per row (inf when identical).

    a = 1/sqrt(1 + e^2/u^2) and S = 10 log10(u^2/e^2) carry the same information; dB lets one budget table
    speak for weights, layers, hidden states and actions alike.
    """
    a = update_agreement_per_row(x_in, ref_out, cand_out, floor_eps).astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.where(a >= 1.0, np.inf, np.where(a <= 0.0, -np.inf, -10 * np.log10(1.0 / np.maximum(a, 1e-300) ** 2 - 1.0)))


def quantiles_db(values: list[float] | np.ndarray) -> tuple[float, float]:
    """(p50, min) of a list of dB values; inf values count as perfect agreement, NaN as none."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    v = np.where(np.isnan(v), -np.inf, v)
    return float(np.quantile(v, 0.5, method="lower")), float(v.min())
