"""Fidelity checks (before rollouts): candidate backend vs reference backend on a fixed probe batch.

torch does the math (cosine, SQNR, weight fingerprints via forward hooks and tensor reductions).
Entry points: `fidelity_for_run(...)` (builds the reference and the probes: what the CLI calls) and
`run_fidelity(reference_policy, candidate_policy, probes, backend_report, cfg)` (the checks themselves);
probes come from `evalkit.fidelity.probes.load_probes(spec, cache_dir)`.
"""

from evalkit.fidelity.report import FidelityCheck, FidelityReport, LayerResult
from evalkit.fidelity.run import run_fidelity
from evalkit.fidelity.stage import fidelity_for_run

__all__ = ["FidelityCheck", "FidelityReport", "LayerResult", "fidelity_for_run", "run_fidelity"]
