"""Sequential judging of paired episodes: a group-sequential test checked after every block (`gate.sequential`).

Each paired episode is a "b" pair (baseline succeeded, candidate failed), a "c" pair (the reverse) or
concordant. The cell can stop at the end of every complete block (one pair per task, see below) with:

- **regression**: the lost pairs b cross the boundary of a group-sequential sign test. Conditional on
  where the m = b + c discordant pairs fell, an unchanged policy makes their signs fair coins (the
  exact McNemar argument), so the probability that the sign walk crosses given boundaries is computed
  exactly by a dynamic programme over b, one discordant pair at a time. The boundary at each look is
  the smallest b whose crossing probability, added to that of the earlier looks, stays within the
  alpha-spending function a * SPEND_SHARE * (1 - exp(-m / SPEND_SCALE)) of the discordant pairs seen (a
  = alpha / family_size; an exponential spending function on the information scale m, the count the
  sign test's power depends on). It depends only on the pairs seen, never on how many the run
  planned, so the stop rule and the judge draw the same boundaries for any suite size. An early stop
  also needs the observed drop (b - c) / n >= REGRESSION_STOP_SHARE x margin: a drop inside the
  allowance (say 2.5 pp of 5) shows "> 0" long before it shows "< margin", and without this condition
  the first crossing would call it a regression before non-inferiority had a chance. The condition only
  shrinks the stopping region; the dynamic programme counts the region actually used, and what a look
  does not spend stays available to later looks (Lan-DeMets).
- **pass** (non-inferior within the margin M = gate.max_drop): the anytime-valid test martingale
  E_ni = mean over a grid of bets lambda in (0, 1/(1 - M)) of prod_i (1 + lambda (M - D_i)), D = +1 for a
  b pair, -1 for a c pair, 0 otherwise, reaches 1 / (alpha NI_INTERIM_SHARE). Under "drop >= M" it is a
  nonnegative supermartingale, so by Ville's inequality a false pass at any look has probability
  <= alpha NI_INTERIM_SHARE whatever the nuisance discordance. (The null of non-inferiority has that
  nuisance parameter, so no exact conditional boundary exists for it as for the sign test.) At a look
  where both boundaries are crossed the pass wins (a drop shown > 0 and < M is within the allowance);
  the regression boundaries are computed as if the pass boundary did not exist (non-binding), which
  only makes them conservative.

Final analysis (a cell that ran all its episodes without crossing): regression is exact McNemar on all
pairs at the level the interim looks left: the design's p-value orders outcomes by the look at which
they crossed, then by b (stagewise ordering), p = P(crossed at a look) + P(no crossing, b_all >= b_obs),
exact from the same dynamic programme; an interim stop reports P(crossed at an earlier look) +
P(reached that look, b >= b_obs). Either is a valid p-value at every level, so the family's adjustment
(Holm) can use it; a cell stopped by the pass boundary reports p = 1 (its regression test ended without
a claim). Non-inferiority at the end: the fixed exact test (Tango, evalkit.stats) at level
alpha (1 - NI_INTERIM_SHARE), so P(pass | drop >= M) <= alpha overall.

Blocks: episodes are grouped by init state id, one pair per task in each block (block r = every task's
episode r), and the looks happen only at the end of the longest prefix of complete blocks, in block
order: what each look contains is fixed in advance, so the order in which episodes happen to finish
(a success ends sooner) cannot select the pairs, and every look weighs the tasks equally. The sign test
needs nothing more (it conditions on the pairs); for the pass boundary, a block's factor has expectation
prod_t (1 + lambda (M - drop_t)) <= (1 + lambda (M - mean drop))^T (AM-GM) when init states are
exchangeable within a task, so it is about the suite's mean drop. The rollout engine schedules episodes
block by block (RolloutOptions.order="interleave").

Written here rather than taken from a library: the maintained group-sequential packages (R's gsDesign,
rpact, ldbounds) compute normal-approximation boundaries for a planned maximum information; none, and
no Python package, computes exact boundaries of the conditional sign test on an open information scale.
The recursion is short and the tests check it against brute-force enumeration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp

from evalkit import stats as S
from evalkit.gate.config import GateConfig

# Regression boundary: exponential alpha spending on the discordant-pair count m. The share and the
# scale trade early stops on large drops against power on small ones at the end (bench/gate_calibration.py
# and docs/gate_statistics.md show the trade-off they were chosen from).
SPEND_SHARE = 0.55  # share of the per-cell level the interim looks may spend in all
SPEND_SCALE = 16.0  # discordant pairs: 63 % of that share is spent by SPEND_SCALE discordant pairs
REGRESSION_STOP_SHARE = 1.0  # an early regression stop needs the observed drop >= this share of the margin
N_BETS = 100  # grid of lambda values of the non-inferiority mixture (a discrete uniform prior: exact)
NI_INTERIM_SHARE = 0.5  # share of alpha the interim non-inferiority boundary spends; the final test gets the rest
_TOL = 1e-9  # relative slack on budget comparisons (float sums of the same probabilities)


def spending(m, level: float) -> np.ndarray:
    """Cumulative type I error the interim looks may spend once m discordant pairs are in (vectorised)."""
    return level * SPEND_SHARE * -np.expm1(-np.asarray(m, dtype=float) / SPEND_SCALE)


def regression_stop_drop(cfg: GateConfig) -> float:
    """d0: the observed drop an early regression stop needs besides the boundary (REGRESSION_STOP_SHARE x margin)."""
    return REGRESSION_STOP_SHARE * cfg.max_drop


def levels(cfg: GateConfig) -> tuple[float, float]:
    """(per-cell regression level a = alpha / family_size, log threshold of the interim E_ni)."""
    a = cfg.alpha / max(int(cfg.family_size), 1)
    return a, math.log(1 / (cfg.alpha * NI_INTERIM_SHARE))


def log_e_noninferior(b, c, n, margin: float) -> np.ndarray:
    """log E_ni after n pairs of which b lost and c gained, for margin M (vectorised)."""
    lam = (np.arange(N_BETS) + 0.5) / N_BETS / (1 - margin)  # midpoints of (0, 1/(1-M)): every factor > 0
    b = np.asarray(b, dtype=float)[..., None]
    c = np.asarray(c, dtype=float)[..., None]
    z = np.asarray(n, dtype=float)[..., None] - b - c
    terms = b * np.log1p(lam * (margin - 1)) + c * np.log1p(lam * (margin + 1)) + z * np.log1p(lam * margin)
    return logsumexp(terms, axis=-1) - math.log(N_BETS)


# ---------------------------------------------------------------------------------------------
# Regression: exact group-sequential sign test
# ---------------------------------------------------------------------------------------------


@dataclass
class RegressionPaths:
    """The regression side of many runs at once (one row per run)."""

    index: np.ndarray  # block index of the first look whose boundary b reached (-1: none)
    boundary: np.ndarray  # lost pairs the boundary needed at that look, or at the last look (-1: no look)
    spent: np.ndarray  # P(crossing at a look up to that one | discordant positions), under an unchanged policy
    p: np.ndarray  # the design's p-value: stagewise at a crossing, final otherwise (nan: final not computed)


def regression_paths(cum_b, cum_m, cum_n, b_all, m_all, level: float, drop_stop: float = 0.0,
                     final: bool = True) -> RegressionPaths:
    """Looks at every block end (cum_*: counts there, shape (runs, blocks)); b_all, m_all over all pairs.

    A dynamic programme over the discordant pairs, vectorised over runs: `dist[r, b]` is the probability,
    under fair signs, of b lost pairs among the first j discordant ones and no crossing yet. At a look (the
    first block end with m = j: later block ends with the same m cannot cross where it did not, since b
    is the same and the budget too) the boundary is the smallest K with P(b >= K) <= spending(j) - spent,
    raised to the early-stop drop condition b - c >= drop_stop n; the mass beyond it is absorbed.
    """
    cum_b = np.asarray(cum_b, dtype=int)
    cum_m = np.asarray(cum_m, dtype=int)
    cum_n = np.asarray(cum_n, dtype=float)
    r, nb = cum_b.shape
    b_all = np.broadcast_to(np.asarray(b_all, dtype=int), (r,))
    m_all = np.broadcast_to(np.asarray(m_all, dtype=int), (r,))
    top = int(max(m_all.max(initial=0), cum_m.max(initial=0)))
    rows = np.arange(r)
    look = np.zeros((r, top + 1), bool)
    look_k = np.full((r, top + 1), -1)
    look_n = np.zeros((r, top + 1))
    look_b = np.zeros((r, top + 1), int)
    for k in range(nb - 1, -1, -1):  # backwards: the first block end with each m is the one kept
        j = cum_m[:, k]
        look[rows, j], look_k[rows, j], look_n[rows, j], look_b[rows, j] = True, k, cum_n[:, k], cum_b[:, k]
    budget = spending(np.arange(top + 1), level)
    dist = np.zeros((r, top + 2))  # one spare column: tail[:, j + 1] = 0 means "cannot cross"
    dist[:, 0] = 1.0
    spent = np.zeros(r)
    index = np.full(r, -1)
    bound = np.full(r, -1)
    p = np.full(r, np.nan)
    at_cross = np.zeros(r)
    last_spend = np.zeros(r, dtype=int)
    ks = np.arange(top + 2)
    for j in range(top + 1):
        if j:
            dist[:, 1:j + 1] = 0.5 * (dist[:, 1:j + 1] + dist[:, :j])
            dist[:, 0] *= 0.5
        live = np.flatnonzero(look[:, j] & (index < 0))
        if len(live):
            d = dist[live, : j + 2]
            tail = np.cumsum(d[:, ::-1], axis=1)[:, ::-1]  # tail[b] = P(b' >= b, not crossed); tail[j + 1] = 0
            room = budget[j] - spent[live]
            fits = tail <= room[:, None] * (1 + _TOL)
            fits[:, j + 1] = True
            k_spend = np.argmax(fits, axis=1)
            k = np.minimum(np.maximum(k_spend, _drop_bound(j, look_n[live, j], drop_stop)), j + 1)
            bound[live] = np.where(k <= j, k, -1)
            last_spend[live] = k_spend
            ob = look_b[live, j]
            hit = ob >= k
            sel = live[hit]
            index[sel] = look_k[sel, j]
            p[sel] = spent[sel] + tail[np.flatnonzero(hit), ob[hit]]
            at_cross[sel] = spent[sel] + tail[np.flatnonzero(hit), k[hit]]
            spent[live] += tail[np.arange(len(live)), k]
            dist[live, : j + 2] = np.where(ks[None, : j + 2] >= k[:, None], 0.0, d)
        if final:
            done = np.flatnonzero((m_all == j) & (index < 0))
            if len(done):
                tail = np.cumsum(dist[done, : j + 2][:, ::-1], axis=1)[:, ::-1]
                p[done] = np.minimum(1.0, spent[done] + tail[np.arange(len(done)), b_all[done]])
    if final:
        p[(m_all == 0) & (index < 0)] = 1.0  # no discordant pair at all: no evidence
    if nb:  # no crossing: the boundary of the last block end (same spending as the first one with its m)
        k = np.maximum(last_spend, _drop_bound(cum_m[:, -1], cum_n[:, -1], drop_stop))
        bound = np.where(index >= 0, bound, np.where(k <= cum_m[:, -1], k, -1))
    return RegressionPaths(index, bound, np.where(index >= 0, at_cross, spent), p)


def _drop_bound(m, n, drop_stop: float):
    """Smallest b with b - (m - b) >= drop_stop n: the early-stop condition on the observed drop, as a bound on b."""
    return np.ceil((np.asarray(m) + drop_stop * np.asarray(n)) / 2 - 1e-9).astype(int)


# ---------------------------------------------------------------------------------------------
# Blocks and the path of a run
# ---------------------------------------------------------------------------------------------


def plan_blocks(keys: Iterable[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Blocks of the plan: for each init state id (ascending), every task's episode with that id.

    An init state id that some task lacks cannot form a balanced block and is left out of the
    sequential path (its pairs still count in the final analysis).
    """
    keys = {(int(t), int(i)) for t, i in keys}
    tasks = sorted({t for t, _ in keys})
    inits = sorted({i for _, i in keys})
    return [[(t, i) for t in tasks] for i in inits if all((t, i) in keys for t in tasks)]


