"""The rollout engine on real LIBERO envs: batching, journaling, failure reasons, crash recovery."""

import multiprocessing as mp
import os
import signal
import time

import numpy as np
from evalkit.suites.specs import customize, get_suite

from evalkit.policies.noop import NoopPolicy
from evalkit.policies.random_policy import RandomPolicy
from evalkit.rollout.engine import RolloutOptions, run_rollouts
from evalkit.rollout.journal import Journal

SPEC = customize(get_suite("libero_spatial_quick"), tasks=[0, 1], trials=2, max_steps=10)


class SlowNoop(NoopPolicy):
    """A policy call that takes longer than an action chunk's steps: worth waiting for a batch."""

    def predict(self, batch, noise_seed=None):
        time.sleep(0.5)
        return super().predict(batch)


def test_two_workers_batch_policy_calls_and_journal_every_episode(tmp_path):
    j = Journal(tmp_path / "e.jsonl")
    # the window is capped by a call's time (0.5 s here, longer than a 5-step chunk): a waiting worker waits for
    # the stepping one, so calls serve both
    res = run_rollouts(SlowNoop(), SPEC, j, RolloutOptions(workers=2, video_mode="none", batch_window_ms=1e4))
    assert sorted(r.key for r in res.records) == SPEC.episodes()
    assert all(not r.success and r.failure_reason == "timeout" and r.steps == 10 for r in res.records)
    assert max(res.policy_batch_sizes) == 2  # one predict served both workers
    stats = res.stats()
    # task-affine: each worker took a task of its own and kept its env, so 2 envs served 4 episodes
    assert stats["env_builds"] == 2 and sum(r.env_built for r in res.records) == 2
    assert stats["episodes"] == 4 and stats["batch_max"] == 2 and 0 <= stats["idle_share"] < 1
    assert all(r.setup_s > 0 and r.reset_kind in ("hard", "cheap") for r in res.records)
    assert len(j.load()) == 4
    # Nothing left to do: a rerun takes every episode from the journal and starts no env.
    again = run_rollouts(NoopPolicy(), SPEC, j, RolloutOptions(workers=2, video_mode="none"))
    assert again.resumed == 4 and again.policy_call_s == []



def test_results_do_not_depend_on_worker_count(tmp_path):
    a = run_rollouts(RandomPolicy(), SPEC, Journal(tmp_path / "a.jsonl"), RolloutOptions(workers=0, video_mode="none"))
    b = run_rollouts(RandomPolicy(), SPEC, Journal(tmp_path / "b.jsonl"),
                     RolloutOptions(workers=2, video_mode="none", batch_window_ms=1e4))
    assert [(r.key, r.success, r.steps) for r in a.records] == [(r.key, r.success, r.steps) for r in b.records]
    # no barrier: a policy that costs nothing is served at once, however long the window, never held for a stepping
    # worker (the window is capped by a call's time)
    assert b.stats()["batch_wait_ms_p95"] < 50


class NanPolicy(NoopPolicy):
    def predict(self, batch, noise_seed=None):
        out = super().predict(batch)
        out[:, 2, 0] = np.nan
        return out


class CrashingPolicy(NoopPolicy):
    """Raises on the first observation of task 1: those episodes fail, the others go on."""

    def predict(self, batch, noise_seed=None):
        if any(o.task["task_id"] == 1 for o in batch.observations):
            raise RuntimeError("boom")
        return super().predict(batch)


def test_failure_reasons_nan_and_policy_exception(tmp_path):
    res = run_rollouts(NanPolicy(), SPEC, Journal(tmp_path / "n.jsonl"), RolloutOptions(workers=0, video_mode="none"))
    assert {r.failure_reason for r in res.records} == {"nan_action"} and all(r.steps == 2 for r in res.records)
    res = run_rollouts(CrashingPolicy(), SPEC, Journal(tmp_path / "c.jsonl"), RolloutOptions(workers=0, video_mode="none"))
    by_task = {r.key: r.failure_reason for r in res.records}
    assert by_task[(0, 0)] == "timeout" and by_task[(0, 1)] == "timeout"
    assert by_task[(1, 0)].startswith("exception: policy error: RuntimeError: boom")


class WorkerKiller(NoopPolicy):
    """SIGKILLs one env worker on the 3rd call: a crashed simulator process."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def predict(self, batch, noise_seed=None):
        self.calls += 1
        if self.calls == 3:
            os.kill(mp.active_children()[0].pid, signal.SIGKILL)
        return super().predict(batch)


def test_dead_worker_is_replaced_and_its_episode_recorded(tmp_path):
    res = run_rollouts(WorkerKiller(), SPEC, Journal(tmp_path / "k.jsonl"), RolloutOptions(workers=2, video_mode="none"))
    assert sorted(r.key for r in res.records) == SPEC.episodes()  # the run went on
    died = [r for r in res.records if r.failure_reason and "worker process died" in r.failure_reason]
    assert len(died) == 1 and "exit code -9" in died[0].failure_reason
    assert sum(r.failure_reason == "timeout" for r in res.records) == 3


def test_failure_videos_for_a_state_only_policy_are_replayed(tmp_path, capsys):
    spec = customize(SPEC, tasks=[0], trials=1)
    res = run_rollouts(RandomPolicy(), spec, Journal(tmp_path / "v.jsonl"),
                       RolloutOptions(workers=0, video_mode="failures", video_dir=str(tmp_path / "videos")))
    (r,) = res.records
    assert r.video_path and os.path.getsize(r.video_path) > 1000
    import imageio.v3 as iio

    frames = iio.imread(r.video_path)
    assert frames.shape[0] == r.steps + 1 and frames.shape[1:] == (224, 224, 3)
    assert "diverged" not in capsys.readouterr().out
