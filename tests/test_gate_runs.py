"""load_run over a real sqlite MLflow store, run directories and reference files; the gate CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from evalkit.errors import BadInput
from evalkit.gate.runs import (
    LATENCY_CALLS,
    load_references,
    load_run,
    read_latency_calls,
    write_latency_calls,
)

mlflow = pytest.importorskip("mlflow")
REPO = Path(__file__).resolve().parents[1]

PARAMS = {"policy": "pi05_tiny", "backend": "bf16", "suite": "libero_spatial_quick", "denoise_steps": "10", "device": "cpu"}


def write_run_dir(folder: Path, success: list[bool], p50=10.0, calls_ms=None, **params) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if calls_ms is not None:
        write_latency_calls(folder, [0.5] + [x / 1e3 for x in calls_ms], [1] * (len(calls_ms) + 1))
    n = len(success)
    df = pd.DataFrame(
        {
            "suite": "libero_spatial", "task_id": [i % 3 for i in range(n)], "task_name": [f"t{i % 3}" for i in range(n)],
            "init_state_id": [i // 3 for i in range(n)], "seed": 7, "success": success, "steps": 50,
            "failure_reason": [None if s else "timeout" for s in success], "wall_time_s": 1.0, "policy_time_s": 0.1,
            "video_path": None,
        }
    )
    df.to_parquet(folder / "episodes.parquet")
    df.to_csv(folder / "episodes.csv", index=False)
    x = int(sum(success))
    summary = {
        "success_rate": x / n, "episodes": n, "successes": x, "per_task": {},
        "latency": {"latency_ms_p50": p50, "latency_ms_p90": p50 * 1.1, "latency_ms_p99": p50 * 1.3},
        "params": {**PARAMS, **params}, "protocol": {}, "fidelity": None, "gate": None,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("evalkit", artifact_location=str(tmp_path / "artifacts"))

    def log(folder: Path, baseline: bool, **params) -> str:
        run = client.create_run(exp, tags={"evalkit.baseline": "true"} if baseline else {})
        rid = run.info.run_id
        for k, v in {**PARAMS, **params}.items():
            client.log_param(rid, k, v)
        for f in ("summary.json", "episodes.parquet", "episodes.csv", LATENCY_CALLS):
            if (folder / f).exists():
                client.log_artifact(rid, str(folder / f))
        client.set_terminated(rid)
        time.sleep(0.01)  # distinct start times for "latest"
        return rid

    return uri, log


def test_load_run_from_mlflow_and_latest(tmp_path, store):
    uri, log = store
    old = log(write_run_dir(tmp_path / "old", [True] * 6 + [False] * 3, calls_ms=[9.0, 10.0, 11.0]), baseline=True)
    new = log(write_run_dir(tmp_path / "new", [True] * 9), baseline=True)
    log(write_run_dir(tmp_path / "gpu", [False] * 9), baseline=True, device="cuda")  # other device: not "latest"
    cand = log(write_run_dir(tmp_path / "cand", [True] * 8 + [False]), baseline=False)

    r = load_run(cand, uri)
    assert r.source == "mlflow" and r.params["policy"] == "pi05_tiny" and len(r.episodes) == 9
    assert r.summary.successes == 8

    latest = load_run("latest", uri, like=r.params)
    assert latest.ref == f"latest ({new})" and latest.summary.successes == 9
    assert old != new and latest.latency_calls is None  # no latency_calls.json: the gate says it uses quantiles
    assert list(load_run(old, uri).latency_calls) == [9.0, 10.0, 11.0]  # warm-up call dropped
    with pytest.raises(BadInput, match="no baseline run"):
        load_run("latest", uri, like={**r.params, "suite": "libero_goal"})
    with pytest.raises(BadInput, match="not found"):
        load_run("0" * 32, uri)


def test_load_run_dir_and_reference(tmp_path):
    d = write_run_dir(tmp_path / "run", [True, False, True], calls_ms=[5.0, 6.0])
    r = load_run(str(d))
    assert r.source == "dir" and r.summary.episodes == 3 and len(r.episodes) == 3
    assert list(r.latency_calls) == [5.0, 6.0] and json.loads((d / LATENCY_CALLS).read_text())["warmup_calls"] == 1
    (d / LATENCY_CALLS).write_text("{}")
    with pytest.raises(BadInput, match="latency_calls"):
        read_latency_calls(d)
    refs = load_references()
    assert "pi05_libero/bf16/libero_spatial/10" in refs
    ref = load_run("ref:pi05_libero/bf16/libero_spatial/10")
    assert ref.episodes is None and ref.summary.episodes == 500 and ref.summary.successes == 494
    with pytest.raises(BadInput, match="cannot resolve"):
        load_run("no-such-thing")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "evalkit.gate", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_exit_codes(tmp_path, store):
    uri, log = store
    base = log(write_run_dir(tmp_path / "b", [True] * 30), baseline=True)
    bad = write_run_dir(tmp_path / "bad", [True] * 15 + [False] * 15)
    p = _cli(f"candidate={bad}", "baseline=latest", f"tracking_uri={uri}", f"json={tmp_path / 'gate.json'}")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "REGRESSION" in p.stdout and base in p.stdout
    g = json.loads((tmp_path / "gate.json").read_text())
    assert g["passed"] is False and g["verdict"] == "regression" and g["exit_code"] == 1
    good = write_run_dir(tmp_path / "good", [True] * 30)
    p = _cli(f"candidate={good}", f"baseline={base}", f"tracking_uri={uri}", "gate.max_latency_ratio=1.5")
    assert p.returncode == 0 and "gate: INCONCLUSIVE" in p.stdout, p.stdout + p.stderr  # 30 episodes: cannot vouch
    p = _cli(f"candidate={good}", f"baseline={base}", f"tracking_uri={uri}", "gate.max_drop=0.2", "gate.fail_inconclusive=true")
    assert p.returncode == 0 and "gate: PASS" in p.stdout, p.stdout + p.stderr  # 30 identical pairs show < 20 pp
    p = _cli(f"candidate={good}", f"baseline={base}", f"tracking_uri={uri}", "gate.alpha=oops")
    assert p.returncode == 2 and "gate.alpha=oops: expected float" in p.stderr
    p = _cli(f"candidate={good}")
    assert p.returncode == 2 and "baseline=RUN" in p.stderr


def test_plan_cli(tmp_path, capsys):
    from evalkit.gate.__main__ import main

    d = write_run_dir(tmp_path / "b", [True] * 80 + [False] * 10)
    p = _cli("plan", f"baseline={d}", "margin=0.1")  # as a user types it
    assert p.returncode == 0, p.stdout + p.stderr
    assert "paired" in p.stdout and "discordance 0.050" in p.stdout and "episodes" in p.stdout
    assert "independent outcomes" in p.stdout
    assert main(["plan", "baseline=ref:pi05_libero/bf16/libero_spatial/10", "margin=0.05"]) == 0
    out = capsys.readouterr().out
    assert "unpaired" in out and "500 baseline episodes" in out
    assert main(["plan", f"baseline={d}", "margin=2"]) == 2 and "margin=2 must be in" in capsys.readouterr().err
    assert main(["plan", "margin=0.1"]) == 2 and "baseline=... required" in capsys.readouterr().err
