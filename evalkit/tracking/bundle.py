"""The run bundle: params, metrics, tags and artifact paths of one run, as JSON in the run dir."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evalkit.atomic import write_json_atomic

BUNDLE_DIR = "mlflow_bundle"


@dataclass
class RunBundle:
    experiment: str
    run_name: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)  # paths relative to the run dir (files or folders)
    table: str | None = None  # relative path of the episode table (parquet) to log with mlflow.log_table
    sweep_key: str | None = None  # multirun: children of one sweep share a parent run found by this key
    parent_run_id: str | None = None
    # when the run really started and ended (ms since the epoch), so MLflow shows the run's own times and duration,
    # not the upload's; None (bundles written before these existed): the upload's time
    start_time_ms: int | None = None
    end_time_ms: int | None = None


def write_bundle(run_dir: Path, bundle: RunBundle) -> Path:
    d = Path(run_dir) / BUNDLE_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / "run.json"
    return write_json_atomic(path, asdict(bundle), indent=2, default=str)  # whole or absent (evalkit.atomic)


def read_bundle(run_dir: Path) -> RunBundle:
    path = Path(run_dir) / BUNDLE_DIR / "run.json"
    if not path.exists():
        from evalkit.errors import BadInput

        raise BadInput(f"{path} not found: '{run_dir}' is not an evalkit run directory with a tracking bundle")
    return RunBundle(**json.loads(path.read_text()))


def sync_state_path(run_dir: Path) -> Path:
    return Path(run_dir) / BUNDLE_DIR / "synced.json"
