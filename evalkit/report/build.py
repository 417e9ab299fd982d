"""Build the nightly/comparison report: per-run gate verdicts (pass / regression / inconclusive, raw and
family-adjusted p-values), per-task Wilson table, Pareto plot."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalkit.report.plot import pareto_svg
from evalkit.results.summary import LatencySummary, RunSummary, TaskResult
from evalkit.stats import wilson_interval


@dataclass
class ReportRun:
    label: str  # e.g. "int8 / libero_spatial / 10 steps"
    summary: RunSummary  # the run's summary.json (a dict is read into a RunSummary)
    gate: dict[str, Any] | None = None  # GateResult.to_dict(), or None when not judged
    link: str | None = None  # run dir or MLflow run id
    error: str | None = None  # the run itself failed (no summary numbers)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.summary, RunSummary):
            self.summary = RunSummary.from_dict(self.summary)


def _rate(summary: RunSummary) -> tuple[float, float, float, int] | None:
    counts = summary.episode_counts()
    if not counts or not counts[1]:
        return None
    x, n = counts
    lo, hi = wilson_interval(x, n)
    return x / n, lo, hi, n


def _task_rate(t: TaskResult) -> tuple[float, float, float, int]:
    n = int(t.episodes or 0)
    r = float(t.success_rate or 0.0)
    if t.ci_low is not None and t.ci_high is not None:
        return r, float(t.ci_low), float(t.ci_high), n
    lo, hi = wilson_interval(int(round(r * n)), n)
    return r, lo, hi, n


def _verdict(run: ReportRun) -> str:
    if run.error:
        return "ERROR"
    fid = run.summary.fidelity
    if fid and fid.failed_checks:
        return "REGRESSION"  # a failed fidelity check is a regression even when no baseline judged the run
    if not run.gate:
        return "not judged"
    v = run.gate.get("verdict")  # gates written before the three-way verdict only have `passed`
    return v.upper() if v else ("PASS" if run.gate.get("passed") else "REGRESSION")


def _p_text(gate: dict[str, Any] | None) -> str:
    """Regression p-value, raw and family-adjusted ("—" when not judged)."""
    fam = (gate or {}).get("family") or {}
    if "p_raw" not in fam:
        return "—"
    raw, adj = fam["p_raw"], fam["p_adjusted"]
    fmt = lambda x: f"{x:.3g}" if isinstance(x, (int, float)) else str(x)  # noqa: E731
    return fmt(raw) if fam.get("size", 1) <= 1 else f"{fmt(raw)} / {fmt(adj)}"


def _failed_checks(run: ReportRun) -> list[str]:
    out = []
    if run.gate:
        out += [c["name"] for c in run.gate.get("checks", []) if c.get("status") == "fail"]
    fid = run.summary.fidelity
    out += [f"fidelity:{name}" for name in (fid.failed_checks if fid else []) if "fidelity" not in out]
    return sorted(set(out))


def _points(runs: list[ReportRun]) -> list[dict[str, Any]]:
    pts = []
    for r in runs:
        rate = _rate(r.summary)
        lat = r.summary.latency
        if rate is None:
            continue
        p50 = lat.p50_ms
        pts.append({
            "label": r.label, "success": rate[0], "ci_low": rate[1], "ci_high": rate[2],
            "latency": p50, "lat_low": p50, "lat_high": lat.p90_ms if lat.p90_ms is not None else p50,
            "failed": _verdict(r) in ("REGRESSION", "ERROR"),
        })
    for p, front in zip(pts, pareto_front(pts)):
        p["front"] = front
    return pts


def pareto_front(points: list[dict[str, Any]]) -> list[bool]:
    """True for points no other point dominates (lower-or-equal latency and higher-or-equal success, one strictly)."""
    out = []
    for p in points:
        if p.get("latency") is None:
            out.append(False)
            continue
        dominated = any(
            q is not p and q.get("latency") is not None
            and q["latency"] <= p["latency"] and q["success"] >= p["success"]
            and (q["latency"] < p["latency"] or q["success"] > p["success"])
            for q in points
        )
        out.append(not dominated)
    return out


def _fmt_rate(rate) -> str:
    if rate is None:
        return "—"
    r, lo, hi, n = rate
    return f"{r:.1%} [{lo:.1%}, {hi:.1%}] (n={n})"


def _fmt_ms(lat: LatencySummary) -> str:
    if not lat.p50_ms:
        return "—"
    return f"{lat.p50_ms:.3g} (p90 {lat.p90_ms if lat.p90_ms is not None else float('nan'):.3g})"


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def _run_rows(runs: list[ReportRun]) -> list[list[str]]:
    rows = []
    for r in runs:
        p = r.summary.params
        warn = "; ".join((r.gate or {}).get("warnings", []))
        rows.append([
            r.label, _text(p.backend), _text(p.suite), _text(p.denoise_steps),
            _fmt_rate(_rate(r.summary)), _fmt_ms(r.summary.latency), _verdict(r), _p_text(r.gate),
            ", ".join(_failed_checks(r)) or (r.error or ""), warn,
        ])
    return rows


RUN_HEAD = ["run", "backend", "suite", "steps", "success [95% Wilson]", "latency ms p50", "gate",
            "regression p (raw / adjusted)", "failed checks", "warnings"]


def _banner(runs: list[ReportRun]) -> tuple[str, str]:
    """(word, counts): FAIL on any regression/error; INCONCLUSIVE when some cell could not be decided; else PASS."""
    verdicts = [_verdict(r) for r in runs]
    bad = [r.label for r, v in zip(runs, verdicts) if v in ("REGRESSION", "ERROR")]
    unsure = [r.label for r, v in zip(runs, verdicts) if v == "INCONCLUSIVE"]
    word = "FAIL" if bad else ("INCONCLUSIVE" if unsure else "PASS")
    counts = f"{len(runs)} runs, {len(bad)} regressions/errors" + (f" ({', '.join(bad)})" if bad else "")
    if unsure:
        counts += f", {len(unsure)} inconclusive ({', '.join(unsure)}): too few episodes to show a drop or non-inferiority"
    return word, counts


def _task_table(runs: list[ReportRun]) -> tuple[list[str], list[list[str]]]:
    tasks: list[str] = []
    for r in runs:
        for t in r.summary.per_task:
            if t not in tasks:
                tasks.append(t)
    head = ["task"] + [r.label for r in runs]
    rows = []
    for t in tasks:
        row = [t]
        for r in runs:
            d = r.summary.per_task.get(t)
            row.append(_fmt_rate(_task_rate(d)) if d else "—")
        rows.append(row)
    return head, rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(runs: list[ReportRun], title: str = "evalkit report", notes: list[str] | None = None) -> str:
    word, counts = _banner(runs)
    out = [f"# {title}", ""]
    out.append(f"**{word}**: {counts}")
    out += ["", *[f"- {n}" for n in notes or []], "", "## Gate verdicts", "", _md_table(RUN_HEAD, _run_rows(runs)), ""]
    head, rows = _task_table(runs)
    if rows:
        out += ["## Per-task success (95% Wilson intervals)", "", _md_table(head, rows), ""]
    out += ["## Success vs latency", "", "See the HTML report for the Pareto plot (success with Wilson intervals, latency p50..p90).", ""]
    pts = _points(runs)
    front = [p["label"] for p in pts if p.get("front")]
    if front:
        out += [f"Pareto-optimal runs: {', '.join(front)}", ""]
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#1d2329;max-width:1200px}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}th,td{border:1px solid #d0d7de;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}.PASS{color:#1a7f37;font-weight:600}.REGRESSION,.ERROR,.FAIL{color:#cf222e;font-weight:600}
.INCONCLUSIVE{color:#9a6700;font-weight:600}
.banner{padding:.6rem 1rem;border-radius:6px;display:inline-block}.banner.PASS{background:#dafbe1}.banner.FAIL{background:#ffebe9}
.banner.INCONCLUSIVE{background:#fff8c5}
.plot svg{max-width:100%;height:auto}small{color:#57606a}
"""


