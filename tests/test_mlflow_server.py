"""Against a real `mlflow server` on 127.0.0.1: concurrent writers, and a server that dies mid-run."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

pytestmark = pytest.mark.server

FAST = ["policy=noop", "suite=libero_spatial_quick", "video=none", "quiet=true", "workers=0", "tracking=server"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` with a sqlite backend and proxied artifacts (--artifacts-destination, mlflow 3.17)."""

    def __init__(self, root):
        self.root, self.port, self.proc = root, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'db.sqlite'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        self.log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited {self.proc.returncode}: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"mlflow server not healthy after {timeout_s} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # the server and its uvicorn worker (own session, started by us)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.log.close()

    def runs(self):
        client = mlflow.MlflowClient(self.uri)
        exp = client.get_experiment_by_name("evalkit")
        return client, (client.search_runs([exp.experiment_id]) if exp else [])


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path)
    s.start()
    yield s
    s.stop()


def test_two_concurrent_writers_both_land(server, workdir):
    args = [*FAST, "suite.tasks=[0]", "suite.trials=2", "suite.max_steps=4", f"tracking.uri={server.uri}"]
    env = {**os.environ, "MUJOCO_GL": "osmesa"}
    launched = time.time() * 1000
    procs = [subprocess.Popen([sys.executable, "-m", "evalkit", *args, f"hydra.run.dir={workdir / f'w{i}'}"], cwd=workdir,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(f"in {server.uri}" in o for o in outs), outs  # each uploaded, none fell back to offline
    client, runs = server.runs()
    assert len(runs) == 2 and {r.data.tags["evalkit.run_dir"] for r in runs} == {str(workdir / "w0"), str(workdir / "w1")}
    exp = client.get_experiment(runs[0].info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens as a classic ML experiment
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.metrics["success_rate"] == 0.0
        assert r.data.metrics["Headline/success_rate"] == 0.0 and "Headline/latency_p50_ms" in r.data.metrics
        assert {"summary.json", "episodes_table.json"} <= {f.path for f in client.list_artifacts(r.info.run_id)}
        # the run's own start and end (it is uploaded after it ended): it started before its upload and the two
        # episodes' env alone take seconds
        assert launched < r.info.start_time and r.info.end_time - r.info.start_time > 2000
        out = outs[int(r.data.tags["evalkit.run_dir"].endswith("w1"))]
        assert f"{server.uri}/#/experiments/{r.info.experiment_id}/runs/{r.info.run_id}?workflowType=machine_learning" in out


def test_server_stopped_mid_run_then_sync_loses_nothing(server, workdir):
    run_dir = workdir / "mid"
    args = [sys.executable, "-m", "evalkit", *FAST, "suite.tasks=[0,1]", "suite.trials=2", "suite.max_steps=60",
            f"tracking.uri={server.uri}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=workdir, env={**os.environ, "MUJOCO_GL": "osmesa"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    journal = run_dir / "episodes.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (journal.exists() and journal.read_text().strip()):
        time.sleep(0.2)
    server.stop()  # mid-run: one episode done, three to go
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "unreachable" in out and f"python -m evalkit.sync runs={run_dir} uri={server.uri}" in out
    bundle = json.loads((run_dir / "mlflow_bundle" / "run.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["episodes"] == 4

    server.start()  # same store, same port
    assert not server.runs()[1]
    p = subprocess.run([sys.executable, "-m", "evalkit.sync", f"runs={run_dir}", f"uri={server.uri}"], cwd=workdir,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    client, (run,) = server.runs()
    assert run.data.metrics == pytest.approx(bundle["metrics"])
    assert run.data.params["suite.trials"] == "2" and run.data.params["policy"] == "noop"
    table = client.download_artifacts(run.info.run_id, "episodes_table.json", str(workdir))
    assert len(json.loads(open(table).read())["data"]) == summary["episodes"]
