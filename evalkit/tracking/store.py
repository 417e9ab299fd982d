"""MLflow side of tracking: resolve the store, check it is reachable, upload bundles.

The default store is sqlite (`sqlite:///mlruns/mlflow.db`) with artifacts under `mlruns/artifacts`:
MLflow 3.13+ refuses the plain file store, and sqlite needs no server.

A fresh sqlite store gets its tables from whichever process opens it first; MLflow does that without a lock,
so two runs opening a new store at once both migrate it and one fails (`duplicate column name: step`).
`ensure_store` opens it under an exclusive `fcntl.flock` on `<db>.lock` beside the database: the first
process creates the tables, the others wait and then find them.
Experiments are created as classic ML experiments with evalkit's runs view (evalkit.tracking.ui); runs keep
the start and end times the bundle recorded.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from evalkit.tracking.bundle import read_bundle, sync_state_path
from evalkit.tracking.ui import EXPERIMENT_KIND_TAG, experiment_tags

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


_ready_stores: set[str] = set()  # sqlite URIs this process has opened under the lock


def ensure_store(uri: str, timeout_s: float = 300.0) -> None:
    """Open a sqlite store once per process under the lock beside it, creating its tables if it is new.
    Other stores (servers) create themselves; a store whose folder cannot be written is opened without the
    lock (this process cannot create it anyway)."""
    if not uri.startswith("sqlite:///") or uri in _ready_stores:
        return
    import mlflow

    db = Path(uri[len("sqlite:///"):])
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = open(db.with_name(db.name + ".lock"), "a")
    except OSError:
        lock = None
    try:
        deadline = time.monotonic() + timeout_s
        while lock is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tracking store {db}: another process held {lock.name} for {timeout_s:.0f} s") from None
                time.sleep(0.1)
        # MLflow announces the table creation at INFO on stderr: library chatter in the middle of evalkit's output
        db_log = logging.getLogger("mlflow.store.db.utils")
        level = db_log.level
        db_log.setLevel(logging.WARNING)
        try:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)  # builds the store: tables created here
        finally:
            db_log.setLevel(level)
    finally:
        if lock is not None:
            lock.close()  # closing the file releases the lock
    _ready_stores.add(uri)


def _mlflow(uri: str):
    # Fail fast against a dead server instead of MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    import mlflow

    ensure_store(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow


def get_or_create_experiment(uri: str, name: str, runs_view: bool = True) -> str:
    """The experiment's id; a new one is created as a classic ML experiment with evalkit's runs view (`runs_view`:
    experiments of evaluation runs), an existing one gets those tags if it lacks them (a kind chosen in the UI is
    kept; evalkit's view is evalkit's to update)."""
    mlflow = _mlflow(uri)
    client = mlflow.MlflowClient(uri)
    tags = {k: v for k, v in experiment_tags().items() if runs_view or k == EXPERIMENT_KIND_TAG}
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root_for(uri), tags=tags)
        except Exception:
            exp = client.get_experiment_by_name(name)  # created concurrently by another job
            if exp is None:
                raise
    for key, value in tags.items():
        if exp.tags.get(key) != value and not (key == EXPERIMENT_KIND_TAG and key in exp.tags):
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def now_ms() -> int:
    return int(time.time() * 1000)


def find_or_create_parent(uri: str, experiment: str, sweep_key: str, run_name: str, tags: dict | None = None,
                          start_time_ms: int | None = None) -> str:
    """The sweep's parent run (found by its sweep key), created if missing, started at `start_time_ms` (default now)
    and marked finished at once (a sweep that dies keeps no RUNNING run); `log_sweep` sets its real end."""
    mlflow = _mlflow(uri)
    client = mlflow.MlflowClient(uri)
    exp_id = get_or_create_experiment(uri, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_key}'", max_results=1,
                               order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    start = start_time_ms or now_ms()
    run = client.create_run(exp_id, run_name=run_name, start_time=start,
                            tags={SWEEP_TAG: sweep_key, "evalkit.role": "sweep", **(tags or {})})
    client.set_terminated(run.info.run_id, end_time=start)
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
        parent = find_or_create_parent(uri, bundle.experiment, bundle.sweep_key, f"sweep {Path(bundle.sweep_key).name}",
                                       start_time_ms=bundle.start_time_ms)
    if parent:
        tags["mlflow.parentRunId"] = parent

    run_id = state.get("run_id") if state.get("uri") == uri else None
    if run_id is None:
        run_id = client.create_run(exp_id, run_name=bundle.run_name, tags=tags,
                                   start_time=bundle.start_time_ms).info.run_id
        state = {"uri": uri, "run_id": run_id, "complete": False}
        state_path.write_text(json.dumps(state))
    from mlflow.entities import Metric, Param, RunTag

    stamp = bundle.end_time_ms or now_ms()  # a metric's time: when the run produced it
    client.log_batch(
        run_id,
        params=[Param(k, str(v)[:6000]) for k, v in bundle.params.items()],
        metrics=[Metric(k, float(v), stamp, 0) for k, v in bundle.metrics.items() if v is not None],
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
    client.set_terminated(run_id, end_time=bundle.end_time_ms)
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
    exp_id = get_or_create_experiment(uri, experiment, runs_view=False)  # no success rate: not evalkit's runs view
    run = client.create_run(exp_id, run_name=Path(json_path).stem, tags={"evalkit.kind": "bench"})
    from mlflow.entities import Metric, Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, float(v), now_ms(), 0) for k, v in metrics.items() if v is not None])
    client.log_artifact(run.info.run_id, json_path)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def experiment_of(uri: str, run_id: str) -> str:
    """The id of the experiment run `run_id` belongs to (for links to it)."""
    return _mlflow(uri).MlflowClient(uri).get_run(run_id).info.experiment_id
