"""Cheap resets equal robosuite's hard reset bit for bit (suites/seeding.py `ResetHook`, suites/env.py `LiberoEnv`).

Two envs of one task run the same episodes in the same order, out of order on purpose (0, 3, 1): one does
robosuite's hard reset (recompile) for every episode (`cheap_resets=False`), the other only for its first and
cheap resets afterwards. After the reset and the settle steps, and again after 20 steps of fixed pseudo-random
actions, they must agree exactly on every model array (fixture `body_pos`/`body_quat`, `site_rgba`, ...), `qpos`,
`qvel`, `qacc_warmstart`, `act`, the float32 proprio state and every entry of the privileged dict; in the rendered
case also on both camera images. A state-only env (no offscreen render context at all) must have the physics of a
rendered one, and drawing failure-video frames on it must not change them.

Default tier: one task per suite: three physics cases (libero_goal's stove task, a drawer sampler under independent
seeding, a libero_object scene) and one rendered case (libero_10: a stove that starts on) that also runs a
state-only env;
the slow tier covers three tasks of each of the four suites under both seed modes and three rendered cases.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from evalkit.suites import env as env_module
from evalkit.suites.env import LiberoEnv
from evalkit.suites.seeding import model_arrays
from evalkit.suites.specs import customize, get_suite

ACTIONS = np.random.default_rng(22).uniform(-1.0, 1.0, (20, 7))
ORDER = (0, 3, 1)


def _snapshot(env: LiberoEnv, obs) -> dict[str, np.ndarray]:
    m, d = env.raw.sim.model._model, env.raw.sim.data._data
    out = {f"model.{k}": v.copy() for k, v in model_arrays(m, assets=False).items()}
    out.update({k: getattr(d, k).copy() for k in ("qpos", "qvel", "qacc_warmstart", "act")})
    out["state"] = obs.state.copy()
    out.update({f"privileged.{k}": v.copy() for k, v in obs.privileged.items()})
    if obs.agentview is not None:
        out["agentview"], out["wrist"] = obs.agentview.copy(), obs.wrist.copy()
    return out


def _asset_digest(env: LiberoEnv) -> str:
    """Meshes, textures and collision trees are not restored per reset (never written): hashed, not copied."""
    h = hashlib.blake2b()
    for name, arr in sorted(model_arrays(env.raw.sim.model._model).items()):
        if name.startswith(("mesh_", "bvh_", "skin_", "flex_", "oct_", "tex_data", "hfield_data")):
            h.update(name.encode() + np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def run_episodes(spec, task_id: int, order, cheap: bool, render: bool, steps: int = 20, film: bool = False) -> dict:
    """Per episode: the reset kind and seconds, snapshots after the settle steps ("first") and after `steps` more
    ("after"); `film`: also the `render_frame()` after the reset and every step, as a failure video's replay does."""
    env = LiberoEnv(spec, task_id, render=render, cheap_resets=cheap)
    try:
        assert (env.raw.sim._render_context_offscreen is not None) == render  # state-only: no context at all
        out = {}
        for i in order:
            obs = env.reset(i)
            rec = {"kind": env.last_reset_kind, "seconds": env.last_reset_s, "first": _snapshot(env, obs), "frames": []}
            if film:
                rec["frames"].append(env.render_frame())
            for a in ACTIONS[:steps]:
                obs, _ = env.step(a)
                if film:
                    rec["frames"].append(env.render_frame())
            rec["after"] = _snapshot(env, obs)
            out[i] = rec
        out["assets"] = _asset_digest(env)
        return out
    finally:
        env.close()


def assert_same(got: dict, ref: dict, label: str, keys=None) -> None:
    assert set(got) == set(ref), f"{label}: fields differ: {sorted(set(got) ^ set(ref))}"
    for k in keys if keys is not None else ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{label}: {k}")


def assert_cheap_equals_hard(libero_name: str, task_id: int, seed_mode: str, order=ORDER, render: bool = False,
                             steps: int = 20) -> None:
    spec = customize(get_suite(libero_name), seed_mode=seed_mode)
    hard = run_episodes(spec, task_id, order, cheap=False, render=render, steps=steps)
    cheap = run_episodes(spec, task_id, order, cheap=True, render=render, steps=steps)
    assert [hard[i]["kind"] for i in order] == ["hard"] * len(order)
    assert [cheap[i]["kind"] for i in order] == ["hard"] + ["cheap"] * (len(order) - 1)
    assert all(r["seconds"] > 0 for r in (hard[i] for i in order))
    for i in order:
        for phase in ("first", "after"):
            assert_same(cheap[i][phase], hard[i][phase], f"{libero_name} task {task_id} {seed_mode} episode {i} {phase}")
    assert cheap["assets"] == hard["assets"]


# -- default tier: one task of each suite ----------------------------------------------------------------------
# libero_goal 7: the stove task; libero_spatial 4: a drawer sampler under independent seeding (LIBERO's sampler list
# grows with every load there); libero_object 1: the floor scene, where leaving out the render context's mj_forward
# changes qpos in the last bits (the case that shows it is needed), episodes in another order. libero_10 is the
# rendered case below.
FAST = [("libero_goal", 7, "openpi", ORDER), ("libero_spatial", 4, "independent", ORDER), ("libero_object", 1, "openpi", (2, 0, 1))]


