"""How many episodes a candidate needs before the gate can decide against a given baseline.

`python -m evalkit.gate plan baseline=RUN [margin=0.05] [alpha=0.05] [power=0.8] [family_size=1]`

Paired baselines (with an episode table): the episodes the exact McNemar test needs to catch a drop of
`margin` with probability >= power, for a range of discordances (how often baseline and candidate
disagree on an episode; unknown before the candidate runs, so several are shown, up to what independent
outcomes with the baseline's per-task rates would give). By symmetry this is also about what it takes to
show non-inferiority within `margin` when nothing changed. Pairs cannot exceed the baseline's episodes.
Unpaired baselines (a reference: only a count): candidate episodes for the one-sided Fisher test.
Numbers are exact power computations (evalkit.stats), for the fixed-size test; a sequential run
(gate.sequential) with this maximum size usually stops earlier; its power at small drops is the same with
correlated paired outcomes and up to about 0.08 lower when outcomes are independent (docs/gate_statistics.md
has the calibration).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from evalkit import stats as S
from evalkit.errors import BadInput
from evalkit.gate.runs import StoredRun

DISCORDANCES = (0.02, 0.05, 0.1, 0.2)


@dataclass
class PlanRow:
    label: str
    discordance: float | None
    episodes: int | None  # None: not reachable (unpaired: not against this baseline sample)
    note: str = ""


@dataclass
class Plan:
    baseline: str
    mode: str  # paired | unpaired
    baseline_episodes: int
    baseline_rate: float
    margin: float
    alpha: float  # per comparison (alpha / family_size)
    power: float
    rows: list[PlanRow] = field(default_factory=list)


def plan(baseline: StoredRun, margin: float = 0.05, alpha: float = 0.05, power: float = 0.8, family_size: int = 1) -> Plan:
    a = alpha / max(int(family_size), 1)
    eps = baseline.episodes
    if eps is not None and len(eps):
        n_b = len(eps)
        rate = float(eps["success"].astype(bool).mean())
        per_task = eps.groupby("task_id")["success"].mean().to_numpy(dtype=float) if "task_id" in eps.columns else np.array([rate])
        independent = float(np.mean(2 * per_task * (1 - per_task)))
        out = Plan(baseline.ref, "paired", n_b, rate, margin, a, power)
        for psi in sorted(set(DISCORDANCES) | {round(independent, 4)}):
            if psi / 2 + margin > rate + 1e-12:
                continue  # a drop of `margin` on top of this discordance is impossible at this baseline rate
            n = S.episodes_needed_paired(margin, a, power, psi)
            note = "independent outcomes at the baseline's per-task rates" if abs(psi - round(independent, 4)) < 1e-12 else ""
            if n is not None and n > n_b:
                note = (note + "; " if note else "") + f"more than the baseline's {n_b} episodes: rerun the baseline larger"
            out.rows.append(PlanRow(f"paired, discordance {psi:.3f}", psi, n, note))
        return out
    counts = baseline.summary.episode_counts()
    if counts is None:
        raise BadInput(f"baseline {baseline.ref} has no episode count in its summary")
    x_b, n_b = counts
    rate = x_b / n_b
    lo, hi = S.wilson_interval(x_b, n_b)
    out = Plan(baseline.ref, "unpaired", n_b, rate, margin, a, power)
    for label, r in (("observed rate", rate), ("conservative rate (95% interval)", min(max(0.5, lo), hi))):
        f = lambda n: S.power_unpaired(n, n_b, r, margin, a) >= power  # noqa: E731
        n_hi = 4 * n_b
        if not f(n_hi):
            out.rows.append(PlanRow(f"unpaired, {label} {r:.3f}", None, None,
                                    f"not reachable with {n_b} baseline episodes: the baseline's own uncertainty dominates"))
            continue
        n_lo = 1
        while n_hi - n_lo > 1:
            mid = (n_lo + n_hi) // 2
            n_lo, n_hi = (n_lo, mid) if f(mid) else (mid, n_hi)
        out.rows.append(PlanRow(f"unpaired, {label} {r:.3f}", None, n_hi))
    return out


def format_plan(p: Plan) -> str:
    lines = [
        f"plan against {p.baseline} ({p.mode}; {p.baseline_episodes} baseline episodes, success {p.baseline_rate:.1%})",
        f"to catch a drop of {p.margin} with probability >= {p.power} at level {p.alpha:.3g} (fixed-size test):",
    ]
    for r in p.rows:
        n = "not reachable" if r.episodes is None else f"{r.episodes} episodes"
        lines.append(f"  {r.label:<48} {n:>16}" + (f"   ({r.note})" if r.note else ""))
    if p.mode == "paired":
        lines.append("discordance: the fraction of episodes where baseline and candidate disagree (a run reports it as "
                     "lost + gained pairs); a quantized policy on the same seeds usually sits well below independent outcomes.")
    return "\n".join(lines)