@dataclass
class SequentialOutcome:
    decision: str | None  # "pass" | "regression" | None (no boundary crossed, final test not shown)
    stage: str | None  # "interim" (a boundary, the run could stop) | "final" (the final test) | None
    pairs_at_decision: int  # paired episodes in the complete-block prefix when it was decided (or in the prefix)
    blocks: int  # complete blocks in the prefix (up to the decision)
    b: int  # lost pairs in the prefix at the decision (or in the whole prefix)
    c: int
    regression_boundary: int  # lost pairs the regression boundary needed at that look, or at the last look (-1: none)
    alpha_spent: float  # P(an unchanged policy crosses at a look up to that one), given the discordant positions
    log_e_noninferior: float  # at the decision, or the maximum over the path
    p_regression: float  # the design's p-value (module docstring)
    p_noninferior_final: float  # final non-inferiority test's p (nan: not computed / decided before the end)
    pairs: int  # all paired episodes (the final analysis)
    b_all: int
    c_all: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def describe(self, cfg: GateConfig) -> str:
        """How the sequential test reached its decision, for the gate's explanation."""
        a, thr_ni = levels(cfg)
        need = (f"boundary b >= {self.regression_boundary}" if self.regression_boundary >= 0
                else "boundary not reachable")
        if self.stage == "interim":
            what = (f"regression (boundary crossed, observed drop >= {regression_stop_drop(cfg):.3g})"
                    if self.decision == "regression" else f"non-inferior within {cfg.max_drop}")
            return (f"decided '{what}' after {self.pairs_at_decision} pairs ({self.blocks} complete blocks: "
                    f"{self.b} lost, {self.c} gained; regression {need}, alpha spent {self.alpha_spent:.3g} of {a:.3g}; "
                    f"E_ni {math.exp(self.log_e_noninferior):.3g} vs {math.exp(thr_ni):.3g})")
        return (f"no boundary crossed in {self.blocks} complete blocks ({self.pairs_at_decision} pairs; last look's "
                f"regression {need}, alpha spent {self.alpha_spent:.3g} of {a:.3g}; max E_ni "
                f"{math.exp(self.log_e_noninferior):.3g} < {math.exp(thr_ni):.3g}); final analysis on all {self.pairs} "
                f"pairs: McNemar at the level left, non-inferiority (Tango, exact) p = {self.p_noninferior_final:.4g} "
                f"vs {cfg.alpha * (1 - NI_INTERIM_SHARE):.3g}")


