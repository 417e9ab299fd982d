"""evalkit.stats against statsmodels / scipy on test vectors, exact sizes of the exact tests, Monte-Carlo checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, special
from scipy import stats as sps

from evalkit import stats as S

sm_prop = pytest.importorskip("statsmodels.stats.proportion")
sm_ct = pytest.importorskip("statsmodels.stats.contingency_tables")
sm_mt = pytest.importorskip("statsmodels.stats.multitest")


@pytest.mark.parametrize("x,n", [(0, 9), (9, 9), (5, 9), (37, 50), (412, 500)])
def test_wilson_matches_statsmodels(x, n):
    lo, hi = S.wilson_interval(x, n)
    slo, shi = sm_prop.proportion_confint(x, n, alpha=0.05, method="wilson")
    assert lo == pytest.approx(slo, abs=1e-9) and hi == pytest.approx(shi, abs=1e-9)


@pytest.mark.parametrize("b,c", [(0, 0), (5, 0), (3, 1), (10, 4), (7, 7), (1, 12), (40, 25)])
def test_mcnemar_matches_statsmodels(b, c):
    table = np.array([[20, b], [c, 30]])  # rows baseline ok/fail, cols candidate fail... only b, c matter
    two = sm_ct.mcnemar(table, exact=True).pvalue
    assert S.mcnemar_exact(b, c, "two-sided") == pytest.approx(min(1.0, two), abs=1e-12)
    if b + c:
        assert S.mcnemar_exact(b, c) == pytest.approx(sps.binomtest(b, b + c, 0.5, alternative="greater").pvalue, abs=1e-12)
    assert S.mcnemar_p(np.array([b]), np.array([c]))[0] == pytest.approx(S.mcnemar_exact(b, c), abs=1e-15)


def test_discordant_counts():
    base = np.array([1, 1, 0, 0, 1], bool)
    cand = np.array([1, 0, 1, 0, 0], bool)
    assert S.discordant_counts(base, cand) == (2, 1)


@pytest.mark.parametrize("method,sm", [("holm", "holm"), ("bh", "fdr_bh"), ("bonferroni", "bonferroni")])
def test_family_adjustment_matches_statsmodels(method, sm):
    rng = np.random.default_rng(0)
    for p in (rng.random(28) ** 3, np.array([0.01, 0.04, 0.03, 0.005, 0.5]), np.array([0.02]), np.array([0.03, 0.03, 0.03])):
        ref = sm_mt.multipletests(p, alpha=0.05, method=sm)[1]
        assert np.allclose(S.adjust_pvalues(p, method), ref, atol=1e-12)
    assert np.array_equal(S.adjust_pvalues([0.2, 0.01], "none"), [0.2, 0.01])
    with pytest.raises(ValueError, match="holm"):
        S.adjust_pvalues([0.1], "sidak")


# --- unpaired: Fisher --------------------------------------------------------------------------


@pytest.mark.parametrize("xc,nc,xb,nb", [(29, 30, 500, 500), (40, 50, 45, 50), (8, 9, 9, 9), (0, 10, 10, 10), (180, 200, 190, 210)])
def test_fisher_matches_scipy(xc, nc, xb, nb):
    ref = sps.fisher_exact([[xc, xb], [nc - xc, nb - xb]], alternative="less").pvalue
    assert S.fisher_worse_p(xc, nc, xb, nb) == pytest.approx(ref, rel=1e-9)


def test_the_29_of_30_vs_500_of_500_case_is_not_significant():
    # the example: the old normal approximation gave p = 2.2e-5 here
    assert S.fisher_worse_p(29, 30, 500, 500) == pytest.approx(0.0566, abs=1e-4)


@pytest.mark.parametrize("nc,nb", [(30, 500), (9, 9), (100, 80)])
def test_fisher_critical_values_are_the_rejection_region(nc, nb):
    tab = np.asarray(S.fisher_worse_p(np.arange(nc + 1)[:, None], nc, np.arange(nb + 1)[None, :], nb)) <= 0.05
    crit = S.fisher_critical(nc, nb, 0.05)
    assert np.array_equal(tab, np.arange(nc + 1)[:, None] <= crit[None, :])


def test_unpaired_exact_false_alarm_is_at_most_alpha_at_every_rate():
    crit = S.fisher_critical(30, 500, 0.05)
    worst = max(float(np.sum(sps.binom.pmf(np.arange(501), 500, p) * np.where(crit >= 0, sps.binom.cdf(crit, 30, p), 0)))
                for p in np.linspace(0, 1, 401))
    assert worst <= 0.05


def test_unpaired_power_matches_simulation():
    rng = np.random.default_rng(3)
    nc, nb, p0, drop = 60, 80, 0.8, 0.15
    sim = np.mean(S.fisher_worse_p(rng.binomial(nc, p0 - drop, 4000), nc, rng.binomial(nb, p0, 4000), nb) <= 0.05)
    assert S.power_unpaired(nc, nb, p0, drop) == pytest.approx(sim, abs=4 * math.sqrt(0.25 / 4000))


# --- non-inferiority ---------------------------------------------------------------------------


def _tango_numeric(b, c, n, m):
    """Tango's z with the restricted MLE found numerically (independent of the closed form)."""
    def nll(x):
        return -(special.xlogy(b, x + m) + special.xlogy(c, x) + special.xlogy(n - b - c, 1 - 2 * x - m))

    x = optimize.minimize_scalar(nll, bounds=(1e-12, (1 - m) / 2 - 1e-12), method="bounded", options={"xatol": 1e-13}).x
    return (b - c - n * m) / math.sqrt(n * (2 * x + m * (1 - m)))


