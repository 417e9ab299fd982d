"""`policy=remote` against `python -m evalkit.serve` in a subprocess, over openpi's websocket protocol."""

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from evalkit.policies.base import ObsBatch, Observation
from tests.conftest import REPO, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, timeout_s: float = 120):
    """`python -m evalkit.serve ...` on a free port; waits (bounded) for /healthz."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "evalkit.serve", *args, f"port={port}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"server not healthy after {timeout_s} s")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def random_server():
    proc, port = start_server("policy=random")
    yield port
    stop(proc)


def _obs(seed: int) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(state=rng.normal(size=8).astype(np.float32), instruction="pick up the black bowl",
                       episode_key=f"s/0/{seed}", step=0, noise_seed=seed,
                       agentview=rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
                       wrist=rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))


def test_remote_policy_returns_what_the_served_policy_computes(random_server):
    from evalkit.policies.random_policy import RandomPolicy
    from evalkit.policies.remote import RemotePolicy

    remote = RemotePolicy(port=random_server, evalkit_extras=True)
    batch = ObsBatch([_obs(s) for s in (3, 11, 42)])
    got = remote.predict(batch)
    assert got.shape == (3, 10, 7) and got.dtype == np.float32
    np.testing.assert_array_equal(got, RandomPolicy().predict(batch).astype(np.float32))
    t = remote.last_timing
    assert len(t["client_roundtrip_ms"]) == 3 and len(t["server_infer_ms"]) == 3 and len(t["policy_infer_ms"]) == 3
    # the server's own time is a part of what the client waited for, measured separately
    assert all(rt >= srv for rt, srv in zip(t["client_roundtrip_ms"], t["server_infer_ms"]))
    assert len(t["server_prev_total_ms"]) == 2  # reported from the second request of a connection on
    summary = remote.timing_summary()
    assert summary["client_roundtrip_ms"]["n"] == 3 and summary["server_metadata"]["evalkit_policy"] == "random"


def test_openpi_client_speaks_to_evalkit_serve(random_server):
    """The unmodified openpi client, with openpi's LIBERO request keys."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from evalkit.policies.remote import to_request

    client = WebsocketClientPolicy("127.0.0.1", random_server)
    assert client.get_server_metadata()["action_horizon"] == 10
    req = to_request(_obs(1), with_images=True, extras=False)
    assert set(req) == {"observation/image", "observation/wrist_image", "observation/state", "prompt"}
    reply = client.infer(req)
    assert np.asarray(reply["actions"]).shape == (10, 7) and reply["server_timing"]["infer_ms"] > 0
    with pytest.raises(RuntimeError, match="request misses"):  # errors come back with the server's traceback
        client.infer({"observation/image": req["observation/image"]})


def test_quick_suite_through_a_served_pi05_tiny(workdir):
    """A real evaluation: LIBERO envs here, pi05_tiny (images + prompt) in a server subprocess."""
    proc, port = start_server("policy=pi05_tiny", "device=cpu")
    try:
        run_dir = workdir / "remote"
        p = run_cli("policy=remote", f"policy.port={port}", "suite=libero_spatial_quick", "suite.tasks=[0]",
                    "suite.trials=2", "suite.max_steps=5", "workers=1", "video=none", "quiet=true", "tracking=offline",
                    f"hydra.run.dir={run_dir}", cwd=workdir)
        assert p.returncode == 0, p.stderr[-3000:]
    finally:
        stop(proc)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["episodes"] == 2 and s["params"]["policy"] == "remote"
    assert set(s["failure_reasons"]) <= {"timeout"}  # every episode ran to its step limit, no policy errors
    t = s["policy_timing"]
    assert t["server_metadata"]["evalkit_config"] == "pi05_tiny" and t["server_metadata"]["device"] == "cpu"
    # one request per policy call: 2 episodes x ceil(5 steps / replan 5) = 2 calls
    assert t["client_roundtrip_ms"]["n"] == 2 and t["server_infer_ms"]["n"] == 2 and t["policy_infer_ms"]["n"] == 2
    assert t["client_roundtrip_ms"]["p50"] >= t["server_infer_ms"]["p50"] >= t["policy_infer_ms"]["p50"] > 0
    bundle = json.loads((run_dir / "mlflow_bundle" / "run.json").read_text())
    assert {"policy_timing_ms/client_roundtrip_ms", "policy_timing_ms/server_infer_ms"} <= set(bundle["metrics"])


def test_no_server_is_bad_input_with_how_to_start_one(workdir):
    p = run_cli("policy=remote", f"policy.port={free_port()}", "policy.connect_timeout_s=1", "tracking=offline",
                "quiet=true", f"hydra.run.dir={workdir / 'x'}", cwd=workdir, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert re.search(r"no policy server at ws://127.0.0.1:\d+ after 1 s", p.stderr) and "python -m evalkit.serve" in p.stderr


def test_serve_rejects_unknown_policy():
    p = subprocess.run([sys.executable, "-m", "evalkit.serve", "policy=nope", "port=0"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown policy 'nope'; valid: " in p.stderr
