"""What a run prints at its end (rich): the one-screen results table, and where the results are.

Task names are never cut: the task column folds long names onto more lines at any terminal width.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from evalkit.progress import RUN_LOG
from evalkit.results.summary import RunSummary


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def print_summary(summary: RunSummary, console: Console | None = None) -> None:
    console = console or Console()
    p = summary.params
    t = Table(title=f"evalkit · {p.policy} · {p.backend} · {p.suite} · denoise_steps={p.denoise_steps} · {p.device}")
    t.add_column("task", overflow="fold", ratio=1, min_width=24)
    t.add_column("success", justify="right")
    t.add_column("95% CI (Wilson)", justify="right")
    t.add_column("episodes", justify="right")
    t.add_column("failures", justify="left")
    for name, r in summary.per_task.items():
        fails = ", ".join(f"{k} {v}" for k, v in (r.failures or {}).items())
        t.add_row(f"{r.task_id}: {escape(name)}", _pct(r.success_rate), f"[{_pct(r.ci_low)}, {_pct(r.ci_high)}]",
                  str(r.episodes), fails)
    t.add_section()
    t.add_row("[b]overall[/b]", f"[b]{_pct(summary.success_rate)}[/b]",
              f"[{_pct(summary.success_ci_low)}, {_pct(summary.success_ci_high)}]", str(summary.episodes),
              ", ".join(f"{k} {v}" for k, v in summary.failure_reasons.items()))
    console.print(t)
    lat = summary.latency
    if lat.p50_ms is not None:
        console.print(
            f"policy latency p50 {lat.p50_ms:.1f} ms  p90 {lat.p90_ms:.1f}  p99 {lat.p99_ms:.1f}"
            f"  (±{lat.std_ms:.1f} ms std, {lat.calls} calls"
            + (f" + {lat.warmup_calls} warm-up" if lat.warmup_calls else "") + f", mean batch {lat.mean_batch:.1f})"
        )
    if lat.stages:
        console.print("per stage p50: " + "  ".join(f"{k} {v.p50:.1f} ms" for k, v in lat.stages.items()))
    if summary.episodes_per_min:
        console.print(f"throughput {summary.episodes_per_min:.1f} episodes/min over {summary.wall_time_s:.0f} s")


def print_where(run_dir: Path, uri: str | None = None, experiment_id: str | None = None, run_id: str | None = None,
                console: Console | None = None) -> None:
    """The last lines of a run: its folder, its library log, and (uploaded) the MLflow URL of the run, of its
    experiment's runs side by side, and the one command that serves the UI of a sqlite store."""
    from evalkit.tracking.ui import open_command, run_url, runs_url

    console = console or Console()
    console.print(f"[bold]results[/]  {run_dir}")
    log = Path(run_dir) / RUN_LOG
    if log.exists() and log.stat().st_size:
        console.print(f"[bold]log[/]      {log} (what robosuite, LIBERO and the policy printed during the rollouts)")
    if not (uri and experiment_id and run_id):
        return
    console.print(f"[bold]MLflow[/]   {run_url(uri, experiment_id, run_id)}")
    console.print(f"[bold]all runs[/] {runs_url(uri, experiment_id)}")
    cmd = open_command(uri)
    if cmd:
        console.print(f"[bold]open[/]     {cmd}   (then the links above)")