def _html_table(head: list[str], rows: list[list[str]], verdict_col: int | None = None) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = f' class="{html.escape(c)}"' if i == verdict_col else ""
            cells.append(f"<td{cls}>{html.escape(str(c))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(runs: list[ReportRun], title: str = "evalkit report", notes: list[str] | None = None) -> str:
    """One self-contained page: inline CSS, inline SVG, no scripts, no external resources."""
    verdict, counts = _banner(runs)
    head, rows = _task_table(runs)
    svg = pareto_svg(_points(runs), title="success vs latency (Pareto front in blue, regressions in red)")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='banner {verdict}'><b>{verdict}</b>: {html.escape(counts)}</p>",
        "".join(f"<p><small>{html.escape(n)}</small></p>" for n in notes or []),
        "<h2>Gate verdicts</h2>", _html_table(RUN_HEAD, _run_rows(runs), verdict_col=6),
    ]
    if rows:
        parts += ["<h2>Per-task success (95% Wilson intervals)</h2>", _html_table(head, rows)]
    parts += ["<h2>Success vs latency</h2>", f"<div class='plot'>{svg}</div>", "</body></html>"]
    return "\n".join(parts)


def write_report(runs: list[ReportRun], out_dir: str | Path, title: str = "evalkit report",
                 notes: list[str] | None = None) -> tuple[Path, Path]:
    """Write report.md and report.html into out_dir; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "report.md", out / "report.html"
    md.write_text(render_markdown(runs, title, notes))
    page.write_text(render_html(runs, title, notes))
    return md, page
