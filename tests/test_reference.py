"""policy=reference: planner features, the planner tracked alongside the policy as when demos were recorded, and the
committed checkpoint (loads strictly, predicts finite chunks, acts in one short episode of each suite it covers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evalkit.errors import BadInput
from evalkit.policies.base import ObsBatch, Observation
from evalkit.policies.reference import (
    DEFAULT_DIR,
    FEATURE_DIM,
    SKILLS,
    Stage,
    StageTracker,
    planner_features,
    stage_of,
)
from evalkit.policies.registry import build_policy

BDDL = "(define (problem p) (:init (On akita_black_bowl_1 main_table_region)) (:goal (And (On akita_black_bowl_1 plate_1))))"


def _obs(tmp_path: Path, k: int) -> Observation:
    bddl = tmp_path / "task.bddl"
    bddl.write_text(BDDL)
    priv = {
        "robot0_eef_pos": np.array([-0.2, 0.0, 1.1 + 0.01 * k], np.float32),
        "robot0_eef_quat": np.array([1.0, 0.0, 0.0, 0.0], np.float32),
        "robot0_gripper_qpos": np.array([0.04, -0.04], np.float32),
        "akita_black_bowl_1_pos": np.array([-0.06, 0.2, 0.9], np.float32),
        "akita_black_bowl_1_quat": np.array([0.0, 0.0, 0.0, 1.0], np.float32),
        "plate_1_pos": np.array([0.05, 0.2, 0.9], np.float32),
        "plate_1_quat": np.array([0.0, 0.0, 0.0, 1.0], np.float32),
    }
    return Observation(state=np.zeros(8, np.float32), instruction="pick up the black bowl and place it on the plate",
                       episode_key=f"e{k}", step=0, privileged=priv, task={"bddl_file": str(bddl)})


def test_features_layout():
    priv = {"robot0_eef_pos": np.zeros(3), "robot0_eef_quat": np.array([1.0, 0, 0, 0]),
            "robot0_gripper_qpos": np.zeros(2), "a_1_pos": np.ones(3), "a_1_quat": np.array([0, 0, 0, 1.0]),
            "b_1_pos": np.full(3, 2.0), "b_1_joint_pos": np.array([0.1, 0.2])}
    cmd = np.array([0.5, 0.5, 0.5, 0, 0, 0, 1, 1.0])
    f = planner_features(priv, Stage("pick_place", 3, "a_1", "b_1", cmd))
    assert f.shape == (FEATURE_DIM,) and f.dtype == np.float32
    n = 11 + len(SKILLS)
    assert f[11] == 1 and f[12:n].sum() == 0  # skill one-hot
    assert f[n + 3] == 1 and f[n:n + 16].sum() == 1  # phase one-hot
    o = n + 16
    assert np.allclose(f[o:o + 3], 1.0) and np.allclose(f[o + 9:o + 12], 1.0) and np.allclose(f[o + 12:o + 15], 0)
    t = o + 15
    assert np.allclose(f[t:t + 6], 2.0) and np.allclose(f[t + 6:t + 9], [0.1, 0.2, 0.0])
    assert np.allclose(f[t + 9:t + 12], 0.5) and f[-1] == 1.0
    with pytest.raises(BadInput, match="unknown planner skill"):
        planner_features(priv, Stage("juggle", 0, "a_1", "b_1", cmd))


def test_tracker_follows_the_expert_as_recorded():
    """The tracker, fed the observations of a scripted episode once per chunk, is in the stage the expert recorded
    (libero_10 task 0: two pick-and-places, so the handled object changes mid-episode); repeated and reordered
    calls (the fidelity gate's) see the same stage."""
    from evalkit.policies.base import ObsBatch
    from evalkit.policies.scripted import ScriptedPolicy
    from evalkit.suites.env import LiberoEnv
    from evalkit.suites.specs import get_suite

    spec = get_suite("libero_10")
    env = LiberoEnv(spec, 0, render=False)
    expert, tracker = ScriptedPolicy(), StageTracker()
    try:
        obs = env.reset(0)
        seen, objs = [], set()
        for _ in range(48):  # 240 steps: the first object placed, the second under way
            chunk = expert.predict(ObsBatch([obs]))[0]
            plan = expert.plans[obs.episode_key]
            want = stage_of(plan, plan.last_command)
            got = tracker.stage(obs)
            assert (got.skill, got.phase, got.obj, got.target) == (want.skill, want.phase, want.obj, want.target)
            assert np.array_equal(got.command, want.command)
            seen.append((obs, got))
            objs.add(got.obj)
            for a in chunk[: spec.replan_steps]:
                obs, done = env.step(a)
        assert len(objs) == 2, objs
    finally:
        env.close()
    other = StageTracker()  # a second policy instance, asked in reverse order, sees the same stages
    for o, st in reversed(seen):
        assert other.stage(o) == st or np.array_equal(other.stage(o).command, st.command)


@pytest.mark.skipif(not (DEFAULT_DIR / "model.safetensors").is_file(), reason="reference checkpoint not trained yet")
def test_reference_checkpoint_loads_and_predicts(tmp_path):
    size = (DEFAULT_DIR / "model.safetensors").stat().st_size
    assert size <= 20 * 2**20
    policy = build_policy({"kind": "reference", "denoise_steps": 3}, torch.device("cpu"))
    assert policy.name == "reference" and policy.needs_privileged and not policy.needs_images
    batch = ObsBatch([_obs(tmp_path, k) for k in range(3)])
    a = policy.predict(batch, noise_seed=0)
    assert a.shape == (3, 10, 7) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, policy.predict(batch, noise_seed=0))  # deterministic given the noise seed


