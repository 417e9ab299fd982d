"""Live progress of the rollouts (rich): episodes done and running, successes with the running rate and its Wilson
interval, elapsed time, an ETA, and the last finished episode; `quiet=True` prints one plain line per finished
episode instead, for CI logs.

While it runs, file descriptors 1 and 2 point at the run's log file (`LibraryOutput`): whatever robosuite, LIBERO,
MuJoCo, warnings or the policy print, from this process or from the env workers it spawns (they inherit the
descriptors), lands in `run.log` instead of over the bar; the bar and the quiet lines write to the real terminal.

The ETA is ours, not rich's: rich estimates speed from the last 30 s of progress, which an episode longer than
that never gives it ("-:--:--" for minutes). Ours is known from the first finished episode: the mean episode wall
time times the episodes left, divided by the workers that run them side by side, and counts down between episodes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column
from rich.text import Text

from evalkit.rollout.records import EpisodeRecord
from evalkit.stats import wilson_interval

RUN_LOG = "run.log"  # in the run dir: library output of the rollouts


def eta_seconds(episode_s: list[float], left: int, workers: int) -> float | None:
    """Seconds until `left` more episodes end, from the wall times of finished ones (`episode_s`) with `workers`
    running side by side; None before any episode finished."""
    if left <= 0:
        return 0.0
    if not episode_s:
        return None
    return sum(episode_s) / len(episode_s) * left / max(1, min(workers, left))


def clock(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _columns(fd: int) -> int | None:
    """The terminal's width as rich would find it (COLUMNS first), taken before fd 1 stops being the terminal;
    None when unknown (a pseudo-terminal of size 0)."""
    cols = int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else 0
    if cols <= 0:
        try:
            cols = os.get_terminal_size(fd).columns
        except OSError:
            cols = 0
    return cols or None


class LibraryOutput:
    """Points file descriptors 1 and 2 at `path` (appending) while active; `terminal` writes to the real stdout."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.terminal = sys.stdout

    def __enter__(self) -> "LibraryOutput":
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self._log = open(self.path, "ab")
        self.is_tty = os.isatty(self._saved[0])
        self.columns = _columns(self._saved[0]) if self.is_tty else None
        self.terminal = os.fdopen(os.dup(self._saved[0]), "w", buffering=1,
                                  encoding=getattr(sys.stdout, "encoding", None) or "utf-8", errors="replace")
        os.dup2(self._log.fileno(), 1)
        os.dup2(self._log.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.terminal.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self.terminal.close()
        self._log.close()
        self.terminal = sys.stdout


class _EtaColumn(ProgressColumn):
    """Counts down to the time estimated at the last finished episode (`eta_at`, a perf_counter time)."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text("done", style="progress.remaining")
        at = task.fields.get("eta_at")
        if at is None:
            return Text("ETA after 1st episode", style="progress.remaining")
        return Text(f"ETA {clock(at - time.perf_counter())}", style="progress.remaining")


def _fixed() -> Column:
    return Column(no_wrap=True)


def bar_columns(width: int) -> list[ProgressColumn]:
    """One line at any width: counts, rate, elapsed and ETA always; the suite name shortened with an ellipsis when
    short of room; from 120 columns a bar and the last finished episode (task name cut to what is left)."""
    flexible = Column(ratio=1, no_wrap=True, overflow="ellipsis")
    wide = width >= 120
    columns: list[ProgressColumn] = [
        TextColumn("[bold]{task.description}", table_column=_fixed() if wide else flexible)]
    if wide:
        columns.append(BarColumn(bar_width=16))
    columns += [TextColumn("{task.fields[counts]}", markup=False, table_column=_fixed()),
                TextColumn("{task.fields[rate]}", markup=False, table_column=_fixed()),
                TimeElapsedColumn(table_column=_fixed()), _EtaColumn(table_column=_fixed())]
    if wide:
        columns.append(TextColumn("{task.fields[last]}", markup=False, table_column=flexible))
    return columns


class RunProgress:
    def __init__(self, total: int, already_done: list[EpisodeRecord], quiet: bool, label: str,
                 log_path: Path | None = None, workers: int = 1):
        self.total = total
        self.n = len(already_done)
        self.k = sum(r.success for r in already_done)
        self.quiet = quiet
        self.label = label
        self.workers = max(1, workers)  # workers=0 runs one env in this process
        self.durations = [r.wall_time_s for r in already_done if r.wall_time_s]  # resumed ones count too
        self.output = LibraryOutput(log_path) if log_path is not None else None
        self.progress: Progress | None = None
        self.last = ""
        self.eta_at: float | None = None

    # -- what the bar and the lines show ------------------------------------------------------
    def _rate(self) -> str:
        if self.n == 0:
            return "success –"
        lo, hi = wilson_interval(self.k, self.n)
        return f"success {self.k}/{self.n} = {100 * self.k / self.n:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"

    def _running(self) -> int:
        return min(self.workers, self.total - self.n)

    def _counts(self) -> str:
        return f"{self.n}/{self.total} done · {self._running()} running"

    def _eta(self) -> str:
        return "ETA after 1st episode" if self.eta_at is None else f"ETA {clock(self.eta_at - time.perf_counter())}"

    def _estimate(self) -> None:
        eta = eta_seconds(self.durations, self.total - self.n, self.workers)
        self.eta_at = None if eta is None else time.perf_counter() + eta

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self):
        out = sys.stdout
        if self.output is not None:
            self.output.__enter__()
            out = self.output.terminal
        self.out = out
        self._estimate()
        try:
            self._start_bar(out)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _start_bar(self, out) -> None:
        if self.quiet:
            return
        tty = bool(self.output.is_tty) if self.output is not None else sys.stdout.isatty()
        width = (self.output.columns if self.output is not None else None) if tty else 160
        console = Console(file=out, width=width, force_terminal=tty or None)
        self.progress = Progress(*bar_columns(console.width), console=console, expand=True, refresh_per_second=2,
                                 redirect_stdout=False, redirect_stderr=False)
        self.task = self.progress.add_task(self.label, total=self.total, completed=self.n, counts=self._counts(),
                                           rate=self._rate(), eta_at=self.eta_at, last="")
        self.progress.start()

    def __exit__(self, *exc):
        try:
            if self.progress:
                self.progress.stop()
        finally:
            if self.output is not None:
                self.output.__exit__(*exc)

    def update(self, r: EpisodeRecord) -> None:
        self.n += 1
        self.k += int(r.success)
        if r.wall_time_s:
            self.durations.append(r.wall_time_s)
        self._estimate()
        outcome = "success" if r.success else f"fail ({r.failure_reason})"
        where = f"task {r.task_id} {r.task_name}".rstrip() + f" init {r.init_state_id}"
        if self.progress:
            self.progress.update(self.task, completed=self.n, counts=self._counts(), rate=self._rate(),
                                 eta_at=self.eta_at, last=f"last: {where}: {outcome}")
        else:
            print(f"[{self.n}/{self.total}] {where}: {outcome} in {r.steps} steps, {r.wall_time_s:.1f} s | "
                  f"{self._rate()} | {self._eta()}", file=self.out, flush=True)