@dataclass
class Paths:
    """Decisions of many block paths at once (the calibration bench) or of one run (`evaluate`)."""

    kind: np.ndarray  # 0 none, 1 pass (non-inferiority: interim boundary, or the final test), 2 regression (interim)
    index: np.ndarray  # block index of an interim decision (-1: none, or decided by the final analysis)
    regression_boundary: np.ndarray  # lost pairs the boundary needed at the decision, or at the last look (-1: none)
    alpha_spent: np.ndarray  # regression crossing probability up to the decision (or over all looks)
    log_e_noninferior: np.ndarray  # at the decision, or the maximum over the path
    p_regression: np.ndarray  # the design's p-value (module docstring)
    p_noninferior_final: np.ndarray  # the final non-inferiority test's p (nan: decided before the end / not final)


def decide_paths(cum_b: np.ndarray, cum_c: np.ndarray, cum_n: np.ndarray, b_all, c_all, cfg: GateConfig,
                 final: bool = True, n_all: int | None = None) -> Paths:
    """cum_*: counts at the end of each complete block (last axis = blocks, possibly length 0);
    b_all, c_all: lost/gained over all n_all pairs (the final analysis, when `final`). Same rule for one run
    and for a simulation. A final regression is not decided here: it needs the family's adjustment."""
    a, thr_ni = levels(cfg)
    cum_b, cum_c, cum_n = (np.asarray(x, dtype=float) for x in (cum_b, cum_c, cum_n))
    shape = cum_b.shape[:-1]
    nb = cum_b.shape[-1]
    flat = (int(np.prod(shape)), nb)
    b_all = np.broadcast_to(np.asarray(b_all, dtype=int), shape)
    m_all = b_all + np.broadcast_to(np.asarray(c_all, dtype=int), shape)
    reg = regression_paths(cum_b.reshape(flat), (cum_b + cum_c).reshape(flat), cum_n.reshape(flat), b_all.ravel(),
                           m_all.ravel(), a, regression_stop_drop(cfg), final)
    reg_idx, bound, spent, p = (x.reshape(shape) for x in (reg.index, reg.boundary, reg.spent, reg.p))
    p_ni_end = np.full(shape, np.nan)
    if final and n_all:
        p_ni_end = np.broadcast_to(S.noninferiority_p_paired(b_all, m_all - b_all, int(n_all), cfg.max_drop),
                                   shape).astype(float)
    ni_end = p_ni_end <= cfg.alpha * (1 - NI_INTERIM_SHARE)
    if nb == 0:
        z = np.zeros(shape)
        return Paths(np.where(ni_end, 1, 0), z.astype(int) - 1, bound, spent, z, p, p_ni_end)
    ln = log_e_noninferior(cum_b, cum_c, cum_n, cfg.max_drop)
    ni = ln >= thr_ni
    ni_idx = np.where(ni.any(axis=-1), np.argmax(ni, axis=-1), -1)
    # pass first at a look where both are crossed; otherwise the earlier of the two
    is_pass = (ni_idx >= 0) & ((reg_idx < 0) | (ni_idx <= reg_idx))
    is_reg = (reg_idx >= 0) & ~is_pass
    idx = np.where(is_pass, ni_idx, np.where(is_reg, reg_idx, -1))
    kind = np.where(is_pass, 1, np.where(is_reg, 2, 0))
    upto = np.arange(nb) <= np.where(idx < 0, nb, idx)[..., None]
    at_ln = np.max(np.where(upto, ln, -np.inf), axis=-1)
    # a cell stopped by the pass boundary ended its regression test without a decision: p = 1 (no claim)
    p_out = np.where(is_pass, 1.0, p if final else np.where(is_reg, p, np.nan))
    p_ni = np.where(kind == 0, p_ni_end, np.nan)
    return Paths(np.where((kind == 0) & ni_end, 1, kind), idx, bound, spent, at_ln, p_out, p_ni)


