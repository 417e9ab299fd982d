"""N shards of one suite as separate processes through Hydra's joblib launcher, then merged;
every job lands in the one sqlite MLflow store they share."""

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import mlflow_runs as _runs
from tests.conftest import run_cli


def test_joblib_shards_land_in_one_sqlite_store_and_merge(workdir):
    sweep = workdir / "sweep"
    p = run_cli("-m", "hydra/launcher=local_joblib", "shard=0/2,1/2", "policy=random", "suite=libero_spatial_quick",
                "suite.max_steps=8", "quiet=true", "video=none", "workers=1", f"hydra.sweep.dir={sweep}", cwd=workdir)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Joblib.Parallel" in p.stdout + p.stderr  # really the joblib launcher, not the basic one
    jobs = sorted(d for d in sweep.iterdir() if (d / "run_key.json").exists())
    assert [json.loads((d / "run_key.json").read_text())["shard"] for d in jobs] == [[0, 2], [1, 2]]
    db = workdir / "mlruns" / "mlflow.db"
    runs = _runs(db)
    parents = [r for r in runs if r.data.tags.get("evalkit.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    assert sorted(c.data.params["shard"] for c in children) == ["0/2", "1/2"]
    assert all(c.info.status == "FINISHED" and "success_rate" in c.data.metrics for c in children)

    m = subprocess.run([sys.executable, "-m", "evalkit.merge", f"runs={sweep}"], cwd=workdir, capture_output=True, text=True)
    assert m.returncode == 0, m.stderr
    df = pd.read_csv(sweep / "merged" / "episodes.csv")
    assert len(df) == 9 and not df.duplicated(["task_id", "init_state_id"]).any()
    merged = [r for r in _runs(db) if r.data.tags.get("evalkit.role") == "merged"]
    assert len(merged) == 1 and merged[0].data.metrics["success_rate"] == 0.0
    assert len(_runs(db)) == 4


@pytest.mark.slow  # CI time; tests/test_tracking.py keeps concurrent store creation in the default tier
def test_many_concurrent_writers_on_one_sqlite_store(workdir):
    """Six uploads at once into one sqlite store created beforehand (as the sweep callback does): none lost."""
    base = workdir / "r0"
    p = run_cli("policy=noop", "suite=libero_spatial_quick", "suite.tasks=[0]", "suite.trials=1", "suite.max_steps=2",
                "video=none", "quiet=true", "workers=0", "tracking=offline", f"hydra.run.dir={base}", cwd=workdir)
    assert p.returncode == 0, p.stderr[-2000:]
    dirs = [base] + [shutil.copytree(base, workdir / f"r{i}") for i in range(1, 6)]
    db = workdir / "store" / "mlflow.db"
    from evalkit.tracking.store import get_or_create_experiment

    get_or_create_experiment(f"sqlite:///{db}", "evalkit")
    procs = [subprocess.Popen([sys.executable, "-m", "evalkit.sync", f"runs={d}", f"uri=sqlite:///{db}"], cwd=workdir,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for d in dirs]
    outs = [pr.communicate(timeout=300)[0] for pr in procs]
    assert all(pr.returncode == 0 for pr in procs), outs
    runs = _runs(db)
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["evalkit.run_dir"] for r in runs} == {str(base)}  # same content, six separate runs
    assert all(r.data.metrics.get("success_rate") == 0.0 and r.data.params["policy"] == "noop" for r in runs)


@pytest.mark.slow  # CI time
def test_a_failing_job_fails_the_sweep(workdir):
    """Jobs run in joblib's processes: their exit codes still decide the sweep's (the worst wins)."""
    p = run_cli("-m", "hydra/launcher=local_joblib", "shard=0/2,7/2", "policy=noop", "suite=libero_spatial_quick",
                "suite.tasks=[0]", "suite.trials=1", "suite.max_steps=2", "quiet=true", "video=none", "workers=0",
                "tracking=offline", f"hydra.sweep.dir={workdir / 'sweep'}", cwd=workdir)
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-2000:])
    assert "shard=7/2: need N >= 1 and 0 <= K < N" in p.stderr