@pytest.mark.parametrize("b,c,n", [(3, 1, 50), (10, 4, 100), (0, 5, 60), (20, 20, 200), (30, 2, 300)])
def test_tango_statistic_matches_numerical_mle(b, c, n):
    assert float(S.tango_z(b, c, n, 0.05)) == pytest.approx(_tango_numeric(b, c, n, 0.05), abs=1e-6)


def _score_numeric(x1, n1, x2, n2, margin):
    d = -margin
    lo, hi = max(0.0, -d) + 1e-12, min(1.0, 1 - d) - 1e-12
    p2 = optimize.minimize_scalar(lambda p2: -(sps.binom.logpmf(x1, n1, p2 + d) + sps.binom.logpmf(x2, n2, p2)),
                                  bounds=(lo, hi), method="bounded", options={"xatol": 1e-12}).x
    p1 = p2 + d
    return (x1 / n1 - x2 / n2 - d) / math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)


@pytest.mark.parametrize("x1,n1,x2,n2", [(40, 50, 45, 50), (30, 60, 50, 70), (7, 9, 2, 9), (180, 200, 190, 210), (208, 500, 292, 500)])
def test_farrington_manning_statistic_matches_numerical_mle(x1, n1, x2, n2):
    assert float(S.score_z(x1, n1, x2, n2, 0.05)) == pytest.approx(_score_numeric(x1, n1, x2, n2, 0.05), abs=1e-6)


