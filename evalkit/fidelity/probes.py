"""The two probe sets of the fidelity stage, rendered once and cached (npz), never the same observations:

- calibration probes: each task's first official init states at t = 0 (after the settle steps). Backends that
  calibrate (fp8 activation scales, ...) get these as `calib` (`backend.calib=probes`).
- check probes (held out): each task's LAST official init states, observed at t = 0 and at later steps of a short
  rollout driven by the reference policy (grasping, carrying, placing: activations a t = 0 scene never shows).
  A backend that fits its calibration data, or keeps state from its first call, meets observations it never saw.

Observations come from the LIBERO env adapter (`evalkit.suites.env.LiberoEnv`), so probes look exactly like what the
policy sees in an episode, with the task's own instruction. Cameras are rendered only when the policy reads
images. numpy stores the cache; its key hashes everything that changes an observation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from evalkit.policies.base import ObsBatch, Observation

_FIELDS = ("state", "agentview", "wrist")
Actor = Callable[[Observation], np.ndarray]  # observation -> action chunk [H, 7]
# An actor may also carry `actor.context(o) -> dict[str, np.ndarray]`: what it derived from the episode so far
# (Observation.context), recorded with each probe so a policy that follows episodes (the reference policy's planner)
# sees a replayed probe as it saw it in the rollout, whatever ran before in the process.


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("mujoco", "robosuite"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a missing simulator is reported by the env itself
            out[mod] = "?"
    return out


def probe_key(spec, per_task: int, **extra) -> str:
    desc = {
        "suite": spec.libero_name,
        "tasks": list(spec.task_ids),
        "per_task": per_task,
        "resolution": spec.resolution,
        "image_size": spec.image_size,
        "settle": spec.num_steps_wait,
        "seed": spec.seed, "seed_mode": spec.seed_mode,
        **_versions(),
        **extra,
    }
    return hashlib.sha1(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _default_env(render: bool):
    def make(spec, task_id: int):
        from evalkit.suites.env import LiberoEnv

        return LiberoEnv(spec, task_id, render=render)

    return make


def render_probes(spec, per_task: int = 1, make_env: Callable | None = None, images: bool = True) -> list[Observation]:
    """One observation per (task in spec.task_ids, init state 0..per_task-1), privileged state included."""
    make_env = make_env or _default_env(images)
    obs: list[Observation] = []
    for task_id in spec.task_ids:
        env = make_env(spec, task_id)
        try:
            for i in range(per_task):
                obs.append(env.reset(i))
        finally:
            env.close()
    return obs


def record_rollout_probes(spec, init_states: int, steps: list[int], actor_factory: Callable[[], Actor],
                          make_env: Callable | None = None, images: bool = True) -> list[Observation]:
    """Observations at `steps` of a rollout from each task's last `init_states` official init states.

    The rollout executes the actor's chunks `spec.replan_steps` actions at a time, as an episode does. An episode
    that ends (success) before the last step contributes the steps it reached.
    """
    make_env = make_env or _default_env(images)
    want = sorted({int(s) for s in steps})
    actor = actor_factory() if max(want) > 0 else None
    context = getattr(actor, "context", None)  # what the actor derived from the episode (Actor's comment)
    obs: list[Observation] = []
    for task_id in spec.task_ids:
        env = make_env(spec, task_id)
        try:
            n = len(getattr(env, "init_states", ())) or 50
            for j in range(init_states):
                o = env.reset(n - 1 - j)
                chunk: list[np.ndarray] = []
                for t in range(want[-1] + 1):
                    if t in want:
                        obs.append(dataclasses.replace(o, context=context(o)) if context is not None else o)
                    if t == want[-1]:
                        break
                    if not chunk:
                        chunk = list(np.asarray(actor(o))[: spec.replan_steps])
                    o, done = env.step(chunk.pop(0))
                    if done:
                        break
        finally:
            env.close()
    return obs


def save_probes(path: Path, observations: list[Observation]) -> None:
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for i, o in enumerate(observations):
        for f in _FIELDS:
            v = getattr(o, f)
            if v is not None:
                arrays[f"{f}/{i}"] = np.asarray(v)
        for k, v in o.privileged.items():
            arrays[f"priv/{i}/{k}"] = np.asarray(v)
        for k, v in o.context.items():
            arrays[f"ctx/{i}/{k}"] = np.asarray(v)
        meta.append({"instruction": o.instruction, "episode_key": o.episode_key, "step": o.step,
                     "task": {k: v for k, v in o.task.items() if isinstance(v, (str, int, float))}})
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # parallel runs never share a temp file
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)  # atomic: a killed run never leaves half a cache


def read_probes(path: Path) -> list[Observation]:
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        obs = []
        for i, m in enumerate(meta):
            vals = {f: (z[f"{f}/{i}"] if f"{f}/{i}" in z.files else None) for f in _FIELDS}
            priv = {k.split("/", 2)[2]: z[k] for k in z.files if k.startswith(f"priv/{i}/")}
            ctx = {k.split("/", 2)[2]: z[k] for k in z.files if k.startswith(f"ctx/{i}/")}
            obs.append(Observation(state=vals["state"], instruction=m["instruction"], episode_key=m["episode_key"],
                                   step=m["step"], agentview=vals["agentview"], wrist=vals["wrist"],
                                   privileged=priv, task=m["task"], context=ctx))
    return obs


def _cached(path: Path, render: Callable[[], list[Observation]]) -> ObsBatch:
    if path.exists():
        try:
            return ObsBatch(read_probes(path))
        except Exception:  # a corrupt cache file is rendered again, never trusted
            path.unlink(missing_ok=True)
    obs = render()
    save_probes(path, obs)
    return ObsBatch(obs)


def load_probes(spec, cache_dir: str | Path, per_task: int = 1, make_env: Callable | None = None,
                images: bool = True) -> ObsBatch:
    """Calibration probes for `spec` (a evalkit.suites.specs.SuiteSpec): init states 0..per_task-1 at t = 0, cached."""
    extra = {} if images else {"images": False}
    path = Path(cache_dir) / f"{spec.name}_{probe_key(spec, per_task, **extra)}.npz"
    return _cached(path, lambda: render_probes(spec, per_task, make_env, images))


def reference_actor_factory(noise_seed: int = 0) -> tuple[Callable[[], Actor], str]:
    """The trained reference policy as the probe rollouts' driver, and its identity for the cache key.

    Tasks the reference cannot read a goal for get seeded random actions of the same size instead (the later
    states then still differ from t = 0)."""
    from evalkit.errors import BadInput
    from evalkit.policies.registry import checkpoint_identity

    # every file of the checkpoint that decides its actions (weights, config.json's settings, norm stats): the same
    # identity a run's key holds; the shipped checkpoint, as `factory` below builds
    files = checkpoint_identity({"kind": "reference"})
    ident = (hashlib.sha1(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
             if "model.safetensors" in files else "missing")

    def factory() -> Actor:
        from evalkit.policies.reference import build, stage_context

        try:
            policy = build({"kind": "reference"}, "cpu")
        except BadInput:
            policy = None
        rng = np.random.default_rng(noise_seed)

        def act(o: Observation) -> np.ndarray:
            if policy is not None:
                try:
                    return policy.predict(ObsBatch([o]), noise_seed=noise_seed)[0]
                except BadInput:
                    pass
            return np.concatenate([rng.uniform(-0.3, 0.3, (10, 6)), -np.ones((10, 1))], axis=1)

        def context(o: Observation) -> dict[str, np.ndarray]:
            """The planner stage the rollout is in at o (before the policy acts on it: the same stage it then uses)."""
            if policy is None:
                return {}
            try:
                return stage_context(policy.feature_fn.tracker.stage(o))
            except BadInput:
                return {}

        act.context = context
        return act

    return factory, ident


def load_check_probes(spec, cache_dir: str | Path, init_states: int = 1, steps: list[int] | None = None,
                      images: bool = True, actor_factory: Callable[[], Actor] | None = None, actor_id: str = "",
                      make_env: Callable | None = None) -> ObsBatch:
    """Held-out check probes (module docstring), cached; the default actor is the trained reference policy."""
    steps = sorted({int(s) for s in (steps or [0])})
    if actor_factory is None:
        actor_factory, actor_id = reference_actor_factory()
    # context=1: the probes carry the actor's Observation.context (earlier caches lack it and are not reused)
    key = probe_key(spec, init_states, kind="check", steps=steps, images=images, actor=actor_id, context=1)
    path = Path(cache_dir) / f"{spec.name}_check_{key}.npz"
    return _cached(path, lambda: record_rollout_probes(spec, init_states, steps, actor_factory, make_env, images))
