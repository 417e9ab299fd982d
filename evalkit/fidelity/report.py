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
    state_cosine_min: float  # cosine of the layer's output in the free-running candidate (accumulated error)
    calls: int  # forward calls seen on the candidate (expert layers: one per denoise step)
    order: int  # position in execution order (first call)


@dataclass
class FidelityReport:
    checks: list[FidelityCheck]
    reference_backend: str
    candidate_backend: str
    probes: int
    layers: list[LayerResult] = field(default_factory=list)
    first_divergent_layer: str | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failed(self) -> list[FidelityCheck]:
        return [c for c in self.checks if c.status == FAIL]

    def check(self, name: str) -> FidelityCheck:
        return next(c for c in self.checks if c.name == name)

    def metrics(self) -> dict[str, float]:
        """MLflow metrics (DESIGN.md names): action_cosine_min, layer_cosine_min, plus action_sqnr_db_min."""
        out = {}
        for name, key in (("action_cosine", "action_cosine_min"), ("layer_cosine", "layer_cosine_min"), ("action_sqnr", "action_sqnr_db_min")):
            c = next((c for c in self.checks if c.name == name), None)
            if c is not None and isinstance(c.value, (int, float)) and math.isfinite(c.value):
                out[key] = float(c.value)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["failed"] = [c.name for c in self.failed()]
        d.update(self.metrics())  # action_cosine_min, layer_cosine_min, action_sqnr_db_min at the top for MLflow
        for c in d["checks"]:
            for k in ("value", "threshold"):
                if isinstance(c[k], float) and not math.isfinite(c[k]):
                    c[k] = str(c[k])  # JSON has no inf
        return d
