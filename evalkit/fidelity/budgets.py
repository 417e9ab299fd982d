"""Error budgets by precision class, derived from the quantization noise each class must introduce.

Every backend declares a precision class (`Backend.precision_class`): 16-bit, 8-bit, 4-bit, fp4 or sparse. A class's
expected weight SQNR comes from the step size of its coarsest format (docs/fidelity.md has the derivation):

- a float format with p significant bits rounds with relative error uniform in half an ulp; averaged over an
  octave of values that is SQNR = 6.02 (p - 1) + 13.5 dB: bf16 (p = 8) 55.6 dB, fp8 e4m3 (p = 4) 31.5 dB,
  e2m1 (p = 2) 19.5 dB;
- a b-bit integer grid over a range of k standard deviations has step k·σ / (2^b - 1) (per group, asymmetric) or
  k·σ / (2^(b-1) - 1) (symmetric), and noise step²/12: int8 per channel (k ≈ 6) 37 dB, int4 in groups of 128
  (range ≈ 5σ) 20.3 dB;
- 2:4 magnitude pruning of Gaussian weights removes the two smallest of every four: 8.8 dB.

The class noise is the smallest of its formats: 16-bit 55.6 (bf16), 8-bit 31.5 (fp8 e4m3), 4-bit 20.3 (int4 g128),
fp4 19.5 (e2m1 values; the e4m3 block scale of every 16 values keeps them in range), sparse 8.8.

A budget is that noise minus an allowance per statistic (FidelityConfig.allowance_db): how far below the weight
noise a healthy backend's statistic may sit (activation rounding adds noise of the same order; a GeGLU amplifies it;
hidden states accumulate it over the layers before; an action chunk is ten Euler steps of the expert). The
allowances were set from the measured gap of every healthy backend (docs/fidelity.md) plus a safety margin, and
every fault the project knows lands far below them. Budgets never exceed `max_db` (bit-identical results are
`inf` dB; a 16-bit candidate against an fp32 reference rounds its activations and cannot reach 55 dB there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CLASSES = ("16-bit", "8-bit", "4-bit", "fp4", "sparse")

# expected weight SQNR in dB of the coarsest format of each class (module docstring)
CLASS_NOISE_DB: dict[str, float] = {"16-bit": 55.6, "8-bit": 31.5, "4-bit": 20.3, "fp4": 19.5, "sparse": 8.8}

# the bits a class stores its weights in (silent fallback: a class below the reference's bits must change bits)
CLASS_BITS: dict[str, int] = {"16-bit": 16, "8-bit": 8, "4-bit": 4, "fp4": 4, "sparse": 16}


def float_format_sqnr_db(significant_bits: int) -> float:
    """SQNR of round-to-nearest into a float format with p significant bits, values log-uniform in an octave."""
    p = significant_bits
    mean_inv_sq = (1 - 0.25) / 2 / math.log(2)  # E[1/x^2] over [1, 2) log-uniform
    return 10 * math.log10(12 * 4 ** (p - 1) / mean_inv_sq)


def int_grid_sqnr_db(levels: int, range_sigmas: float) -> float:
    """SQNR of a uniform grid of `levels` steps spanning `range_sigmas` standard deviations."""
    step = range_sigmas / levels
    return 10 * math.log10(12 / step**2)


@dataclass(frozen=True)
class Budget:
    """Lower bounds in dB for one precision class (p50: the typical probe row; min: the worst)."""

    precision_class: str
    weight: float
    layer_p50: float
    layer_min: float
    state_p50: float
    state_min: float
    action_p50: float
    action_min: float

    def describe(self) -> str:
        return (f"{self.precision_class} budgets (dB): weights {self.weight:.1f}, layer update p50 {self.layer_p50:.1f} "
                f"min {self.layer_min:.1f}, hidden state p50 {self.state_p50:.1f} min {self.state_min:.1f}, "
                f"actions p50 {self.action_p50:.1f} min {self.action_min:.1f}")


# No budget goes below these: an output whose SQNR is ~0 dB is unrelated to the reference's, whatever the class
# (the sparse class's derived budgets would otherwise admit anything).
FLOOR_DB = {"p50": 6.0, "min": 3.0}


def budget_for(precision_class: str, allowance_db: dict[str, float], max_db: dict[str, float]) -> Budget:
    """Budget of a class: its weight noise minus each statistic's allowance, capped at max_db, floored at FLOOR_DB."""
    noise = CLASS_NOISE_DB[precision_class]

    def b(stat: str) -> float:
        floor = FLOOR_DB["min"] if stat.endswith("min") or stat == "weight" else FLOOR_DB["p50"]
        return max(min(noise - float(allowance_db[stat]), float(max_db.get(stat, math.inf))), floor)

    return Budget(precision_class, b("weight"), b("layer_p50"), b("layer_min"), b("state_p50"), b("state_min"),
                  b("action_p50"), b("action_min"))


def class_of_backend(backend) -> tuple[str, str]:
    """(precision class, how it was known): declared by the backend, read from its name, or the strict default.

    A backend that declares nothing is judged as 16-bit: the strictest budgets, so an undeclared custom backend
    can only be judged too strictly, never too leniently.
    """
    from evalkit.fidelity.fallback import precision_bits

    declared = getattr(backend, "precision_class", None)
    if declared:
        if declared not in CLASSES:
            from evalkit.errors import BadInput

            raise BadInput(f"backend '{getattr(backend, 'name', backend)}' declares precision_class={declared!r}; "
                           f"valid: {', '.join(CLASSES)}")
        return declared, "declared"
    name = str(getattr(backend, "name", "") or "")
    bits = precision_bits(name)
    if "fp4" in name.lower() or "nvfp4" in name.lower():
        return "fp4", "from its name"
    if bits == 4:
        return "4-bit", "from its name"
    if bits == 8:
        return "8-bit", "from its name"
    return "16-bit", "default (declares no precision_class)"
