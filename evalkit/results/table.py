"""The one-screen table printed at the end of a run (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from evalkit.results.summary import RunSummary


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def print_summary(summary: RunSummary, console: Console | None = None) -> None:
    console = console or Console()
    p = summary.params
    t = Table(title=f"evalkit · {p.policy} · {p.backend} · {p.suite} · denoise_steps={p.denoise_steps} · {p.device}")
    t.add_column("task")
    t.add_column("success", justify="right")
    t.add_column("95% CI (Wilson)", justify="right")
    t.add_column("episodes", justify="right")
    t.add_column("failures", justify="left")
    for name, r in summary.per_task.items():
        fails = ", ".join(f"{k} {v}" for k, v in (r.failures or {}).items())
        t.add_row(f"{r.task_id}: {name[:60]}", _pct(r.success_rate), f"[{_pct(r.ci_low)}, {_pct(r.ci_high)}]",
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
            f"  (±{lat.std_ms:.1f} ms std, {lat.calls} calls, mean batch {lat.mean_batch:.1f})"
        )
    if lat.stages:
        console.print("per stage p50: " + "  ".join(f"{k} {v.p50:.1f} ms" for k, v in lat.stages.items()))
    if summary.episodes_per_min:
        console.print(f"throughput {summary.episodes_per_min:.1f} episodes/min over {summary.wall_time_s:.0f} s")
