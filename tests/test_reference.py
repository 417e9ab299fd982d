"""policy=reference: the committed checkpoint loads strictly (no missing/unexpected keys) and predicts finite chunks."""

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
    features_from_privileged,
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
            "b_1_pos": np.full(3, 2.0)}
    f = features_from_privileged(priv, "a_1", "b_1")
    assert f.shape == (FEATURE_DIM,) and f.dtype == np.float32
    assert np.allclose(f[11:14], 1.0) and np.allclose(f[20:23], 1.0) and np.allclose(f[23:26], 2.0)


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


def test_missing_checkpoint_is_bad_input(tmp_path):
    with pytest.raises(BadInput):
        build_policy({"kind": "reference", "checkpoint": str(tmp_path)}, torch.device("cpu"))


def test_unknown_field_is_bad_input():
    with pytest.raises(BadInput):
        build_policy({"kind": "reference", "denoise_stepz": 3}, torch.device("cpu"))
