"""`policy=reference`: the small π0.5 (state_tokens prefix) trained here on scripted demonstrations.

It is `evalkit.policies.pi05.policy.Pi05Policy` itself (same model code, backends and latency stages),
built from `references/reference_policy/` (safetensors + config.json + assets/*/norm_stats.json) with
the reference feature function below: privileged object poses -> normalized features.
"""

from __future__ import annotations

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
    """stats: {"mean", "std"} of the features, plus where they were read ("path", "key") for messages."""
    from evalkit.policies.pi05.checkpoint import read_vector

    where, key = stats.get("path", "reference norm stats"), stats.get("key", "features")
    for q in ("mean", "std"):
        if q not in stats:
            raise BadInput(f"{where}: {key} has no {q}")
    mean = read_vector(where, f"{key}.mean", stats["mean"])
    std = read_vector(where, f"{key}.std", stats["std"])
    if mean.shape != (FEATURE_DIM,) or std.shape != (FEATURE_DIM,):
        raise BadInput(f"{where}: {key} need {FEATURE_DIM} dims, got mean {mean.size}, std {std.size}")
    if (std <= 0).any():
        raise BadInput(f"{where}: {key}.std must be > 0, not at dims {np.flatnonzero(std <= 0)[:8].tolist()}")

    def feature_fn(batch: ObsBatch) -> np.ndarray:
        x = np.stack([observation_features(o) for o in batch.observations])
        return np.clip((x - mean) / std, -5.0, 5.0).astype(np.float32)  # same transform as evalkit.train

    return feature_fn


_KEYS = {"kind", "name", "checkpoint", "denoise_steps", "dtype", "seed", "compile", "cuda_graph"}


def _pi05_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pi05 config that builds the reference policy, and its feature statistics; every file read and checked
    (through pi05's checkpoint reader) on the way, so `precheck` and `build` share one path."""
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise BadInput(f"unknown reference policy fields {unknown}; valid: {sorted(_KEYS)}")
    from evalkit.policies.pi05.checkpoint import (
        find_norm_stats,
        read_checkpoint_config,
        read_norm_stats_json,
    )

    ckpt = Path(str(cfg.get("checkpoint") or DEFAULT_DIR)).expanduser()
    if not (ckpt / "model.safetensors").is_file():
        raise BadInput(f"reference policy checkpoint not found: {ckpt}/model.safetensors (train it: python -m evalkit.train)")
    meta = read_checkpoint_config(ckpt)
    sizes = dict(meta.get("evalkit_pi05") or {})
    if sizes.get("prefix_inputs") != "state_tokens":
        raise BadInput(f"{ckpt}: not a state_tokens checkpoint (config.json evalkit_pi05.prefix_inputs)")
    ns_path = find_norm_stats(ckpt)
    stats, prefix = read_norm_stats_json(ns_path)
    if not isinstance(stats.get("features"), dict):
        raise BadInput(f"{ns_path}: no '{prefix}features' statistics (mean, std; written by evalkit.train)")
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
    return pi_cfg, {**stats["features"], "path": ns_path, "key": f"{prefix}features"}


def precheck(cfg: dict[str, Any]) -> None:
    """The shipped (or given) checkpoint's files exist and parse, and fit the model they describe; no model built."""
    from evalkit.policies.pi05.policy import precheck as precheck_pi05

    pi_cfg, features = _pi05_config(cfg)
    make_feature_fn(features)
    precheck_pi05(pi_cfg)


def build(cfg: dict[str, Any], device) -> Any:
    from evalkit.policies.pi05.policy import build as build_pi05

    pi_cfg, features = _pi05_config(cfg)
    feature_fn = make_feature_fn(features)
    import torch

    policy = build_pi05(pi_cfg, torch.device(device))
    policy.feature_fn = feature_fn
    policy.name = "reference"
    policy.needs_images = False
    policy.needs_privileged = True
    policy.checkpoint_dir = pi_cfg["checkpoint"]
    return policy
