"""Fidelity settings: the `gate.fidelity` part of the gate config group (conf/gate/*.yaml).

Budgets are not set here one number per check: each comes from the backend's precision class
(evalkit.fidelity.budgets) minus an allowance per statistic. The allowances below are what a healthy backend's
statistic may lose against its class's weight noise; docs/fidelity.md shows the measured gaps they cover.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from evalkit.errors import BadInput
from evalkit.fidelity.budgets import CLASSES, Budget, budget_for

STATS = ("weight", "layer_p50", "layer_min", "state_p50", "state_min", "action_p50", "action_min")


def _allowances() -> dict[str, float]:
    # dB below the class's weight noise (see the module docstring and docs/fidelity.md)
    return {"weight": 6.0, "layer_p50": 8.0, "layer_min": 14.0, "state_p50": 12.0, "state_min": 18.0,
            "action_p50": 10.0, "action_min": 16.0}


def _caps() -> dict[str, float]:
    # no statistic of a healthy 16-bit backend needs more than this (activations round at 16 bits too)
    return {"weight": 30.0, "layer_p50": 20.0, "layer_min": 14.0, "state_p50": 26.0, "state_min": 20.0,
            "action_p50": 26.0, "action_min": 20.0}


@dataclass
class FidelityConfig:
    reference_backend: str = "bf16"  # the candidate is compared with the same policy under this backend
    probe_noise_seed: int = 0  # flow-matching noise shared by reference and candidate (call k uses seed + k)
    calib_init_states: int = 2  # calibration probes: each task's init states 0..k-1 at t = 0 (backend.calib=probes)
    check_init_states: int = 1  # held-out check probes: each task's LAST k init states (never used for calibration)
    check_steps: list[int] = field(default_factory=lambda: [0, 30, 60])  # steps of a reference rollout to check at
    check_calls: int = 10  # at most this many predict calls (sizes 1, 1, 2, 2, 3, 3, ...; evalkit.fidelity.run)
    allowance_db: dict[str, float] = field(default_factory=_allowances)
    max_db: dict[str, float] = field(default_factory=_caps)
    margin_db: float = 0.0  # added to every budget (gate=strict raises it)
    # Free-running checks (hidden states, actions) excuse from their MIN budgets one probe in every this many
    # (rounded up): the probes whose action SQNR is lowest, where a flow policy sits at a decision boundary and
    # amplifies any perturbation, healthy or not (docs/fidelity.md). Their p50 budgets see every probe, every probe
    # row is still judged by the teacher-forced layer check, and a non-finite output is never excused. 0: none.
    boundary_excuse_every: int = 16

    def budget(self, precision_class: str) -> Budget:
        if precision_class not in CLASSES:
            raise BadInput(f"unknown precision class {precision_class!r}; valid: {', '.join(CLASSES)}")
        allow = {k: float(v) - self.margin_db for k, v in self.allowance_db.items()}
        caps = {k: float(v) + self.margin_db for k, v in self.max_db.items()}
        return budget_for(precision_class, allow, caps)

    @classmethod
    def from_dict(cls, d: "dict[str, Any] | FidelityConfig | None") -> "FidelityConfig":
        if isinstance(d, FidelityConfig):
            return d
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadInput(f"unknown gate.fidelity fields {unknown}; valid: {sorted(known)}")
        for key in ("allowance_db", "max_db"):
            if key in d:
                bad = sorted(set(d[key]) - set(STATS))
                if bad:
                    raise BadInput(f"gate.fidelity.{key} has unknown statistics {bad}; valid: {', '.join(STATS)}")
                d[key] = {**getattr(cls(), key), **{k: float(v) for k, v in d[key].items()}}
        cfg = cls(**d)
        if cfg.calib_init_states < 1 or cfg.check_init_states < 1 or cfg.check_calls < 1 or not cfg.check_steps:
            raise BadInput("gate.fidelity: calib_init_states, check_init_states and check_calls must be >= 1, "
                           "check_steps non-empty")
        if cfg.boundary_excuse_every < 0:
            raise BadInput(f"gate.fidelity.boundary_excuse_every must be >= 0 (0: excuse none), got {cfg.boundary_excuse_every}")
        if any(int(s) < 0 for s in cfg.check_steps):
            raise BadInput(f"gate.fidelity.check_steps must be >= 0, got {cfg.check_steps}")
        return cfg
