"""Sequential judging of paired episodes: anytime-valid tests checked as episodes finish (`gate.sequential`).

Each paired episode gives D = +1 (baseline succeeded, candidate failed: a "b" pair), -1 (the reverse, "c"),
or 0. The suite's drop is delta = E[D] = p10 - p01. Two test martingales run side by side:

- regression (H0: delta <= d0 = M/2): E_reg = mean over lambda of prod_i (1 + lambda (D_i - d0)), lambda in (0, 1/(1+d0))
- non-inferiority (H0: delta >= M):   E_ni  = mean over lambda of prod_i (1 + lambda (M - D_i)),  lambda in (0, 1/(1-M))

(a uniform mixture over a fixed grid of bets lambda). Under its H0 each is a nonnegative supermartingale
with E <= 1, so by Ville's inequality P(E ever reaches 1/a) <= a, whatever the stopping rule: the cell
stops with "regression" when E_reg >= 1/a (a = alpha / family_size) and with "pass" (non-inferior within
the margin M = gate.max_drop) when E_ni >= 2/alpha (half of alpha; the other half is kept for the final
analysis). The early regression stop asks for a drop shown above half the margin, d0 = M/2, not merely
above 0: a drop inside the allowance (say 2.5 pp of 5) shows "> 0" long before it shows "< M", and a
first-crossing rule on "> 0" would call most of them regressions. A drop shown > M/2 is also shown > 0
(E_reg with d0 > 0 is below the same mixture with d0 = 0 on every path), so the false-alarm guarantee
for an unchanged policy holds with room to spare.

Blocks, so that the suite's average is what is tested: episodes are grouped by init state id, one pair
per task in each block (block r = every task's episode r), and the martingales advance only over the
longest prefix of complete blocks, in block order. For independent episodes whose init states are
exchangeable within a task, a block's product has expectation prod_t (1 + lambda delta_t) <=
(1 + lambda mean_t delta_t)^T (AM-GM), so the test is about the suite's mean drop even when tasks differ,
and the order in which episodes happen to finish (a success ends sooner) cannot bias it. The rollout
engine must schedule episodes block by block (RolloutOptions.order="interleave") for early stops to
happen before most of the suite has run.

Final analysis: a cell that reaches the end without crossing either boundary is judged on all its pairs
with the exact McNemar statistic, at the level that is left: conditional on where the discordant pairs
fell, their signs are fair coins under H0 (delta <= 0; fewer b's when delta < 0), so a dynamic
programme over the signs gives exactly P(E_reg reached its boundary at some block end) and the tail of b
among the paths that did not; the p-value of the whole design is P(cross) + P(no cross, b >= b_obs).
Non-inferiority at the end: the fixed exact test (Tango, evalkit.stats) at level alpha/2, so that
P(pass | drop >= M) <= alpha/2 (interim, Ville) + alpha/2 (final) = alpha. Its null has a nuisance
parameter, so no exact "level left" exists for it as for McNemar; the even split is the simple valid choice.

Written here rather than taken from a library: no maintained Python package gives e-processes with this
two-sided design over paired binary data; the formulas are short and the tests check them by simulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
from scipy.special import logsumexp

from evalkit import stats as S
from evalkit.gate.config import GateConfig

N_BETS = 100  # grid of lambda values of each mixture (a discrete uniform prior: exact, no quadrature error)
NI_INTERIM_SHARE = 0.5  # share of alpha the interim non-inferiority boundary spends; the final test gets the rest
REGRESSION_STOP_SHARE = 0.5  # an early regression stop needs the drop shown above this share of the margin


def _bets_regression(above: float = 0.0) -> np.ndarray:
    return (np.arange(N_BETS) + 0.5) / N_BETS / (1 + above)  # midpoints of (0, 1/(1+d0)): every factor > 0


def _bets_noninferior(margin: float) -> np.ndarray:
    return (np.arange(N_BETS) + 0.5) / N_BETS / (1 - margin)  # midpoints of (0, 1/(1-M)): every factor > 0


def log_e_regression(b, c, n=None, above: float = 0.0) -> np.ndarray:
    """log E_reg for H0 "drop <= above" after n pairs of which b lost and c gained (vectorised).

    above = 0: McNemar's one-sided mixture likelihood ratio (concordant pairs leave it unchanged, n unused).
    """
    lam = _bets_regression(above)
    b = np.asarray(b, dtype=float)[..., None]
    c = np.asarray(c, dtype=float)[..., None]
    terms = b * np.log1p(lam * (1 - above)) + c * np.log1p(-lam * (1 + above))
    if above:
        terms = terms + (np.asarray(n, dtype=float)[..., None] - b - c) * np.log1p(-lam * above)
    return logsumexp(terms, axis=-1) - math.log(N_BETS)


def regression_stop_drop(cfg: GateConfig) -> float:
    """d0: the drop an early regression stop must show to be exceeded (REGRESSION_STOP_SHARE x margin)."""
    return REGRESSION_STOP_SHARE * cfg.max_drop


def log_e_noninferior(b, c, n, margin: float) -> np.ndarray:
    """log E_ni after n pairs of which b lost and c gained, for margin M (vectorised)."""
    lam = _bets_noninferior(margin)
    b = np.asarray(b, dtype=float)[..., None]
    c = np.asarray(c, dtype=float)[..., None]
    z = np.asarray(n, dtype=float)[..., None] - b - c
    terms = b * np.log1p(lam * (margin - 1)) + c * np.log1p(lam * (margin + 1)) + z * np.log1p(lam * margin)
    return logsumexp(terms, axis=-1) - math.log(N_BETS)


def thresholds(cfg: GateConfig) -> tuple[float, float, float]:
    """(per-cell regression level a, log threshold of E_reg, log threshold of E_ni)."""
    a = cfg.alpha / max(int(cfg.family_size), 1)
    return a, math.log(1 / a), math.log(1 / (cfg.alpha * NI_INTERIM_SHARE))


# ---------------------------------------------------------------------------------------------
# Final analysis: exact level left for McNemar at the end
# ---------------------------------------------------------------------------------------------


def crossing_k(m, n, log_thr: float, above: float) -> np.ndarray:
    """Smallest b that makes log E_reg(b, m - b, n) reach log_thr (m + 1: none), vectorised over (m, n).

    E_reg grows with b at fixed m and n, so a bisection over b finds it for every (m, n) at once.
    """
    m = np.asarray(m, dtype=int)
    n = np.asarray(n, dtype=float)
    lo = np.full(m.shape, -1)  # invariant: b = lo does not cross (or -1), b = hi crosses (or m + 1)
    hi = m + 1
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        act = hi - lo > 1
        mid_ok = np.clip(mid, 0, np.maximum(m, 0))
        hit = log_e_regression(mid_ok, m - mid_ok, n, above) >= log_thr
        lo = np.where(act & ~hit, mid, lo)
        hi = np.where(act & hit, mid, hi)
    return hi


def final_p_regression(b_final, m_final, check_m, check_n, level: float, above: float = 0.0):
    """p-value of the sequential design for cells that ended without crossing: P(cross) + P(no cross, b >= b_obs).

    Conditional on where the discordant pairs fell (their count m_k at each block end k, with n_k pairs
    then), the signs are fair coins under H0, so a dynamic programme over b after each discordant pair,
    absorbing paths where E_reg(b, m_k - b, n_k) reached the threshold at a block end, gives both terms
    exactly. Vectorised over runs: b_final, m_final (R,), check_m, check_n (R, B) block-end counts.
    """
    b_final = np.atleast_1d(np.asarray(b_final, dtype=int))
    m_final = np.atleast_1d(np.asarray(m_final, dtype=int))
    r = len(m_final)
    check_m = np.asarray(check_m, dtype=int).reshape(r, np.shape(check_m)[-1])
    check_n = np.asarray(check_n, dtype=float).reshape(r, np.shape(check_n)[-1])
    top = int(m_final.max()) if r else 0
    # per run and number of discordant pairs j: the smallest b that crosses at a block end with j discordant
    ks = np.full((r, top + 1), top + 2)
    if check_m.size:
        pairs, inv = np.unique(np.stack([check_m.ravel(), check_n.ravel()]), axis=1, return_inverse=True)
        kp = crossing_k(pairs[0], pairs[1], math.log(1 / level), above)[inv.ravel()].reshape(check_m.shape)
        rows = np.repeat(np.arange(r), check_m.shape[1])
        np.minimum.at(ks, (rows, np.minimum(check_m.ravel(), top)), kp.ravel())
    dist = np.zeros((r, top + 1))
    dist[:, 0] = 1.0
    cross = np.zeros(r)
    out = np.where(m_final == 0, 1.0, np.nan)
    k = np.arange(top + 1)[None, :]
    for j in range(1, top + 1):
        new = 0.5 * dist
        new[:, 1:] += 0.5 * dist[:, :-1]
        hit = k >= ks[:, j][:, None]
        cross += np.where(hit, new, 0.0).sum(axis=1)
        dist = np.where(hit, 0.0, new)
        done = m_final == j
        if done.any():
            tail = np.where(k >= b_final[:, None], dist, 0.0).sum(axis=1)
            out = np.where(done, np.minimum(1.0, cross + tail), out)
    return out


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
    blocks: int  # complete blocks in the prefix
    b: int  # lost pairs in the prefix at the decision (or in the whole prefix)
    c: int
    log_e_regression: float  # at the decision (or the maximum over the path)
    log_e_noninferior: float
    p_regression: float  # p-value of the design (see module docstring)
    p_noninferior_final: float  # final non-inferiority test's p (nan: not computed / decided before the end)
    pairs: int  # all paired episodes (the final analysis)
    b_all: int
    c_all: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def first_crossing(log_reg: np.ndarray, log_ni: np.ndarray, thr_reg: float, thr_ni: float) -> tuple[np.ndarray, np.ndarray]:
    """Index of the first block end where a boundary is crossed and which one, over the last axis.

    Returns (index, kind): kind 1 = pass (non-inferiority, checked first: a drop shown to be both > 0 and
    < margin is within the allowance), 2 = regression, 0 = none (index = -1).
    """
    ni = log_ni >= thr_ni
    reg = log_reg >= thr_reg
    any_ = ni | reg
    idx = np.where(any_.any(axis=-1), np.argmax(any_, axis=-1), -1)
    safe = np.maximum(idx, 0)[..., None]
    kind = np.where(idx < 0, 0, np.where(np.take_along_axis(ni, safe, -1)[..., 0], 1, 2))
    return idx, kind


@dataclass
class Paths:
    """Decisions of many block paths at once (the calibration bench) or of one run (`evaluate`)."""

    kind: np.ndarray  # 0 none, 1 pass (non-inferior: interim boundary, or the final test), 2 regression (interim)
    index: np.ndarray  # block index of an interim decision (-1: none, or decided by the final analysis)
    log_e_regression: np.ndarray  # at the decision, or the maximum over the path
    log_e_noninferior: np.ndarray
    p_regression: np.ndarray  # the design's p-value (module docstring)
    p_noninferior_final: np.ndarray  # the final non-inferiority test's p (nan: decided before the end / not final)


def decide_paths(cum_b: np.ndarray, cum_c: np.ndarray, cum_n: np.ndarray, b_all, c_all, cfg: GateConfig,
                 final: bool = True, n_all: int | None = None) -> Paths:
    """cum_*: counts at the end of each complete block (last axis = blocks, possibly length 0);
    b_all, c_all: lost/gained over all n_all pairs (the final analysis, when `final`). Same rule for one run
    and for a simulation. A final regression is not decided here: it needs the family's adjustment."""
    a, thr_reg, thr_ni = thresholds(cfg)
    d0 = regression_stop_drop(cfg)
    cum_b, cum_c, cum_n = (np.asarray(x, dtype=float) for x in (cum_b, cum_c, cum_n))
    shape = cum_b.shape[:-1]
    nan = np.full(shape, np.nan)
    b_all = np.broadcast_to(np.asarray(b_all, dtype=int), shape)
    m_all = b_all + np.broadcast_to(np.asarray(c_all, dtype=int), shape)
    flat = (int(np.prod(shape)), cum_b.shape[-1])
    p_end = (final_p_regression(b_all.ravel(), m_all.ravel(), (cum_b + cum_c).reshape(flat), cum_n.reshape(flat),
                                a, d0).reshape(shape) if final else nan)
    p_ni_end = nan
    if final and n_all:
        p_ni_end = np.broadcast_to(S.noninferiority_p_paired(b_all, c_all, int(n_all), cfg.max_drop), shape).astype(float)
    ni_end = p_ni_end <= cfg.alpha * (1 - NI_INTERIM_SHARE)
    if cum_b.shape[-1] == 0:
        z = np.zeros(shape)
        return Paths(np.where(ni_end, 1, 0), z.astype(int) - 1, z, z, p_end, p_ni_end)
    lr = log_e_regression(cum_b, cum_c, cum_n, d0)
    ln = log_e_noninferior(cum_b, cum_c, cum_n, cfg.max_drop)
    idx, kind = first_crossing(lr, ln, thr_reg, thr_ni)
    safe = np.maximum(idx, 0)[..., None]
    upto = np.arange(lr.shape[-1]) <= np.where(idx < 0, lr.shape[-1], idx)[..., None]
    lr_max = np.max(np.where(upto, lr, -np.inf), axis=-1)  # running max up to the decision (Ville)
    at_lr = np.where(idx < 0, lr_max, np.take_along_axis(lr, safe, -1)[..., 0])
    at_ln = np.where(idx < 0, ln.max(axis=-1), np.take_along_axis(ln, safe, -1)[..., 0])
    p = np.where(kind == 0, p_end, np.minimum(1.0, np.exp(-lr_max)))
    p_ni = np.where(kind == 0, p_ni_end, np.nan)
    return Paths(np.where((kind == 0) & ni_end, 1, kind), idx, at_lr, at_ln, p, p_ni)