@pytest.mark.parametrize("kind", ["reference", "reference_vision"])
def test_reference_rows_never_depend_on_their_batch(tmp_path, kind):
    """The shipped references pad prompts to max_token_len (config.json), so on a CPU an observation's actions are
    bit-identical alone and batched next to a longer prompt, in bf16 as the default backend runs them: a run's
    results do not depend on how its workers' calls happened to batch (they did: the quick start flipped an episode
    between 2 workers and 1)."""
    policy = build_policy({"kind": kind, "denoise_steps": 3}, torch.device("cpu"))
    assert policy.cfg.pad_to_max_len
    policy.model.to(torch.bfloat16)
    img = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)

    def obs(k: int, instruction: str) -> Observation:
        o = _obs(tmp_path, k)
        o.instruction, o.noise_seed, o.agentview, o.wrist = instruction, 100 + k, img, img[::-1].copy()
        return o

    short = obs(0, "put the bowl on the plate")
    long = obs(1, "pick up the black bowl between the plate and the ramekin and place it on the plate")
    alone = policy.predict(ObsBatch([short]))
    mixed = policy.predict(ObsBatch([obs(0, short.instruction), long]))
    assert np.array_equal(alone[0], mixed[0])
    assert np.array_equal(policy.predict(ObsBatch([long]))[0], mixed[1])


def test_missing_checkpoint_is_bad_input(tmp_path):
    with pytest.raises(BadInput):
        build_policy({"kind": "reference", "checkpoint": str(tmp_path)}, torch.device("cpu"))


def test_unknown_field_is_bad_input():
    with pytest.raises(BadInput):
        build_policy({"kind": "reference", "denoise_stepz": 3}, torch.device("cpu"))


@pytest.mark.skipif(not (DEFAULT_DIR / "model.safetensors").is_file(), reason="reference checkpoint not trained yet")
@pytest.mark.parametrize("suite", ["libero_spatial", "libero_object", "libero_goal", "libero_10"])
def test_reference_acts_in_a_short_episode_of_each_suite(suite):
    """One short episode (40 steps) per covered suite: the checkpoint loads, acts, and moves the arm."""
    from evalkit.suites.env import LiberoEnv
    from evalkit.suites.specs import get_suite

    policy = build_policy({"kind": "reference", "denoise_steps": 3}, torch.device("cpu"))
    spec = get_suite(suite)
    env = LiberoEnv(spec, 0, render=False)
    try:
        obs = env.reset(0)
        policy.reset(obs.episode_key)
        start = np.asarray(obs.privileged["robot0_eef_pos"]).copy()
        for _ in range(8):
            chunk = policy.predict(ObsBatch([obs]), noise_seed=0)[0]
            assert chunk.shape == (10, 7) and np.isfinite(chunk).all()
            for a in chunk[: spec.replan_steps]:
                obs, _ = env.step(a)
        assert np.linalg.norm(np.asarray(obs.privileged["robot0_eef_pos"]) - start) > 0.02
    finally:
        env.close()


def test_reference_rollouts_are_the_same_with_one_worker_or_two(tmp_path):
    """End to end on real envs: the bf16 reference's every action chunk is bit-identical whether the episodes ran in
    one process or on two workers whose calls were batched together (tasks 0 and 1: prompts of different lengths)."""
    import hashlib

    from evalkit.rollout.engine import RolloutOptions, run_rollouts
    from evalkit.rollout.journal import Journal
    from evalkit.suites.specs import customize, get_suite

    spec = customize(get_suite("libero_spatial_quick"), tasks=[0, 1], trials=1, max_steps=30)

    def traced():
        policy = build_policy({"kind": "reference", "denoise_steps": 3}, torch.device("cpu"))
        policy.model.to(torch.bfloat16)
        seen: dict[tuple[str, int], str] = {}
        batch_sizes: list[int] = []
        predict = policy.predict

        def recording(batch, noise_seed=None, **kw):
            out = predict(batch, noise_seed=noise_seed, **kw)
            batch_sizes.append(len(batch))
            for o, a in zip(batch.observations, out):
                seen[(o.episode_key, o.step)] = hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()
            return out

        policy.predict = recording
        return policy, seen, batch_sizes

    one, seen_one, _ = traced()
    run_rollouts(one, spec, Journal(tmp_path / "one.jsonl"), RolloutOptions(workers=0, video_mode="none"))
    two, seen_two, sizes = traced()
    run_rollouts(two, spec, Journal(tmp_path / "two.jsonl"),
                 RolloutOptions(workers=2, video_mode="none", batch_window_ms=1e4))
    assert max(sizes) == 2  # the two tasks' observations did share calls
    assert len(seen_one) >= 12 and seen_one == seen_two
