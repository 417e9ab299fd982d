"""Tracking as MLflow users expect it, against real sqlite stores: headline metric names that sort first, runs with
their own start and end times, experiments that open as classic ML experiments with evalkit's runs view, a sweep's
cells side by side on its parent run, and a fresh store opened by two processes at once. Also the terminal side:
library output kept off the progress bar, the ETA, task names that are never cut, the end-of-run links."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
from rich.console import Console
from rich.progress import Progress

from evalkit.progress import RUN_LOG, bar_columns, clock, eta_seconds
from evalkit.results.summary import (
    RunSummary,
    build_summary,
    episodes_frame,
    latency_summary,
    write_results,
)
from evalkit.results.table import print_summary, print_where
from evalkit.rollout.records import EpisodeRecord
from evalkit.tracking.bundle import RunBundle, write_bundle
from evalkit.tracking.names import HEADLINE, with_design_names
from evalkit.tracking.store import get_or_create_experiment, sync_bundle
from evalkit.tracking.sweep import (
    SWEEP_TABLE,
    cells_frame,
    print_sweep_table,
    sweep_cells,
    sync_sweeps,
)
from evalkit.tracking.ui import (
    CLASSIC_ML_KIND,
    EXPERIMENT_KIND_TAG,
    VIEW_TAG,
    open_command,
    run_url,
    runs_url,
)
from tests.conftest import REPO

TASKS = ["pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate",
         "pick_up_the_black_bowl_next_to_the_ramekin_and_place_it_on_the_plate",
         "pick_up_the_black_bowl_from_table_center_and_place_it_on_the_plate"]


def make_run(run_dir: Path, *, successes: int, episodes: int = 9, call_ms: float = 120.0, backend: str = "bf16",
             denoise_steps: int = 10, start_ms: int | None = None, end_ms: int | None = None,
             sweep_key: str | None = None, verdict: str = "unjudged") -> RunBundle:
    """A run dir as `python -m evalkit` leaves it (results + bundle), built with evalkit's own results and tracking
    code from made-up episodes: `successes` of `episodes` succeed, policy calls take about `call_ms`."""
    records = [EpisodeRecord(suite="libero_spatial_quick", task_id=i % 3, task_name=TASKS[i % 3], init_state_id=i // 3,
                             seed=7, success=i < successes, steps=50, failure_reason=None if i < successes else "timeout",
                             wall_time_s=20.0, policy_time_s=2.0, policy_calls=10) for i in range(episodes)]
    df = episodes_frame(records)
    calls_s = [(call_ms + 5.0 * (i % 5 - 2)) / 1e3 for i in range(41)]
    params = {"policy": "noop", "backend": backend, "suite": "libero_spatial_quick", "denoise_steps": denoise_steps,
              "device": "cpu", "git_sha": "0" * 40}
    summary = build_summary(df, params, {"max_steps": 220, "replan_steps": 5}, latency_summary(calls_s, [1] * 41), 180.0)
    summary.verdict = verdict
    write_results(run_dir, df, summary)
    # the params a CLI run logs (evalkit/run.py: track): the identity first, then provenance, protocol, versions
    logged = {**params, "workers": 2, "seed": 7, "suite.tasks": [0, 1, 2], "suite.trials": 3,
              **{f"backend.{k}": v for k, v in (("target", f"evalkit.backends.casts.{backend.upper()}Backend"),
                                                 ("engine", "native"), ("targets", "all"), ("inner", None),
                                                 ("options", "{}"), ("precision_class", "16-bit"),
                                                 ("precision_class_source", "declared"), ("calib", "probes"))},
              **{f"protocol.{k}": v for k, v in (("max_steps", 220), ("num_steps_wait", 10), ("replan_steps", 5),
                                                  ("seed", 7), ("seed_mode", "openpi"), ("resolution", 256),
                                                  ("image_size", 224), ("rotate_180", True))},
              **{f"version.{k}": v for k, v in (("mujoco", "3.2.3"), ("robosuite", "1.4.0"), ("torch", "2.13.0"),
                                                 ("mlflow", mlflow.__version__), ("evalkit", "0.1.0"))}}
    bundle = RunBundle(experiment="evalkit", run_name=run_dir.name, params=logged, metrics=summary.metrics(),
                       tags={"evalkit.run_dir": str(run_dir), "evalkit.verdict": verdict}, artifacts=["summary.json"],
                       table="episodes.parquet", sweep_key=sweep_key, start_time_ms=start_ms, end_time_ms=end_ms)
    write_bundle(run_dir, bundle)
    return bundle


def test_headline_metrics_sort_first_and_read_back():
    s = RunSummary.from_dict({"success_rate": 7 / 9, "success_ci_low": 0.4530, "success_ci_high": 0.9368,
                              "latency": {"latency_ms_p50": 123.456789}, "episodes_per_min": 3.0,
                              "per_task": {"a_task": {"task_id": 0, "success_rate": 1.0}}})
    m = s.metrics()
    assert list(m)[:4] == list(HEADLINE.values())  # logged first: the run page lists them in this order
    assert m["Headline/success_rate"] == 0.7778 and m["Headline/latency_p50_ms"] == 123.46
    assert m["success_rate"] == 7 / 9  # the DESIGN.md names keep the full value
    # MLflow sorts names by code point (compare page, pickers): the four headline names come first, together
    assert sorted(m)[:4] == sorted(HEADLINE.values()) and all(k < "a" for k in HEADLINE.values())
    # a run that holds only headline names reads like one with the DESIGN.md names
    only = {h: m[h] for h in HEADLINE.values()}
    assert with_design_names(only) == {"success_rate": 0.7778, "success_ci_low": 0.453, "success_ci_high": 0.9368,
                                       "latency_ms_p50": 123.46}
    back = RunSummary.from_metrics(only, {"policy": "noop"})
    assert back.success_rate == 0.7778 and back.latency.p50_ms == 123.46 and not back.extra


def test_upload_keeps_the_runs_own_times_and_opens_as_a_classic_ml_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    start, end = 1_700_000_000_000, 1_700_000_754_321  # 12 min 34 s, long before the upload
    make_run(tmp_path / "a", successes=7, start_ms=start, end_ms=end)
    run = mlflow.MlflowClient(uri).get_run(sync_bundle(tmp_path / "a", uri))
    assert (run.info.start_time, run.info.end_time, run.info.status) == (start, end, "FINISHED")
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "Headline/success_rate")
    assert [(h.value, h.timestamp) for h in history] == [(0.7778, end)]
    exp = mlflow.MlflowClient(uri).get_experiment(run.info.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == CLASSIC_ML_KIND
    columns = json.loads(exp.tags[VIEW_TAG])["selectedColumns"]
    assert columns[:2] == ["metrics.`Headline/success_rate`", "metrics.`Headline/success_rate_ci_low`"]
    assert {"metrics.`Headline/latency_p50_ms`", "params.`backend`", "params.`denoise_steps`",
            "tags.`evalkit.verdict`"} <= set(columns)
    # an experiment made before (or by hand) gets evalkit's view; a kind its owner chose stays
    client = mlflow.MlflowClient(uri)
    plain = client.create_experiment("plain")
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    get_or_create_experiment(uri, "plain")
    get_or_create_experiment(uri, "chosen")
    assert client.get_experiment(plain).tags[EXPERIMENT_KIND_TAG] == CLASSIC_ML_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    assert VIEW_TAG in client.get_experiment(chosen).tags


SYNC_WHEN_TOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from evalkit.tracking.store import sync_bundle
    import mlflow.store.tracking.sqlalchemy_store  # the slow imports before the start line
    Path(sys.argv[3]).touch()
    while not Path(sys.argv[4]).exists():
        time.sleep(0.01)
    print(sync_bundle(sys.argv[1], sys.argv[2]))
""")