def evaluate(base: dict[tuple[int, int], bool], cand: dict[tuple[int, int], bool], cfg: GateConfig,
             blocks: list[list[tuple[int, int]]] | None = None, final: bool = True) -> SequentialOutcome:
    """The sequential verdict of paired outcomes (dicts (task, init) -> success) under `cfg`.

    blocks: the plan (default: the baseline's episodes of the tasks the candidate ran). The path stops at
    the first planned block the candidate has not completed, so a run stopped early is read exactly as
    the stop rule read it. The same function serves the stop rule (during the run, final=False) and the
    judge (afterwards), so both reach the same decision on the same episodes.
    final: compute the final-analysis p-value when no boundary was crossed (the judge); the stop rule skips it.
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
    out = decide_paths(np.array([cum_b], dtype=float).reshape(1, -1), np.array([cum_c], dtype=float).reshape(1, -1),
                       np.array([cum_n], dtype=float).reshape(1, -1), np.array([b_all]), np.array([c_all]), cfg, final,
                       n_all=len(shared))
    kind, idx = int(out.kind[0]), int(out.index[0])
    at = idx if idx >= 0 else len(cum_n) - 1
    return SequentialOutcome(
        {0: None, 1: "pass", 2: "regression"}[kind], "interim" if idx >= 0 else ("final" if kind else None),
        cum_n[at] if cum_n else 0, at + 1 if cum_n else 0, cum_b[at] if cum_n else 0, cum_c[at] if cum_n else 0,
        float(out.log_e_regression[0]), float(out.log_e_noninferior[0]), float(out.p_regression[0]),
        float(out.p_noninferior_final[0]), len(shared), b_all, c_all,
    )


# ---------------------------------------------------------------------------------------------
# Stop rule for the rollout engine
# ---------------------------------------------------------------------------------------------


class SequentialStopRule:
    """Callable(records) -> reason | None for RolloutOptions.stop_rule (see `sequential_stop_rule`)."""

    def __init__(self, base: dict[tuple[int, int], bool], blocks: list[list[tuple[int, int]]], cfg: GateConfig, suite: str):
        self.base, self.blocks, self.cfg, self.suite = base, blocks, cfg, suite
        self.outcome: SequentialOutcome | None = None

    def __call__(self, records: list) -> str | None:
        cand = {(int(r.task_id), int(r.init_state_id)): bool(r.success) for r in records
                if getattr(r, "suite", self.suite) == self.suite and (int(r.task_id), int(r.init_state_id)) in self.base}
        out = evaluate(self.base, cand, self.cfg, self.blocks, final=False)
        self.outcome = out
        if out.decision is None:
            return None
        a, _, _ = thresholds(self.cfg)
        if out.decision == "regression":
            return (f"sequential gate: regression (drop shown > {regression_stop_drop(self.cfg):.3g}) after "
                    f"{out.pairs_at_decision} paired episodes ({out.b} lost, {out.c} gained; "
                    f"E = {math.exp(out.log_e_regression):.3g} >= 1/{a:.3g})")
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
    it evaluates the same blocks with `evaluate`. The rule costs about a millisecond per finished episode
    (500-episode suite) and keeps its last SequentialOutcome in `.outcome`.
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
