"""The env adapter on a real LIBERO env (MuJoCo, OSMesa)."""

import numpy as np
import pytest
from evalkit.suites.env import LiberoEnv, quat2axisangle, resize_with_pad
from evalkit.suites.specs import get_suite


def test_quat2axisangle_and_resize():
    np.testing.assert_allclose(quat2axisangle(np.array([0, 0, 0, 1.0])), 0)
    aa = quat2axisangle(np.array([0, 0, np.sin(np.pi / 4), np.cos(np.pi / 4)]))  # 90° about z
    np.testing.assert_allclose(aa, [0, 0, np.pi / 2], atol=1e-9)
    img = np.full((100, 200, 3), 255, np.uint8)
    out = resize_with_pad(img, 224)
    assert out.shape == (224, 224, 3) and out[0].max() == 0 and out[112].min() == 255  # padded top, content middle


@pytest.fixture(scope="module")
def spec():
    return get_suite("libero_spatial_quick")


def test_state_only_env_has_no_images_and_is_deterministic(spec):
    env = LiberoEnv(spec, 0, render=False)
    try:
        o1 = env.reset(0)
        assert o1.agentview is None and o1.state.shape == (8,) and o1.state.dtype == np.float32
        assert "akita_black_bowl_1_pos" in o1.privileged
        assert o1.instruction.startswith("pick up the black bowl")
        acts = np.random.default_rng(0).uniform(-1, 1, (15, 7))
        s1 = [env.step(a)[0].state for a in acts]
        env.reset(0)
        s2 = [env.step(a)[0].state for a in acts]
        np.testing.assert_array_equal(np.array(s1), np.array(s2))  # same init state + actions => same episode
        o3 = env.reset(1)
        assert not np.allclose(o3.privileged["akita_black_bowl_1_pos"], o1.privileged["akita_black_bowl_1_pos"])
    finally:
        env.close()


def test_rendered_env_gives_upright_224_images(spec):
    env = LiberoEnv(spec, 0, render=True)
    try:
        o = env.reset(0)
        assert o.agentview.shape == (224, 224, 3) and o.wrist.shape == (224, 224, 3)
        # Upright: the table (bright) fills the bottom of the agentview image, the top holds the robot/wall.
        assert o.agentview[-40:].mean() > o.agentview[:40].mean()
        # Frames rendered on demand for replay videos match the camera observation.
        np.testing.assert_allclose(env.render_frame().astype(float).mean(), o.agentview.astype(float).mean(), rtol=0.05)
    finally:
        env.close()


def test_an_env_renders_only_the_cameras_the_policy_reads():
    """One view asked: the other is never rendered; the view rendered and the physics equal a two-camera env's."""
    from evalkit.policies.base import policy_cameras
    from evalkit.policies.noop import NoopPolicy
    from evalkit.suites.specs import customize

    assert policy_cameras(NoopPolicy()) == () and policy_cameras(NoopPolicy(needs_images=True)) == ("agentview", "wrist")
    small = customize(get_suite("libero_spatial_quick"), resolution=64)  # CPU rendering is slow
    one, both = LiberoEnv(small, 0, render=True, cameras=("agentview",)), LiberoEnv(small, 0, render=True)
    try:
        a, b = one.reset(0), both.reset(0)
        assert a.wrist is None and b.wrist is not None
        assert one.raw.env.camera_names == ["agentview"]
        for act in np.random.default_rng(1).uniform(-1, 1, (3, 7)):
            a, b = one.step(act)[0], both.step(act)[0]
        np.testing.assert_array_equal(a.agentview, b.agentview)
        np.testing.assert_array_equal(a.state, b.state)
    finally:
        one.close()
        both.close()
    with pytest.raises(ValueError, match="valid: agentview, wrist"):
        LiberoEnv(small, 0, render=True, cameras=("top",))


def test_openpi_stream_checks_every_reset_against_its_replay():
    """seed_mode=openpi: a fresh env fast-forwards to episode i, and a reset whose draws disagree with the
    replayed stream is an error, not a silently different scene."""
    spec = get_suite("libero_spatial_quick")
    assert spec.seed_mode == "openpi"
    env = LiberoEnv(spec, 1, render=False)
    try:
        env.reset(2)
        assert env.stream.replays == 3 and len(env.stream.states) == 4  # resets 0, 1, 2 replayed (2: the check)
        first = env.raw.sim.model.body_pos.copy()
        env.reset(2)  # again: nothing left to replay, same scene
        assert env.stream.replays == 3
        np.testing.assert_array_equal(env.raw.sim.model.body_pos, first)
        env.stream.states[2] = env.stream.states[0]  # corrupt what reset 1 must end in
        with pytest.raises(RuntimeError, match="episode 1 drew a different number"):
            env.reset(1)
    finally:
        env.close()
