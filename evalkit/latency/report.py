"""LatencyReport: p50/p90/p99 per stage and end-to-end over many calls, with their spread.

`Stats.of` is evalkit.stats.sample_stats, the same summary a run's summary.json uses (std with ddof=0).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from evalkit.latency.timer import StageTimer
from evalkit.stats import sample_stats


@dataclass
class Stats:
    n: int
    mean: float
    std: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    @staticmethod
    def of(values: list[float]) -> "Stats":
        return Stats(**sample_stats(values))


@dataclass
class LatencyReport:
    """Milliseconds. `stages[s]` is the per-call total of stage s (e.g. all denoise steps of a call);
    `per_occurrence[s]` is per single occurrence (e.g. one denoise step)."""

    device: str
    calls: int
    warmup: int
    end_to_end: Stats
    stages: dict[str, Stats] = field(default_factory=dict)
    per_occurrence: dict[str, Stats] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metric names (docs/architecture.md): latency_ms_p50/p90/p99, latency_ms/<stage>, hz."""
        m = {
            "latency_ms_p50": self.end_to_end.p50,
            "latency_ms_p90": self.end_to_end.p90,
            "latency_ms_p99": self.end_to_end.p99,
            "latency_ms_std": self.end_to_end.std,
            "hz": 1000.0 / self.end_to_end.p50 if self.end_to_end.p50 > 0 else 0.0,
        }
        for name, s in self.stages.items():
            m[f"latency_ms/{name}"] = s.p50
        return m


def measure(call: Callable[[StageTimer], Any], device: torch.device | str, calls: int = 50, warmup: int = 5,
            notes: list[str] | None = None) -> LatencyReport:
    """Run `call(timer)` warmup + calls times; warm-up calls are excluded from every number.

    End-to-end is host wall time of the whole call (it returns host arrays, so it includes the final sync).
    """
    if calls < 1:
        raise ValueError("calls must be >= 1")
    timer = StageTimer(device)
    for _ in range(warmup):
        timer.begin_call()
        call(timer)
        timer.end_call()
    e2e: list[float] = []
    per_call: dict[str, list[float]] = {}
    per_occ: dict[str, list[float]] = {}
    for _ in range(calls):
        timer.begin_call()
        t0 = time.perf_counter()
        call(timer)
        if timer.cuda:
            torch.cuda.synchronize(timer.device)
        e2e.append((time.perf_counter() - t0) * 1e3)
        for name, values in timer.end_call().items():
            per_call.setdefault(name, []).append(sum(values))
            per_occ.setdefault(name, []).extend(values)
    return LatencyReport(
        device=str(device) if not timer.cuda else torch.cuda.get_device_name(timer.device),
        calls=calls,
        warmup=warmup,
        end_to_end=Stats.of(e2e),
        stages={k: Stats.of(v) for k, v in per_call.items()},
        per_occurrence={k: Stats.of(v) for k, v in per_occ.items()},
        notes=list(notes or []),
    )
