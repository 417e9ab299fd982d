"""The fidelity stage of a run (before rollouts): build the reference, load the probes, run every check."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from evalkit.fidelity.probes import load_probes
from evalkit.fidelity.report import FidelityReport
from evalkit.fidelity.run import run_fidelity
from evalkit.gate.config import GateConfig

# Outside the repo so it survives checkouts (the nightly runner renders once); EVALKIT_CACHE moves it.
DEFAULT_PROBE_CACHE = Path(os.environ.get("EVALKIT_CACHE", Path.home() / ".cache" / "evalkit")) / "probes"


def fidelity_applies(policy) -> bool:
    """Fidelity compares torch models layer by layer: only policies with a model and transformer stacks."""
    return getattr(policy, "model", None) is not None and bool(getattr(policy, "transformer_stacks", lambda: {})())


def build_reference(policy_cfg: dict[str, Any], device, reference_backend: str):
    """The same policy (same config, same seed/checkpoint) under the reference backend."""
    from backends.registry import get_backend
    from evalkit.policies.registry import build_policy

    cfg = dict(policy_cfg)
    for k in ("compile", "cuda_graph"):  # the reference runs eagerly: hooks must see every layer
        if k in cfg:
            cfg[k] = False
    ref = build_policy(cfg, device)
    get_backend(reference_backend).apply(ref.model)
    return ref


def fidelity_for_run(
    policy_cfg: dict[str, Any],
    device,
    candidate_policy,
    backend_report,
    suite_spec,
    gate_cfg: GateConfig | dict | None = None,
    cache_dir: str | Path = DEFAULT_PROBE_CACHE,
    make_env: Callable | None = None,
) -> FidelityReport | None:
    """None when the policy has no torch layers to compare (noop, scripted, remote)."""
    cfg = GateConfig.from_dict(gate_cfg)
    if not fidelity_applies(candidate_policy):
        return None
    probes = load_probes(suite_spec, cache_dir, per_task=cfg.probe_init_states, make_env=make_env)
    reference = build_reference(policy_cfg, device, cfg.reference_backend)
    try:
        return run_fidelity(reference, candidate_policy, probes, backend_report, cfg,
                            denoise_steps=getattr(candidate_policy, "denoise_steps", None))
    finally:
        del reference  # free the second copy of the weights before rollouts
