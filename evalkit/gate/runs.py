"""Load a stored run for the gate: an MLflow run id, `latest` baseline, a run directory, or a reference entry.

MLflow (its client and `mlflow.artifacts`) reads the tracking store; pandas reads the episode table;
PyYAML reads reference files. Nothing here judges anything. `latency_calls.json` (written by
`write_latency_calls`, one entry per batched policy call) lets the gate judge latency from the raw call
times instead of two stored quantiles.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from evalkit.atomic import write_json_atomic
from evalkit.errors import BadInput
from evalkit.results.summary import RunSummary
from evalkit.tracking.names import with_design_names
from evalkit.tracking.store import DEFAULT_URI, ensure_store

DEFAULT_TRACKING_URI = DEFAULT_URI
REFERENCES_DIR = Path(__file__).resolve().parents[2] / "references"
BASELINE_TAG = "evalkit.baseline"
MATCH_PARAMS = ("policy", "suite", "denoise_steps", "device")  # what `latest` must share with the candidate
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
LATENCY_CALLS = "latency_calls.json"  # raw policy call times of a run (ms), an artifact next to summary.json


@dataclass
class StoredRun:
    summary: RunSummary  # a summary.json dict is read into one (from_dict)
    episodes: pd.DataFrame | None = None
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    ref: str = ""  # how it was named (for messages)
    source: str = "dict"  # mlflow | dir | reference | dict
    latency_calls: np.ndarray | None = None  # ms per policy call, warm-up calls removed (None: not recorded)

    def __post_init__(self) -> None:
        if not isinstance(self.summary, RunSummary):
            self.summary = RunSummary.from_dict(self.summary)

    @classmethod
    def from_summary(cls, summary: RunSummary | dict[str, Any], ref: str = "summary") -> "StoredRun":
        run = cls(summary=summary, ref=ref)
        run.params = run.summary.params.to_dict()
        return run


def load_run(
    run_ref: str,
    tracking_uri: str = DEFAULT_TRACKING_URI,
    like: dict[str, Any] | None = None,
    exclude_run_id: str | None = None,
    references_dir: Path | str | None = None,
) -> StoredRun:
    """Resolve `run_ref` to a StoredRun.

    run_ref: a run directory (holds summary.json), `latest` (newest run tagged evalkit.baseline=true
    whose policy/suite/denoise_steps/device equal `like`'s), `ref:<policy>/<backend>/<suite>/<steps>`
    (or that key bare) from references/*.yaml, or an MLflow run id.
    """
    ref = str(run_ref).strip()
    if not ref:
        raise BadInput("empty run reference")
    path = Path(ref)
    if path.is_dir():
        return _load_dir(path)
    if ref == "latest":
        if not like:
            raise BadInput("baseline=latest needs the candidate's params (policy, suite, denoise_steps, device)")
        return _load_latest(tracking_uri, like, exclude_run_id)
    key = ref[4:] if ref.startswith("ref:") else ref
    refs = load_references(references_dir)
    if key in refs:
        return _from_reference(key, refs[key])
    if _RUN_ID.match(ref):
        return _load_mlflow(ref, tracking_uri)
    raise BadInput(
        f"cannot resolve run '{ref}': not a run directory, not 'latest', not an MLflow run id, "
        f"not a reference key (known: {', '.join(sorted(refs)) or 'none'})"
    )


# --- raw latency -----------------------------------------------------------------------------


def write_latency_calls(run_dir: str | Path, call_s: list[float], batch_sizes: list[int] | None = None,
                        warmup_calls: int = 1) -> Path:
    """Write a run's raw policy call times (seconds in, ms stored) as latency_calls.json in run_dir.

    The first `warmup_calls` calls are stored but marked: they are excluded from the gate's latency
    comparison, as they are from the run's latency_ms_* quantiles (evalkit.results.summary.latency_summary).
    """
    path = Path(run_dir) / LATENCY_CALLS
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"unit": "ms", "warmup_calls": int(warmup_calls) if len(call_s) > 1 else 0,
           "call_ms": [round(float(x) * 1e3, 6) for x in call_s],
           "batch_sizes": [int(b) for b in (batch_sizes or [])]}
    return write_json_atomic(path, doc)  # whole or absent, never torn (evalkit.atomic)


def read_latency_calls(folder: str | Path) -> np.ndarray | None:
    """The call times (ms) of latency_calls.json in folder without the warm-up calls; None when absent."""
    f = Path(folder) / LATENCY_CALLS
    if not f.exists():
        return None
    try:
        doc = json.loads(f.read_text())
        calls = np.asarray(doc["call_ms"], dtype=float)[int(doc.get("warmup_calls", 0)):]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise BadInput(f"{f} is not a latency_calls file: {e}") from None
    return calls if calls.size else None


# --- run directories -------------------------------------------------------------------------


def _read_episodes(folder: Path) -> pd.DataFrame | None:
    if (folder / "episodes.parquet").exists():
        return pd.read_parquet(folder / "episodes.parquet")
    if (folder / "episodes.csv").exists():
        return pd.read_csv(folder / "episodes.csv")
    return None


def _load_dir(path: Path) -> StoredRun:
    f = path / "summary.json"
    if not f.exists():
        raise BadInput(f"run directory {path} has no summary.json")
    summary = RunSummary.from_dict(json.loads(f.read_text()))
    return StoredRun(summary, _read_episodes(path), summary.params.to_dict(), {}, str(path), "dir",
                     read_latency_calls(path))


# --- MLflow ----------------------------------------------------------------------------------


def _client(tracking_uri: str):
    import mlflow

    ensure_store(tracking_uri)  # a sqlite store another run is creating right now: wait for its tables
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def _load_mlflow(run_id: str, tracking_uri: str) -> StoredRun:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise BadInput(f"MLflow run {run_id} not found in {tracking_uri}: {str(e).splitlines()[0]}") from None
    params = dict(run.data.params)
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    names = {a.path for a in client.list_artifacts(run_id)}
    summary: RunSummary | None = None
    episodes = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("summary.json", "episodes.parquet", "episodes.csv", LATENCY_CALLS):
            if name in names:
                mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=name, dst_path=tmp, tracking_uri=tracking_uri
                )
        if (Path(tmp) / "summary.json").exists():
            stored = json.loads((Path(tmp) / "summary.json").read_text())
            stored.setdefault("params", params)
            summary = RunSummary.from_dict(stored)
        episodes = _read_episodes(Path(tmp))
        calls = read_latency_calls(tmp)
    if summary is None:  # older runs: rebuild what the gate needs from metrics
        m = with_design_names(run.data.metrics)  # a run logged with headline names only reads the same
        if "success_rate" not in m:
            raise BadInput(f"MLflow run {run_id} has neither summary.json nor a success_rate metric")
        summary = RunSummary.from_metrics(m, params)
        if episodes is not None:
            summary.episodes, summary.successes = len(episodes), int(episodes["success"].sum())
    return StoredRun(summary, episodes, params or summary.params.to_dict(), tags, run_id, "mlflow", calls)


def _load_latest(tracking_uri: str, like: dict[str, Any], exclude_run_id: str | None) -> StoredRun:
    client = _client(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    filt = [f"tags.`{BASELINE_TAG}` = 'true'"]
    for p in MATCH_PARAMS:
        if like.get(p) is None:
            raise BadInput(f"baseline=latest needs the candidate's '{p}' param")
        filt.append(f"params.{p} = '{like[p]}'")
    runs = client.search_runs(exps, " and ".join(filt), order_by=["attributes.start_time DESC"], max_results=5)
    runs = [r for r in runs if r.info.run_id != exclude_run_id]
    if not runs:
        want = ", ".join(f"{p}={like[p]}" for p in MATCH_PARAMS)
        raise BadInput(f"no baseline run tagged {BASELINE_TAG}=true with {want} in {tracking_uri}")
    out = _load_mlflow(runs[0].info.run_id, tracking_uri)
    out.ref = f"latest ({runs[0].info.run_id})"
    return out


# --- reference files -------------------------------------------------------------------------


def reference_key(policy: str, backend: str, suite: str, denoise_steps: Any) -> str:
    return f"{policy}/{backend}/{suite}/{denoise_steps}"


def load_references(references_dir: Path | str | None = None) -> dict[str, dict[str, Any]]:
    """All entries of references/*.yaml by key policy/backend/suite/denoise_steps."""
    folder = Path(references_dir) if references_dir else REFERENCES_DIR
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        doc = yaml.safe_load(f.read_text()) or {}
        for e in doc.get("entries", []):
            for req in ("policy", "backend", "suite", "denoise_steps", "success_rate", "episodes"):
                if req not in e:
                    raise BadInput(f"{f}: reference entry {e.get('policy')}/{e.get('suite')} lacks '{req}'")
            e = dict(e, file=f.name, version=doc.get("version"))
            out[reference_key(e["policy"], e["backend"], e["suite"], e["denoise_steps"])] = e
    return out


def _from_reference(key: str, e: dict[str, Any]) -> StoredRun:
    n = int(e["episodes"])
    x = int(round(float(e["success_rate"]) * n))
    params = {p: e.get(p) for p in ("policy", "backend", "suite", "denoise_steps", "device")}
    summary = {
        "success_rate": x / n,
        "episodes": n,
        "successes": x,
        "per_task": e.get("per_task") or {},
        "latency": {k: e[k] for k in ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99") if k in e},
        "params": params,
        "source": e.get("source"),
    }
    return StoredRun(RunSummary.from_dict(summary), None, params, {"reference_file": e["file"]}, f"ref:{key}", "reference")
