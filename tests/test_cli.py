"""`python -m evalkit` as a user runs it: real LIBERO episodes, a real sqlite MLflow store."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import REPO, run_cli
from tests.conftest import mlflow_runs as _runs_in

FAST = ["policy=noop", "backend=bf16", "suite=libero_spatial_quick", "suite.max_steps=8", "quiet=true"]


def mlflow_runs(workdir):
    return _runs_in(workdir / "mlruns" / "mlflow.db")


def test_quick_suite_end_to_end_with_mlflow(workdir):
    run_dir = workdir / "a"
    p = run_cli(*FAST, f"hydra.run.dir={run_dir}", cwd=workdir)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["episodes"] == 9 and s["success_rate"] == 0.0
    assert s["success_ci_low"] == 0.0 and 0.25 < s["success_ci_high"] < 0.35  # Wilson upper bound for 0/9
    assert s["protocol"]["max_steps"] == 8 and s["protocol"]["num_steps_wait"] == 10 and s["protocol"]["replan_steps"] == 5
    pin = re.search(r'"mujoco==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert s["versions"]["mujoco"] == pin and s["params"]["backend"] == "bf16"  # the pinned simulator ran
    df = pd.read_parquet(run_dir / "episodes.parquet")
    assert len(df) == 9 and set(df.failure_reason) == {"timeout"}
    (run,) = mlflow_runs(workdir)
    assert run.data.params["policy"] == "noop" and run.data.params["suite"] == "libero_spatial_quick"
    assert {"denoise_steps", "device", "git_sha", "backend", "version.mujoco"} <= set(run.data.params)
    assert run.data.metrics["success_rate"] == 0.0 and "success_ci_high" in run.data.metrics
    assert any(k.startswith("success_rate/") for k in run.data.metrics)
    # videos of failures (at most 5 per task) were rendered by replay and logged
    assert len(list((run_dir / "videos").glob("*.mp4"))) == 9


def test_sigkill_then_rerun_finishes_only_missing_episodes(workdir):
    run_dir = workdir / "k"
    args = [sys.executable, "-m", "evalkit", *FAST, "suite.max_steps=40", "video=none", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MUJOCO_GL": "osmesa"}, start_new_session=True)
    journal = run_dir / "episodes.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if journal.exists() and len(journal.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its env workers, mid-episode
    proc.wait()
    done_before = {(r["task_id"], r["init_state_id"]) for r in map(json.loads, journal.read_text().splitlines()) if r}
    assert 3 <= len(done_before) < 9
    p = run_cli(*FAST, "suite.max_steps=40", "video=none", f"hydra.run.dir={run_dir}", cwd=workdir)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming: {len(done_before)} of 9" in p.stdout
    df = pd.read_csv(run_dir / "episodes.csv")
    assert len(df) == 9 and not df.duplicated(["task_id", "init_state_id"]).any()
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["episodes"] == 9 and s["resumed_episodes"] == len(done_before)


def test_rerun_with_another_config_in_same_dir_is_refused(workdir):
    run_dir = workdir / "r"
    base = ["policy=noop", "suite=libero_spatial_quick", "suite.tasks=[0]", "suite.trials=1", "suite.max_steps=2",
            "video=none", "quiet=true", "tracking=offline", f"hydra.run.dir={run_dir}"]
    assert run_cli(*base, cwd=workdir).returncode == 0
    p = run_cli(*base, "denoise_steps=3", cwd=workdir)
    assert p.returncode == 2 and "holds a different run (differs in: denoise_steps)" in p.stderr


def test_multirun_creates_parent_and_child_runs(workdir):
    p = run_cli("-m", "backend=bf16,fp16", "policy=noop", "suite=libero_spatial_quick", "suite.tasks=[0]",
                "suite.trials=1", "suite.max_steps=2", "video=none", "quiet=true", "workers=0",
                f"hydra.sweep.dir={workdir / 'sweep'}", cwd=workdir)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = mlflow_runs(workdir)
    parents = [r for r in runs if r.data.tags.get("evalkit.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.params["backend"] for c in children) == ["bf16", "fp16"]
    # the cells side by side: printed at the end, and on the parent run, which spans its cells (tests/test_tracking.py)
    assert "2 cells" in p.stdout and parents[0].data.metrics["sweep/cells"] == 2
    assert parents[0].info.end_time == max(c.info.end_time for c in children)


@pytest.mark.parametrize(
    "override, message",
    [
        ("backend=nope", "unknown backend 'nope'; valid: "),
        ("suite=nope", "unknown suite 'nope'; valid: "),
        ("denoise_steps=0", "denoise_steps=0: must be >= 1"),
        ("suite.tasks=[99]", "out of range; libero_spatial has tasks 0..9"),
        ("workers=abc", "workers='abc' is not an integer"),
        ("video=sometimes", "video"),
        ("+backend.options.fuse_norm=true", "backend 'bf16' has no option 'fuse_norm'; valid: (none)"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(workdir, override, message):
    p = run_cli("policy=noop", "tracking=offline", override, cwd=workdir, timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert message in p.stderr and "Traceback" not in p.stderr
    assert not (workdir / "mlruns").exists() or not mlflow_runs(workdir)


def test_offline_run_then_sync_and_unreachable_server(workdir):
    run_dir = workdir / "off"
    common = ["policy=noop", "suite=libero_spatial_quick", "suite.tasks=[0]", "suite.trials=1", "suite.max_steps=2",
              "video=none", "quiet=true", "workers=0"]
    p = run_cli(*common, "tracking=offline", f"hydra.run.dir={run_dir}", cwd=workdir)
    assert p.returncode == 0 and "python -m evalkit.sync" in p.stdout
    assert not mlflow_runs(workdir) if (workdir / "mlruns" / "mlflow.db").exists() else True
    s = subprocess.run([sys.executable, "-m", "evalkit.sync", f"runs={run_dir}"], cwd=workdir, capture_output=True, text=True)
    assert s.returncode == 0, s.stderr
    (run,) = mlflow_runs(workdir)
    assert run.data.params["policy"] == "noop"
    # syncing again uploads nothing twice
    subprocess.run([sys.executable, "-m", "evalkit.sync", f"runs={run_dir}"], cwd=workdir, check=True, capture_output=True)
    assert len(mlflow_runs(workdir)) == 1
    # a tracking server that cannot be reached: the run still finishes and says how to sync
    dead = workdir / "dead"
    p = run_cli(*common, "tracking.uri=http://127.0.0.1:9", f"hydra.run.dir={dead}", cwd=workdir)
    assert p.returncode == 0 and "unreachable" in p.stdout and "python -m evalkit.sync" in p.stdout
    assert (dead / "mlflow_bundle" / "run.json").exists() and (dead / "summary.json").exists()


def test_baseline_latest_is_judged_by_the_gate(workdir):
    common = ["policy=random", "suite=libero_spatial_quick", "suite.tasks=[0]", "suite.trials=2", "suite.max_steps=4",
              "video=none", "quiet=true", "workers=0"]
    p = run_cli(*common, "tracking.tag_baseline=true", f"hydra.run.dir={workdir / 'base'}", cwd=workdir)
    assert p.returncode == 0, p.stderr[-2000:]
    p = run_cli(*common, "baseline=latest", f"hydra.run.dir={workdir / 'cand'}", cwd=workdir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    s = json.loads((workdir / "cand" / "summary.json").read_text())
    # same episodes, same outcomes, but 2 pairs cannot show a drop < gate.max_drop: inconclusive, exit 0, not a pass
    assert s["gate"]["verdict"] == "inconclusive" and not s["gate"]["passed"] and s["gate"]["mode"] == "paired"
    assert "gate: INCONCLUSIVE" in p.stdout
    (base,) = [r for r in mlflow_runs(workdir) if r.data.tags.get("evalkit.baseline") == "true"]
    assert s["gate"]["baseline"] in (base.info.run_id, f"mlflow:{base.info.run_id}") or base.info.run_id in str(s["gate"])
