"""Which baseline a run is judged against, resolved before the first episode (a bad name costs seconds, not a suite).

`baseline=auto` (the default): the newest run tagged evalkit.baseline=true in the tracking store with the same
policy, suite and denoise steps. None found is not a pass: the run's verdict is `unjudged` (printed, in
summary.json and as the MLflow tag evalkit.verdict). `baseline=none` asks for no judgement (also `unjudged`).
Any other value names one run (MLflow run id, `latest`, run directory, `ref:<key>`) and must resolve, or the run
stops with exit 2 before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalkit.gate.runs import BASELINE_TAG, StoredRun, load_run

AUTO = "auto"
NONE_VALUES = ("none", "null", "false", "")
AUTO_MATCH = ("policy", "suite", "denoise_steps")


@dataclass
class BaselineChoice:
    run: StoredRun | None
    how: str  # one line for the terminal and summary.json: what was chosen and why


def _sqlite_missing(uri: str) -> bool:
    """A sqlite store that does not exist yet holds no baseline (and must not be created just to look)."""
    if not uri.startswith("sqlite:///"):
        return False
    return not Path(uri[len("sqlite:///"):]).exists()


def find_auto(tracking_uri: str, like: dict[str, Any]) -> tuple[str | None, str]:
    """(run id, why) of the newest baseline-tagged run sharing AUTO_MATCH with `like`; (None, why) when none."""
    if _sqlite_missing(tracking_uri):
        return None, f"no tracking store yet at {tracking_uri}"
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    filt = [f"tags.`{BASELINE_TAG}` = 'true'"] + [f"params.{p} = '{like[p]}'" for p in AUTO_MATCH]
    try:
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, " and ".join(filt), order_by=["attributes.start_time DESC"], max_results=1)
    except Exception as e:  # an unreachable store holds no baseline we could use; say why
        return None, f"tracking store {tracking_uri} not readable ({type(e).__name__})"
    want = ", ".join(f"{p}={like[p]}" for p in AUTO_MATCH)
    if not runs:
        return None, f"no run tagged {BASELINE_TAG}=true with {want} in {tracking_uri}"
    return runs[0].info.run_id, f"newest run tagged {BASELINE_TAG}=true with {want}"


def resolve_baseline(ref: str | None, tracking_uri: str, like: dict[str, Any], offline: bool = False) -> BaselineChoice:
    """Resolve `baseline=` before the rollouts (module docstring). Raises BadInput for a named baseline that
    cannot be found."""
    value = "none" if ref is None else str(ref).strip()
    if value.lower() in NONE_VALUES:
        return BaselineChoice(None, "baseline=none: not judged")
    if value.lower() == AUTO:
        if offline:
            return BaselineChoice(None, "baseline=auto: tracking is offline, no store to search")
        run_id, why = find_auto(tracking_uri, like)
        if run_id is None:
            return BaselineChoice(None, f"baseline=auto: {why} (tag one: tracking.tag_baseline=true)")
        run = load_run(run_id, tracking_uri)
        return BaselineChoice(run, f"baseline=auto: {why}: {run_id}")
    run = load_run(value, tracking_uri, like=like)
    return BaselineChoice(run, f"baseline={value}: {run.ref}")
