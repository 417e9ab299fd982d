"""The regression gate (DESIGN.md): judge a candidate run against a baseline with stated error rates."""

from evalkit.gate.config import GateConfig
from evalkit.gate.judge import GateCheck, GateResult, judge
from evalkit.gate.runs import StoredRun, load_run
from evalkit.gate.stage import gate_run

__all__ = ["GateConfig", "GateCheck", "GateResult", "StoredRun", "gate_run", "judge", "load_run"]
