"""Gate thresholds: the `gate` config group (conf/gate/*.yaml). A plain dataclass so Hydra's ConfigStore validates it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from evalkit.errors import BadInput
from evalkit.fidelity.config import FidelityConfig


@dataclass
class GateConfig:
    # --- fidelity (before rollouts): budgets by precision class, evalkit/fidelity/config.py ---
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    always_rollout: bool = False  # run episodes even when fidelity fails (the run still exits 1)
    # --- success and latency (after rollouts) ---
    # Success verdict: pass / regression / inconclusive (docs/gate_statistics.md has every test's error rates).
    alpha: float = 0.05  # false-alarm rate on an unchanged policy (family-wise when several cells are judged together)
    power: float = 0.8  # 1 - beta: the detectable drop reported, and `plan`, use this power
    # Non-inferiority margin: "pass" needs the drop shown < max_drop (one-sided, level alpha); a drop shown > 0
    # but not < max_drop is a regression; neither shown is inconclusive.
    max_drop: float = 0.05
    sequential: bool = False  # group-sequential test on paired episodes, looked at after every block; can stop a run early (nightly: on)
    family_method: str = "holm"  # holm | bh | bonferroni | none: adjustment of regression p-values over a family
    family_size: int = 1  # comparisons judged together (nightly sets it); a cell judged alone uses alpha / family_size
    fail_inconclusive: bool = False  # exit 1 instead of 0 on an inconclusive verdict (strict: true)
    max_latency_ratio: float = 1.10  # candidate p50 / baseline p50, same device only
    # A ratio above the maximum fails only if p50 also grew by more than this: sub-millisecond policies on a
    # shared CPU jitter by tens of percent (0.09 -> 0.11 ms), which says nothing about the policy.
    latency_min_delta_ms: float = 0.2
    baseline: Optional[str] = None  # mlflow run id | latest | run dir | references key ("ref:policy/backend/suite/steps")
    allow_sim_mismatch: bool = False  # judge runs made with different mujoco/robosuite/LIBERO versions (evalkit/gate/compat.py)

    @classmethod
    def from_dict(cls, d: "dict[str, Any] | GateConfig | None") -> "GateConfig":
        """From the composed `gate` group (a plain dict); unknown keys are bad input, not ignored."""
        if isinstance(d, GateConfig):
            return d
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadInput(f"unknown gate fields {unknown}; valid: {sorted(known)}")
        d["fidelity"] = FidelityConfig.from_dict(d.get("fidelity"))
        return cls(**d)

    def validate(self) -> "GateConfig":
        """Bad statistics settings are bad input (exit 2), named with their valid range."""
        from evalkit.stats import FAMILY_METHODS

        if self.family_method not in FAMILY_METHODS:
            raise BadInput(f"gate.family_method={self.family_method!r}; valid: {', '.join(FAMILY_METHODS)}")
        for name, lo, hi in (("alpha", 0.0, 0.5), ("power", 0.0, 1.0), ("max_drop", 0.0, 1.0)):
            v = getattr(self, name)
            if not lo < v < hi:
                raise BadInput(f"gate.{name}={v} must be in ({lo}, {hi})")
        if int(self.family_size) < 1:
            raise BadInput(f"gate.family_size={self.family_size} must be >= 1")
        return self
