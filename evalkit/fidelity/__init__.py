"""Fidelity checks (before rollouts): the candidate backend against the reference backend on held-out probes.

Entry points: `fidelity_for_run(...)` (builds the reference, loads the probes, runs every check: what a run
calls), `run_fidelity(reference, candidate, probes, report, cfg, ...)` (the checks themselves) and
`calibration_set(...)` (the calibration data a backend gets). Budgets: evalkit.fidelity.budgets/config.
Submodules are imported lazily so the light ones (config, budgets) do not pull in torch.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "FidelityCheck": "evalkit.fidelity.report", "FidelityReport": "evalkit.fidelity.report",
    "LayerResult": "evalkit.fidelity.report", "run_fidelity": "evalkit.fidelity.run",
    "fidelity_for_run": "evalkit.fidelity.stage", "calibration_set": "evalkit.fidelity.stage",
    "FidelityConfig": "evalkit.fidelity.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
