"""`random`: uniform random actions in [-scale, scale], seeded per observation. Moves the robot
(exercises contacts, timeouts and determinism of the rollout engine) but solves nothing."""

from __future__ import annotations

import numpy as np

from evalkit.policies.base import ObsBatch


class RandomPolicy:
    name = "random"
    needs_images = False
    needs_privileged = False

    def __init__(self, action_horizon: int = 10, scale: float = 0.5):
        self.action_horizon = action_horizon
        self.scale = scale

    def predict(self, batch: ObsBatch, noise_seed: int | None = None) -> np.ndarray:
        out = []
        for i, o in enumerate(batch.observations):
            seed = noise_seed + i if noise_seed is not None else (o.noise_seed or 0)
            rng = np.random.default_rng(seed)
            out.append(rng.uniform(-self.scale, self.scale, size=(self.action_horizon, 7)))
        return np.asarray(out, dtype=np.float32)

    def reset(self, episode_key: str) -> None:
        return None


def build(cfg: dict, device) -> RandomPolicy:
    return RandomPolicy(int(cfg.get("action_horizon", 10)), float(cfg.get("scale", 0.5)))
