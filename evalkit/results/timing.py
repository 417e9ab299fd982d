"""A run's latency and throughput rebuilt from its journaled episodes (docs/journal.md).

Every record carries the policy calls that served it and its session (one engine run in one process), so a run
finished in pieces (killed and resumed), re-run after it finished, or merged from shards reports the calls of
every episode it counts, as one uninterrupted run would:
- a batched call that served several episodes is stored in each of their records and counted once, by its id
  (session, number within the session); calls that served only episodes that were never journaled (in flight
  at a kill) or that lost to an earlier record of the same episode are not counted;
- the first call of each session is its warm-up (lazy initialisation, compilation) and is left out of the
  quantiles, as the first call of a run always was; `warmup_calls` says how many;
- the rollout wall time is the sum over sessions of the time from the session's start to its last journaled
  episode, and episodes/min counts the episodes that have it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evalkit.results.summary import LatencySummary, calls_latency, stage_summary
from evalkit.rollout.records import EpisodeRecord, PolicyCall

CallId = tuple[str, int]  # (session, number in the session)


@dataclass
class RunTiming:
    latency: LatencySummary
    call_s: list[float] = field(default_factory=list)  # every counted call, warm-up calls first
    batch_sizes: list[int] = field(default_factory=list)  # aligned with call_s
    warmup_calls: int = 0  # how many of the first call_s are warm-ups (left out of the quantiles)
    wall_s: float = 0.0
    timed_episodes: int = 0  # episodes whose session timing is journaled

    @property
    def episodes_per_min(self) -> float | None:
        return self.timed_episodes / self.wall_s * 60.0 if self.wall_s > 0 and self.timed_episodes else None


def unique_calls(records: list[EpisodeRecord]) -> dict[CallId, PolicyCall]:
    """Each call once, ordered by session (ids sort by start time) then call number."""
    calls: dict[CallId, PolicyCall] = {}
    for r in records:
        for c in r.calls or []:
            calls.setdefault((r.session or "", c.n), c)
    return dict(sorted(calls.items()))


def session_wall(records: list[EpisodeRecord]) -> tuple[float, int]:
    """(sum over sessions of the time to their last journaled episode, episodes with session timing)."""
    end: dict[str, float] = {}
    n = 0
    for r in records:
        if r.session is not None and r.session_s is not None:
            end[r.session] = max(end.get(r.session, 0.0), r.session_s)
            n += 1
    return sum(end.values()), n


def run_timing(records: list[EpisodeRecord]) -> RunTiming:
    """Latency summary, raw calls (for latency_calls.json) and rollout wall time of the episodes that count."""
    calls = unique_calls(records)
    warm = [c for (_, n), c in calls.items() if n == 0]
    rest = [c for (_, n), c in calls.items() if n != 0]
    if not rest:  # only warm-up calls (one call per session): keep them rather than report nothing
        warm, rest = [], warm
    ordered = warm + rest
    stage_calls = [c.stage_ms for c in rest if c.stage_ms is not None]
    unrecorded = sum(r.calls is None for r in records)
    latency = calls_latency([c.s for c in rest], [c.batch for c in ordered],
                            stage_summary(stage_calls, warmup=0) if stage_calls else None,
                            source="rollout policy calls from the journal (wall clock, batched across workers; "
                                   "each session's first call is its warm-up)",
                            warmup_calls=len(warm), unrecorded_episodes=unrecorded or None)
    wall, timed = session_wall(records)
    return RunTiming(latency, [c.s for c in ordered], [c.batch for c in ordered], len(warm), wall, timed)
