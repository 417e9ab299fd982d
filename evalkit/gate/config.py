"""Gate thresholds: the `gate` config group (conf/gate/*.yaml). A plain dataclass so Hydra's ConfigStore validates it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from evalkit.errors import BadInput


@dataclass
class GateConfig:
    # --- fidelity (before rollouts) ---
    reference_backend: str = "bf16"  # the reference the candidate's outputs are compared to (fp32 also available)
    action_cosine_min: float = 0.99  # min over probes of the cosine between action chunks
    # 17 dB is the error budget that cosine 0.99 allows when the error is uncorrelated with the signal
    # (cos = 1/sqrt(1 + 1/SNR) -> SNR = 49 = 17 dB). SQNR is checked as well because cosine is blind to
    # scale: a quantization scale applied wrongly by a factor k leaves cosine ~1 but gives
    # SQNR = -20 log10|k - 1| (k = 1.15 already fails).
    sqnr_min_db: float = 17.0
    # Hidden states are checked on every layer of deep stacks where rounding error accumulates, so
    # slightly looser than the action cosine. bf16 vs fp32 stays >= 0.999; the faults this must catch
    # (shared weights, a dropped residual branch) drop it far below 0.9.
    layer_cosine_min: float = 0.98
    # Each layer's effective (dequantized) weights vs its own reference layer. int4 per-group gives
    # ~ 20 dB, fp8 ~ 30 dB; a wrong scale (x2) gives 0 dB, another layer's weights ~ -3 dB.
    weight_sqnr_min_db: float = 12.0
    always_rollout: bool = False  # run episodes even when fidelity fails (the run still exits 1)
    probe_init_states: int = 1  # probes per task of the suite (init states 0..k-1)
    probe_noise_seed: int = 0  # flow-matching noise shared by reference and candidate
    # --- success and latency (after rollouts) ---
    alpha: float = 0.05  # false-alarm rate of the success test on an unchanged policy
    power: float = 0.8  # 1 - beta: probability of catching a drop of the reported detectable size
    max_drop: float = 0.05  # the success drop the gate must be able to catch; warns when it cannot
    max_latency_ratio: float = 1.10  # candidate p50 / baseline p50, same device only
    # A ratio above the maximum fails only if p50 also grew by more than this: sub-millisecond policies on a
    # shared CPU jitter by tens of percent (0.09 -> 0.11 ms), which says nothing about the policy.
    latency_min_delta_ms: float = 0.2
    baseline: Optional[str] = None  # mlflow run id | latest | run dir | references key ("ref:policy/backend/suite/steps")

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
        return cls(**d)