def test_a_fresh_store_opened_by_two_processes_at_once_takes_both_runs(tmp_path):
    """Issue 24: two runs creating a new sqlite store at once; without the lock one fails (`duplicate column
    name: step`; 3 of 3 tries on the 2-core machine). Both processes import first, then start together."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    go = tmp_path / "go"
    procs = []
    for name in ("a", "b"):
        make_run(tmp_path / name, successes=3)
        procs.append(subprocess.Popen([sys.executable, "-c", SYNC_WHEN_TOLD, str(tmp_path / name), uri,
                                       str(tmp_path / f"ready_{name}"), str(go)], cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 120
    while not all((tmp_path / f"ready_{n}").exists() for n in "ab") and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    runs = mlflow.MlflowClient(uri).search_runs([get_or_create_experiment(uri, "evalkit")])
    assert sorted(r.info.run_id for r in runs) == sorted(out.strip() for out, _ in outs)
    assert (tmp_path / "fresh" / "mlflow.db.lock").exists()


def test_sweep_cells_side_by_side_on_the_parent_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = (tmp_path / "sweep").resolve()
    cells = [("0_noop_bf16", "bf16", 10, 8, 150.0, "pass"), ("2_noop_fp8", "fp8", 10, 7, 90.0, "pass"),
             ("10_noop_fp8_d3", "fp8", 3, 2, 40.0, "regression")]
    dirs = []
    for i, (name, backend, steps, ok, ms, verdict) in enumerate(cells):
        dirs.append(sweep / name)
        make_run(sweep / name, successes=ok, call_ms=ms, backend=backend, denoise_steps=steps, sweep_key=str(sweep),
                 start_ms=1_700_000_000_000 + i * 60_000, end_ms=1_700_000_050_000 + i * 60_000, verdict=verdict)
    make_run(sweep / "merged", successes=1)  # a merge's bundle under the sweep dir: not a cell
    df = cells_frame(sweep_cells(sweep))
    assert list(df["cell"]) == ["0_noop_bf16", "2_noop_fp8", "10_noop_fp8_d3"]  # job order, 2 before 10
    assert list(df["backend"]) == ["bf16", "fp8", "fp8"] and list(df["denoise_steps"]) == ["10", "10", "3"]
    assert df["success_rate"].tolist() == pytest.approx([8 / 9, 7 / 9, 2 / 9])
    out = Console(record=True, width=200, file=io.StringIO())
    print_sweep_table(df, out)
    text = out.export_text()
    assert "policy noop · suite libero_spatial_quick" in text  # shared by every cell: said once
    rows = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    assert [[c.strip() for c in r] for r in rows] == [
        ["0", "bf16", "10", "88.9%", "[56.5%, 98.0%]", "150.0", "pass"],
        ["2", "fp8", "10", "77.8%", "[45.3%, 93.7%]", "90.0", "pass"],
        ["10", "fp8", "3", "22.2%", "[6.3%, 54.7%]", "40.0", "regression"]]

    for d in dirs + [sweep / "merged"]:
        sync_bundle(d, uri)
    assert sync_sweeps(dirs, uri) and sync_sweeps(dirs, uri)  # twice: the table is replaced, not appended to
    client = mlflow.MlflowClient(uri)
    (parent,) = [r for r in client.search_runs([get_or_create_experiment(uri, "evalkit")])
                 if r.data.tags.get("evalkit.role") == "sweep"]
    assert parent.info.start_time == 1_700_000_000_000 and parent.info.end_time == 1_700_000_170_000
    assert parent.data.metrics["sweep/cells"] == 3 and parent.data.metrics["sweep/regressions"] == 1
    assert parent.data.metrics["sweep/success_rate_max"] == pytest.approx(8 / 9)
    assert parent.data.metrics["sweep/latency_p50_ms_min"] == pytest.approx(40.0)
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, SWEEP_TABLE, str(tmp_path))).read_text())
    assert [row[0] for row in table["data"]] == ["0_noop_bf16", "2_noop_fp8", "10_noop_fp8_d3"]
    run_ids = {r.info.run_id for r in client.search_runs([parent.info.experiment_id])
               if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {row[table["columns"].index("run_id")] for row in table["data"]} == run_ids and len(run_ids) == 3


LIBRARY_CHATTER = textwrap.dedent("""
    import multiprocessing as mp, os, sys, warnings
    from pathlib import Path
    from evalkit.progress import RunProgress
    from evalkit.rollout.records import EpisodeRecord

    def worker():
        print("[info] Applying task order index 0 (from a spawned worker)", flush=True)

    if __name__ == "__main__":
        name = "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate"
        rec = EpisodeRecord(suite="s", task_id=0, task_name=name, init_state_id=1, seed=7, success=True, steps=9,
                            failure_reason=None, wall_time_s=30.0, policy_time_s=1.0, policy_calls=2)
        with RunProgress(5, [], True, "s", log_path=Path(sys.argv[1]), workers=2) as p:
            os.write(1, b"[robosuite WARNING] C-level write to fd 1\\n")
            os.write(2, b"MuJoCo chatter on fd 2\\n")
            print("python print from a library")
            warnings.warn("a library warning")
            proc = mp.get_context("spawn").Process(target=worker)
            proc.start(); proc.join()
            p.update(rec)
        print("after the rollouts")
