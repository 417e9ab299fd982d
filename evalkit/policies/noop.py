"""`noop`: holds still with the gripper open. Solves nothing; wires and tests the spine."""

from __future__ import annotations

import numpy as np

from evalkit.policies.base import ObsBatch

HOLD = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float32)


class NoopPolicy:
    name = "noop"
    needs_images = False
    needs_privileged = False

    def __init__(self, action_horizon: int = 10, needs_images: bool = False):
        self.action_horizon = action_horizon
        self.needs_images = needs_images  # true lets tests and benchmarks exercise the camera path

    def predict(self, batch: ObsBatch, noise_seed: int | None = None) -> np.ndarray:
        return np.tile(HOLD, (len(batch), self.action_horizon, 1))

    def reset(self, episode_key: str) -> None:
        return None


def build(cfg: dict, device) -> NoopPolicy:
    return NoopPolicy(int(cfg.get("action_horizon", 10)), bool(cfg.get("needs_images", False)))
