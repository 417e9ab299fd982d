"""Sharded runs merge into exactly the single-process result (real LIBERO episodes, real MLflow sqlite)."""

import json
import os
import shutil
import subprocess
import sys
import time

import mlflow
import pandas as pd
import pytest

from evalkit.merge import main as merge_main
from tests.conftest import run_cli

# random: moves the robot with actions seeded per episode, so an episode depends only on its own seed.
COMMON = ["policy=random", "suite=libero_spatial_quick", "suite.max_steps=8", "quiet=true", "video=none",
          "tracking=offline", "workers=1"]
COLS = ["suite", "task_id", "init_state_id", "seed", "success", "steps", "failure_reason"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run and two shards started as separate processes at the same time."""
    d = tmp_path_factory.mktemp("merge")
    env = {**os.environ, "MUJOCO_GL": "osmesa"}
    procs = [subprocess.Popen([sys.executable, "-m", "evalkit", *COMMON, f"shard={k}/2", f"hydra.run.dir={d / f's{k}'}"],
                              cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in (0, 1)]
    full = run_cli(*COMMON, f"hydra.run.dir={d / 'full'}", cwd=d)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert full.returncode == 0, full.stderr[-3000:]
    assert all(p.returncode == 0 for p in procs), outs
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_two_shards_merge_into_the_single_process_result(runs, tmp_path):
    s0 = pd.read_csv(runs / "s0" / "episodes.csv")
    s1 = pd.read_csv(runs / "s1" / "episodes.csv")
    assert len(s0) == 4 and len(s1) == 5  # contiguous slices of 9 episodes
    db = tmp_path / "mlruns" / "mlflow.db"
    out = tmp_path / "merged"
    code = merge_main([f"runs=[{runs / 's0'},{runs / 's1'}]", f"out={out}", f"uri=sqlite:///{db}"])
    assert code == 0
    full, merged = pd.read_csv(runs / "full" / "episodes.csv"), pd.read_csv(out / "episodes.csv")
    pd.testing.assert_frame_equal(full[COLS], merged[COLS])
    a, b = json.loads((runs / "full" / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    for k in ("episodes", "successes", "success_rate", "success_ci_low", "success_ci_high", "per_task", "protocol"):
        assert a[k] == b[k], k
    assert b["partial"] is False and b["duplicates_dropped"] == 0 and "shard" not in b["params"]
    assert json.loads((out / "run_key.json").read_text()) == json.loads((runs / "full" / "run_key.json").read_text())
    # ONE MLflow run for the whole, tagged with its shards
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("evalkit").experiment_id])
    assert run.data.tags["evalkit.role"] == "merged"
    assert run.data.tags["evalkit.merged_from"].split(",") == [str((runs / f"s{k}").resolve()) for k in (0, 1)]
    assert run.data.metrics["success_rate"] == a["success_rate"] and run.data.params["merged_shards"] == "2"
    assert "shard" not in run.data.params and run.data.params["suite"] == "libero_spatial_quick"


def test_a_sweep_folder_is_searched_for_runs(runs, tmp_path):
    sweep = tmp_path / "sweep"
    _copy(runs / "s0", sweep / "0_job")
    _copy(runs / "s1", sweep / "1_job")
    p = subprocess.run([sys.executable, "-m", "evalkit.merge", f"runs={sweep}"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "9 of 9 episodes" in p.stdout and "tracking: the shards ran with tracking offline" in p.stdout
    assert "python -m evalkit.sync" in p.stdout and (sweep / "merged" / "mlflow_bundle" / "run.json").exists()


def test_missing_shard_is_refused_with_the_missing_episodes(runs, tmp_path):
    p = subprocess.run([sys.executable, "-m", "evalkit.merge", f"runs={runs / 's0'}", f"out={tmp_path / 'm'}"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "miss 5 of 9 episodes" in p.stderr and "task 1 init 1" in p.stderr and "task 2 init 2" in p.stderr
    assert merge_main([f"runs={runs / 's0'}", f"out={tmp_path / 'm'}", "allow_partial=true"]) == 0
    s = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert s["partial"] is True and s["episodes"] == 4 and len(s["missing_episodes"]) == 5


def test_shards_of_different_configs_are_refused(runs, tmp_path, capsys):
    other = _copy(runs / "s1", tmp_path / "s1_other")
    key = json.loads((other / "run_key.json").read_text())
    key["max_steps"], key["policy"]["scale"] = 9, 0.25
    (other / "run_key.json").write_text(json.dumps(key))
    assert merge_main([f"runs=[{runs / 's0'},{other}]", f"out={tmp_path / 'm'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot merge runs of different configs" in err and "differ in max_steps, policy" in err
    assert not (tmp_path / "m").exists()


def test_rerun_episodes_count_once_the_latest_dir_wins_and_in_a_journal_the_first_record(runs, tmp_path):
    s1 = _copy(runs / "s1", tmp_path / "s1")
    rerun = _copy(runs / "s1", tmp_path / "s1_rerun")  # the same shard run again into another dir
    lines = (rerun / "episodes.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["steps"], rec["failure_reason"] = 7, "exception: rerun marker"
    lines[0] = json.dumps(rec)  # the re-run recorded this episode differently: the later dir wins
    # a second record of an episode in the same journal: the first one counts (docs/journal.md), and it is noted
    second = {**json.loads(lines[1]), "steps": 1, "failure_reason": "exception: second record"}
    (rerun / "episodes.jsonl").write_text("\n".join([*lines, json.dumps(second)]) + "\n")
    later = time.time() + 5
    os.utime(rerun / "episodes.jsonl", (later, later))  # written after s1's journal
    assert merge_main([f"runs=[{runs / 's0'},{s1},{rerun}]", f"out={tmp_path / 'm'}"]) == 0
    s = json.loads((tmp_path / "m" / "summary.json").read_text())
    df = pd.read_csv(tmp_path / "m" / "episodes.csv")
    assert len(df) == 9 and not df.duplicated(["task_id", "init_state_id"]).any()
    row = df[(df.task_id == rec["task_id"]) & (df.init_state_id == rec["init_state_id"])].iloc[0]
    assert row.steps == 7 and row.failure_reason == "exception: rerun marker"
    row = df[(df.task_id == second["task_id"]) & (df.init_state_id == second["init_state_id"])].iloc[0]
    assert row.failure_reason != "exception: second record"
    assert s["duplicates_dropped"] == 6  # 5 episodes recorded twice across dirs + 1 twice in one journal
    assert any("1 episode(s) recorded again with another outcome" in n for n in s["merge_notes"])
    # merging again into the same output replaces it (no second copy of any episode)
    assert merge_main([f"runs=[{runs / 's0'},{s1}]", f"out={tmp_path / 'm'}"]) == 0
    assert len(pd.read_csv(tmp_path / "m" / "episodes.csv")) == 9