""")


def test_library_output_goes_to_the_run_log_and_the_lines_stay_clean(tmp_path):
    log = tmp_path / RUN_LOG
    script = tmp_path / "chatter.py"
    script.write_text(LIBRARY_CHATTER)
    p = subprocess.run([sys.executable, str(script), str(log)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    # the terminal: the episode line (task name whole, rate, ETA from the first episode), then normal output again
    assert p.stdout.splitlines() == [
        "[1/5] task 0 pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate init 1: "
        "success in 9 steps, 30.0 s | success 1/1 = 100% [21, 100] | ETA 0:01:00",
        "after the rollouts"]
    assert p.stderr == ""
    text = log.read_text()
    for line in ("C-level write to fd 1", "MuJoCo chatter on fd 2", "python print from a library", "a library warning",
                 "Applying task order index 0 (from a spawned worker)"):
        assert line in text


def test_eta_from_the_first_finished_episode():
    assert eta_seconds([], 9, 2) is None  # nothing finished yet: no estimate
    assert eta_seconds([30.0], 8, 2) == 120.0  # 8 left, two at a time, 30 s each
    assert eta_seconds([10.0, 20.0], 1, 4) == 15.0 and eta_seconds([10.0], 0, 2) == 0.0
    assert clock(3725.4) == "1:02:05" and clock(-3) == "0:00:00"


@pytest.mark.parametrize("width", [80, 100, 160])
def test_the_bar_is_one_line_at_any_width(width):
    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    progress = Progress(*bar_columns(width), console=console, expand=True)
    progress.add_task("libero_spatial_quick", total=9, completed=3, counts="3/9 done · 2 running",
                      rate="success 2/3 = 67% [21, 94]", eta_at=time.perf_counter() + 125, last="last: task 1 " + TASKS[0])
    console.print(progress.get_renderable())
    (line,) = console.file.getvalue().splitlines()
    assert "3/9 done · 2 running" in line and "success 2/3 = 67% [21, 94]" in line and "ETA 0:02:0" in line
    assert ("last: task 1 pick_up" in line) == (width >= 120)


def test_task_names_are_never_cut_and_the_end_says_where_everything_is(tmp_path):
    make_run(tmp_path / "r", successes=4)
    summary = RunSummary.from_dict(json.loads((tmp_path / "r" / "summary.json").read_text()))
    console = Console(record=True, width=80, file=io.StringIO())
    print_summary(summary, console)
    folded = "".join(ch for ch in console.export_text() if ch not in " │┃\n")
    assert all(name in folded for name in TASKS)
    (tmp_path / "r" / RUN_LOG).write_text("[robosuite WARNING] ...\n")
    uri = "sqlite:////data/mlruns/mlflow.db"
    console = Console(record=True, width=300, file=io.StringIO())
    print_where(tmp_path / "r", uri, "3", "ab12", console=console)
    lines = console.export_text().splitlines()
    assert lines[0] == f"results  {tmp_path / 'r'}" and str(tmp_path / "r" / RUN_LOG) in lines[1]
    assert lines[2] == "MLflow   http://127.0.0.1:5000/#/experiments/3/runs/ab12?workflowType=machine_learning"
    assert lines[3] == ("all runs http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
                        "&viewStateShareKey=evalkit")
    assert lines[4].startswith("open     mlflow ui --backend-store-uri sqlite:////data/mlruns/mlflow.db")
    # a server serves its own UI: its links, no command
    assert run_url("http://10.0.0.5:5000/", "1", "r") == "http://10.0.0.5:5000/#/experiments/1/runs/r?workflowType=machine_learning"
    assert open_command("http://10.0.0.5:5000") is None
    assert runs_url(uri, "1", charts=True).endswith("&compareRunsMode=CHART")