def evaluate(base: dict[tuple[int, int], bool], cand: dict[tuple[int, int], bool], cfg: GateConfig,
             blocks: list[list[tuple[int, int]]] | None = None, final: bool = True) -> SequentialOutcome:
    """The sequential verdict of paired outcomes (dicts (task, init) -> success) under `cfg`.

    blocks: the plan (default: the baseline's episodes of the tasks the candidate ran). The path stops at
    the first planned block the candidate has not completed, so a run stopped early is read exactly as
    the stop rule read it. The same function serves the stop rule (during the run, final=False) and the
    judge (afterwards), so both reach the same decision on the same episodes.
    final: compute the final analysis when no boundary was crossed (the judge); the stop rule skips it.
    """
    if blocks is None:
        tasks = {t for t, _ in cand}
        blocks = plan_blocks(k for k in base if k[0] in tasks)
    cum_b, cum_c, cum_n = [], [], []
    b = c = n = 0
    for blk in blocks:
        if not all(k in cand for k in blk):
            break
        for k in blk:
            d = int(base[k]) - int(cand[k])
            b += d > 0
            c += d < 0
        n += len(blk)
        cum_b.append(b)
        cum_c.append(c)
        cum_n.append(n)
    shared = [k for k in cand if k in base]
    b_all = sum(base[k] and not cand[k] for k in shared)
    c_all = sum(cand[k] and not base[k] for k in shared)
    cb, cc, cn = (np.array(x, dtype=float).reshape(1, -1) for x in (cum_b, cum_c, cum_n))
    out = decide_paths(cb, cc, cn, np.array([b_all]), np.array([c_all]), cfg, final, n_all=len(shared))
    kind, idx = int(out.kind[0]), int(out.index[0])
    at = idx if idx >= 0 else len(cum_n) - 1
    return SequentialOutcome(
        {0: None, 1: "pass", 2: "regression"}[kind], "interim" if idx >= 0 else ("final" if kind else None),
        cum_n[at] if cum_n else 0, at + 1 if cum_n else 0, cum_b[at] if cum_n else 0, cum_c[at] if cum_n else 0,
        int(out.regression_boundary[0]), float(out.alpha_spent[0]), float(out.log_e_noninferior[0]),
        float(out.p_regression[0]), float(out.p_noninferior_final[0]), len(shared), b_all, c_all,
    )


