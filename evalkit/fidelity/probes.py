"""The fidelity probe set: observations at a suite's official init states, rendered once and cached (npz).

Each probe is the first observation of an episode (after the settle steps) from the LIBERO env adapter
(`suites.env.LiberoEnv`), so probes look exactly like what the policy sees at t=0, with the task's own
instruction. numpy stores the cache; the key hashes everything that changes the pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from evalkit.policies.base import ObsBatch, Observation

_FIELDS = ("state", "agentview", "wrist")


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("mujoco", "robosuite"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a missing simulator is reported by the env itself
            out[mod] = "?"
    return out


def probe_key(spec, per_task: int) -> str:
    desc = {
        "suite": spec.libero_name,
        "tasks": list(spec.task_ids),
        "per_task": per_task,
        "resolution": spec.resolution,
        "image_size": spec.image_size,
        "settle": spec.num_steps_wait,
        "seed": spec.seed,
        **_versions(),
    }
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:12]


def _default_env(spec, task_id: int):
    from suites.env import LiberoEnv

    return LiberoEnv(spec, task_id, render=True)


def render_probes(spec, per_task: int = 1, make_env: Callable | None = None) -> list[Observation]:
    """One observation per (task in spec.task_ids, init state 0..per_task-1), images and privileged state included."""
    make_env = make_env or _default_env
    obs: list[Observation] = []
    for task_id in spec.task_ids:
        env = make_env(spec, task_id)
        try:
            for i in range(per_task):
                obs.append(env.reset(i))
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
            obs.append(Observation(state=vals["state"], instruction=m["instruction"], episode_key=m["episode_key"],
                                   step=m["step"], agentview=vals["agentview"], wrist=vals["wrist"],
                                   privileged=priv, task=m["task"]))
    return obs


def load_probes(spec, cache_dir: str | Path, per_task: int = 1,
                make_env: Callable | None = None) -> ObsBatch:
    """The probe batch for `spec` (a suites.specs.SuiteSpec): read from the cache or rendered once and cached."""
    path = Path(cache_dir) / f"{spec.name}_{probe_key(spec, per_task)}.npz"
    if path.exists():
        return ObsBatch(read_probes(path))
    obs = render_probes(spec, per_task, make_env)
    save_probes(path, obs)
    return ObsBatch(obs)
