"""Probe set: rendered once from LIBERO's official init states, then read back from the npz cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

from evalkit.fidelity.probes import load_probes, probe_key
from evalkit.policies.base import Observation


class CountingEnv:
    made = 0

    def __init__(self, spec, task_id):
        CountingEnv.made += 1
        self.task_id = task_id

    def reset(self, i):
        rng = np.random.default_rng(100 * self.task_id + i)
        return Observation(state=rng.normal(size=8).astype(np.float32), instruction=f"task {self.task_id}",
                           episode_key=f"s/{self.task_id}/{i}", step=0,
                           agentview=rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), wrist=None,
                           privileged={"bowl_pos": np.ones(3, np.float32) * i}, task={"task_id": self.task_id})

    def close(self):
        pass


def test_cache_renders_once_and_round_trips(tmp_path):
    from evalkit.suites.specs import get_suite

    spec = get_suite("libero_spatial_quick")
    CountingEnv.made = 0
    a = load_probes(spec, tmp_path, per_task=2, make_env=CountingEnv)
    assert CountingEnv.made == len(spec.task_ids) and len(a) == 2 * len(spec.task_ids)
    b = load_probes(spec, tmp_path, per_task=2, make_env=CountingEnv)
    assert CountingEnv.made == len(spec.task_ids)  # second call: from the cache
    for x, y in zip(a.observations, b.observations):
        assert np.array_equal(x.state, y.state) and np.array_equal(x.agentview, y.agentview)
        assert y.wrist is None and x.instruction == y.instruction and x.task == y.task
        assert np.array_equal(x.privileged["bowl_pos"], y.privileged["bowl_pos"])
    assert probe_key(spec, 1) != probe_key(spec, 2)


def test_real_libero_probe_renders(tmp_path):
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    try:
        from evalkit.suites.env import LiberoEnv  # noqa: F401
        from evalkit.suites.specs import customize, get_suite
    except ImportError as e:
        pytest.skip(f"LIBERO env adapter not importable: {e}")
    spec = customize(get_suite("libero_spatial_quick"), tasks=[0])
    batch = load_probes(spec, tmp_path, per_task=1)
    o = batch.observations[0]
    assert o.agentview.shape == (224, 224, 3) and o.wrist.shape == (224, 224, 3) and o.state.shape == (8,)
    assert "bowl" in o.instruction and o.agentview.std() > 5  # a real rendered scene, not a blank frame
    again = load_probes(spec, tmp_path, per_task=1)
    assert np.array_equal(again.observations[0].agentview, o.agentview)


class SteppingEnv(CountingEnv):
    """A fake env whose state moves with the actions: later probes differ from t = 0."""

    init_states = list(range(50))

    def reset(self, i):
        self.i, self.t = i, 0
        return self._obs()

    def step(self, action):
        self.t += 1
        return self._obs(), False

    def _obs(self):
        return Observation(state=np.full(8, 100 * self.i + self.t, np.float32), instruction=f"task {self.task_id}",
                           episode_key=f"s/{self.task_id}/{self.i}", step=self.t, task={"task_id": self.task_id})


def test_check_probes_are_held_out_and_later_in_the_episode(tmp_path):
    from evalkit.suites.specs import get_suite

    from evalkit.fidelity.probes import load_check_probes

    spec = get_suite("libero_spatial_quick")
    calls = []

    def factory():
        return lambda o: calls.append(o.step) or np.zeros((10, 7))

    batch = load_check_probes(spec, tmp_path, init_states=2, steps=[0, 12, 30], images=False, actor_factory=factory,
                              actor_id="test", make_env=SteppingEnv)
    obs = batch.observations
    assert len(obs) == len(spec.task_ids) * 2 * 3
    assert {o.episode_key.rsplit("/", 1)[1] for o in obs} == {"49", "48"}  # the last init states, never 0..k-1
    assert sorted({o.step for o in obs}) == [0, 12, 30]
    assert calls and set(calls) <= set(range(0, 30, spec.replan_steps))  # one actor call per chunk of replan_steps
    again = load_check_probes(spec, tmp_path, init_states=2, steps=[0, 12, 30], images=False, actor_factory=factory,
                              actor_id="test", make_env=SteppingEnv)
    assert [o.step for o in again.observations] == [o.step for o in obs]  # from the cache: the actor ran once
    calib = load_probes(spec, tmp_path, per_task=2, make_env=SteppingEnv, images=False)
    assert {o.episode_key for o in calib.observations}.isdisjoint({o.episode_key for o in obs})
