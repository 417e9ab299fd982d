"""Print a GateResult as a rich table (shared by `python -m evalkit.gate` and the main CLI)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from evalkit.gate.judge import GateResult

_STYLE = {"pass": "green", "fail": "bold red", "warn": "yellow", "skip": "dim", "inconclusive": "bold yellow"}


def verdict_line(result: GateResult) -> str:
    """One line a person (and CI log grep) reads: `gate: PASS`, `gate: REGRESSION: ...`, `gate: INCONCLUSIVE ...`."""
    if result.verdict == "regression":
        return "gate: REGRESSION: " + ", ".join(c.name for c in result.failed())
    if result.verdict == "inconclusive":
        why = next((w.split(": ", 1)[1] for w in result.warnings if w.startswith("inconclusive: ")),
                   "neither a drop nor non-inferiority within max_drop is shown")
        return (f"gate: INCONCLUSIVE (not a pass; exit {result.exit_code}"
                + ("" if result.exit_code else ", gate.fail_inconclusive=true makes it 1") + f"): {why}")
    return "gate: PASS"


def print_gate(result: GateResult, console: Console | None = None, title: str | None = None) -> None:
    console = console or Console()
    t = Table(title=title or f"gate: {result.candidate} vs {result.baseline} ({result.mode}, {result.design})", show_lines=False)
    for col in ("check", "status", "value", "threshold", "explanation"):
        t.add_column(col, overflow="fold")
    for c in result.checks:
        value = f"{c.value:.4g}" if isinstance(c.value, float) else str(c.value)
        t.add_row(c.name, f"[{_STYLE.get(c.status, '')}]{c.status}[/]", value, escape(str(c.threshold)), escape(c.explanation))
    console.print(t)
    fam = result.family or {}
    if fam.get("size", 1) > 1:
        console.print(f"family: {fam['size']} comparisons, {fam['method']}, alpha {fam['alpha']} "
                      f"(raw p {fam['p_raw']:.4g}, adjusted p {fam['p_adjusted']:.4g})")
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    line = verdict_line(result)
    style = {"regression": "bold red", "inconclusive": "bold yellow"}.get(result.verdict, "green")
    console.print(f"[{style}]{escape(line)}[/]", highlight=False)
