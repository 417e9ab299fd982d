"""MLflow side of tracking: resolve the store, check it is reachable, upload bundles.

The default store is sqlite (`sqlite:///mlruns/mlflow.db`) with artifacts under `mlruns/artifacts`:
MLflow 3.13+ refuses the plain file store, and sqlite needs no server.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

from evalkit.tracking.bundle import read_bundle, sync_state_path

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
SWEEP_TAG = "evalkit.sweep_key"


def resolve_uri(uri: str | None, base_dir: str | Path | None = None) -> str:
    """Make a relative sqlite path absolute (relative to base_dir, default cwd) and create its folder."""
    uri = uri or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        path = Path(base_dir or os.getcwd()) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path.resolve()}"
    if uri.startswith("sqlite:////"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_root_for(uri: str) -> str | None:
    """sqlite stores keep artifacts beside the database: <db dir>/artifacts."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "artifacts").resolve().as_uri()
    return None  # a server decides its own artifact root


def reachable(uri: str, timeout_s: float = 3.0) -> tuple[bool, str]:
    if uri.startswith("http://") or uri.startswith("https://"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                return r.status == 200, f"HTTP {r.status}"
        except Exception as e:
            return False, f"{type(e).__name__}: {e}"
    return True, "local store"


def _mlflow(uri: str):
    # Fail fast against a dead server instead of MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow


def get_or_create_experiment(uri: str, name: str) -> str:
    mlflow = _mlflow(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root_for(uri))
    except Exception:
        exp = client.get_experiment_by_name(name)  # created concurrently by another job
        if exp is None:
            raise
        return exp.experiment_id


def find_or_create_parent(uri: str, experiment: str, sweep_key: str, run_name: str, tags: dict | None = None) -> str:
    mlflow = _mlflow(uri)
    client = mlflow.MlflowClient(uri)
    exp_id = get_or_create_experiment(uri, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_key}'", max_results=1,
                               order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={SWEEP_TAG: sweep_key, "evalkit.role": "sweep", **(tags or {})})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def sync_bundle(run_dir: str | Path, uri: str, base_dir: str | Path | None = None) -> str:
    """Upload one run bundle; idempotent (re-syncing reuses the run id written on the first try)."""
    run_dir = Path(run_dir)
    uri = resolve_uri(uri, base_dir)
    bundle = read_bundle(run_dir)
    state_path = sync_state_path(run_dir)
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("uri") == uri and state.get("complete"):
        return state["run_id"]

    mlflow = _mlflow(uri)
    client = mlflow.MlflowClient(uri)
    exp_id = get_or_create_experiment(uri, bundle.experiment)
    tags = dict(bundle.tags)
    parent = bundle.parent_run_id
    if parent is None and bundle.sweep_key:
        parent = find_or_create_parent(uri, bundle.experiment, bundle.sweep_key, f"sweep {Path(bundle.sweep_key).name}")
    if parent:
        tags["mlflow.parentRunId"] = parent

    run_id = state.get("run_id") if state.get("uri") == uri else None
    if run_id is None:
        run_id = client.create_run(exp_id, run_name=bundle.run_name, tags=tags).info.run_id
        state = {"uri": uri, "run_id": run_id, "complete": False}
        state_path.write_text(json.dumps(state))
    from mlflow.entities import Metric, Param, RunTag

    client.log_batch(
        run_id,
        params=[Param(k, str(v)[:6000]) for k, v in bundle.params.items()],
        metrics=[Metric(k, float(v), 0, 0) for k, v in bundle.metrics.items() if v is not None],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )
    if bundle.table:
        import pandas as pd

        df = pd.read_parquet(run_dir / bundle.table)
        client.log_table(run_id, data=df.astype({c: "string" for c in df.columns if df[c].dtype == object}),
                         artifact_file="episodes_table.json")
    for rel in bundle.artifacts:
        p = run_dir / rel
        if p.is_dir():
            client.log_artifacts(run_id, str(p), artifact_path=rel)
        elif p.exists():
            client.log_artifact(run_id, str(p))
    client.set_terminated(run_id)
    state["complete"] = True
    state_path.write_text(json.dumps(state))
    return run_id


def log_bench_run(params: dict[str, Any], metrics: dict[str, float], json_path: str, uri: str | None = None,
                  experiment: str = "evalkit-bench") -> str | None:
    """Log a latency benchmark (no rollouts) as its own MLflow run with its JSON as artifact."""
    uri = resolve_uri(uri)
    ok, why = reachable(uri)
    if not ok:
        print(f"[evalkit] tracking store {uri} unreachable ({why}); benchmark JSON kept at {json_path}")
        return None
    mlflow = _mlflow(uri)
    client = mlflow.MlflowClient(uri)
    exp_id = get_or_create_experiment(uri, experiment)
    run = client.create_run(exp_id, run_name=Path(json_path).stem, tags={"evalkit.kind": "bench"})
    from mlflow.entities import Metric, Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items() if v is not None])
    client.log_artifact(run.info.run_id, json_path)
    client.set_terminated(run.info.run_id)
    return run.info.run_id
