"""Judge several comparisons as one family (the nightly's cells): one multiple-comparison adjustment.

Each comparison is evaluated on its own (evalkit.gate.judge.compare); the regression p-values of all
comparisons that could be evaluated are adjusted together with `gate.family_method` (Holm by default:
family-wise false alarms <= alpha under any dependence; "bh" bounds the false discovery rate instead,
for screening many cells), then each cell is decided on its adjusted p. Non-inferiority ("pass")
claims are per cell at level alpha; the family adjustment is about false alarms.
"""

from __future__ import annotations

from typing import Sequence

from evalkit import stats as S
from evalkit.errors import BadInput
from evalkit.gate.config import GateConfig
from evalkit.gate.judge import GateResult, compare, decide
from evalkit.gate.runs import StoredRun


def judge_family(pairs: Sequence[tuple[StoredRun | dict, StoredRun | dict]], cfg: GateConfig | None = None
                 ) -> list[GateResult | BadInput]:
    """One GateResult per (candidate, baseline), or the BadInput that stopped that comparison.

    The family is every comparison that could be evaluated; its size is stated in each result's `family`.
    """
    cfg = (cfg or GateConfig()).validate()
    comps: list = []
    for cand, base in pairs:
        try:
            comps.append(compare(cand, base, cfg))
        except BadInput as e:
            comps.append(e)
    ok = [c for c in comps if not isinstance(c, BadInput)]
    adjusted = S.adjust_pvalues([c.evidence.p_regression for c in ok], cfg.family_method)
    fam = {"method": cfg.family_method, "size": len(ok), "alpha": cfg.alpha}
    by_id = {id(c): float(p) for c, p in zip(ok, adjusted)}
    return [c if isinstance(c, BadInput) else decide(c, cfg, by_id[id(c)], fam) for c in comps]
