"""Demonstration writer: resume logic, atomic writes, argument parsing (pure; no simulator)."""

from __future__ import annotations

import numpy as np
import pytest

from evalkit.demos import (
    attempts_to_run,
    demo_seed,
    episode_path,
    parse_args,
    scan,
    write_episode,
)
from evalkit.errors import BadInput


def test_resume_skips_written_and_failed_attempts(tmp_path):
    assert attempts_to_run(tmp_path, 3, wanted=3, max_attempts=10) == [0, 1, 2]
    write_episode(episode_path(tmp_path, 3, 0), {"actions": np.zeros((2, 7), np.float32)})
    episode_path(tmp_path, 3, 1, failed=True).touch()
    write_episode(episode_path(tmp_path, 4, 0), {"actions": np.zeros((2, 7), np.float32)})  # other task
    assert scan(tmp_path, 3) == ({0}, {1})
    # one success on disk, attempt 1 failed: the next two attempts are 2 and 3
    assert attempts_to_run(tmp_path, 3, wanted=3, max_attempts=10) == [2, 3]
    assert attempts_to_run(tmp_path, 3, wanted=1, max_attempts=10) == []
    assert attempts_to_run(tmp_path, 3, wanted=5, max_attempts=3) == [2]  # capped by max_attempts
    assert not list(tmp_path.glob("*.tmp*"))  # atomic write leaves no temp file
    with np.load(episode_path(tmp_path, 3, 0)) as d:
        assert d["actions"].shape == (2, 7)


def test_seeds_are_stable_and_distinct():
    seeds = {demo_seed(100_000, "libero_spatial", t, a) for t in range(10) for a in range(50)}
    assert len(seeds) == 500
    assert demo_seed(1, "libero_object", 2, 3) == demo_seed(1, "libero_object", 2, 3)
    assert demo_seed(1, "libero_object", 2, 3) != demo_seed(2, "libero_object", 2, 3)


def test_parse_args():
    cfg = parse_args(["suite=libero_object", "episodes_per_task=7", "workers=2", "tasks=[1,3]", "round_size=5"])
    assert (cfg.suite, cfg.episodes_per_task, cfg.workers, cfg.tasks, cfg.round_size) == ("libero_object", 7, 2, (1, 3), 5)
    assert cfg.out == "data/demos/libero_object"
    with pytest.raises(BadInput):
        parse_args(["bogus=1"])
    with pytest.raises(BadInput):
        parse_args(["workers=0"])


def test_recorded_episode_holds_planner_stage_and_views():
    """A short recorded episode (real env, both views rendered): per-step planner stage, the features the
    reference policy computes from it, and the two camera views as the policy sees them."""
    from evalkit.demos import record_episode
    from evalkit.policies.reference import FEATURE_DIM, episode_features
    from evalkit.policies.scripted import ScriptedPolicy
    from evalkit.suites.env import LiberoEnv
    from evalkit.suites.specs import customize, get_suite

    spec = customize(get_suite("libero_spatial"), max_steps=12)
    env = LiberoEnv(spec, 0, render=True)
    try:
        ok, arrays = record_episode(env, ScriptedPolicy(), seed=demo_seed(100_000, spec.libero_name, 0, 0))
    finally:
        env.close()
    assert not ok and len(arrays["actions"]) == 12
    for cam in ("agentview", "wrist"):
        assert arrays[cam].shape == (12, spec.image_size, spec.image_size, 3) and arrays[cam].dtype == np.uint8
    assert set(arrays["stage:skill"]) == {"pick_place"} and arrays["stage:command"].shape == (12, 8)
    assert arrays["stage:obj"][0] == "akita_black_bowl_1"

    class Npz(dict):  # what np.load gives: .files and item access
        files = property(lambda self: list(self))

    feats = episode_features(Npz(arrays))
    assert feats.shape == (12, FEATURE_DIM) and np.array_equal(feats, arrays["features"])
