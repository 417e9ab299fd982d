"""A rendered env renders only at observed steps, and that changes nothing (suites/env.py `_LazyCamera`).

Two rendered envs of one task run the same episodes (a hard reset, then a cheap one) with the same pseudo-random
actions: one renders at every camera sample, as robosuite does on its own (`lazy_render=False`, observing every
step), the other observes only the last step of each 5-step chunk, as the rollout worker does. After every step
they must agree exactly on `qpos`, `qvel`, `qacc_warmstart`, `act` and the proprio state; at the reset and at every
chunk end also on both camera images. The lazy env must skip the renders of the unobserved steps, settle steps and
resets included.
"""

from __future__ import annotations

import numpy as np
import pytest
from evalkit.suites.env import LiberoEnv
from evalkit.suites.specs import customize, get_suite

CHUNK = 5
STEPS = 20
ACTIONS = np.random.default_rng(5).uniform(-1.0, 1.0, (STEPS, 7))


def _physics(env: LiberoEnv) -> np.ndarray:
    d = env.raw.sim.data._data
    return np.concatenate([d.qpos, d.qvel, d.qacc_warmstart, d.act])


def _run(spec, task_id: int, lazy: bool) -> tuple[list, list, int]:
    env = LiberoEnv(spec, task_id, render=True, privileged=False, lazy_render=lazy)
    physics, images = [], []
    try:
        for init in (0, 1):  # the first reset is hard, the second cheap
            obs = env.reset(init)
            images.append((obs.agentview.copy(), obs.wrist.copy()))
            for k in range(STEPS):
                observe = (not lazy) or k % CHUNK == CHUNK - 1
                obs, _ = env.step(ACTIONS[k], observe=observe)
                physics.append((_physics(env).copy(), obs.state.copy()))
                if k % CHUNK == CHUNK - 1:
                    images.append((obs.agentview.copy(), obs.wrist.copy()))
        assert env.last_reset_kind == "cheap"
        return physics, images, env.renders
    finally:
        env.close()


@pytest.mark.parametrize("suite,task_id", [("libero_spatial", 0), ("libero_10", 1)])
def test_rendering_only_observed_steps_changes_nothing(suite, task_id):
    spec = customize(get_suite(suite), tasks=[task_id], trials=2)
    every_physics, every_images, every_renders = _run(spec, task_id, lazy=False)
    lazy_physics, lazy_images, lazy_renders = _run(spec, task_id, lazy=True)
    assert len(every_physics) == len(lazy_physics) == 2 * STEPS
    for i, ((p0, s0), (p1, s1)) in enumerate(zip(every_physics, lazy_physics)):
        assert np.array_equal(p0, p1), f"physics differ after step {i}"
        assert np.array_equal(s0, s1), f"proprio state differs after step {i}"
    assert len(every_images) == len(lazy_images) == 2 * (1 + STEPS // CHUNK)
    for i, ((a0, w0), (a1, w1)) in enumerate(zip(every_images, lazy_images)):
        assert np.array_equal(a0, a1) and np.array_equal(w0, w1), f"images differ at observation {i}"
    # 2 episodes x 2 cameras: the lazy env renders the last settle step and one step a chunk, plus each camera's
    # first sample after wrapping (it has no frame yet); the other renders every sample
    assert lazy_renders == 2 * 2 * (1 + STEPS // CHUNK) + 2, lazy_renders
    assert every_renders >= 2 * 2 * (spec.num_steps_wait + STEPS), every_renders
