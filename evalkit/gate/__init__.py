"""The regression gate (docs/architecture.md): judge a candidate run against a baseline with stated error rates
(docs/gate_statistics.md): pass / regression / inconclusive, families of cells, sequential judging."""

from evalkit.gate.config import GateConfig
from evalkit.gate.family import judge_family
from evalkit.gate.judge import GateCheck, GateResult, judge
from evalkit.gate.runs import StoredRun, load_run
from evalkit.gate.sequential import sequential_stop_rule
from evalkit.gate.stage import gate_run

__all__ = ["GateConfig", "GateCheck", "GateResult", "StoredRun", "gate_run", "judge", "judge_family", "load_run",
           "sequential_stop_rule"]
