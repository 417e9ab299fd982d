"""The fidelity stage of a run (before rollouts): calibration data for the backend, then the reference policy,
the held-out check probes and every check."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from evalkit.errors import BadInput
from evalkit.fidelity.budgets import class_of_backend
from evalkit.fidelity.calib_sources import describe, load_observations, parse_calib
from evalkit.fidelity.config import FidelityConfig
from evalkit.fidelity.probes import load_check_probes, load_probes
from evalkit.fidelity.report import FidelityReport
from evalkit.fidelity.run import run_fidelity
from evalkit.policies.base import ObsBatch

# Outside the repo so it survives checkouts (the nightly runner renders once); EVALKIT_CACHE moves it.
DEFAULT_PROBE_CACHE = Path(os.environ.get("EVALKIT_CACHE", Path.home() / ".cache" / "evalkit")) / "probes"


def fidelity_applies(policy) -> bool:
    """Fidelity compares torch models layer by layer: only policies with a model and transformer stacks."""
    return getattr(policy, "model", None) is not None and bool(getattr(policy, "transformer_stacks", lambda: {})())


@dataclass
class CalibrationSet:
    """What a backend that calibrates is given (`Backend.apply(model, calib)`): zero-argument callables, each running
    the policy on one batch of observations, and a description of where they came from (recorded in the run)."""

    items: list[Callable[[], Any]]
    source: str  # e.g. "probes: libero_spatial_quick tasks (0, 1, 2) x init states 0..1 at t=0"
    observations: int
    digest: str  # sha1 of the observations' states: two runs calibrated on the same data share it


DEMO_CALIB_BATCH = 8  # recorded observations per calibration predict call


def calibration_set(policy, spec, fidelity: FidelityConfig | dict | None = None, source: str = "probes",
                    cache_dir: str | Path = DEFAULT_PROBE_CACHE, make_env: Callable | None = None,
                    demos_root: str | Path | None = None) -> CalibrationSet:
    """`backend.calib=probes`: each task's first init states at t = 0 (disjoint from the held-out check probes), one
    predict call per task. `demos:N` and a path: recorded observations (evalkit/fidelity/calib_sources.py)."""
    cfg = FidelityConfig.from_dict(fidelity)
    src = parse_calib(source, spec, Path(demos_root) if demos_root is not None else None)
    if src.kind != "probes":
        if getattr(policy, "needs_images", True):
            raise BadInput(f"backend.calib={src.text}: recorded demonstrations hold no camera images and policy "
                           f"'{getattr(policy, 'name', '?')}' reads images; use backend.calib=probes")
        return calibration_from_observations(policy, ObsBatch(load_observations(src)), group=DEMO_CALIB_BATCH,
                                             seed=cfg.probe_noise_seed, source=describe(src))
    batch = load_probes(spec, cache_dir, per_task=cfg.calib_init_states, make_env=make_env,
                        images=bool(getattr(policy, "needs_images", True)))
    return calibration_from_observations(policy, batch, group=cfg.calib_init_states, seed=cfg.probe_noise_seed,
                                         source=f"probes: {spec.name} tasks {tuple(spec.task_ids)} x init states "
                                                f"0..{cfg.calib_init_states - 1} at t=0")


def calibration_from_observations(policy, batch: ObsBatch, group: int, seed: int, source: str) -> CalibrationSet:
    obs = batch.observations
    h = hashlib.sha1()
    for o in obs:
        h.update(o.state.tobytes())
        h.update(o.instruction.encode())
    items = []
    for s in range(0, len(obs), max(1, group)):
        chunk = ObsBatch(obs[s : s + group])
        items.append(lambda chunk=chunk: policy.predict(chunk, noise_seed=seed))
    return CalibrationSet(items, source, len(obs), h.hexdigest()[:12])


def build_reference(policy_cfg: dict[str, Any], device, reference_backend: str):
    """The same policy (same config, same seed/checkpoint) under the reference backend."""
    from evalkit.backends.registry import get_backend
    from evalkit.policies.registry import build_policy

    cfg = dict(policy_cfg)
    for k in ("compile", "cuda_graph"):  # the reference runs eagerly: hooks must see every layer
        if k in cfg:
            cfg[k] = False
    ref = build_policy(cfg, device)
    get_backend(reference_backend).apply(ref.model)
    return ref


def check_probes(spec, cfg: FidelityConfig, images: bool, cache_dir: str | Path = DEFAULT_PROBE_CACHE,
                 make_env: Callable | None = None, actor_factory=None, actor_id: str = "") -> ObsBatch:
    return load_check_probes(spec, cache_dir, init_states=cfg.check_init_states, steps=list(cfg.check_steps),
                             images=images, actor_factory=actor_factory, actor_id=actor_id, make_env=make_env)


def fidelity_for_run(
    policy_cfg: dict[str, Any],
    device,
    candidate_policy,
    backend,
    backend_report,
    suite_spec,
    fidelity: FidelityConfig | dict | None = None,
    denoise_steps: int | None = None,
    cache_dir: str | Path = DEFAULT_PROBE_CACHE,
    make_env: Callable | None = None,
) -> FidelityReport | None:
    """None when the policy has no torch layers to compare (noop, scripted, remote).

    backend: the Backend object the run applied (its declared precision class and `targets` decide the budgets);
    denoise_steps: the run's configured steps (what the expert must really run, whatever the model says).
    """
    cfg = FidelityConfig.from_dict(fidelity)
    if not fidelity_applies(candidate_policy):
        return None
    probes = check_probes(suite_spec, cfg, bool(getattr(candidate_policy, "needs_images", True)), cache_dir, make_env)
    cls, source = class_of_backend(backend)
    reference = build_reference(policy_cfg, device, cfg.reference_backend)
    try:
        return run_fidelity(reference, candidate_policy, probes, backend_report, cfg, precision_class=cls,
                            class_source=source, denoise_steps=denoise_steps, targets=getattr(backend, "targets", None))
    finally:
        del reference  # free the second copy of the weights before rollouts
