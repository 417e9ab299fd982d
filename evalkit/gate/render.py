"""Print a GateResult as a rich table (shared by `python -m evalkit.gate` and the main CLI)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from evalkit.gate.judge import GateResult

_STYLE = {"pass": "green", "fail": "bold red", "warn": "yellow", "skip": "dim"}


def print_gate(result: GateResult, console: Console | None = None, title: str | None = None) -> None:
    console = console or Console()
    t = Table(title=title or f"gate: {result.candidate} vs {result.baseline} ({result.mode})", show_lines=False)
    for col in ("check", "status", "value", "threshold", "explanation"):
        t.add_column(col, overflow="fold")
    for c in result.checks:
        value = f"{c.value:.4g}" if isinstance(c.value, float) else str(c.value)
        t.add_row(c.name, f"[{_STYLE.get(c.status, '')}]{c.status}[/]", value, str(c.threshold), c.explanation)
    console.print(t)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    verdict = "[green]PASS[/]" if result.passed else "[bold red]REGRESSION[/]: " + ", ".join(c.name for c in result.failed())
    console.print(f"gate: {verdict}")
