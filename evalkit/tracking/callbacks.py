"""Hydra callback: one MLflow parent run per multirun sweep; every job becomes its child; at the end the cells
side by side, printed and logged to the parent (evalkit.tracking.sweep)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

PARENT_ENV = "EVALKIT_PARENT_RUN_ID"


def _online(config: DictConfig) -> bool:
    mode = (config.get("tracking") or {}).get("mode", "online")
    return str(getattr(mode, "value", mode)) == "online"  # an Enum node (TrackingMode) in the structured config


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from evalkit.tracking.store import find_or_create_parent, reachable, resolve_uri

        tracking = config.get("tracking") or {}
        if not _online(config):
            return  # children carry the sweep key; `evalkit.sync` creates the parent later
        uri = resolve_uri(tracking.get("uri"))
        ok, why = reachable(uri)
        if not ok:
            print(f"[evalkit] tracking store unreachable ({why}); sweep parent run will be created at sync time")
            return
        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        parent = find_or_create_parent(uri, str(tracking.get("experiment", "evalkit")), sweep_dir,
                                       run_name=f"sweep {Path(sweep_dir).name}",
                                       tags={"evalkit.overrides": " ".join(config.hydra.overrides.task)})
        os.environ[PARENT_ENV] = parent  # inherited by launcher processes started after this point
        print(f"[evalkit] MLflow parent run {parent} for sweep {sweep_dir}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """The cells side by side; online, also logged to the parent run (table + summary metrics)."""
        from rich.console import Console

        from evalkit.tracking.sweep import (
            SWEEP_TABLE,
            cells_frame,
            log_sweep,
            print_sweep_table,
            sweep_cells,
        )

        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        cells = sweep_cells(sweep_dir)
        if not cells:
            return  # every job failed before writing its results: their own errors said why
        df = cells_frame(cells)
        # as the run's own output (evalkit/run.py): the terminal's width, or 160 columns in a log
        console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
        print_sweep_table(df, console, title=f"sweep {sweep_dir} · {len(cells)} cells")
        parent = os.environ.pop(PARENT_ENV, None)  # this sweep's; a later sweep in this process makes its own
        if not (parent and _online(config)):
            console.print(f"the sweep's parent run gets this table when the cells are uploaded: "
                          f"python -m evalkit.sync runs={sweep_dir}")
            return
        from evalkit.tracking.store import experiment_of, resolve_uri
        from evalkit.tracking.ui import open_command, runs_url

        uri = resolve_uri((config.get("tracking") or {}).get("uri"))
        try:
            log_sweep(uri, parent, df, cells)
        except Exception as e:  # the cells' own runs are uploaded already; only the summary is missing
            console.print(f"[yellow]could not log the sweep table to MLflow run {parent} ({type(e).__name__}: {e}); "
                          f"python -m evalkit.sync runs={sweep_dir} logs it again[/]")
            return
        exp = experiment_of(uri, parent)
        console.print(f"MLflow sweep run {parent}: the table above as {SWEEP_TABLE}; the cells side by side: "
                      f"{runs_url(uri, exp, charts=True)}")
        cmd = open_command(uri)
        if cmd:
            console.print(f"open it with: {cmd}")