@pytest.mark.parametrize("libero_name,task_id,seed_mode,order", FAST)
def test_cheap_reset_equals_hard_reset(libero_name, task_id, seed_mode, order):
    assert_cheap_equals_hard(libero_name, task_id, seed_mode, order)


@pytest.mark.parametrize("with_hard", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_rendered_cheap_reset_equals_hard_reset_and_state_only_physics_equal_rendered(with_hard):
    """(Default tier: without the hard-reset env; the slow tier adds it.) libero_10 task 8 (a stove that starts on: its turn-on joint sampler, and a burner site whose alpha in
    site_rgba LIBERO and robosuite toggle at every reset): a rendered env with cheap resets equals the hard-reset
    env, both camera images included (the render context is reused rather than recreated). A state-only env,
    which has no render context, has exactly the same physics and privileged state over the settle steps and 20
    steps, after a hard and after a cheap reset, also while failure-video frames are drawn from it (`render_frame`
    attaches a context without touching the physics); those frames equal the rendered env's own."""
    spec = customize(get_suite("libero_10"), seed_mode="openpi", resolution=64)  # CPU rendering is slow
    order = (1, 0)
    hard = run_episodes(spec, 8, order, cheap=False, render=True, steps=10) if with_hard else None
    cheap = run_episodes(spec, 8, order, cheap=True, render=True, steps=10, film=True)
    state_only = run_episodes(spec, 8, order, cheap=True, render=False, steps=10, film=True)
    assert [cheap[i]["kind"] for i in order] == [state_only[i]["kind"] for i in order] == ["hard", "cheap"]
    for i in order:
        for phase in ("first", "after"):
            label = f"libero_10 task 8 episode {i} {phase}"
            assert "agentview" in cheap[i][phase] and "agentview" not in state_only[i][phase]
            if hard is not None:
                assert_same(cheap[i][phase], hard[i][phase], label)
            physics = {k: v for k, v in cheap[i][phase].items() if k not in ("agentview", "wrist")}
            assert_same(state_only[i][phase], physics, f"state-only {label}")
        assert len(state_only[i]["frames"]) == len(cheap[i]["frames"]) == 11
        for t, (f, ref) in enumerate(zip(state_only[i]["frames"], cheap[i]["frames"])):
            np.testing.assert_array_equal(f, ref, err_msg=f"video frame {t} of episode {i}")
    assert cheap["assets"] == state_only["assets"] == (hard or cheap)["assets"]


def test_reset_kind_is_recorded_and_a_listed_task_keeps_the_hard_reset(monkeypatch):
    spec = customize(get_suite("libero_spatial"), seed_mode="independent")
    monkeypatch.setitem(env_module.HARD_RESET_ONLY, (spec.libero_name, 3), "test: pretend this task diverges")
    env = LiberoEnv(spec, 3, render=False)
    try:
        assert not env.cheap_resets and env.hard_reset_reason == "test: pretend this task diverges"
        env.reset(0)
        env.reset(1)
        assert env.last_reset_kind == "hard" and env.last_reset_s > 0
    finally:
        env.close()


def test_independent_seeding_does_not_depend_on_what_the_env_ran_before():
    """seed_mode=independent reseeds every episode; LIBERO's joint-sampler list, which grows with every model load,
    must not make an episode's scene depend on the episodes its env ran before (i.e. on workers and scheduling).
    libero_spatial task 4 (a drawer's sampler): episode 0 of a fresh env = episode 0 after episode 1."""
    spec = customize(get_suite("libero_spatial"), seed_mode="independent")
    fresh = run_episodes(spec, 4, (0,), cheap=True, render=False, steps=0)
    later = run_episodes(spec, 4, (1, 0), cheap=True, render=False, steps=0)
    assert later[0]["kind"] == "cheap"
    assert_same(later[0]["first"], fresh[0]["first"], "independent episode 0, fresh env vs after episode 1")


# -- slow tier: three tasks of every suite, both seed modes ----------------------------------------------------
SLOW_TASKS = {"libero_spatial": (0, 4, 9), "libero_object": (0, 5, 9), "libero_goal": (0, 5, 7), "libero_10": (2, 3, 9)}


@pytest.mark.slow
@pytest.mark.parametrize("seed_mode", ["openpi", "independent"])
@pytest.mark.parametrize("libero_name,task_id", [(s, t) for s, ts in SLOW_TASKS.items() for t in ts])
def test_more_cheap_resets_equal_hard_resets(libero_name, task_id, seed_mode):
    assert_cheap_equals_hard(libero_name, task_id, seed_mode, order=(0, 3, 1, 4))


@pytest.mark.slow
@pytest.mark.parametrize("libero_name,task_id", [("libero_spatial", 4), ("libero_goal", 7), ("libero_object", 6)])
def test_more_rendered_cheap_resets_equal_hard_resets(libero_name, task_id):
    assert_cheap_equals_hard(libero_name, task_id, "openpi", order=(2, 0, 1), render=True, steps=10)
