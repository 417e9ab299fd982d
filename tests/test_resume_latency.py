"""Latency is journaled with the episodes (docs/journal.md): a run killed twice and resumed, a re-run of a finished
run dir and a merge report what one uninterrupted run reports, timing values aside. Real LIBERO episodes, real
`python -m evalkit` processes killed with SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evalkit.merge import main as merge_main
from evalkit.results.timing import run_timing
from evalkit.rollout.journal import Journal
from evalkit.rollout.records import EpisodeRecord, PolicyCall
from tests.conftest import run_cli

# 3 episodes of 10 steps: 2 policy calls each (replan every 5); workers=0 keeps each process small and quick
COMMON = ["policy=noop", "suite=libero_spatial_quick", "suite.tasks=[0]", "suite.max_steps=10", "quiet=true",
          "video=none", "tracking=offline", "workers=0"]
# what legitimately differs between a run made in one piece and one made in three
# "rollout" holds what the episodes cost (env builds, resets, set-up): the killed run rebuilt its env after each kill
TIMING = {"wall_time_s", "episodes_per_min", "resumed_episodes", "rollout"}
LATENCY_VALUES = {"latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms_mean", "latency_ms_std", "hz"}


def _tmp(cwd: Path) -> dict:
    """TMPDIR inside the test's folder: a SIGKILLed run cannot remove its temp file, and /tmp must not fill up."""
    (cwd / "tmp").mkdir(exist_ok=True)
    return {"TMPDIR": str(cwd / "tmp")}


