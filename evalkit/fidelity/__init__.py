"""Fidelity checks (before rollouts): candidate backend vs reference backend on a fixed probe batch.

torch does the math (cosine, SQNR, weight fingerprints via forward hooks and tensor reductions).
Entry point: `run_fidelity(reference_policy, candidate_policy, probes, backend_report, cfg)`;
probes come from `evalkit.fidelity.probes.load_probes(spec, cache_dir)`.
"""

from evalkit.fidelity.report import FidelityCheck, FidelityReport, LayerResult
from evalkit.fidelity.run import run_fidelity

__all__ = ["FidelityCheck", "FidelityReport", "LayerResult", "run_fidelity"]
