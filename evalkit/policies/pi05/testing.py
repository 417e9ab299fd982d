"""Small builders for tests and smoke runs: a tiny pi05 policy and synthetic LIBERO-like observations."""

from __future__ import annotations

import numpy as np
import torch

from evalkit.policies.base import ObsBatch, Observation
from evalkit.policies.pi05.policy import build

TINY = {"kind": "pi05", "variant": "tiny", "init": "random", "tokenizer": "bytes", "state_in_prompt": True,
        "denoise_steps": 3, "num_views": 2}


def tiny_policy(**over):
    return build({**TINY, **over}, torch.device("cpu"))


def make_obs(seed: int, instruction: str = "put the black bowl on the plate", privileged: dict | None = None):
    rng = np.random.default_rng(seed)
    return Observation(
        state=rng.uniform(-1, 1, 8).astype(np.float32),
        instruction=instruction,
        episode_key=f"libero_spatial/0/{seed}",
        step=0,
        agentview=rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        wrist=rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        privileged=privileged or {},
    )


def batch(*seeds: int, **kw) -> ObsBatch:
    return ObsBatch([make_obs(s, **kw) for s in seeds])
