"""The policy contract (docs/architecture.md): a batch of LIBERO observations + instructions -> action chunk [B, H, 7].

A policy is any object with the attributes and methods of `Policy`. Rollout workers build
`Observation`s; the rollout engine stacks the ones waiting for an action into an `ObsBatch`
and makes one `predict` call for all of them (batched across workers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from evalkit.errors import BadInput

if TYPE_CHECKING:  # torch stays out of rollout worker processes
    import torch


@dataclass
class Observation:
    """One environment's observation after openpi's processing.

    Images are only present when the policy (or a video) asked for cameras.
    """

    state: np.ndarray  # [8] eef pos (3) + eef axis-angle (3) + gripper qpos (2), float32
    instruction: str
    episode_key: str  # unique per episode: "<suite>/<task>/<init>" ; lets stateful policies keep per-episode memory
    step: int  # env steps taken so far (after settle)
    agentview: np.ndarray | None = None  # [224, 224, 3] uint8, rotated 180° and resized with padding
    wrist: np.ndarray | None = None  # [224, 224, 3] uint8
    # Privileged simulator state for scripted/state-based policies: object positions/quaternions etc.
    # Keys are the raw LIBERO observation keys (e.g. "akita_black_bowl_1_pos").
    privileged: dict[str, np.ndarray] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)  # suite, task_id, bddl_file, language
    # Per-observation flow-matching noise seed, set by the rollout engine from (episode seed, call index)
    # so results do not depend on how observations were batched across workers.
    noise_seed: int | None = None
    # What a stateful policy derived from the episode before this step, kept with an observation that is replayed
    # outside its episode (the fidelity gate's held-out probes): the reference policy's planner stage ("stage:*").
    # Empty in live rollouts, where the policy follows the episode itself.
    context: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ObsBatch:
    observations: list[Observation]

    def __len__(self) -> int:
        return len(self.observations)

    @property
    def instructions(self) -> list[str]:
        return [o.instruction for o in self.observations]

    def stacked_state(self) -> np.ndarray:
        return np.stack([o.state for o in self.observations]).astype(np.float32)

    def stacked_images(self, view: str) -> np.ndarray:
        imgs = [getattr(o, view) for o in self.observations]
        if any(i is None for i in imgs):
            raise ValueError(f"observation batch has no '{view}' images; does the policy declare needs_images?")
        return np.stack(imgs)


# denoise_steps (Euler steps of a flow-matching policy's sampler): its one default and its one check, used by
# the run schema (evalkit.config) and every policy built outside a run; policies that do not sample ignore it.
DEFAULT_DENOISE_STEPS = 10  # openpi's LIBERO example


def check_denoise_steps(value: Any = None) -> int:
    """`value` as an int (DEFAULT_DENOISE_STEPS when None: not set); BadInput unless it is >= 1."""
    steps = DEFAULT_DENOISE_STEPS if value is None else int(value)
    if steps < 1:
        raise BadInput(f"denoise_steps={value}: must be >= 1 (Euler steps of the flow-matching sampler)")
    return steps


CAMERAS = ("agentview", "wrist")  # the views an Observation can carry (LIBERO's agentview and eye-in-hand cameras)


def policy_cameras(policy) -> tuple[str, ...]:
    """The camera views envs must render for `policy`: none for a state-only policy, else its `cameras` (all by
    default). Rendering costs most of a step's time, so a policy that reads one view should say so."""
    if not getattr(policy, "needs_images", False):
        return ()
    cams = tuple(getattr(policy, "cameras", CAMERAS))
    unknown = [c for c in cams if c not in CAMERAS]
    if unknown or not cams:
        raise ValueError(f"policy {getattr(policy, 'name', '?')} reads cameras {cams}; valid: {', '.join(CAMERAS)}")
    return cams


@runtime_checkable
class Policy(Protocol):
    """What the rollout engine, backends and fidelity checks rely on."""

    name: str
    needs_images: bool  # False: envs run without cameras (a state-only policy must not pay for rendering)
    needs_privileged: bool  # True: observations carry simulator object poses
    action_horizon: int  # H of the returned chunk
    # Optional `cameras`: the views it reads, of CAMERAS (default: all of them when needs_images); envs render only
    # those (policy_cameras).

    def predict(self, batch: ObsBatch, noise_seed: int | None = None) -> np.ndarray:
        """Return float32 actions [B, H, 7] in LIBERO's action space.

        Deterministic given the noise: `noise_seed` (one seed for the whole batch, used by probes/benchmarks)
        or, when it is None, each observation's own `noise_seed` (rollouts).
        """
        ...

    def reset(self, episode_key: str) -> None:
        """Forget any per-episode memory (called when an episode starts)."""
        ...


class TorchPolicy:
    """Base for policies backed by an nn.Module: backends and fidelity operate on `self.model`.

    Subclasses set `model` and implement `predict`. `transformer_stacks()` names the layer stacks
    (e.g. {"prefix": model.prefix.layers, "expert": model.expert.layers}) so backends and the
    fidelity checks can find layers by stable names.

    What backends may rely on (they never import a policy): Linear modules named by the patterns in
    evalkit/backends/targets.py (`prefix.layers.<i>.mlp.gate_proj`, ...); a GeGLU MLP module declares
    `mlp_kind = "geglu_tanh"`; model-specific fusions are registered with evalkit.backends.fusions.register.
    `eager()` (where a policy has compiled or graphed paths) runs plain module forwards, so hooks see every call.
    """

    name = "torch"
    needs_images = False
    needs_privileged = False
    action_horizon = 10
    model: "torch.nn.Module"
    device: "torch.device | str" = "cpu"

    def reset(self, episode_key: str) -> None:  # stateless by default
        return None

    def transformer_stacks(self) -> "dict[str, torch.nn.ModuleList]":
        return {}
