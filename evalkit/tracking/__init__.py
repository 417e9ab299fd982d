"""Tracking: every run is written as a local bundle first, then synced to MLflow.

One code path for online and offline: `tracking.mode=online` syncs the bundle right away;
`offline` (or an unreachable server) keeps it for `python -m evalkit.sync runs=DIR`. Nothing is lost
when the server is down.
"""

from evalkit.tracking.bundle import RunBundle, write_bundle  # noqa: F401
from evalkit.tracking.store import log_bench_run, sync_bundle  # noqa: F401
