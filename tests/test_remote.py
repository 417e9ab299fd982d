"""`policy=remote` against `python -m evalkit.serve` in a subprocess, over openpi's websocket protocol."""

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from evalkit.policies.base import ObsBatch, Observation
from tests.conftest import REPO, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, timeout_s: float = 120, log: Path | None = None):
    """`python -m evalkit.serve ...` on a free port; waits (bounded) for /healthz. `log`: its output goes there."""
    port = free_port()
    out = open(log, "w") if log is not None else subprocess.PIPE  # the server writes it while it runs
    proc = subprocess.Popen([sys.executable, "-m", "evalkit.serve", *args, f"port={port}"], cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            text = log.read_text() if log is not None else proc.stdout.read()
            raise AssertionError(f"server exited {proc.returncode}: {text[-3000:]}")
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
def served(tmp_path_factory):
    """The random policy served with a 1 MiB message limit; (port, path of the server's log)."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, port = start_server("policy=random", "max_message_mb=1", log=log)
    yield port, log
    stop(proc)


@pytest.fixture(scope="module")
def random_server(served):
    return served[0]


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


@pytest.mark.slow  # a whole quick suite through the server (~75 s); the calls above cover the protocol
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
    assert p.returncode == 2 and "unknown policy 'nope'; did you mean 'noop'? valid: noop, " in p.stderr


@contextlib.contextmanager
def _raw_client(port: int):
    """A plain websockets client (no openpi wrapper), so close codes and text frames are seen as sent."""
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None, open_timeout=30) as ws:
        ws.recv(timeout=30)  # the server's metadata
        yield ws


def _wait_for(log: Path, text: str, timeout_s: float = 10) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        content = log.read_text()
        if text in content:
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the server log: {log.read_text()[-2000:]}")


def test_failed_request_gets_type_and_one_line_and_the_log_gets_the_traceback(served):
    from openpi_client import msgpack_numpy
    from websockets.exceptions import ConnectionClosed

    port, log = served
    for request, expected in [
        ({"observation/image": np.zeros((4, 4, 3), np.uint8)},
         "ValueError: request misses ['observation/state', 'prompt']; got keys ['observation/image']"),
        ([1, 2, 3], "ValueError: a request must be a msgpack map of openpi's LIBERO keys, got list"),
    ]:
        with _raw_client(port) as ws:
            ws.send(msgpack_numpy.Packer().pack(request))
            reply = ws.recv(timeout=30)
            assert reply == expected  # exactly the type and one line: no traceback, no file path
            with pytest.raises(ConnectionClosed) as e:
                ws.recv(timeout=30)
            assert e.value.rcvd.code == 1011 and "details in the previous frame" in e.value.rcvd.reason
    content = _wait_for(log, "a request must be a msgpack map")
    assert "Traceback (most recent call last)" in content and "evalkit/serve.py" in content  # the log has it all


def test_oversized_message_is_refused_and_the_server_keeps_serving(served):
    from openpi_client import msgpack_numpy
    from websockets.exceptions import ConnectionClosed

    from evalkit.policies.remote import to_request

    port, log = served
    big = _obs(5)
    big.agentview = np.zeros((1024, 1024, 3), np.uint8)  # 3 MiB > the 1 MiB limit
    with _raw_client(port) as ws:
        ws.send(msgpack_numpy.Packer().pack(to_request(big, with_images=True, extras=False)))
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=30)
    assert e.value.rcvd.code == 1009  # "message too big", sent by the server's websocket layer before decoding
    assert "refused a message" in _wait_for(log, "over max_message_mb")
    # the server is unharmed: a normal request on a new connection is answered
    with _raw_client(port) as ws:
        ws.send(msgpack_numpy.Packer().pack(to_request(_obs(6), with_images=True, extras=False)))
        reply = msgpack_numpy.unpackb(ws.recv(timeout=30))
    assert np.asarray(reply["actions"]).shape == (10, 7)


def test_client_error_blanks_paths_and_keeps_one_line():
    from evalkit.serve import client_error

    e = FileNotFoundError(2, "No such file or directory", "/home/alice/ckpt/model.safetensors")
    assert client_error(e) == "FileNotFoundError: [Errno 2] No such file or directory: '<path>'"
    msg = client_error(RuntimeError("failed in ./evalkit/x.py and C:\\Users\\a\\b.py\n  at line 3"))
    assert msg == "RuntimeError: failed in <path> and <path>"
    assert client_error(KeyError("observation/state")) == "KeyError: 'observation/state'"  # keys are not paths
    assert len(client_error(ValueError("x" * 1000))) == 300


def test_serve_rejects_a_bad_message_limit(capsys):
    from evalkit.serve import main

    assert main(["policy=random", "port=0", "max_message_mb=0"]) == 2
    err = capsys.readouterr().err
    assert "evalkit.serve: error: max_message_mb must be > 0, got 0.0" in err and "Traceback" not in err