# ---------------------------------------------------------------------------------------------
# Stop rule for the rollout engine
# ---------------------------------------------------------------------------------------------


class SequentialStopRule:
    """Callable(records) -> reason | None for RolloutOptions.stop_rule (see `sequential_stop_rule`)."""

    def __init__(self, base: dict[tuple[int, int], bool], blocks: list[list[tuple[int, int]]], cfg: GateConfig, suite: str):
        self.base, self.blocks, self.cfg, self.suite = base, blocks, cfg, suite
        self.outcome: SequentialOutcome | None = None
        self._prefix = -1  # complete blocks when `outcome` was computed: looks happen only when it grows

    def __call__(self, records: list) -> str | None:
        cand = {(int(r.task_id), int(r.init_state_id)): bool(r.success) for r in records
                if getattr(r, "suite", self.suite) == self.suite and (int(r.task_id), int(r.init_state_id)) in self.base}
        prefix = next((i for i, blk in enumerate(self.blocks) if not all(k in cand for k in blk)), len(self.blocks))
        if prefix != self._prefix or self.outcome is None:
            self.outcome = evaluate(self.base, cand, self.cfg, self.blocks, final=False)
            self._prefix = prefix
        out = self.outcome
        if out.decision is None:
            return None
        if out.decision == "regression":
            return (f"sequential gate: regression after {out.pairs_at_decision} paired episodes ({out.b} lost, "
                    f"{out.c} gained; boundary b >= {out.regression_boundary}, design p = {out.p_regression:.3g})")
        return (f"sequential gate: non-inferior within {self.cfg.max_drop} after {out.pairs_at_decision} paired "
                f"episodes ({out.b} lost, {out.c} gained; E = {math.exp(out.log_e_noninferior):.3g} >= "
                f"{1 / (self.cfg.alpha * NI_INTERIM_SHARE):.3g})")


