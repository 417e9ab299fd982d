"""Effective weights measured by driving a module, not read from it.

A Linear-like module y = W x + b is called on scaled basis inputs +a·e_j and -a·e_j (the bias cancels in the
difference), so column j of the weight its kernel really multiplies by is (y(+a e_j) - y(-a e_j)) / 2a, averaged
over four amplitudes a spread over an octave (a statically quantized input rounds each differently). This sees
what `dequantized_weight()` or a report row could hide: a scale the kernel ignores or applies on the wrong axis,
another layer's weights, a full-precision fallback. `a` is the module's typical input size (RMS seen at run time),
so a statically calibrated activation scale is not driven out of its range; the inputs go in chunks of the row
count the module saw at run time, so the same kernel runs as in the policy. Only a fixed sample of columns is
driven (enough for an SQNR and a fingerprint; full matrices of a 2B model would take minutes). The reference is
driven the same way at the candidate's activation dtype, so the rounding of a large bias in bf16 (which blurs
small driven columns) is common to both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from evalkit.fidelity.hooks import ModuleInput

DRIVE_COLUMNS = 64
AMPLITUDES = 4


def sample_columns(in_features: int, n: int = DRIVE_COLUMNS) -> torch.Tensor:
    """The same column sample for every module of this width (so layers can be compared with each other)."""
    g = torch.Generator().manual_seed(in_features)
    return torch.randperm(in_features, generator=g)[: min(n, in_features)].sort().values


@dataclass
class Driven:
    columns: torch.Tensor  # which input columns were driven
    weight: torch.Tensor  # [out, len(columns)] fp32: the measured columns of the effective weight
    calls: int  # forward calls it took


def in_features_of(mod: nn.Module) -> int | None:
    for attr in ("in_features",):
        v = getattr(mod, attr, None)
        if isinstance(v, int):
            return v
    w = getattr(mod, "weight", None)
    return int(w.shape[-1]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None


@torch.no_grad()
def drive_linear(mod: "nn.Module | Callable[[torch.Tensor], torch.Tensor]", in_features: int, seen: ModuleInput | None, device: torch.device,
                 default_dtype: torch.dtype) -> Driven:
    """Measure `mod`'s effective weight columns by calling it (see the module docstring)."""
    cols = sample_columns(in_features)
    dtype = seen.dtype if seen is not None else default_dtype
    base = 1.0 if seen is None or not (seen.rms > 0) else min(max(seen.rms, 1e-3), 1e3)
    # AMPLITUDES values spread over an octave: a statically quantized input rounds each of them differently, so
    # averaging their estimates shrinks that rounding (a common factor on every column, indistinguishable from a
    # wrong weight scale at one amplitude) while a real scale error stays whole
    amps = [float(torch.tensor(base * 2 ** (i / AMPLITUDES)).to(dtype)) for i in range(AMPLITUDES)]  # as received
    k = len(cols)
    # on a GPU the kernel depends on the row count (M <= 16 kernels in the expert): drive in chunks of what the
    # module saw at run time; a CPU kernel does not, and one call is many times cheaper there
    cuda = torch.device(device).type == "cuda"
    chunk = max(1, seen.rows) if (cuda and seen is not None) else 2 * k * len(amps)
    idx = torch.arange(k)
    x = torch.zeros(len(amps), 2 * k, in_features, dtype=torch.float32)
    for i, a in enumerate(amps):
        x[i, idx, cols] = a
        x[i, k + idx, cols] = -a
    x = x.reshape(-1, in_features).to(device=device, dtype=dtype)
    outs, calls = [], 0
    for s in range(0, x.shape[0], chunk):
        y = mod(x[s : s + chunk])
        outs.append(y.reshape(y.shape[0], -1).float())
        calls += 1
    y = torch.cat(outs).reshape(len(amps), 2 * k, -1)
    a = torch.tensor(amps, dtype=torch.float32, device=y.device)[:, None, None]
    w = ((y[:, :k] - y[:, k:]) / (2 * a)).mean(0).t()
    return Driven(cols, w.cpu(), calls)
