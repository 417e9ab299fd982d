import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "osmesa")
REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m evalkit ...` as a user would, in `cwd` (its mlruns/ and outputs/ land there)."""
    e = {**os.environ, "MUJOCO_GL": "osmesa", **(env or {})}
    return subprocess.run([sys.executable, "-m", "evalkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def mlflow_runs(db: Path, experiment: str = "evalkit") -> list:
    """Every run of `experiment` in the sqlite store at `db` ([] when the experiment does not exist)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []
