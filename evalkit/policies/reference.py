"""`policy=reference`: the small π0.5 (state_tokens prefix) trained here on scripted demonstrations.

It is `evalkit.policies.pi05.policy.Pi05Policy` itself (same model code, backends and latency stages),
built from `references/reference_policy/` (safetensors + config.json + assets/*/norm_stats.json) with
the reference feature function below: privileged object poses -> normalized features.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from evalkit.errors import BadInput
from evalkit.policies.base import ObsBatch, Observation
from evalkit.policies.scripted import pick_place_goal
from evalkit.policies.scripted_goal import parse_goal

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "references" / "reference_policy"

# ---------------------------------------------------------------------------------------------- features
# State features (prefix input `state_tokens`): a fixed-size float vector per step, goal objects first so one
# small model serves every pick-and-place task:
#     eef pos (3), eef rotation as the first two columns of its matrix (6, continuous unlike axis-angle),
#     gripper qpos (2), object to move: pos (3), rotation 6D (6), pos - eef (3), goal target: pos (3), pos - eef (3).
# Which object is "to move" and which is the "target" is read from the task's BDDL goal, exactly as the
# scripted expert does (the policy is privileged on purpose: it stands in for π0.5 on CPU-only machines).
FEATURE_DIM = 29


def rot6d(quat_xyzw: np.ndarray) -> np.ndarray:
    return Rotation.from_quat(np.asarray(quat_xyzw, np.float64)).as_matrix()[:, :2].T.ravel()


def features_from_privileged(priv: dict[str, np.ndarray], obj: str, target: str) -> np.ndarray:
    eef = np.asarray(priv["robot0_eef_pos"], np.float64)
    o = np.asarray(priv[f"{obj}_pos"], np.float64)
    t = np.asarray(priv[f"{target}_pos"], np.float64)
    out = np.concatenate([
        eef, rot6d(priv["robot0_eef_quat"]), np.asarray(priv["robot0_gripper_qpos"], np.float64),
        o, rot6d(priv[f"{obj}_quat"]), o - eef,
        t, t - eef,
    ])
    assert out.shape == (FEATURE_DIM,)
    return out.astype(np.float32)


def goal_names(obs: Observation) -> tuple[str, str]:
    bddl = obs.task.get("bddl_file")
    if not bddl or not obs.privileged:
        raise BadInput("reference policy needs privileged observations and Observation.task['bddl_file']")
    return pick_place_goal(parse_goal(bddl), obs.privileged)


def observation_features(obs: Observation) -> np.ndarray:
    obj, target = goal_names(obs)
    return features_from_privileged(obs.privileged, obj, target)


# ---------------------------------------------------------------------------------------------- policy


def make_feature_fn(stats: dict[str, Any]):
    mean = np.asarray(stats["mean"], np.float32)
    std = np.asarray(stats["std"], np.float32)
    if mean.shape != (FEATURE_DIM,) or std.shape != (FEATURE_DIM,):
        raise BadInput(f"reference norm stats: features need {FEATURE_DIM} dims, got {mean.shape}")

    def feature_fn(batch: ObsBatch) -> np.ndarray:
        x = np.stack([observation_features(o) for o in batch.observations])
        return np.clip((x - mean) / std, -5.0, 5.0).astype(np.float32)  # same transform as evalkit.train

    return feature_fn


_KEYS = {"kind", "name", "checkpoint", "denoise_steps", "dtype", "seed", "compile", "cuda_graph"}


def build(cfg: dict[str, Any], device) -> Any:
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise BadInput(f"unknown reference policy fields {unknown}; valid: {sorted(_KEYS)}")
    from evalkit.policies.pi05 import processing as proc
    from evalkit.policies.pi05.checkpoint import read_checkpoint_config
    from evalkit.policies.pi05.policy import build as build_pi05

    ckpt = Path(cfg.get("checkpoint") or DEFAULT_DIR).expanduser()
    if not (ckpt / "model.safetensors").is_file():
        raise BadInput(f"reference policy checkpoint not found: {ckpt}/model.safetensors (train it: python -m evalkit.train)")
    meta = read_checkpoint_config(ckpt)
    sizes = dict(meta.get("evalkit_pi05") or {})
    if sizes.get("prefix_inputs") != "state_tokens":
        raise BadInput(f"{ckpt}: not a state_tokens checkpoint (config.json evalkit_pi05.prefix_inputs)")
    ns_path = proc.find_norm_stats(ckpt)
    raw_stats = json.loads(ns_path.read_text())["norm_stats"]
    if "features" not in raw_stats:
        raise BadInput(f"{ns_path}: no 'features' statistics (written by evalkit.train)")
    pi_cfg = {
        "kind": "pi05",
        "variant": "tiny",
        "init": "checkpoint",
        "checkpoint": str(ckpt),
        "norm_stats": str(ns_path),
        "tokenizer": "bytes",
        "denoise_steps": cfg.get("denoise_steps"),  # None: pi05's default
        "dtype": cfg.get("dtype") or "float32",
        "seed": int(cfg.get("seed") or 0),
        "compile": bool(cfg.get("compile", False)),
        "cuda_graph": bool(cfg.get("cuda_graph", False)),
        "model": sizes,
    }
    import torch

    policy = build_pi05(pi_cfg, torch.device(device))
    policy.feature_fn = make_feature_fn(raw_stats["features"])
    policy.name = "reference"
    policy.needs_images = False
    policy.needs_privileged = True
    policy.checkpoint_dir = str(ckpt)
    return policy
