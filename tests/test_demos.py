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
