"""FidelityReport: every fidelity check with its value and threshold, pass or fail (goes into summary.json)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass
class FidelityCheck:
    name: str
    value: Any
    threshold: Any
    passed: bool  # a skipped check counts as passed; its status and detail say why it was skipped
    detail: str
    status: str = PASS


@dataclass
class LayerResult:
    layer: str  # "<stack>.layers.<i>"
    cosine_min: float  # agreement of the layer's residual update (cosine-like), reference input fed in; min over probes, calls
    update_p50_db: float  # the same as an SQNR in dB: median over probe rows and calls
    update_min_db: float  # ... and its worst row
    state_p50_db: float  # SQNR of the layer's output in the free-running candidate (accumulated error): median
    state_min_db: float  # ... and worst
    calls: int  # forward calls seen on the candidate over all check calls (expert layers: one per denoise step)
    ref_calls: int  # ... and on the reference
    order: int  # position in execution order (first call)


@dataclass
class FidelityReport:
    checks: list[FidelityCheck]
    reference_backend: str
    candidate_backend: str
    probes: int
    layers: list[LayerResult] = field(default_factory=list)
    first_divergent_layer: str | None = None
    precision_class: str = "16-bit"  # the class whose budgets applied (evalkit.fidelity.budgets)
    class_source: str = ""  # declared | from its name | default
    budget: dict[str, Any] = field(default_factory=dict)
    calls: int = 0  # predict calls the held-out probes were split into
    action_cosine_min: float | None = None
    weight_sqnr_db: dict[str, float] = field(default_factory=dict)  # driven effective weight vs reference, per Linear

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failed(self) -> list[FidelityCheck]:
        return [c for c in self.checks if c.status == FAIL]

    def check(self, name: str) -> FidelityCheck:
        return next(c for c in self.checks if c.name == name)

    def metrics(self) -> dict[str, float]:
        """MLflow metrics (names: docs/architecture.md): action_cosine_min, layer_cosine_min, plus the dB minima."""
        out = {}
        if self.action_cosine_min is not None and math.isfinite(self.action_cosine_min):
            out["action_cosine_min"] = float(self.action_cosine_min)
        if self.layers:
            out["layer_cosine_min"] = float(min(lr.cosine_min for lr in self.layers))
        for name, key in (("action_sqnr", "action_sqnr_db_min"), ("layer_cosine", "layer_sqnr_db_min"),
                          ("layer_states", "state_sqnr_db_min"), ("weight_match", "weight_sqnr_db_min")):
            c = next((c for c in self.checks if c.name == name), None)
            if c is not None and isinstance(c.value, (int, float)) and math.isfinite(c.value):
                out[key] = float(c.value)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["failed"] = [c.name for c in self.failed()]
        d.update(self.metrics())  # action_cosine_min, layer_cosine_min, ... at the top for MLflow
        return _json_safe(d)


def _json_safe(x: Any) -> Any:
    """JSON has no inf/nan: they become strings ("inf", "-inf", "nan")."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x
