"""Hydra callback: one MLflow parent run per multirun sweep; every job becomes its child."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

PARENT_ENV = "EVALKIT_PARENT_RUN_ID"


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from evalkit.tracking.store import find_or_create_parent, reachable, resolve_uri

        tracking = config.get("tracking") or {}
        mode = tracking.get("mode", "online")
        if str(getattr(mode, "value", mode)) != "online":  # an Enum node (TrackingMode) in the structured config
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
