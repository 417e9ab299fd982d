"""`policy=reference`: the small π0.5 (state_tokens prefix) trained here on scripted demonstrations.

It is `evalkit.policies.pi05.policy.Pi05Policy` itself (same model code, backends and latency stages),
built from `references/reference_policy/` (safetensors + config.json + assets/*/norm_stats.json) with
the reference feature function below: the scripted planner's stage and privileged poses -> normalized features.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from evalkit.errors import BadInput
from evalkit.policies.base import ObsBatch, Observation

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "references" / "reference_policy"

# ---------------------------------------------------------------------------------------------- features
# The reference policy is hierarchical: the scripted expert's planner (privileged; goals from the task's BDDL, skills
# and their phases from `policy=scripted`) says which skill runs, in which phase, on which object and towards which
# pose target; the learned π0.5 (this checkpoint) turns that into action chunks. The state features, one fixed-size
# vector per step (prefix input `state_tokens`):
#     eef pos (3), eef rotation as the first two columns of its matrix (6, continuous unlike axis-angle),
#     gripper qpos (2), skill one-hot (9), phase one-hot (16),
#     object handled: pos (3), rotation 6D (6), pos - eef (3), its joints (3: drawers, knob, door; else 0),
#     goal target: pos (3), pos - eef (3), its joints (3),
#     the planner's pose target: pos - eef (3), rotation 6D (6), gripper command (1).
SKILLS = ("pick_place", "push", "open_drawer", "close_drawer", "turn_on", "put_through", "close_door", "open_door",
          "hold")
MAX_PHASES = 16
JOINTS = 3
FEATURE_DIM = 11 + len(SKILLS) + MAX_PHASES + 15 + 9 + 10


def rot6d(quat_xyzw: np.ndarray) -> np.ndarray:
    return Rotation.from_quat(np.asarray(quat_xyzw, np.float64)).as_matrix()[:, :2].T.ravel()


@dataclass(frozen=True)
class Stage:
    """Where the planner is when a chunk is planned (what `python -m evalkit.demos` records as `stage:*`)."""
    skill: str
    phase: int
    obj: str
    target: str
    command: np.ndarray  # [8]: pose target xyz, quat xyzw, gripper command


def _joints(priv: dict[str, np.ndarray], name: str) -> np.ndarray:
    out = np.zeros(JOINTS)
    j = priv.get(f"{name}_joint_pos") if name else None
    if j is not None:
        j = np.asarray(j, np.float64).ravel()[:JOINTS]
        out[: j.size] = j
    return out


def planner_features(priv: dict[str, np.ndarray], stage: Stage) -> np.ndarray:
    if stage.skill not in SKILLS:
        raise BadInput(f"reference features: unknown planner skill '{stage.skill}' (known: {', '.join(SKILLS)})")
    if not 0 <= stage.phase < MAX_PHASES:
        raise BadInput(f"reference features: phase {stage.phase} of '{stage.skill}' exceeds {MAX_PHASES}")
    eef = np.asarray(priv["robot0_eef_pos"], np.float64)
    skill = np.zeros(len(SKILLS))
    skill[SKILLS.index(stage.skill)] = 1.0
    phase = np.zeros(MAX_PHASES)
    phase[stage.phase] = 1.0
    if stage.obj:
        o = np.asarray(priv[f"{stage.obj}_pos"], np.float64)
        obj = np.concatenate([o, rot6d(priv[f"{stage.obj}_quat"]), o - eef, _joints(priv, stage.obj)])
    else:  # a plan's final hold
        obj = np.concatenate([eef, rot6d(priv["robot0_eef_quat"]), np.zeros(3 + JOINTS)])
    t = np.asarray(priv[f"{stage.target}_pos"], np.float64) if stage.target else eef
    cmd = np.asarray(stage.command, np.float64)
    out = np.concatenate([
        eef, rot6d(priv["robot0_eef_quat"]), np.asarray(priv["robot0_gripper_qpos"], np.float64), skill, phase,
        obj, t, t - eef, _joints(priv, stage.target),
        cmd[:3] - eef, rot6d(cmd[3:7]), cmd[7:8],
    ])
    assert out.shape == (FEATURE_DIM,)
    return out.astype(np.float32)


def episode_features(d) -> np.ndarray:
    """[T, FEATURE_DIM] features of one recorded episode (an npz from `python -m evalkit.demos`)."""
    priv_keys = [k for k in d.files if k.startswith("p:")]
    if "stage:skill" not in d.files:
        raise BadInput("episode has no planner stage (stage:* arrays): re-record it with `python -m evalkit.demos`")
    priv = {k[2:]: d[k] for k in priv_keys}
    stage = {k: d[k] for k in STAGE_KEYS}  # read once: an npz member is decompressed on every access
    return np.stack([
        planner_features({k: v[t] for k, v in priv.items()}, stage_from_context({k: v[t] for k, v in stage.items()}))
        for t in range(len(stage["stage:skill"]))
    ])


def stage_of(plan, command) -> Stage:
    """The Stage of a scripted `EpisodePlan` right after it planned `command` (demos and the tracker share this)."""
    skill = plan.current
    return Stage(skill.name, int(skill.phase), plan.obj, plan.target,
                 np.concatenate([command.pos, command.rot.as_quat(), [command.grip]]).astype(np.float32))


# A Stage as arrays: the names demos record per step and Observation.context carries for a replayed probe
STAGE_KEYS = ("stage:skill", "stage:phase_index", "stage:obj", "stage:target", "stage:command")


def stage_context(st: Stage) -> dict[str, np.ndarray]:
    """A Stage as STAGE_KEYS arrays (Observation.context; demos record the same per step)."""
    return {"stage:skill": np.array(st.skill), "stage:phase_index": np.array(st.phase, np.int16),
            "stage:obj": np.array(st.obj), "stage:target": np.array(st.target),
            "stage:command": np.asarray(st.command, np.float32)}


def stage_from_context(ctx: dict[str, np.ndarray]) -> Stage:
    missing = [k for k in STAGE_KEYS if k not in ctx]
    if missing:
        raise BadInput(f"observation context has no planner stage {missing}: re-record the probes")
    return Stage(str(ctx["stage:skill"]), int(ctx["stage:phase_index"]), str(ctx["stage:obj"]),
                 str(ctx["stage:target"]), np.asarray(ctx["stage:command"], np.float32))


# Stages already computed, shared by every reference policy in the process: the fidelity gate calls the reference
# and a candidate on the same observations in different orders, and both must see the same features.
_STAGE_MEMO: OrderedDict[tuple, Stage] = OrderedDict()
_MEMO_SIZE = 8192


def _digest(o: Observation) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(o.privileged):
        h.update(k.encode())
        h.update(np.ascontiguousarray(o.privileged[k]).tobytes())
    return h.digest()


class StageTracker:
    """Runs the scripted planner alongside the learned policy: one plan per episode, advanced once per chunk (as
    when the demonstrations were recorded). An observation at an earlier step than the last seen for its
    episode starts a new plan (a new episode under the same key)."""

    def __init__(self) -> None:
        from evalkit.policies.scripted import ScriptedPolicy

        self.planner = ScriptedPolicy()
        self.last_step: dict[str, int] = {}

    def reset(self, episode_key: str) -> None:
        self.planner.reset(episode_key)
        self.last_step.pop(episode_key, None)

    def stage(self, o: Observation) -> Stage:
        if o.context:  # replayed out of its episode (a held-out probe): the stage recorded with it
            return stage_from_context(o.context)
        key = (o.episode_key, o.step, o.task.get("bddl_file"), _digest(o))
        hit = _STAGE_MEMO.get(key)
        if hit is not None:
            _STAGE_MEMO.move_to_end(key)
            return hit
        if o.step == 0 or o.step < self.last_step.get(o.episode_key, -1):  # step 0 always starts a plan
            self.reset(o.episode_key)
        self.last_step[o.episode_key] = o.step
        plan = self.planner._plan(o)
        st = stage_of(plan, self.planner._command(plan, o))
        _STAGE_MEMO[key] = st
        if len(_STAGE_MEMO) > _MEMO_SIZE:
            _STAGE_MEMO.popitem(last=False)
        return st


def check_observation(obs: Observation) -> None:
    if not obs.task.get("bddl_file") or not obs.privileged:
        raise BadInput("reference policy needs privileged observations and Observation.task['bddl_file']")


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

    tracker = StageTracker()

    def feature_fn(batch: ObsBatch) -> np.ndarray:
        for o in batch.observations:
            check_observation(o)
        x = np.stack([planner_features(o.privileged, tracker.stage(o)) for o in batch.observations])
        return np.clip((x - mean) / std, -5.0, 5.0).astype(np.float32)  # same transform as evalkit.train

    feature_fn.tracker = tracker
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
    policy.reset = feature_fn.tracker.reset  # a new episode drops its plan
    policy.name = "reference"
    policy.needs_images = False
    policy.needs_privileged = True
    policy.checkpoint_dir = pi_cfg["checkpoint"]
    return policy
