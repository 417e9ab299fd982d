"""Statistics behind every number evalkit shows and every verdict the gate gives.

Conventions: "drop" is baseline rate minus candidate rate (positive = candidate worse); `margin` is the
non-inferiority margin (`gate.max_drop`). Every test here is exact or conservative: its false-alarm rate
is at most its level for every value of the nuisance parameters, not only asymptotically.

Tests (what each p-value means, docs/gate_statistics.md has the error rates):
- paired regression: exact McNemar (conditional binomial on the discordant pairs), H1 "candidate worse";
- paired non-inferiority: Tango's score statistic for a paired difference with a margin, made exact
  unconditional (p = sup over the nuisance discordance of the tail probability), H1 "drop < margin";
- unpaired regression: Fisher's exact test, one-sided (conditional on the total successes);
- unpaired non-inferiority: the Farrington–Manning score statistic with a margin, exact unconditional
  (Chan's test), H1 "drop < margin";
- family-wise adjustment: Holm (FWER), Benjamini–Hochberg (FDR, screening), Bonferroni.

scipy.stats does the distributions (binom, hypergeom, beta, bootstrap). Written here, and why:
- Holm/BH/Bonferroni adjusted p-values (a few lines; statsmodels' `multipletests` gives the same numbers
  and is a dev dependency only, tests compare the two);
- the exact unconditional tests with a margin: scipy has none (its `boschloo_exact`/`barnard_exact` have
  no margin and give one p-value per call, 1.6 s at 500 x 500), and the gate needs the whole rejection
  region for exact power, planning and the calibration bench. We compute the p-value of every table of
  a design at once (`_sup_tail`): order tables by the statistic, sum the probability of each prefix, take
  the largest over a fixed grid of nuisance values. The grid is part of the test's definition (the same
  grid for p-values, regions and power), so a decision and its reported p-value always agree;
- Tango's restricted maximum likelihood (closed form, a quadratic) and the Farrington–Manning one (a cubic);
  tests check both against a numerical maximisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import special, stats


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0 (nothing is known)."""
    if n == 0:
        return 0.0, 1.0
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def binomial_upper(x: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper–Pearson upper bound of a binomial proportion (1.0 when x == n or n == 0)."""
    if n <= 0 or x >= n:
        return 1.0
    return float(stats.beta.ppf(confidence, x + 1, n - x))


# ---------------------------------------------------------------------------------------------
# Multiple comparisons
# ---------------------------------------------------------------------------------------------

FAMILY_METHODS = ("holm", "bh", "bonferroni", "none")


def adjust_pvalues(p, method: str = "holm") -> np.ndarray:
    """Adjusted p-values of a family (reject the hypotheses whose adjusted p <= alpha).

    holm: Holm's step-down, family-wise error <= alpha under any dependence.
    bh: Benjamini–Hochberg step-up, false discovery rate <= alpha (independent or positively dependent
        p-values); when every hypothesis is true it also bounds the family-wise error. For screening.
    bonferroni: m * p. none: p unchanged.
    """
    p = np.asarray(p, dtype=float)
    m = p.size
    if method not in FAMILY_METHODS:
        raise ValueError(f"unknown family method {method!r}; valid: {', '.join(FAMILY_METHODS)}")
    if m == 0 or method == "none":
        return p.copy()
    if method == "bonferroni":
        return np.minimum(1.0, m * p)
    order = np.argsort(p, kind="stable")
    ps = p[order]
    if method == "holm":  # adj_(i) = max_{j <= i} (m - j + 1) p_(j)
        adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * ps))
    else:  # bh: adj_(i) = min_{j >= i} m p_(j) / j
        adj = np.minimum.accumulate((m * ps / np.arange(1, m + 1))[::-1])[::-1]
        adj = np.minimum(adj, 1.0)
    out = np.empty(m)
    out[order] = adj
    return out


# ---------------------------------------------------------------------------------------------
# Paired episodes: exact McNemar on the discordant pairs (regression test)
# ---------------------------------------------------------------------------------------------


def mcnemar_exact(b: int, c: int, alternative: str = "greater") -> float:
    """Exact McNemar p-value from the discordant counts.

    b: pairs where the baseline succeeded and the candidate failed; c: the reverse.
    Conditional on m = b + c, b ~ Binomial(m, 1/2) when both policies are equally good.
    alternative "greater": H1 candidate worse (b > c); "less": candidate better; "two-sided".
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be >= 0")
    if b + c == 0:
        return 1.0  # no discordant pair: no evidence either way
    if alternative == "greater":
        return float(mcnemar_p(b, c))
    return float(stats.binomtest(b, b + c, 0.5, alternative=alternative).pvalue)


def mcnemar_p(b, c) -> np.ndarray:
    """One-sided exact McNemar p-value P(Binomial(b + c, 1/2) >= b), vectorised (1 where b + c == 0)."""
    b = np.asarray(b)
    return stats.binom.sf(b - 1, b + np.asarray(c), 0.5)


def discordant_counts(baseline_success: np.ndarray, candidate_success: np.ndarray) -> tuple[int, int]:
    """(b, c) for paired boolean arrays: b = baseline ok & candidate failed, c = the reverse."""
    base = np.asarray(baseline_success, dtype=bool)
    cand = np.asarray(candidate_success, dtype=bool)
    if base.shape != cand.shape:
        raise ValueError(f"paired arrays differ in shape: {base.shape} vs {cand.shape}")
    return int(np.sum(base & ~cand)), int(np.sum(~base & cand))


def _mcnemar_critical_b(m: np.ndarray, alpha: float) -> np.ndarray:
    """Smallest b with P(Binomial(m, 1/2) >= b) <= alpha, per m (m + 1 when none: never rejects)."""
    m = np.asarray(m)
    k = stats.binom.isf(alpha, m, 0.5) + 1
    k = np.where(np.isnan(k), m + 1, k).astype(int)
    # guard the float edge of isf on a discrete distribution: step k until it is exactly the smallest
    k = k - (stats.binom.sf(k - 2, m, 0.5) <= alpha)
    k = k + (stats.binom.sf(k - 1, m, 0.5) > alpha)
    return np.minimum(k, m + 1)


def power_paired(n: int, drop: float, alpha: float = 0.05, background_discordance: float = 0.0) -> float:
    """Exact power of the one-sided exact McNemar test over n paired episodes.

    Model: episodes flip both ways at rate background_discordance / 2 each (noise that is not a
    regression), and a drop adds `drop` flips from success to failure. So P(b-pair) = psi0/2 + drop,
    P(c-pair) = psi0/2. Power sums P(m discordant) * P(reject | m) over every m.
    """
    p10 = background_discordance / 2 + drop
    p01 = background_discordance / 2
    psi = p10 + p01
    if n <= 0 or psi <= 0:
        return 0.0
    if psi > 1 + 1e-12:
        raise ValueError(f"discordance {psi:.3f} > 1 is impossible")
    m = np.arange(n + 1)
    crit = _mcnemar_critical_b(m, alpha)
    theta = p10 / psi
    reject_given_m = stats.binom.sf(crit - 1, m, theta)
    return float(np.sum(stats.binom.pmf(m, n, min(psi, 1.0)) * reject_given_m))


def detectable_drop_paired(
    n: int,
    alpha: float = 0.05,
    power: float = 0.8,
    background_discordance: float = 0.0,
    baseline_rate: float = 1.0,
) -> float:
    """Smallest drop the paired test catches with probability >= power (math.inf when none can be).

    The drop cannot exceed what the model allows: p10 = psi0/2 + drop <= baseline_rate and psi <= 1.
    """
    hi = min(baseline_rate - background_discordance / 2, 1.0 - background_discordance)
    return _smallest_drop(lambda d: power_paired(n, d, alpha, background_discordance), hi, power)


def discordance_upper(c: int, n: int, confidence: float = 0.95) -> float:
    """Conservative background discordance from the gained pairs: 2 x the Clopper–Pearson upper bound of c/n.

    Plugging in the observed 2c/n makes lucky runs (few discordant pairs by chance) claim a power they do
    not have; the upper bound is exceeded by the truth with probability <= 1 - confidence.
    """
    return min(1.0, 2 * binomial_upper(c, n, confidence))


def episodes_needed_paired(
    drop: float, alpha: float = 0.05, power: float = 0.8, background_discordance: float = 0.0,
    gained_fraction: float | None = None, n_max: int = 200_000,
) -> int | None:
    """Smallest n (paired episodes) whose exact McNemar test catches `drop` with probability >= power.

    gained_fraction: instead of a fixed discordance, use at each n the conservative bound a run of n pairs
    would report if it gained that fraction of pairs (`discordance_upper(round(f n), n)`): the number a
    larger run with the same outcomes would need to reach. Power is not monotone in n on a discrete test
    (it saw-tooths by a few percent); this returns the n where the search first reaches it, None past n_max.
    """
    if drop <= 0:
        return None

    def ok(n: int) -> bool:
        psi = background_discordance if gained_fraction is None else discordance_upper(round(gained_fraction * n), n)
        return psi + drop <= 1 and power_paired(n, drop, alpha, psi) >= power

    hi = 8
    while not ok(hi):
        if hi >= n_max:
            return None
        hi = min(2 * hi, n_max)
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


# ---------------------------------------------------------------------------------------------
# Exact unconditional p-values of a whole design at once
# ---------------------------------------------------------------------------------------------


def _sup_tail(stat: np.ndarray, logpmf_at, grid: np.ndarray) -> np.ndarray:
    """p(table) = max over the grid of P_theta(stat <= stat(table)), for every table at once.

    stat: one value per table (small = evidence for H1; +inf for impossible tables);
    logpmf_at(theta): the tables' log probabilities under the null boundary at nuisance theta.
    """
    s = np.round(np.where(np.isfinite(stat), stat, np.inf), 9)  # equal statistics are one tail point
    uniq, inv = np.unique(s.ravel(), return_inverse=True)
    best = np.zeros(len(uniq))
    for theta in grid:
        mass = np.bincount(inv, weights=np.exp(logpmf_at(theta)).ravel(), minlength=len(uniq))
        best = np.maximum(best, np.cumsum(mass))
    return np.minimum(best, 1.0)[inv].reshape(stat.shape)


def _nuisance_grid(lo: float, hi: float) -> np.ndarray:
    """Fixed nuisance grid: even steps plus geometric steps towards both ends (small discordance, rates near 1)."""
    if hi <= lo:
        return np.array([lo])
    even = np.linspace(lo, hi, 161)
    ends = np.geomspace(1e-5, (hi - lo) / 2, 40)
    return np.unique(np.clip(np.concatenate([even, lo + ends, hi - ends]), lo, hi))


def tango_z(b, c, n: int, margin: float) -> np.ndarray:
    """Tango's score statistic for H0: p10 - p01 = margin on n pairs (small z: drop below the margin).

    The restricted MLE of p01 under H0 solves 2n x^2 - B x - c margin (1 - margin) = 0 with
    B = (b + c) - margin (2n - b + c); Var(b - c) = n (2x + margin (1 - margin)).
    """
    b = np.asarray(b, dtype=float)
    c = np.asarray(c, dtype=float)
    m = float(margin)
    bb = (b + c) - m * (2 * n - b + c)
    x = (bb + np.sqrt(bb**2 + 8 * n * c * m * (1 - m))) / (4 * n)
    var = n * (2 * x + m * (1 - m))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (b - c - n * m) / np.sqrt(var)


@lru_cache(maxsize=32)
def _paired_ni_table(n: int, margin: float) -> np.ndarray:
    """p[b, c] of the exact unconditional paired non-inferiority test (b + c > n: nan)."""
    b = np.arange(n + 1)[:, None]
    c = np.arange(n + 1)[None, :]
    ok = b + c <= n
    z = np.where(ok, tango_z(b, c, n, margin), np.inf)
    lcomb = np.where(ok, special.gammaln(n + 1) - special.gammaln(b + 1) - special.gammaln(c + 1)
                     - special.gammaln(np.maximum(n - b - c, 0) + 1), -np.inf)
    rest = np.maximum(n - b - c, 0)

    def logpmf(x):  # null boundary: p10 = x + margin, p01 = x, p00 = 1 - 2x - margin
        p00 = max(1 - 2 * x - margin, 0.0)
        return lcomb + special.xlogy(b, x + margin) + special.xlogy(c, x) + special.xlogy(rest, p00)

    p = _sup_tail(z, logpmf, _nuisance_grid(0.0, (1 - margin) / 2))
    p[~ok] = np.nan
    p.setflags(write=False)
    return p


TABLE_MAX = 260_000  # designs with more outcome tables than this get point p-values (windowed), not a whole table


def _window(mean: float, sd: float, top: int) -> np.ndarray:
    """Counts within 9 sd (+ 3) of the mean: a binomial margin leaves out less than 1e-15 there."""
    lo, hi = int(max(0, math.floor(mean - 9 * sd - 3))), int(min(top, math.ceil(mean + 9 * sd + 3)))
    return np.arange(lo, hi + 1)


def _paired_ni_point(b: int, c: int, n: int, margin: float) -> float:
    """The same p-value as `_paired_ni_table` for one observed table, summing only where the mass is."""
    z_obs = round(float(tango_z(b, c, n, margin)), 9)
    best = 0.0
    for x in _nuisance_grid(0.0, (1 - margin) / 2):
        p10, p01 = x + margin, x
        bb = _window(n * p10, math.sqrt(n * p10 * (1 - p10)), n)[:, None]
        cc = _window(n * p01, math.sqrt(n * p01 * (1 - p01)), n)[None, :]
        ok = bb + cc <= n
        rest = np.maximum(n - bb - cc, 0)
        lp = (special.gammaln(n + 1) - special.gammaln(bb + 1) - special.gammaln(cc + 1) - special.gammaln(rest + 1)
              + special.xlogy(bb, p10) + special.xlogy(cc, p01) + special.xlogy(rest, max(1 - p10 - p01, 0.0)))
        z = np.round(tango_z(bb, cc, n, margin), 9)
        best = max(best, float(np.sum(np.where(ok & (z <= z_obs), np.exp(lp), 0.0))))
    return min(best, 1.0)


def noninferiority_p_paired(b, c, n: int, margin: float):
    """Exact p-value for H1 "drop < margin" on n paired episodes with b lost and c gained pairs.

    H0: p10 - p01 >= margin; p = sup over the nuisance p01 of P(Tango z <= observed z). A small p shows the
    candidate lost less than `margin` (non-inferiority); P(p <= alpha) <= alpha whenever the drop is >= margin.
    Vectorised over b, c for designs up to TABLE_MAX tables (n <= 508); larger n: scalars only.
    """
    _check_margin(margin)
    if (n + 1) ** 2 > TABLE_MAX:
        if np.ndim(b) or np.ndim(c):
            raise ValueError(f"vectorised paired non-inferiority p-values need n <= 508 (got {n})")
        return _paired_ni_point(int(b), int(c), int(n), float(margin))
    tab = _paired_ni_table(int(n), float(margin))
    out = tab[np.asarray(b, dtype=int), np.asarray(c, dtype=int)]
    return float(out) if np.ndim(out) == 0 else out


def power_noninferior_paired(n: int, drop: float, background_discordance: float, margin: float, alpha: float = 0.05) -> float:
    """Probability that the paired non-inferiority test shows "drop < margin" at a true drop (exact)."""
    _check_margin(margin)
    p10, p01 = background_discordance / 2 + drop, background_discordance / 2
    if p10 + p01 > 1 + 1e-12 or p10 < 0:
        raise ValueError("impossible discordance/drop")
    tab = _paired_ni_table(int(n), float(margin))
    b = np.arange(n + 1)[:, None]
    c = np.arange(n + 1)[None, :]
    rest = np.maximum(n - b - c, 0)
    lp = (special.gammaln(n + 1) - special.gammaln(b + 1) - special.gammaln(c + 1) - special.gammaln(rest + 1)
          + special.xlogy(b, p10) + special.xlogy(c, p01) + special.xlogy(rest, max(1 - p10 - p01, 0.0)))
    w = np.where(b + c <= n, np.exp(lp), 0.0)
    return float(np.sum(w * (np.nan_to_num(tab, nan=1.0) <= alpha)))


# ---------------------------------------------------------------------------------------------
# Unpaired episodes: Fisher's exact test (regression), Chan's exact score test with a margin (non-inferiority)
# ---------------------------------------------------------------------------------------------


def fisher_worse_p(x_cand, n_cand: int, x_base, n_base: int):
    """One-sided Fisher exact p-value for "candidate worse": P(X <= x_cand) given the total successes.

    Same as scipy.stats.fisher_exact([[x_cand, x_base], [n_cand - x_cand, n_base - x_base]], "less"); vectorised.
    """
    xc = np.asarray(x_cand)
    out = stats.hypergeom.cdf(xc, n_cand + n_base, xc + np.asarray(x_base), n_cand)
    return float(out) if np.ndim(out) == 0 else out


@lru_cache(maxsize=256)
def fisher_critical(n_cand: int, n_base: int, alpha: float) -> np.ndarray:
    """Per x_base, the largest x_cand the one-sided Fisher test rejects at alpha (-1: none).

    Fisher's p grows with x_cand at fixed x_base, so the region is {x_cand <= critical[x_base]}; a
    bisection over x_cand for every x_base at once needs log2(n_cand) vectorised cdf calls instead of
    the whole (n_cand + 1) x (n_base + 1) table.
    """
    xb = np.arange(n_base + 1)
    lo = np.full(n_base + 1, -1)  # invariant: p(lo) <= alpha (or lo == -1), p(hi) > alpha (or hi == n_cand + 1)
    hi = np.full(n_base + 1, n_cand + 1)
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        ok = np.asarray(fisher_worse_p(np.clip(mid, 0, n_cand), n_cand, xb, n_base)) <= alpha
        act = hi - lo > 1
        lo = np.where(act & ok, mid, lo)
        hi = np.where(act & ~ok, mid, hi)
    lo.setflags(write=False)
    return lo


def power_unpaired(n_cand: int, n_base: int, baseline_rate: float, drop: float, alpha: float = 0.05) -> float:
    """Exact power of the one-sided Fisher test: sums over every (x_cand, x_base) outcome."""
    crit = fisher_critical(int(n_cand), int(n_base), float(alpha))
    pc = min(max(baseline_rate - drop, 0.0), 1.0)
    w_b = stats.binom.pmf(np.arange(n_base + 1), n_base, baseline_rate)
    return float(np.sum(w_b * np.where(crit >= 0, stats.binom.cdf(crit, n_cand, pc), 0.0)))


def detectable_drop_unpaired(n_cand: int, n_base: int, baseline_rate: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest drop the unpaired test catches with probability >= power (math.inf when none can be)."""
    return _smallest_drop(lambda d: power_unpaired(n_cand, n_base, baseline_rate, d, alpha), baseline_rate, power)


def _fm_restricted(x1, n1, x2, n2, delta):
    """Farrington–Manning restricted MLE (p1~, p2~) under H0: p1 - p2 = delta (vectorised, closed form)."""
    p1 = x1 / n1
    p2 = x2 / n2
    if delta == 0:
        pooled = (x1 + x2) / (n1 + n2)
        return pooled, pooled
    theta = n2 / n1
    a = 1 + theta
    b = -(1 + theta + p1 + theta * p2 + delta * (theta + 2))
    c = delta**2 + delta * (2 * p1 + theta + 1) + p1 + theta * p2
    d = -p1 * delta * (1 + delta)
    v = b**3 / (27 * a**3) - b * c / (6 * a**2) + d / (2 * a)
    s = np.sqrt(np.maximum(b**2 / (9 * a**2) - c / (3 * a), 0.0))
    u = np.where(v >= 0, 1.0, -1.0) * s  # sign(0) = +1: v == 0 happens on real tables (e.g. 7/9 vs 2/9)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(s > 0, v / np.where(s > 0, u, 1.0) ** 3, 0.0)
    w = (math.pi + np.arccos(np.clip(r, -1.0, 1.0))) / 3
    p1r = 2 * u * np.cos(w) - b / (3 * a)
    p1r = np.clip(p1r, 0.0, 1.0)
    p2r = np.clip(p1r - delta, 0.0, 1.0)
    return p1r, p2r


def score_z(x_cand, n_cand: int, x_base, n_base: int, margin: float = 0.0):
    """Farrington–Manning score statistic for H0: p_cand - p_base = -margin (negative z: candidate looks worse)."""
    x1 = np.asarray(x_cand, dtype=float)
    x2 = np.asarray(x_base, dtype=float)
    delta = -float(margin)
    p1r, p2r = _fm_restricted(x1, n_cand, x2, n_base, delta)
    var = p1r * (1 - p1r) / n_cand + p2r * (1 - p2r) / n_base
    diff = x1 / n_cand - x2 / n_base - delta
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, diff / np.sqrt(np.where(var > 0, var, 1.0)), np.where(diff < 0, -np.inf, np.where(diff > 0, np.inf, 0.0)))
    return z


@lru_cache(maxsize=32)
def _unpaired_ni_table(n_cand: int, n_base: int, margin: float) -> np.ndarray:
    """p[x_cand, x_base] of the exact unconditional unpaired non-inferiority test (Chan's test)."""
    xc = np.arange(n_cand + 1)[:, None]
    xb = np.arange(n_base + 1)[None, :]
    stat = -score_z(xc, n_cand, xb, n_base, margin)  # small = candidate clearly above p_base - margin
    kc, kb = np.arange(n_cand + 1), np.arange(n_base + 1)

    def logpmf(pb):  # null boundary: p_cand = p_base - margin
        return stats.binom.logpmf(kc, n_cand, max(pb - margin, 0.0))[:, None] + stats.binom.logpmf(kb, n_base, pb)[None, :]

    p = _sup_tail(stat, logpmf, _nuisance_grid(margin, 1.0))
    p.setflags(write=False)
    return p


def _unpaired_ni_point(xc: int, nc: int, xb: int, nb: int, margin: float) -> float:
    """The same p-value as `_unpaired_ni_table` for one observed table, summing only where the mass is."""
    s_obs = round(float(-score_z(xc, nc, xb, nb, margin)), 9)
    best = 0.0
    for pb in _nuisance_grid(margin, 1.0):
        pc = max(pb - margin, 0.0)
        kc = _window(nc * pc, math.sqrt(nc * pc * (1 - pc)), nc)
        kb = _window(nb * pb, math.sqrt(nb * pb * (1 - pb)), nb)
        w = np.exp(stats.binom.logpmf(kc, nc, pc)[:, None] + stats.binom.logpmf(kb, nb, pb)[None, :])
        st = np.round(-score_z(kc[:, None], nc, kb[None, :], nb, margin), 9)
        best = max(best, float(np.sum(np.where(st <= s_obs, w, 0.0))))
    return min(best, 1.0)


def noninferiority_p_unpaired(x_cand, n_cand: int, x_base, n_base: int, margin: float):
    """Exact p-value for H1 "p_base - p_cand < margin" from two independent samples (Chan's exact score test).

    H0: p_base - p_cand >= margin; p = sup over p_base of P(FM score z >= observed z) on the null boundary.
    Vectorised up to TABLE_MAX outcome tables; larger designs: scalars only.
    """
    _check_margin(margin)
    if (n_cand + 1) * (n_base + 1) > TABLE_MAX:
        if np.ndim(x_cand) or np.ndim(x_base):
            raise ValueError(f"vectorised unpaired non-inferiority p-values need (n_cand+1)(n_base+1) <= {TABLE_MAX}")
        return _unpaired_ni_point(int(x_cand), int(n_cand), int(x_base), int(n_base), float(margin))
    tab = _unpaired_ni_table(int(n_cand), int(n_base), float(margin))
    out = tab[np.asarray(x_cand, dtype=int), np.asarray(x_base, dtype=int)]
    return float(out) if np.ndim(out) == 0 else out


def _check_margin(margin: float) -> None:
    if not 0 < margin < 1:
        raise ValueError(f"non-inferiority margin must be in (0, 1), got {margin}")


def _smallest_drop(power_at, hi: float, target: float, tol: float = 1e-4) -> float:
    """Bisection for the smallest drop in (0, hi] whose power reaches target (power grows with the drop)."""
    if hi <= 0 or power_at(hi) < target:
        return math.inf
    lo = 0.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if power_at(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


# ---------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------


def sample_stats(values) -> dict[str, float | int]:
    """n, mean, std, p50/p90/p99 (numpy's linear interpolation), min and max of a latency sample.

    The one latency summary: a run's summary.json (evalkit.results.summary) and a LatencyReport
    (evalkit.latency.report) both use it. std is the population spread (ddof=0), as summary.json always had.
    """
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "min": float(a.min()), "max": float(a.max())}


@dataclass
class RatioEstimate:
    ratio: float  # candidate / baseline
    low: float  # confidence interval (bootstrap) or the spread of quantile ratios when only quantiles are known
    high: float
    method: str


def latency_ratio(
    cand_ms: np.ndarray, base_ms: np.ndarray, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> RatioEstimate:
    """Ratio of median latencies with a percentile-bootstrap interval (scipy.stats.bootstrap, two independent samples)."""
    cand = np.asarray(cand_ms, dtype=float)
    base = np.asarray(base_ms, dtype=float)
    if cand.size == 0 or base.size == 0:
        raise ValueError("latency ratio needs samples on both sides")
    ratio = float(np.median(cand) / np.median(base))
    if cand.size < 2 or base.size < 2:
        return RatioEstimate(ratio, math.nan, math.nan, "median ratio (too few samples for an interval)")
    res = stats.bootstrap(
        (cand, base),
        lambda a, b, axis=-1: np.median(a, axis=axis) / np.median(b, axis=axis),
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        vectorized=True,
        batch=max(1, min(n_resamples, 4_000_000 // max(cand.size, base.size))),  # bounded memory on long runs
        rng=np.random.default_rng(seed),
    )
    return RatioEstimate(ratio, float(res.confidence_interval.low), float(res.confidence_interval.high),
                         f"bootstrap of the p50 ratio ({cand.size} vs {base.size} calls, {confidence:.0%} percentile interval)")


def latency_ratio_from_quantiles(cand: dict, base: dict) -> RatioEstimate:
    """p50 ratio from summary quantiles; low/high are the min/max of the p50, p90 and p99 ratios (the spread)."""
    ratios = []
    for q in ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99"):
        if cand.get(q) and base.get(q):
            ratios.append(float(cand[q]) / float(base[q]))
    if not (cand.get("latency_ms_p50") and base.get("latency_ms_p50")):
        raise ValueError("both runs need latency_ms_p50")
    return RatioEstimate(ratios[0], min(ratios), max(ratios), "stored quantiles (no raw call times): p50 ratio, p50..p99 spread")
