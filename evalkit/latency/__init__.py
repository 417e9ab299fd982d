"""Per-stage latency: a stage timer (CUDA events / perf_counter) and LatencyReport (p50/p90/p99 + spread)."""

from evalkit.latency.report import LatencyReport, Stats, measure
from evalkit.latency.timer import NullTimer, StageTimer

__all__ = ["LatencyReport", "NullTimer", "StageTimer", "Stats", "measure"]