def _paired_size(n, m, alpha=0.05, points=601):
    """Largest P(reject) on the null boundary p10 - p01 = m over a grid 2.5x finer than the test's own."""
    rej = np.nan_to_num(np.asarray(S.noninferiority_p_paired(*np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij"), n, m)),
                        nan=1.0) <= alpha
    b = np.arange(n + 1)[:, None]
    c = np.arange(n + 1)[None, :]
    rest = np.maximum(n - b - c, 0)
    lc = special.gammaln(n + 1) - special.gammaln(b + 1) - special.gammaln(c + 1) - special.gammaln(rest + 1)
    worst = 0.0
    for x in np.linspace(0, (1 - m) / 2, points):
        lp = lc + special.xlogy(b, x + m) + special.xlogy(c, x) + special.xlogy(rest, max(1 - 2 * x - m, 0))
        worst = max(worst, float(np.sum(np.where(b + c <= n, np.exp(lp), 0) * rej)))
    return worst


@pytest.mark.parametrize("n", [30, 100])
def test_paired_noninferiority_test_is_exact(n):
    assert _paired_size(n, 0.05) <= 0.05
    assert _paired_size(n, 0.10) <= 0.05


def test_unpaired_noninferiority_test_is_exact_and_fails_to_pass_29_of_30():
    rej = S.noninferiority_p_unpaired(np.arange(31)[:, None], 30, np.arange(501)[None, :], 500, 0.05) <= 0.05
    worst = max(float(sps.binom.pmf(np.arange(31), 30, pb - 0.05) @ rej @ sps.binom.pmf(np.arange(501), 500, pb))
                for pb in np.linspace(0.05, 1, 601))
    assert worst <= 0.05
    assert S.noninferiority_p_unpaired(29, 30, 500, 500, 0.05) > 0.05  # 30 episodes cannot show a drop < 5 pp
    assert S.noninferiority_p_unpaired(480, 500, 485, 500, 0.05) < 0.05


def test_noninferiority_point_p_values_equal_the_table():
    for b, c in ((3, 1), (0, 0), (12, 2)):
        assert S._paired_ni_point(b, c, 100, 0.05) == pytest.approx(S.noninferiority_p_paired(b, c, 100, 0.05), abs=1e-10)
    assert S._unpaired_ni_point(90, 100, 92, 100, 0.05) == pytest.approx(
        S.noninferiority_p_unpaired(90, 100, 92, 100, 0.05), abs=1e-10)
    with pytest.raises(ValueError, match="margin"):
        S.noninferiority_p_paired(0, 0, 10, 0.0)


def test_noninferiority_power_matches_simulation():
    rng = np.random.default_rng(8)
    n, psi, reps = 100, 0.06, 4000
    counts = rng.multinomial(n, [psi / 2, psi / 2, 1 - psi], size=reps)
    sim = np.mean(S.noninferiority_p_paired(counts[:, 0], counts[:, 1], n, 0.05) <= 0.05)
    assert S.power_noninferior_paired(n, 0.0, psi, 0.05) == pytest.approx(sim, abs=4 * math.sqrt(0.25 / reps))


# --- power and honest detectable drops ---------------------------------------------------------


def test_detectable_drop_shrinks_with_episodes():
    small = S.detectable_drop_unpaired(9, 9, 0.9)
    big = S.detectable_drop_unpaired(500, 500, 0.9)
    assert big < 0.08 < small
    assert S.detectable_drop_paired(500, background_discordance=0.1, baseline_rate=0.9) < S.detectable_drop_paired(
        50, background_discordance=0.1, baseline_rate=0.9
    )
    # 5 one-sided flips are needed for p <= 0.05 (0.5**5); with 3 pairs no drop is detectable.
    assert S.detectable_drop_paired(3) == math.inf


def test_conservative_discordance_bounds_the_truth():
    rng = np.random.default_rng(2)
    n, p01 = 200, 0.03
    c = rng.binomial(n, p01, 4000)
    bounds = np.array([S.discordance_upper(int(x), n) for x in c])
    assert np.mean(bounds >= 2 * p01) >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / 4000)
    assert S.discordance_upper(0, 500) == pytest.approx(2 * (1 - 0.05 ** (1 / 500)), rel=1e-6)


def test_episodes_needed_reaches_the_power():
    n = S.episodes_needed_paired(0.05, 0.05, 0.8, 0.1)
    assert S.power_paired(n, 0.05, 0.05, 0.1) >= 0.8 and S.power_paired(n // 2, 0.05, 0.05, 0.1) < 0.8
    m = S.episodes_needed_paired(0.05, 0.05, 0.8, gained_fraction=0.0)
    assert S.detectable_drop_paired(m, 0.05, 0.8, S.discordance_upper(0, m)) <= 0.05 + 1e-3
    assert S.episodes_needed_paired(0.05, 0.05, 0.8, 0.1, n_max=50) is None


def test_latency_ratio_bootstrap_covers_true_ratio():
    rng = np.random.default_rng(1)
    base = rng.lognormal(mean=math.log(10.0), sigma=0.1, size=200)
    cand = rng.lognormal(mean=math.log(12.0), sigma=0.1, size=200)
    est = S.latency_ratio(cand, base)
    assert est.low < 1.2 < est.high and est.low < est.ratio < est.high
    q = S.latency_ratio_from_quantiles(
        {"latency_ms_p50": 11, "latency_ms_p90": 14, "latency_ms_p99": 20},
        {"latency_ms_p50": 10, "latency_ms_p90": 12, "latency_ms_p99": 15},
    )
    assert q.ratio == pytest.approx(1.1) and q.low == pytest.approx(1.1) and q.high == pytest.approx(20 / 15)


# --- Monte-Carlo: the paired regression test keeps its level under correlated, heterogeneous outcomes ---

REPS = 3000


def test_monte_carlo_paired_false_alarm_and_power():
    rng = np.random.default_rng(1234)
    n, psi0 = 60, 0.2
    counts = rng.multinomial(n, [psi0 / 2, psi0 / 2, 1 - psi0], size=REPS)
    fa = float(np.mean(S.mcnemar_p(counts[:, 0], counts[:, 1]) <= 0.05))
    assert fa <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / REPS)
    mde = S.detectable_drop_paired(n, 0.05, 0.8, background_discordance=psi0)
    counts = rng.multinomial(n, [psi0 / 2 + mde, psi0 / 2, 1 - psi0 - mde], size=REPS)
    pw = float(np.mean(S.mcnemar_p(counts[:, 0], counts[:, 1]) <= 0.05))
    assert pw >= 0.8 - 3 * math.sqrt(0.16 / REPS)
    assert S.power_paired(n, mde, 0.05, psi0) == pytest.approx(pw, abs=4 * math.sqrt(0.25 / REPS))
