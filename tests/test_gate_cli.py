"""The fidelity gate through the CLI, as a user runs it: a fault backend exits 1 before any episode on the trained
reference policy, naming the check and the first divergent layer; a healthy backend passes and runs, and with no
baseline its verdict is `unjudged`, never a plain pass; a custom backend's run records what it really was."""

import json

import pytest

from tests.conftest import REPO, mlflow_runs, run_cli

COMMON = ["policy=reference", "suite=libero_spatial_quick", "quiet=true", "video=none"]
SHORT = ["suite.tasks=[0]", "suite.trials=1", "suite.max_steps=2", "workers=0"]


@pytest.mark.parametrize("fault, check, where", [
    ("fault_layer_order", "execution_order", "prefix.layers.1"),
    ("fault_state_across_calls", "layer_states", None),
])
def test_fault_backend_fails_before_any_episode_naming_the_check(tmp_path, fault, check, where):
    run_dir = tmp_path / fault
    p = run_cli(*COMMON, "tracking=offline", f"backend={fault}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    tail = p.stdout.split("caught by fidelity")[1]
    assert check in tail
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["episodes"] == 0 and s["skipped_rollouts"] and s["verdict"] == "regression"
    assert check in {c["name"] for c in s["fidelity"]["checks"] if not c["passed"]}
    if where:
        assert s["fidelity"]["first_divergent_layer"] == where and f"first divergent layer: {where}" in p.stdout


def test_healthy_run_without_baseline_is_unjudged(tmp_path):
    run_dir = tmp_path / "ok"
    p = run_cli(*COMMON, *SHORT, "tracking=offline", "backend=int8", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert all(c["passed"] for c in s["fidelity"]["checks"]) and s["episodes"] == 1
    assert s["verdict"] == "unjudged" and "baseline=auto" in s["baseline"] and "verdict: UNJUDGED" in p.stdout
    assert s["fidelity"]["precision_class"] == "8-bit"


def test_custom_backend_run_records_what_it_was(tmp_path):
    """A backend passed by import path must not look like plain bf16 in MLflow; and a baseline-tagged run is
    found by the next run's baseline=auto."""
    env = {"PYTHONPATH": str(REPO)}
    run_dir = tmp_path / "custom"
    p = run_cli(*COMMON, *SHORT, "backend.target=tests.custom_backends.UserNoise", "+backend.options.scale=0.001",
                "tracking.tag_baseline=true", f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    run = mlflow_runs(tmp_path / "mlruns" / "mlflow.db")[0]
    params, tags = run.data.params, run.data.tags
    assert params["backend.target"] == "tests.custom_backends.UserNoise" and params["backend.options"] == '{"scale": 0.001}'
    assert params["backend.precision_class"] == "16-bit" and tags["evalkit.verdict"] == "unjudged"
    p = run_cli(*COMMON, *SHORT, "backend=bf16", f"hydra.run.dir={tmp_path / 'second'}", cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    s = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert run.info.run_id in s["baseline"] and s["verdict"] != "unjudged"


def test_unknown_baseline_stops_before_anything_is_built(tmp_path):
    p = run_cli(*COMMON, "baseline=nope", f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path)
    assert p.returncode == 2 and "cannot resolve run 'nope'" in p.stderr
    assert "fidelity" not in p.stdout and not (tmp_path / "x" / "episodes.jsonl").exists()