def _start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evalkit", *COMMON, *args], cwd=cwd, start_new_session=True,
                            env={**os.environ, "MUJOCO_GL": "osmesa", **_tmp(cwd)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _journal_lines(run_dir: Path) -> int:
    p = run_dir / "episodes.jsonl"
    return p.read_bytes().count(b"\n") if p.exists() else 0


def _kill_after(proc: subprocess.Popen, run_dir: Path, episodes: int) -> None:
    deadline = time.time() + 300
    while _journal_lines(run_dir) < episodes:
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-episode: the next episode was already running
    proc.wait()


# four kinds of bad line, the last one torn (no newline): what a disk error, a hand edit or a kill -9 leaves
BAD_LINES = b"[1, 2, 3]\n" + b"null\n" + b"\xff\xfe\xfd\n" + b'{"suite": "libero_spat'


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`full`: one uninterrupted run. `killed`: the same run SIGKILLed after 1 episode, resumed, SIGKILLed after
    2, its journal then damaged with bad lines, resumed to the end (the uninterrupted one runs alongside to save
    time). Returns the folder and the last resume's output."""
    d = tmp_path_factory.mktemp("resume_latency")
    full = _start(d, f"hydra.run.dir={d / 'full'}")
    killed = d / "killed"
    _kill_after(_start(d, f"hydra.run.dir={killed}"), killed, 1)
    _kill_after(_start(d, f"resume={killed}"), killed, 2)
    with (killed / "episodes.jsonl").open("ab") as f:
        f.write(BAD_LINES)
    last = run_cli(*COMMON, f"resume={killed}", cwd=d, env=_tmp(d))
    assert last.returncode == 0, last.stderr[-3000:]
    assert full.wait(timeout=600) == 0, full.stderr.read()[-3000:]
    return d, last.stdout + last.stderr


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_a_run_killed_twice_reports_what_one_uninterrupted_run_reports(runs):
    runs, _ = runs
    a, b = _summary(runs / "full"), _summary(runs / "killed")
    sessions = {r.session for r in Journal(runs / "killed" / "episodes.jsonl").load()}
    assert len(sessions) == 3 and b["resumed_episodes"] == 2 and a["resumed_episodes"] == 0
    for key in sorted((set(a) | set(b)) - TIMING - {"latency"}):
        assert a[key] == b[key], key
    la, lb = a["latency"], b["latency"]
    assert set(la) == set(lb) and la["source"] == lb["source"] and la["mean_batch"] == lb["mean_batch"] == 1.0
    for key in sorted(set(la) - LATENCY_VALUES - {"calls", "warmup_calls"}):
        assert la[key] == lb[key], key
    # every call of every counted episode is there; each process's first call is its warm-up
    assert la["calls"] + la["warmup_calls"] == lb["calls"] + lb["warmup_calls"] == 6
    assert (la["warmup_calls"], lb["warmup_calls"]) == (1, 3)
    for run_dir, lat in ((runs / "full", la), (runs / "killed", lb)):
        raw = json.loads((run_dir / "latency_calls.json").read_text())
        episodes = pd.read_csv(run_dir / "episodes.csv")
        assert len(raw["call_ms"]) == episodes["policy_calls"].sum() == 6 and raw["warmup_calls"] == lat["warmup_calls"]
        timed = np.asarray(raw["call_ms"][raw["warmup_calls"]:])
        assert lat["latency_ms_p50"] == pytest.approx(np.percentile(timed, 50), rel=1e-5)
        assert lat["latency_ms_mean"] == pytest.approx(timed.mean(), rel=1e-5)
        assert _summary(run_dir)["episodes_per_min"] > 0 and _summary(run_dir)["wall_time_s"] > 0
    cols = [c for c in pd.read_csv(runs / "full" / "episodes.csv").columns if c not in ("wall_time_s", "policy_time_s")]
    pd.testing.assert_frame_equal(pd.read_csv(runs / "full" / "episodes.csv")[cols],
                                  pd.read_csv(runs / "killed" / "episodes.csv")[cols])


def test_rerunning_a_finished_run_dir_rewrites_the_same_summary(runs, tmp_path):
    runs, _ = runs
    again = shutil.copytree(runs / "killed", tmp_path / "again")
    before, calls_before = _summary(again), (again / "latency_calls.json").read_bytes()
    p = run_cli(*COMMON, f"resume={again}", cwd=tmp_path, env=_tmp(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming: 3 of 3" in p.stdout
    after = _summary(again)
    assert after["latency"] and after["episodes_per_min"] is not None  # not `latency: {}` / null
    assert {k: v for k, v in after.items() if k != "resumed_episodes"} == \
        {k: v for k, v in before.items() if k != "resumed_episodes"}
    assert after["resumed_episodes"] == 3 and (again / "latency_calls.json").read_bytes() == calls_before


def _shard(src: Path, dst: Path, index: int, keep_inits: set[int]) -> Path:
    shutil.copytree(src, dst)
    key = json.loads((dst / "run_key.json").read_text())
    (dst / "run_key.json").write_text(json.dumps({**key, "shard": [index, 2]}))
    lines = (dst / "episodes.jsonl").read_text().splitlines(keepends=True)
    (dst / "episodes.jsonl").write_text("".join(x for x in lines if json.loads(x)["init_state_id"] in keep_inits))
    return dst


def test_merging_shards_pools_their_calls_into_the_uninterrupted_latency(runs, tmp_path, capsys):
    """The uninterrupted run cut into two shards (as two shard processes' journals would hold it) merges back
    into its own summary: the same episodes, the same pooled latency, the same raw calls."""
    runs, _ = runs
    s0 = _shard(runs / "full", tmp_path / "s0", 0, {0})
    s1 = _shard(runs / "full", tmp_path / "s1", 1, {1, 2})
    assert merge_main([f"runs=[{s0},{s1}]", f"out={tmp_path / 'm'}"]) == 0
    full, merged = _summary(runs / "full"), _summary(tmp_path / "m")
    for key in ("success_rate", "success_ci_low", "success_ci_high", "episodes", "successes", "failure_reasons",
                "per_task", "protocol", "latency"):
        assert merged[key] == full[key], key
    assert merged["duplicates_dropped"] == 0 and merged["merge_notes"] == []
    assert (tmp_path / "m" / "latency_calls.json").read_bytes() == (runs / "full" / "latency_calls.json").read_bytes()
    # the merged dir's own journal keeps the calls: merging it again changes nothing
    assert merge_main([f"runs={tmp_path / 'm'}", f"out={tmp_path / 'm2'}"]) == 0
    assert _summary(tmp_path / "m2")["latency"] == full["latency"]
    # a resumed run merges like any other: its three sessions' calls, each session's warm-up left out
    assert merge_main([f"runs={runs / 'killed'}", f"out={tmp_path / 'mk'}"]) == 0
    assert _summary(tmp_path / "mk")["latency"] == _summary(runs / "killed")["latency"]


def test_a_damaged_journal_resumes_with_one_warning_and_nothing_else_lost(runs):
    runs, out = runs
    assert "Traceback" not in out and "resuming: 2 of 3" in out
    warnings = [x for x in out.splitlines() if x.startswith("journal: ")]
    assert warnings == ["journal: 4 bad line(s) in episodes.jsonl moved to episodes.rejected.jsonl (2 not a record, "
                        "1 invalid UTF-8, 1 torn line); their episodes run again"]
    rejected = [json.loads(x) for x in (runs / "killed" / "episodes.rejected.jsonl").read_text().splitlines()]
    assert [r["reason"].split(":")[0] for r in rejected] == ["not a record", "not a record", "invalid UTF-8",
                                                             "torn line"]
    j = Journal(runs / "killed" / "episodes.jsonl").read()
    assert j.bad == [] and j.duplicates == 0 and len(j.records) == 3


# -- the latency rules on hand-made records (no simulator) --------------------------------------
def _rec(init: int, session: str, calls: list[PolicyCall] | None, session_s: float = 1.0) -> EpisodeRecord:
    return EpisodeRecord("s", 0, "t", init, 1, False, 10, "timeout", 1.0, 0.1, len(calls or []),
                         session=session, session_s=session_s, calls=calls)


def test_a_shared_call_counts_once_and_each_session_has_one_warm_up():
    warm_a, shared = PolicyCall(0, 0.500, 2, {"denoise": [90.0]}), PolicyCall(1, 0.010, 2, {"denoise": [8.0]})
    records = [
        _rec(0, "A", [warm_a, shared], session_s=4.0),  # two episodes served by the same batched calls
        _rec(1, "A", [warm_a, shared, PolicyCall(2, 0.020, 1, {"denoise": [9.0]})], session_s=6.0),
        _rec(2, "B", [PolicyCall(0, 0.700, 1, {"denoise": [95.0]}), PolicyCall(1, 0.030, 1, {"denoise": [10.0]})],
             session_s=3.0),
    ]
    t = run_timing(records)
    assert t.call_s == [0.5, 0.7, 0.01, 0.02, 0.03] and t.warmup_calls == 2 and t.batch_sizes == [2, 1, 2, 1, 1]
    lat = t.latency
    assert (lat.calls, lat.warmup_calls, lat.unrecorded_episodes) == (3, 2, None)
    assert lat.p50_ms == pytest.approx(20.0) and lat.mean_batch == pytest.approx(7 / 5)
    assert lat.stages["denoise"].p50 == pytest.approx(9.0) and lat.stages["denoise"].n == 3  # warm-ups left out
    assert t.wall_s == pytest.approx(6.0 + 3.0) and t.episodes_per_min == pytest.approx(3 / 9 * 60)
    # the same records in another order (as a resume or a merge reads them) give the same summary
    assert run_timing(records[::-1]) == t


def test_older_records_without_calls_are_counted_as_unrecorded():
    t = run_timing([_rec(0, None, None, session_s=None), _rec(1, "A", [PolicyCall(0, 0.5, 1), PolicyCall(1, 0.1, 1)])])
    assert t.latency.unrecorded_episodes == 1 and t.latency.calls == 1 and t.timed_episodes == 1
    only_warm = run_timing([_rec(0, "A", [PolicyCall(0, 0.5, 1)]), _rec(1, "B", [PolicyCall(0, 0.7, 1)])])
    assert only_warm.latency.calls == 2 and only_warm.warmup_calls == 0  # nothing else to time: kept, not dropped
