"""A sweep side by side: one row per cell (job) of a Hydra multirun, read from the cells' run bundles.

Printed at the end of the sweep (evalkit.tracking.callbacks) and logged to the sweep's parent MLflow run as a
table (`mlflow.log_table`, artifact `sweep_cells.json`) with summary metrics (`sweep/...`), so the parent run
answers "which cell did what" without opening every child. Built from the bundles, not summary.json: this
layer sits below evalkit.results (tests/test_packaging.py), and the bundle holds the params, metrics and
verdict MLflow shows.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from evalkit.tracking.bundle import BUNDLE_DIR, read_bundle, sync_state_path
from evalkit.tracking.names import with_design_names
from evalkit.tracking.ui import RUN_PARAMS, VERDICT_TAG

SWEEP_TABLE = "sweep_cells.json"
COLUMNS = ["cell", *RUN_PARAMS, "success_rate", "success_ci_low", "success_ci_high", "latency_ms_p50", "verdict",
           "run_id"]


@dataclass
class Cell:
    name: str  # the job's run dir name (hydra.sweep.subdir)
    params: dict
    metrics: dict  # DESIGN.md names
    verdict: str
    run_id: str | None  # its MLflow run, once uploaded
    start_time_ms: int | None
    end_time_ms: int | None
    experiment: str = "evalkit"


def _job_number(run_dir: Path) -> tuple[int, str]:
    """Hydra numbers a sweep's jobs in its subdir names (`3_noop_bf16_...`): sort 2 before 10."""
    m = re.match(r"(\d+)", run_dir.name)
    return (int(m.group(1)) if m else 1 << 30, run_dir.name)


def sweep_cells(sweep_dir: str | Path) -> list[Cell]:
    """The cells of the sweep in `sweep_dir` that wrote a bundle (a job that failed before its results did not),
    in job order. Bundles of other runs under the folder (a merge's) are not cells."""
    root = Path(sweep_dir).resolve()
    cells = []
    for run_dir in sorted({p.parent.parent for p in root.rglob(f"{BUNDLE_DIR}/run.json")}, key=_job_number):
        b = read_bundle(run_dir)
        if b.sweep_key != str(root):
            continue
        state_path = sync_state_path(run_dir)
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        cells.append(Cell(run_dir.name, b.params, with_design_names(b.metrics), str(b.tags.get(VERDICT_TAG, "")),
                          state.get("run_id") if state.get("complete") else None, b.start_time_ms, b.end_time_ms,
                          b.experiment))
    return cells


def cells_frame(cells: list[Cell]) -> pd.DataFrame:
    """One row per cell: COLUMNS (params as strings, metrics as floats, NaN where a cell has none)."""
    rows = [{"cell": c.name, **{p: str(c.params.get(p, "")) for p in RUN_PARAMS},
             **{m: c.metrics.get(m) for m in ("success_rate", "success_ci_low", "success_ci_high", "latency_ms_p50")},
             "verdict": c.verdict, "run_id": c.run_id or ""} for c in cells]
    return pd.DataFrame(rows, columns=COLUMNS).astype({m: float for m in COLUMNS[5:9]})


def summary_metrics(df: pd.DataFrame) -> dict[str, float]:
    """The parent run's metrics: cells, regressions, the best and worst success rate, the fastest p50 latency."""
    m: dict[str, float] = {"sweep/cells": float(len(df)), "sweep/regressions": float((df["verdict"] == "regression").sum())}
    if df["success_rate"].notna().any():
        m["sweep/success_rate_max"] = float(df["success_rate"].max())
        m["sweep/success_rate_min"] = float(df["success_rate"].min())
    if df["latency_ms_p50"].notna().any():
        m["sweep/latency_p50_ms_min"] = float(df["latency_ms_p50"].min())
    return m


def _pct(x: float) -> str:
    return "–" if pd.isna(x) else f"{100 * x:.1f}%"


def print_sweep_table(df: pd.DataFrame, console: Console | None = None, title: str = "sweep") -> None:
    """The cells side by side: a param every cell shares goes in the title, the others get columns; a cell is
    named by its job number (its folder: `<number>_...` in the sweep dir)."""
    console = console or Console()
    shared = [p for p in RUN_PARAMS if df[p].nunique() == 1 and len(df) > 1]
    varying = [p for p in RUN_PARAMS if p not in shared]
    t = Table(title=" · ".join([title, *(f"{p} {df[p].iloc[0]}" for p in shared)]))
    for name, justify in (("job", "right"), *((p, "left") for p in varying), ("success", "right"),
                          ("95% CI (Wilson)", "right"), ("p50 ms", "right"), ("verdict", "left")):
        t.add_column(name, justify=justify, overflow="fold")
    for r in df.itertuples(index=False):
        lat = "–" if pd.isna(r.latency_ms_p50) else f"{r.latency_ms_p50:.1f}"
        job = re.match(r"\d+", r.cell)
        t.add_row(job.group(0) if job else r.cell, *(str(getattr(r, p)) for p in varying), _pct(r.success_rate),
                  f"[{_pct(r.success_ci_low)}, {_pct(r.success_ci_high)}]", lat, r.verdict)
    console.print(t)


def log_sweep(uri: str, parent_run_id: str, df: pd.DataFrame, cells: list[Cell]) -> None:
    """Log the table and summary metrics to the parent run and end it when its last cell ended."""
    from mlflow.entities import Metric

    from evalkit.tracking.store import _mlflow, now_ms

    client = _mlflow(uri).MlflowClient(uri)
    if SWEEP_TABLE not in {a.path for a in client.list_artifacts(parent_run_id)}:
        client.log_table(parent_run_id, data=df, artifact_file=SWEEP_TABLE)
    else:  # logged before (a sync of more cells): replace it, as log_table would append to it
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / SWEEP_TABLE
            df.to_json(path, orient="split", index=False, date_format="iso")  # log_table's own layout
            client.log_artifact(parent_run_id, str(path))
    ends = [c.end_time_ms for c in cells if c.end_time_ms]
    end = max(ends) if ends else now_ms()
    client.log_batch(parent_run_id, metrics=[Metric(k, v, end, 0) for k, v in summary_metrics(df).items()])
    client.set_terminated(parent_run_id, end_time=end)


def sync_sweeps(run_dirs: list[Path], uri: str) -> list[str]:
    """After uploading `run_dirs`: log the table of every sweep they belong to on its parent run (the parent an
    offline sweep's children created when they were uploaded). Returns one line per sweep for the user."""
    from evalkit.tracking.store import find_or_create_parent

    lines = []
    for key in sorted({b.sweep_key for b in map(read_bundle, run_dirs) if b.sweep_key}):
        cells = sweep_cells(key) if Path(key).is_dir() else []
        if not cells:
            continue
        parent = find_or_create_parent(uri, cells[0].experiment, key, f"sweep {Path(key).name}",
                                       start_time_ms=min((c.start_time_ms for c in cells if c.start_time_ms), default=None))
        log_sweep(uri, parent, cells_frame(cells), cells)
        lines.append(f"sweep {key}: {len(cells)} cells side by side in MLflow run {parent} ({SWEEP_TABLE})")
    return lines