def sequential_stop_rule(baseline_run, cfg: GateConfig | dict | None, suite) -> Callable[[list], str | None] | None:
    """Stop rule that ends a run's rollouts once the sequential gate has decided; None when it cannot apply.

    baseline_run: the StoredRun the run will be judged against (evalkit.gate.runs.load_run, resolved
    before the rollouts). cfg: the run's GateConfig (or the `gate` dict). suite: the run's SuiteSpec
    (preferred: its `episodes()` define the plan) or the suite name (the plan is then every baseline
    episode of that suite).

    Returns None, and the run goes on with its fixed size, when `cfg.sequential` is false, when the
    baseline has no episode table (a `ref:` baseline: nothing to pair with) or when fewer than one block
    of pairs is possible. The judge then uses the fixed-size tests and says why in its explanation.

    How run.py calls it (after the baseline is resolved, before the rollouts):

        rule = sequential_stop_rule(baseline_run, gate_cfg, spec)
        options = RolloutOptions(..., stop_rule=rule, order="interleave" if rule else "task")
        result = run_rollouts(policy, spec, journal, options, on_record=...)
        if result.stop_reason:  # recorded for people; the judge re-derives the decision from the episodes
            summary.rollout_stop = RolloutStop(result.stop_reason, result.not_run)

    The judge (gate_run with the same GateConfig) then reaches the same decision from the episode table:
    it evaluates the same blocks with `evaluate` (the boundaries depend only on the pairs seen, not on the
    plan's size). The rule re-evaluates only when a block completes (a few milliseconds on a 500-episode
    suite) and keeps its last SequentialOutcome in `.outcome`.
    """
    cfg = GateConfig.from_dict(cfg)
    cfg.validate()
    if not cfg.sequential:
        return None
    eps = getattr(baseline_run, "episodes", None)
    if eps is None or not len(eps) or not {"task_id", "init_state_id", "success"} <= set(eps.columns):
        return None
    name = suite if isinstance(suite, str) else suite.name
    rows = eps[eps["suite"] == name] if "suite" in eps.columns else eps
    base = {(int(t), int(i)): bool(s) for t, i, s in zip(rows["task_id"], rows["init_state_id"], rows["success"])}
    keys = list(base)
    if not isinstance(suite, str) and hasattr(suite, "episodes"):
        keys = [tuple(map(int, k)) for k in suite.episodes() if tuple(map(int, k)) in base]
    blocks = plan_blocks(keys)
    if not blocks:
        return None
    base = {k: base[k] for k in keys}
    return SequentialStopRule(base, blocks, cfg, name)
