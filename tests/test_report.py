"""Report: Markdown + self-contained HTML; the HTML opens in headless Chromium and a screenshot is produced."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from evalkit.report import (
    ReportRun,
    pareto_front,
    render_html,
    render_markdown,
    write_report,
)


def summary(backend, x, n, p50, tasks=("pick_bowl", "open_drawer")):
    per = {t: {"success_rate": (x // len(tasks)) / (n // len(tasks)), "episodes": n // len(tasks)} for t in tasks}
    return {"success_rate": x / n, "episodes": n, "successes": x, "per_task": per,
            "latency": {"latency_ms_p50": p50, "latency_ms_p90": p50 * 1.2, "latency_ms_p99": p50 * 1.5},
            "params": {"policy": "pi05", "backend": backend, "suite": "libero_spatial", "denoise_steps": 10}}


def runs():
    fail_gate = {"passed": False, "warnings": ["underpowered: smallest detectable drop 0.3 > allowed drop 0.05"],
                 "checks": [{"name": "success (paired)", "status": "fail"}, {"name": "latency p50 ratio", "status": "pass"}]}
    return [
        ReportRun("bf16", summary("bf16", 48, 50, 60.0), None),
        ReportRun("int8", summary("int8", 46, 50, 40.0), {"passed": True, "warnings": [], "checks": []}),
        ReportRun("int4 <b>", summary("int4", 20, 50, 35.0), fail_gate),
        ReportRun("fp8", summary("fp8", 47, 50, 70.0), {"passed": True, "warnings": [], "checks": []}),
        ReportRun("trt", {"params": {"backend": "torch_trt_fp8"}}, None, error="CapabilityError: needs sm_89"),
    ]


def test_pareto_front():
    pts = [{"latency": 60, "success": 0.96}, {"latency": 40, "success": 0.92}, {"latency": 35, "success": 0.4},
           {"latency": 70, "success": 0.94}, {"latency": None, "success": 1.0}]
    assert pareto_front(pts) == [True, True, True, False, False]


def test_markdown_lists_verdicts_and_wilson_intervals():
    md = render_markdown(runs(), "nightly")
    assert "**FAIL**" in md and "REGRESSION" in md and "ERROR" in md
    assert "success (paired)" in md and "underpowered" in md
    assert "96.0% [86.5%, 98.9%] (n=50)" in md and "| 60 (p90 72) |" in md
    assert "| pick_bowl |" in md
    assert "Pareto-optimal runs: bf16, int8, int4 <b>" in md


def test_html_is_self_contained_and_escaped():
    page = render_html(runs(), "nightly")
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<style>" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing external
    assert "<script" not in page
    assert "int4 &lt;b&gt;" in page and "int4 <b>" not in page


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_html_renders_in_headless_chromium(tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
    _, page = write_report(runs(), tmp_path / "report", "nightly")
    png = tmp_path / "shot.png"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--window-size=1280,1600", f"--screenshot={png}", page.as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    log = p.stdout + p.stderr
    assert png.exists() and png.stat().st_size > 10_000, log[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    js_errors = [line for line in log.splitlines() if "Uncaught" in line or ("CONSOLE" in line and "ERROR" in line)]
    assert not js_errors, js_errors


def test_failed_fidelity_is_a_regression_without_a_baseline():
    s = summary("fault_x", 9, 10, 20.0)
    s["fidelity"] = {"checks": [{"name": "weight_distinct", "passed": False}, {"name": "layer_cosine", "passed": True}]}
    md = render_markdown([ReportRun("fault_x", s, gate=None)])
    assert md.splitlines()[2].startswith("**FAIL**: 1 runs, 1 regressions") and "fidelity:weight_distinct" in md


def test_inconclusive_cells_and_family_p_values_are_shown():
    fam = {"method": "holm", "size": 28, "alpha": 0.05, "p_raw": 0.004, "p_adjusted": 0.112}
    unsure = {"passed": False, "verdict": "inconclusive", "family": fam, "checks": [],
              "warnings": ["inconclusive: 30 paired episodes cannot vouch for a drop of 0.05"]}
    ok = {"passed": True, "verdict": "pass", "checks": [], "warnings": [],
          "family": {**fam, "p_raw": 0.9, "p_adjusted": 1.0}}
    runs_ = [ReportRun("int8", summary("int8", 46, 50, 40.0), unsure), ReportRun("fp8", summary("fp8", 47, 50, 70.0), ok)]
    md = render_markdown(runs_, "nightly")
    assert md.splitlines()[2].startswith("**INCONCLUSIVE**") and "1 inconclusive (int8)" in md
    assert "| INCONCLUSIVE | 0.004 / 0.112 |" in md and "| PASS | 0.9 / 1 |" in md
    assert "regression p (raw / adjusted)" in md
    page = render_html(runs_, "nightly")
    assert "banner INCONCLUSIVE" in page and 'class="INCONCLUSIVE"' in page
