"""Live progress (rich): episodes done/total, running success rate with its Wilson interval, ETA.

`quiet=True` prints one plain line per finished episode instead, for CI logs.
"""

from __future__ import annotations

import time

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from evalkit.rollout.records import EpisodeRecord
from evalkit.stats import wilson_interval


class RunProgress:
    def __init__(self, total: int, already_done: list[EpisodeRecord], quiet: bool, label: str):
        self.total = total
        self.n = len(already_done)
        self.k = sum(r.success for r in already_done)
        self.quiet = quiet
        self.label = label
        self.t0 = time.perf_counter()
        self.progress = None
        if not quiet:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            )
            self.task = self.progress.add_task(label, total=total, completed=self.n, rate=self._rate())

    def _rate(self) -> str:
        if self.n == 0:
            return "success –"
        lo, hi = wilson_interval(self.k, self.n)
        return f"success {self.k}/{self.n} = {100 * self.k / self.n:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"

    def __enter__(self):
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def update(self, r: EpisodeRecord) -> None:
        self.n += 1
        self.k += int(r.success)
        if self.progress:
            self.progress.update(self.task, completed=self.n, rate=self._rate())
        else:
            outcome = "success" if r.success else f"fail ({r.failure_reason})"
            print(f"[{self.n}/{self.total}] task {r.task_id} init {r.init_state_id}: {outcome} in {r.steps} steps, "
                  f"{r.wall_time_s:.1f} s | {self._rate()}", flush=True)
