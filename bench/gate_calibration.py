"""Calibration of the gate's success tests by simulation: false alarms, power, episodes to a decision.

    python bench/gate_calibration.py                   # full table (minutes on 2 cores), writes JSON
    python bench/gate_calibration.py --quick           # the seeded mini version the tests run
    python bench/gate_calibration.py --tradeoff        # the sequential design's spending trade-off (n = 500)

Model (what a LIBERO suite looks like to the gate): 10 tasks with heterogeneous success rates around a
suite mean mu (mu +- 0.9 min(mu, 1 - mu), evenly spread), n = 10 x trials paired episodes. Baseline
episode i succeeds when U_i < p_task; the candidate reuses U_i with probability rho (correlated outcomes:
the same seed mostly gives the same outcome) or draws a fresh uniform, and succeeds when it is
< p_task - drop. rho = 0: independent outcomes. Unpaired rows draw the baseline and the candidate
independently (the baseline with n_base episodes: a reference run only reports a count).

What is measured uses the project's own decision functions, not re-implementations:
evalkit.stats (mcnemar_p, noninferiority_p_paired, fisher_worse_p, noninferiority_p_unpaired,
adjust_pvalues, detectable_drop_paired, discordance_upper), evalkit.gate.judge.success_verdicts and
evalkit.gate.sequential.decide_paths (the rule the stop rule and the judge apply to a run's blocks).
tests/test_gate_calibration.py checks that judge() on simulated runs gives the same verdicts.

Columns: false alarm = P(verdict regression | drop 0); power@d = P(regression | drop d); pass@0 =
P(pass | drop 0); false pass = P(pass | drop = margin); reg@margin/2 = P(regression | drop = margin/2);
episodes = mean paired (or candidate) episodes used, at drop 0 and at drop 0.20. The fixed and the
sequential paired rows of a scenario judge the same simulated runs (common random numbers), so the
"sequential vs fixed" table measures their difference with little Monte-Carlo error; its bound@0.20 is the
fewest paired episodes on average that ANY test with false alarms <= alpha needs to catch that 20 pp drop
with the sequential design's power (`episodes_bound`). Family rows: 28 unchanged cells judged together
(Holm), P(any cell called a regression).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evalkit import stats as S  # noqa: E402
from evalkit.gate import sequential as SEQ  # noqa: E402
from evalkit.gate.config import GateConfig  # noqa: E402
from evalkit.gate.judge import success_verdicts  # noqa: E402

TASKS = 10
PASS_, REG, INC = 0, 1, 2
DROPS = (0.05, 0.10, 0.20)


@dataclass(frozen=True)
class Scenario:
    n: int  # paired episodes (10 tasks x trials)
    mu: float  # suite mean success of the baseline
    rho: float  # probability the candidate reuses the baseline's uniform (0: independent)


def task_rates(mu: float) -> np.ndarray:
    s = 0.9 * min(mu, 1 - mu)
    return mu + s * np.linspace(-1, 1, TASKS)


def simulate_pairs(sc: Scenario, drop: float, reps: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes (reps, blocks, tasks) of baseline and candidate; block r = every task's init state r."""
    trials = sc.n // TASKS
    p = task_rates(sc.mu)[None, None, :]
    u = rng.random((reps, trials, TASKS))
    v = np.where(rng.random((reps, trials, TASKS)) < sc.rho, u, rng.random((reps, trials, TASKS)))
    return u < p, v < np.clip(p - drop, 0.0, 1.0)


