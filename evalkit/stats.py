"""Statistics behind every number evalkit shows and every verdict the gate gives.

scipy.stats does the math: Wilson intervals and the exact McNemar test come from
`scipy.stats.binomtest`, normal tail probabilities from `scipy.stats.norm`, binomial
probabilities for exact power from `scipy.stats.binom`, and latency-ratio intervals from
`scipy.stats.bootstrap`. The one formula written here is the Farrington–Manning score
statistic for a difference of two proportions (restricted maximum likelihood under the
null, closed form); tests check it against statsmodels' `test_proportions_2indep(method="score",
correction=False)`.

Conventions: "drop" is baseline rate minus candidate rate (positive = candidate worse).
The gate's success test asks "is the candidate worse than the baseline (by more than
`margin`)?"; it fails a run when the one-sided p-value is <= alpha, so its false-alarm rate
on an unchanged policy is at most alpha. `detectable_drop_*` give the smallest true drop
that test catches with probability >= power at the given episode counts (exact power,
computed over every possible outcome, not a normal approximation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0 (nothing is known)."""
    if n == 0:
        return 0.0, 1.0
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


# ---------------------------------------------------------------------------------------------
# Paired episodes: exact McNemar on the discordant pairs
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
    return float(stats.binomtest(b, b + c, 0.5, alternative=alternative).pvalue)


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


# ---------------------------------------------------------------------------------------------
# Unpaired episodes: score test for a difference of two proportions, with a margin
# ---------------------------------------------------------------------------------------------


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
    u = np.sign(v) * np.sqrt(np.maximum(b**2 / (9 * a**2) - c / (3 * a), 0.0))
    u = np.where(u == 0, 1e-300, u)
    w = (math.pi + np.arccos(np.clip(v / u**3, -1.0, 1.0))) / 3
    p1r = 2 * u * np.cos(w) - b / (3 * a)
    p1r = np.clip(p1r, 0.0, 1.0)
    p2r = np.clip(p1r - delta, 0.0, 1.0)
    return p1r, p2r


def score_z(x_cand, n_cand: int, x_base, n_base: int, margin: float = 0.0):
    """Score statistic z for H0: p_cand - p_base = -margin (negative z: candidate looks worse)."""
    x1 = np.asarray(x_cand, dtype=float)
    x2 = np.asarray(x_base, dtype=float)
    delta = -float(margin)
    p1r, p2r = _fm_restricted(x1, n_cand, x2, n_base, delta)
    var = p1r * (1 - p1r) / n_cand + p2r * (1 - p2r) / n_base
    diff = x1 / n_cand - x2 / n_base - delta
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, diff / np.sqrt(np.where(var > 0, var, 1.0)), np.where(diff < 0, -np.inf, np.where(diff > 0, np.inf, 0.0)))
    return z


def two_proportion_test(
    x_cand: int, n_cand: int, x_base: int, n_base: int, margin: float = 0.0, alternative: str = "worse"
) -> float:
    """One-sided score test on two independent proportions with a margin; returns the p-value.

    alternative "worse":       H0 p_cand >= p_base - margin, H1 p_cand < p_base - margin (regression test).
    alternative "noninferior": H0 p_cand <= p_base - margin, H1 p_cand > p_base - margin (classic
                               non-inferiority: a small p proves the candidate lost less than margin).
    """
    if n_cand <= 0 or n_base <= 0:
        raise ValueError("both samples need at least one episode")
    z = float(score_z(x_cand, n_cand, x_base, n_base, margin))
    if alternative == "worse":
        return float(stats.norm.cdf(z))
    if alternative == "noninferior":
        return float(stats.norm.sf(z))
    raise ValueError(f"alternative must be 'worse' or 'noninferior', got {alternative!r}")


def power_unpaired(
    n_cand: int, n_base: int, baseline_rate: float, drop: float, alpha: float = 0.05, margin: float = 0.0
) -> float:
    """Exact power of the one-sided 'worse' score test: sums over every (x_cand, x_base) outcome."""
    xc = np.arange(n_cand + 1)[:, None]
    xb = np.arange(n_base + 1)[None, :]
    reject = stats.norm.cdf(score_z(xc, n_cand, xb, n_base, margin)) <= alpha
    pc = min(max(baseline_rate - drop, 0.0), 1.0)
    w_c = stats.binom.pmf(np.arange(n_cand + 1), n_cand, pc)
    w_b = stats.binom.pmf(np.arange(n_base + 1), n_base, baseline_rate)
    return float(w_c @ reject.astype(float) @ w_b)


def detectable_drop_unpaired(
    n_cand: int, n_base: int, baseline_rate: float, alpha: float = 0.05, power: float = 0.8, margin: float = 0.0
) -> float:
    """Smallest drop the unpaired test catches with probability >= power (math.inf when none can be)."""
    return _smallest_drop(lambda d: power_unpaired(n_cand, n_base, baseline_rate, d, alpha, margin), baseline_rate, power)


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


@dataclass
class RatioEstimate:
    ratio: float  # candidate / baseline
    low: float  # confidence interval (bootstrap) or the spread of quantile ratios when only quantiles are known
    high: float
    method: str


def latency_ratio(
    cand_ms: np.ndarray, base_ms: np.ndarray, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> RatioEstimate:
    """Ratio of median latencies with a percentile-bootstrap interval (scipy.stats.bootstrap)."""
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
        rng=np.random.default_rng(seed),
    )
    return RatioEstimate(ratio, float(res.confidence_interval.low), float(res.confidence_interval.high), "bootstrap median ratio")


def latency_ratio_from_quantiles(cand: dict, base: dict) -> RatioEstimate:
    """p50 ratio from summary quantiles; low/high are the min/max of the p50, p90 and p99 ratios (the spread)."""
    ratios = []
    for q in ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99"):
        if cand.get(q) and base.get(q):
            ratios.append(float(cand[q]) / float(base[q]))
    if not (cand.get("latency_ms_p50") and base.get("latency_ms_p50")):
        raise ValueError("both runs need latency_ms_p50")
    return RatioEstimate(ratios[0], min(ratios), max(ratios), "quantile ratios p50 (p50..p99 spread)")
