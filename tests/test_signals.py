"""SIGINT (Ctrl-C) and SIGTERM during a run: the env workers are stopped, the journal keeps every finished episode,
ONE line gives the exact resume command, exit 130 / 143, no traceback, no temp file left; the printed command
finishes the run. Real `python -m evalkit` processes on real LIBERO envs."""

import json
import multiprocessing as mp
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from evalkit.errors import Interrupted
from evalkit.rollout.journal import Journal

ARGS = ["policy=noop", "suite=libero_spatial_quick", "suite.tasks=[0]", "suite.trials=2", "suite.max_steps=20",
        "quiet=true", "video=none", "tracking=offline", "workers=1"]


def _marked(marker: str, workers_only: bool = False) -> list[int]:
    """Processes (the run and its env workers) whose environment carries this test's marker; workers_only: just the
    env workers (multiprocessing spawn children), not a short-lived `git` the run starts for its provenance."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"EVALKIT_TEST_MARK={marker}".encode() in (d / "environ").read_bytes():
                    if not workers_only or b"spawn_main" in (d / "cmdline").read_bytes():
                        pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _env(tmp_path: Path, marker: str) -> dict:
    tmp = tmp_path / "tmp"  # the run's TMPDIR: whatever temp file it leaves shows up here
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "MUJOCO_GL": "osmesa", "TMPDIR": str(tmp), "EVALKIT_TEST_MARK": marker}


def _interrupt(tmp_path: Path, sig: int, to_group: bool, after_episodes: int):
    """Start a run, send `sig` once `after_episodes` are journaled (0: once its env worker runs), return
    (exit code, stdout + stderr, run dir, marker)."""
    run_dir, marker = tmp_path / "run", uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "evalkit", *ARGS, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            env=_env(tmp_path, marker), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    journal, deadline = run_dir / "episodes.jsonl", time.time() + 300
    while True:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        if after_episodes and journal.exists() and journal.read_bytes().count(b"\n") >= after_episodes:
            break
        if not after_episodes and _marked(marker, workers_only=True):  # its env worker runs (earlier, a `git`
            break                                                         # child could pass for one: flaky)
        time.sleep(0.05)
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    out = proc.communicate(timeout=120)[0]
    return proc.returncode, out, run_dir, marker


def _assert_stopped_cleanly(code: int, out: str, run_dir: Path, marker: str, tmp_path: Path, sig: int) -> str:
    assert code == 128 + sig, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    (line,) = [x for x in out.splitlines() if "resume=" in x or "stopped by" in x]
    assert line == out.rstrip("\n").splitlines()[-1]  # the last thing printed
    assert line.startswith(f"evalkit: stopped by {signal.Signals(sig).name}; ")
    got = Journal(run_dir / "episodes.jsonl").read()
    assert got.bad == [] and not (run_dir / "summary.json").exists()  # an unfinished run writes no summary
    assert os.listdir(tmp_path / "tmp") == []  # no /tmp/evalkit_job_codes_* or any other temp file
    deadline = time.time() + 10
    while _marked(marker) and time.time() < deadline:  # the workers were stopped with the run
        time.sleep(0.1)
    assert _marked(marker) == []
    return line


@pytest.mark.slow  # runs and resumes a real run; SIGTERM below keeps signals in the default tier
def test_ctrl_c_stops_the_run_with_one_line_whose_command_resumes_it(tmp_path):
    code, out, run_dir, marker = _interrupt(tmp_path, signal.SIGINT, to_group=True, after_episodes=1)  # as Ctrl-C
    line = _assert_stopped_cleanly(code, out, run_dir, marker, tmp_path, signal.SIGINT)
    done = len(Journal(run_dir / "episodes.jsonl").load())
    assert 1 <= done < 2
    command = shlex.split(line.split("Resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "evalkit"] and command[-1] == f"resume={run_dir}"
    assert command[3:-1] == ARGS  # the user's own overrides, quoted for the shell
    p = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=_env(tmp_path, marker),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming: {done} of 2" in p.stdout
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["episodes"] == 2 and s["resumed_episodes"] == done and s["latency"]["calls"] > 0
    assert os.listdir(tmp_path / "tmp") == []


def test_sigterm_to_the_main_process_stops_the_workers_and_exits_143(tmp_path):
    code, out, run_dir, marker = _interrupt(tmp_path, signal.SIGTERM, to_group=False, after_episodes=0)
    line = _assert_stopped_cleanly(code, out, run_dir, marker, tmp_path, signal.SIGTERM)
    assert line.endswith(f"resume={run_dir}")


class _TermsItsWorker:
    """A policy whose 2nd call SIGTERMs the env worker (as `kill -TERM` of the process group would)."""

    name, needs_images, needs_privileged, action_horizon = "term", False, False, 5

    def __init__(self):
        self.calls = 0

    def predict(self, batch, noise_seed=None):
        import numpy as np

        self.calls += 1
        if self.calls == 2:
            (worker,) = mp.active_children()
            os.kill(worker.pid, signal.SIGTERM)
        return np.zeros((len(batch), 5, 7), np.float32)

    def reset(self, episode_key):
        return None


@pytest.mark.slow
def test_a_worker_ended_by_sigterm_stops_the_run_instead_of_failing_its_episode(tmp_path):
    from evalkit.suites.specs import customize, get_suite

    from evalkit.rollout.engine import RolloutOptions, run_rollouts

    spec = customize(get_suite("libero_spatial_quick"), tasks=[0], trials=1, max_steps=20)
    journal = Journal(tmp_path / "episodes.jsonl")
    with pytest.raises(Interrupted) as stop:
        run_rollouts(_TermsItsWorker(), spec, journal, RolloutOptions(workers=1, video_mode="none"))
    assert stop.value.signum == signal.SIGTERM and stop.value.exit_code == 143
    assert journal.load() == []  # no "worker process died" failure recorded: the episode runs again on resume
    assert mp.active_children() == []


def test_the_resume_command_and_the_line():
    from evalkit.run import resume_command

    argv = ["--config-dir", "/my conf", "policy=noop", "suite.tasks=[0,1]", "resume=latest", "-cn=mine"]
    assert resume_command(Path("/runs/a b"), argv) == (
        "python -m evalkit --config-dir '/my conf' -cn=mine policy=noop 'suite.tasks=[0,1]' 'resume=/runs/a b'")
    e = Interrupted(signal.SIGINT, resume="python -m evalkit resume=/r")
    assert e.exit_code == 130 and e.line() == ("evalkit: stopped by SIGINT; finished episodes are in the journal. "
                                               "Resume with: python -m evalkit resume=/r")
    assert Interrupted(signal.SIGTERM).line() == "evalkit: stopped by SIGTERM; nothing to resume"