def simulate_counts(n: int, mu: float, drop: float, reps: int, rng: np.random.Generator) -> np.ndarray:
    """Successes of `reps` independent stratified samples of n episodes (n/10 per task)."""
    p = np.clip(task_rates(mu) - drop, 0.0, 1.0)
    return rng.binomial(n // TASKS, p, size=(reps, TASKS)).sum(axis=1)


# --- the tests, as the gate applies them ------------------------------------------------------


def paired_fixed(base: np.ndarray, cand: np.ndarray, cfg: GateConfig, family: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(verdicts, p_regression) of the fixed paired tests on many runs (family: Bonferroni-free raw p)."""
    n = base.shape[1] * base.shape[2]
    b = (base & ~cand).sum(axis=(1, 2))
    c = (~base & cand).sum(axis=(1, 2))
    p = S.mcnemar_p(b, c)
    ni = S.noninferiority_p_paired(b, c, n, cfg.max_drop) <= cfg.alpha
    return ni, p


def paired_sequential(base: np.ndarray, cand: np.ndarray, cfg: GateConfig, chunk: int = 1000) -> SEQ.Paths:
    """decide_paths over the runs' block paths, `chunk` runs at a time (its arrays are runs x blocks x bets)."""
    d = base.astype(np.int8) - cand.astype(np.int8)
    cum_b = np.cumsum((d > 0).sum(axis=2), axis=1)
    cum_c = np.cumsum((d < 0).sum(axis=2), axis=1)
    cum_n = np.cumsum(np.full(d.shape[1], d.shape[2]))[None, :].repeat(d.shape[0], 0)
    parts = [SEQ.decide_paths(cum_b[i:i + chunk], cum_c[i:i + chunk], cum_n[i:i + chunk], cum_b[i:i + chunk, -1],
                              cum_c[i:i + chunk, -1], cfg, n_all=d.shape[1] * d.shape[2])
             for i in range(0, d.shape[0], chunk)]
    return SEQ.Paths(*(np.concatenate([getattr(p, f) for p in parts]) for f in SEQ.Paths.__dataclass_fields__))


def unpaired_fixed(xc: np.ndarray, nc: int, xb: np.ndarray, nb: int, cfg: GateConfig) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(S.fisher_worse_p(xc, nc, xb, nb))
    ni = S.noninferiority_p_unpaired(xc, nc, xb, nb, cfg.max_drop) <= cfg.alpha
    return ni, p


def verdicts(ni, p, cfg: GateConfig, family_size: int = 1) -> np.ndarray:
    """Per-cell verdicts; a cell alone in a family of K uses alpha / K (as judge does)."""
    return success_verdicts(ni, np.minimum(1.0, family_size * np.asarray(p)), cfg.alpha)


# --- rows ---------------------------------------------------------------------------------------


def mc_se(p: float, reps: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / reps)


def rows_paired(sc: Scenario, cfg: GateConfig, reps: int, rng: np.random.Generator) -> list[dict]:
    """The fixed and the sequential paired tests on the same simulated runs (common random numbers: the
    difference between the two designs is measured with far less Monte-Carlo error than two samples give)."""
    rows = [{"test": name, "n": sc.n, "mu": sc.mu, "rho": sc.rho, "reps": reps}
            for name in ("paired fixed", "paired sequential")]
    drops = {"0": 0.0, "margin/2": cfg.max_drop / 2, "margin": cfg.max_drop, **{f"{d:.2f}": d for d in DROPS}}
    for key, d in drops.items():
        base, cand = simulate_pairs(sc, d, reps, rng)
        ni, p = paired_fixed(base, cand, cfg)
        paths = paired_sequential(base, cand, cfg)
        seq = np.where(paths.kind == 1, PASS_, np.where(paths.kind == 2, REG, success_verdicts(
            np.zeros(reps, bool), paths.p_regression, SEQ.levels(cfg)[0])))
        for out, v, eps in ((rows[0], verdicts(ni, p, cfg), np.full(reps, sc.n)),
                            (rows[1], seq, np.where(paths.index >= 0, (paths.index + 1) * TASKS, sc.n))):
            out[f"reg@{key}"] = float(np.mean(v == REG))
            out[f"pass@{key}"] = float(np.mean(v == PASS_))
            out[f"episodes@{key}"] = float(np.mean(eps))
        if d == max(DROPS):
            rows[1]["episodes_bound@0.20"] = episodes_bound(sc, d, cfg.alpha, rows[1][f"reg@{key}"])
    return rows


def episodes_bound(sc: Scenario, drop: float, alpha: float, power: float) -> float:
    """Lower bound on the mean paired episodes of ANY test with false alarms <= alpha that catches this drop
    with probability `power`: E[N] * KL >= kl(power, alpha) (Wald's identity and the data-processing
    inequality), KL = the per-pair Kullback-Leibler divergence from the simulated candidate to the closest
    unchanged policy (per task, the same discordance with fair signs: psi_t kl(theta_t, 1/2))."""
    p = task_rates(sc.mu)
    q = np.clip(p - drop, 0.0, 1.0)
    p10 = sc.rho * np.maximum(p - q, 0) + (1 - sc.rho) * p * (1 - q)  # baseline ok, candidate failed
    p01 = sc.rho * np.maximum(q - p, 0) + (1 - sc.rho) * (1 - p) * q
    psi = p10 + p01
    theta = np.divide(p10, psi, out=np.full_like(psi, 0.5), where=psi > 0)
    kl_pair = float(np.mean(psi * _kl_bern(theta, 0.5)))
    return _kl_bern(min(power, 1 - 1e-12), alpha) / kl_pair


def _kl_bern(x, y):
    from scipy.special import xlogy

    x = np.asarray(x, dtype=float)
    return xlogy(x, x / y) + xlogy(1 - x, (1 - x) / (1 - y))


def row_unpaired(n: int, n_base: int, mu: float, cfg: GateConfig, reps: int, rng: np.random.Generator) -> dict:
    out = {"test": "unpaired fixed", "n": n, "n_base": n_base, "mu": mu, "rho": None, "reps": reps}
    drops = {"0": 0.0, "margin/2": cfg.max_drop / 2, "margin": cfg.max_drop, **{f"{d:.2f}": d for d in DROPS}}
    for key, d in drops.items():
        xb = simulate_counts(n_base, mu, 0.0, reps, rng)
        xc = simulate_counts(n, mu, d, reps, rng)
        ni, p = unpaired_fixed(xc, n, xb, n_base, cfg)
        v = verdicts(ni, p, cfg)
        out[f"reg@{key}"] = float(np.mean(v == REG))
        out[f"pass@{key}"] = float(np.mean(v == PASS_))
        out[f"episodes@{key}"] = float(n)
    return out


def unpaired_exact_false_alarm(n: int, n_base: int, alpha: float) -> dict:
    """Exact false-alarm rate of the Fisher rule at a common rate p, worst case over p (no simulation)."""
    crit = S.fisher_critical(n, n_base, alpha)
    grid = np.linspace(0.0, 1.0, 2001)
    fa = []
    for p in grid:
        w_b = np.exp(_binom_logpmf(np.arange(n_base + 1), n_base, p))
        fa.append(float(np.sum(w_b * np.where(crit >= 0, _binom_cdf(crit, n, p), 0.0))))
    i = int(np.argmax(fa))
    return {"n": n, "n_base": n_base, "worst_false_alarm": fa[i], "at_rate": float(grid[i])}


def _binom_logpmf(k, n, p):
    from scipy import stats

    return stats.binom.logpmf(k, n, p)


def _binom_cdf(k, n, p):
    from scipy import stats

    return stats.binom.cdf(k, n, p)


def family_row(sc: Scenario, cfg: GateConfig, cells: int, reps: int, rng: np.random.Generator, sequential: bool) -> dict:
    """P(any of `cells` unchanged cells called a regression) with the family adjustment of the nightly."""
    fam_cfg = GateConfig(alpha=cfg.alpha, max_drop=cfg.max_drop, family_size=cells, family_method=cfg.family_method)
    nis, ps = [], []
    for i in range(0, reps, 100):  # 100 nights at a time: bounded memory
        k = min(100, reps - i)
        base, cand = simulate_pairs(sc, 0.0, k * cells, rng)
        if sequential:
            paths = paired_sequential(base, cand, fam_cfg)
            nis.append(paths.kind == 1)
            ps.append(paths.p_regression)
        else:
            ni_, p_ = paired_fixed(base, cand, cfg)
            nis.append(ni_)
            ps.append(p_)
    ni, p = np.concatenate(nis).reshape(reps, cells), np.concatenate(ps).reshape(reps, cells)
    adj = np.stack([S.adjust_pvalues(row, cfg.family_method) for row in p])
    v = success_verdicts(ni, adj, cfg.alpha)
    unadj = success_verdicts(ni, p, cfg.alpha)
    return {"test": f"family of {cells}, paired {'sequential' if sequential else 'fixed'}", "n": sc.n, "mu": sc.mu,
            "rho": sc.rho, "reps": reps, "family_false_alarm": float(np.mean((v == REG).any(axis=1))),
            "family_false_alarm_unadjusted": float(np.mean((unadj == REG).any(axis=1))),
            "pass_cells": float(np.mean(v == PASS_))}


def honest_power_row(sc: Scenario, cfg: GateConfig, reps: int, rng: np.random.Generator) -> dict:
    """Detectable-drop claims on unchanged runs: plug-in discordance (the old gate) vs the conservative bound,
    and the real power (simulated) of the fixed McNemar test at the 10th percentile of each claim."""
    base, cand = simulate_pairs(sc, 0.0, reps, rng)
    n = sc.n
    c = (~base & cand).sum(axis=(1, 2))
    rate = base.mean(axis=(1, 2))
    out = {"test": "detectable drop claims (paired fixed)", "n": n, "mu": sc.mu, "rho": sc.rho, "reps": reps}
    for name, psi_of in (("plug-in 2c/n", lambda c: min(2 * c / n, 1.0)), ("conservative", lambda c: S.discordance_upper(c, n))):
        cache: dict[int, float] = {}
        claims = np.array([cache.setdefault(int(ci), S.detectable_drop_paired(n, cfg.alpha, cfg.power, psi_of(int(ci)),
                                                                              baseline_rate=float(np.median(rate))))
                           for ci in c])
        q10 = float(np.quantile(claims, 0.1))
        if math.isfinite(q10):
            bb, cc = simulate_pairs(sc, q10, reps, rng)
            bl = (bb & ~cc).sum(axis=(1, 2))
            cl = (~bb & cc).sum(axis=(1, 2))
            real = float(np.mean(S.mcnemar_p(bl, cl) <= cfg.alpha))
        else:
            real = math.nan
        out[name] = {"claim_p10": q10, "real_power_at_claim_p10": real}
    return out


# --- driver ---------------------------------------------------------------------------------------


def run(quick: bool, seed: int, reps: int | None) -> dict:
    cfg = GateConfig()
    rng = np.random.default_rng(seed)
    ns = (30, 100) if quick else (30, 100, 500)
    mus = (0.6, 0.9)
    rhos = (0.0, 0.9)
    reps = reps or (600 if quick else 4000)
    rows, fam, honest = [], [], []
    t0 = time.time()
    for n in ns:
        for mu in mus:
            for rho in rhos:
                sc = Scenario(n, mu, rho)
                rows += rows_paired(sc, cfg, reps, rng)
            for nb in sorted({n, 500}):
                rows.append(row_unpaired(n, nb, mu, cfg, reps, rng))
    fam_ns = (100,) if quick else (100, 500)
    for n in fam_ns:
        for mu in mus:
            for seq in (False, True):
                fam.append(family_row(Scenario(n, mu, 0.9), cfg, 28, max(reps // 4, 200) if quick else 2000, rng, seq))
                if not quick:
                    fam.append(family_row(Scenario(n, mu, 0.0), cfg, 28, 2000, rng, seq))
    if not quick:
        for n in (100, 500):
            for mu in mus:
                honest.append(honest_power_row(Scenario(n, mu, 0.9), cfg, reps, rng))
    exact = [unpaired_exact_false_alarm(30, 500, cfg.alpha)] + ([] if quick else [
        unpaired_exact_false_alarm(100, 100, cfg.alpha), unpaired_exact_false_alarm(500, 500, cfg.alpha)])
    return {"rows": rows, "family": fam, "honest_power": honest, "unpaired_exact": exact, "seconds": time.time() - t0,
            "alpha": cfg.alpha, "margin": cfg.max_drop, "power": cfg.power, "reps": reps, "seed": seed}


TRADEOFF = ((0.4, 16.0), (0.5, 16.0), (0.55, 8.0), (0.55, 16.0), (0.55, 32.0), (0.6, 16.0), (0.7, 16.0), (1.0, 16.0))


def spending_tradeoff(seed: int, reps: int, grid=TRADEOFF) -> list[dict]:
    """How the spending function's share and scale trade the 5 pp power against episodes to a 20 pp decision,
    on the noisy (independent) 500-episode scenarios, every design on the same runs as the fixed test."""
    cfg = GateConfig()
    rng = np.random.default_rng(seed)
    sims = {(mu, d): simulate_pairs(Scenario(500, mu, 0.0), d, reps, rng) for mu in (0.6, 0.9) for d in (0.05, 0.20)}
    fixed = {mu: np.mean(verdicts(*paired_fixed(*sims[(mu, 0.05)], cfg), cfg) == REG) for mu in (0.6, 0.9)}
    keep = SEQ.SPEND_SHARE, SEQ.SPEND_SCALE
    out = []
    try:
        for share, scale in grid:
            SEQ.SPEND_SHARE, SEQ.SPEND_SCALE = share, scale
            row = {"spend_share": share, "spend_scale": scale, "reps": reps}
            for mu in (0.6, 0.9):
                for d in (0.05, 0.20):
                    paths = paired_sequential(*sims[(mu, d)], cfg)
                    v = np.where(paths.kind == 1, PASS_, np.where(paths.kind == 2, REG, success_verdicts(
                        np.zeros(reps, bool), paths.p_regression, cfg.alpha)))
                    if d == 0.05:
                        row[f"power@0.05 difference, mu={mu}"] = float(np.mean(v == REG) - fixed[mu])
                    else:
                        row[f"episodes@0.20, mu={mu}"] = float(np.mean(np.where(paths.index >= 0, (paths.index + 1) * TASKS, 500)))
            out.append(row)
    finally:
        SEQ.SPEND_SHARE, SEQ.SPEND_SCALE = keep
    return out


def tradeoff_table(rows: list[dict]) -> str:
    lines = [("| spend share | spend scale (discordant pairs) | power@0.05 vs fixed, mu 0.6 | episodes@0.20, mu 0.6 | "
              "power@0.05 vs fixed, mu 0.9 | episodes@0.20, mu 0.9 |"), "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['spend_share']} | {r['spend_scale']:g} | {r['power@0.05 difference, mu=0.6']:+.3f} | "
                     f"{r['episodes@0.20, mu=0.6']:.1f} | {r['power@0.05 difference, mu=0.9']:+.3f} | "
                     f"{r['episodes@0.20, mu=0.9']:.1f} |")
    return "\n".join(lines)


def table(res: dict) -> str:
    head = ("| test | n | n_base | mu | rho | false alarm | power@0.05 | power@0.10 | power@0.20 | pass@0 | false pass "
            "(drop = margin) | reg@margin/2 | episodes@0 | episodes@0.20 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["rows"]:
        lines.append(
            f"| {r['test']} | {r['n']} | {r.get('n_base', r['n'])} | {r['mu']} | {'—' if r['rho'] is None else r['rho']} | "
            f"{r['reg@0']:.3f} | {r['reg@0.05']:.3f} | {r['reg@0.10']:.3f} | {r['reg@0.20']:.3f} | {r['pass@0']:.3f} | "
            f"{r['pass@margin']:.3f} | {r['reg@margin/2']:.3f} | {r['episodes@0']:.0f} | {r['episodes@0.20']:.0f} |")
    lines += ["", sequential_table(res)]
    lines += ["", "| family | n | mu | rho | family false alarm (Holm) | without adjustment | cells passing |", "|---|---|---|---|---|---|---|"]
    for r in res["family"]:
        lines.append(f"| {r['test']} | {r['n']} | {r['mu']} | {r['rho']} | {r['family_false_alarm']:.3f} | "
                     f"{r['family_false_alarm_unadjusted']:.3f} | {r['pass_cells']:.3f} |")
    if res["honest_power"]:
        lines += ["", "| detectable drop claims | n | mu | rho | plug-in: claim p10 | real power | conservative: claim p10 | real power |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["honest_power"]:
            a, b = r["plug-in 2c/n"], r["conservative"]
            lines.append(f"| unchanged, paired fixed | {r['n']} | {r['mu']} | {r['rho']} | {a['claim_p10']:.4f} | "
                         f"{a['real_power_at_claim_p10']:.3f} | {b['claim_p10']:.4f} | {b['real_power_at_claim_p10']:.3f} |")
    lines += ["", "| unpaired Fisher, exact | n | n_base | worst false alarm | at rate |", "|---|---|---|---|---|"]
    for r in res["unpaired_exact"]:
        lines.append(f"| one-sided Fisher | {r['n']} | {r['n_base']} | {r['worst_false_alarm']:.4f} | {r['at_rate']:.3f} |")
    return "\n".join(lines)


def sequential_vs_fixed(res: dict) -> list[dict]:
    """Per paired scenario: the sequential design against the fixed test on the same runs (the issue's
    acceptance: power at 5 pp within 0.1 of the fixed test, a 20 pp drop decided within 60 paired episodes
    on average), with the information bound on the episodes any valid test needs for that 20 pp drop."""
    fixed = {(r["n"], r["mu"], r["rho"]): r for r in res["rows"] if r["test"] == "paired fixed"}
    out = []
    for r in res["rows"]:
        if r["test"] != "paired sequential":
            continue
        f = fixed[(r["n"], r["mu"], r["rho"])]
        out.append({"n": r["n"], "mu": r["mu"], "rho": r["rho"], "power@0.05 fixed": f["reg@0.05"],
                    "power@0.05 sequential": r["reg@0.05"], "power@0.05 difference": r["reg@0.05"] - f["reg@0.05"],
                    "episodes@0.20": r["episodes@0.20"], "episodes_bound@0.20": r["episodes_bound@0.20"],
                    "pass@0 fixed": f["pass@0"], "pass@0 sequential": r["pass@0"], "episodes@0": r["episodes@0"]})
    return out


def sequential_table(res: dict) -> str:
    lines = [("| sequential vs fixed | n | mu | rho | power@0.05 fixed | sequential | difference | episodes@0.20 | "
              "bound@0.20 (any valid test) | pass@0 fixed | sequential | episodes@0 |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sequential_vs_fixed(res):
        lines.append(f"| same runs | {r['n']} | {r['mu']} | {r['rho']} | {r['power@0.05 fixed']:.3f} | "
                     f"{r['power@0.05 sequential']:.3f} | {r['power@0.05 difference']:+.3f} | {r['episodes@0.20']:.1f} | "
                     f"{r['episodes_bound@0.20']:.1f} | {r['pass@0 fixed']:.3f} | {r['pass@0 sequential']:.3f} | "
                     f"{r['episodes@0']:.0f} |")
    return "\n".join(lines)


def violations(res: dict, z: float = 3.0) -> list[str]:
    """Rates above their bound by more than z Monte-Carlo standard errors."""
    bad = []
    a = res["alpha"]
    for r in res["rows"]:
        reps = r["reps"]
        for key, bound in (("reg@0", a), ("pass@margin", a)):
            if r[key] > bound + z * mc_se(bound, reps):
                bad.append(f"{r['test']} n={r['n']} mu={r['mu']} rho={r['rho']}: {key} = {r[key]:.4f} > {bound}")
    for r in res["family"]:
        if r["family_false_alarm"] > a + z * mc_se(a, r["reps"]):
            bad.append(f"{r['test']} n={r['n']} mu={r['mu']}: family false alarm {r['family_false_alarm']:.4f} > {a}")
    for r in res["unpaired_exact"]:
        if r["worst_false_alarm"] > a + 1e-9:
            bad.append(f"unpaired exact n={r['n']} vs {r['n_base']}: {r['worst_false_alarm']:.4f} > {a}")
    return bad


def _provenance(argv: list[str] | None) -> dict:
    import scipy

    from evalkit.provenance import git_sha, package_versions

    sha, dirty = git_sha()
    return {"command": "python bench/gate_calibration.py " + " ".join(argv or sys.argv[1:]),
            "device": f"cpu ({platform.processor() or platform.machine()})", "host": platform.node(),
            "versions": {**package_versions(), "scipy": scipy.__version__, "python": platform.python_version()},
            "git_sha": sha, "git_dirty": dirty}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the seeded mini version (n <= 100, fewer replicates)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gate_calibration.json"))
    ap.add_argument("--tradeoff", action="store_true",
                    help="only the spending share/scale trade-off table (independent outcomes, n = 500)")
    args = ap.parse_args(argv)
    if args.tradeoff:
        t0 = time.time()
        rows = spending_tradeoff(args.seed, args.reps or 4000)
        print(tradeoff_table(rows))
        print(f"{time.time() - t0:.0f} s")
        doc = {"benchmark": "gate_calibration --tradeoff", **_provenance(argv), "seed": args.seed,
               "seconds": time.time() - t0, "rows": rows, "table_markdown": tradeoff_table(rows)}
        out = Path(args.out).with_name("gate_calibration_tradeoff.json")
        out.write_text(json.dumps(doc, indent=2))
        print(f"wrote {out}")
        return 0
    res = run(args.quick, args.seed, args.reps)
    print(table(res))
    bad = violations(res)
    print(f"\n{len(bad)} rate(s) above their bound by more than 3 Monte-Carlo SE" + "".join(f"\n  {b}" for b in bad))
    print(f"{res['seconds']:.0f} s")
    if not args.quick:
        doc = {"benchmark": "gate_calibration", **_provenance(argv), **res, "violations": bad,
               "sequential_design": {k: getattr(SEQ, k) for k in ("SPEND_SHARE", "SPEND_SCALE", "REGRESSION_STOP_SHARE",
                                                                  "NI_INTERIM_SHARE", "N_BETS")},
               "sequential_vs_fixed": sequential_vs_fixed(res), "table_markdown": table(res)}
        Path(args.out).write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
