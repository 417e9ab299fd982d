"""The gate stage of a run (after rollouts): candidate = this run's results, baseline = `baseline=`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from evalkit.gate.config import GateConfig
from evalkit.gate.judge import GateResult, judge
from evalkit.gate.runs import (
    DEFAULT_TRACKING_URI,
    StoredRun,
    load_run,
    read_latency_calls,
)
from evalkit.results.summary import RunSummary


def gate_run(
    summary: RunSummary | dict[str, Any],
    episodes: pd.DataFrame | None,
    baseline: str | StoredRun,
    cfg: GateConfig | dict | None = None,
    tracking_uri: str = DEFAULT_TRACKING_URI,
    run_id: str | None = None,
    run_dir: str | Path | None = None,
) -> GateResult:
    """Judge a finished run against `baseline` (MLflow run id | latest | run dir | ref:<key>, or a StoredRun
    already resolved before the rollouts).

    run_id: this run's own MLflow id, so `latest` never picks the run itself. run_dir: this run's directory;
    when it holds latency_calls.json the latency check uses the raw call times. Raises BadInput (exit 2)
    when the baseline cannot be found.
    """
    calls = read_latency_calls(run_dir) if run_dir is not None else None
    cand = StoredRun(summary, episodes, ref=run_id or "this run", source="run", latency_calls=calls)
    cand.params = cand.summary.params.to_dict()
    base = baseline if isinstance(baseline, StoredRun) else load_run(baseline, tracking_uri, like=cand.params,
                                                                      exclude_run_id=run_id)
    return judge(cand, base, GateConfig.from_dict(cfg))
