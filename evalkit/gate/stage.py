"""The gate stage of a run (after rollouts): candidate = this run's results, baseline = `baseline=`."""

from __future__ import annotations

from typing import Any

import pandas as pd

from evalkit.gate.config import GateConfig
from evalkit.gate.judge import GateResult, judge
from evalkit.gate.runs import DEFAULT_TRACKING_URI, StoredRun, load_run


def gate_run(
    summary: dict[str, Any],
    episodes: pd.DataFrame | None,
    baseline: str,
    cfg: GateConfig | dict | None = None,
    tracking_uri: str = DEFAULT_TRACKING_URI,
    run_id: str | None = None,
) -> GateResult:
    """Judge a finished run against `baseline` (MLflow run id | latest | run dir | ref:<key>).

    run_id: this run's own MLflow id, so `latest` never picks the run itself. Raises BadInput (exit 2)
    when the baseline cannot be found.
    """
    cand = StoredRun(summary, episodes, dict(summary.get("params") or {}), {}, ref=run_id or "this run", source="run")
    base = load_run(baseline, tracking_uri, like=cand.params, exclude_run_id=run_id)
    return judge(cand, base, GateConfig.from_dict(cfg))
