"""The regression gate: a pure function of (candidate, baseline, thresholds) -> GateResult.

Success verdict, three-way (docs/gate_statistics.md gives each error rate):
- pass:         the drop is shown to be smaller than the margin `max_drop` (non-inferiority, level alpha);
- regression:   not pass, and the drop is shown to be > 0 (regression p-value, after the family
                adjustment, <= alpha);
- inconclusive: neither is shown: too few episodes (the check says how many would decide it) or a drop
                close to the margin. Exit 0 by default (the quick start's 9 episodes must not fail a
                run), exit 1 with `gate.fail_inconclusive=true`; never printed or stored as a pass.

Tests (evalkit.stats; evalkit.gate.sequential for `gate.sequential=true`): paired episodes use exact
McNemar (regression) and Tango's exact unconditional test (non-inferiority); unpaired ones use Fisher's
exact test and Chan's exact unconditional score test. An unchanged policy is called a regression with
probability <= alpha; a candidate that truly lost >= max_drop passes with probability <= alpha.

Several cells judged together (`evalkit.gate.family.judge_family`, the nightly) share one family: their
regression p-values are adjusted (Holm by default) and each check shows the raw and the adjusted p.
A cell judged alone with `family_size = K` uses alpha / K (the Bonferroni bound; Holm can only be kinder).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from evalkit import stats as S
from evalkit.errors import EXIT_PASS, EXIT_REGRESSION, BadInput
from evalkit.gate import sequential as SEQ
from evalkit.gate.compat import check_sim_versions
from evalkit.gate.config import GateConfig
from evalkit.gate.runs import StoredRun
from evalkit.results.summary import RunSummary

PASS, FAIL, WARN, SKIP, INCONCLUSIVE = "pass", "fail", "warn", "skip", "inconclusive"
VERDICTS = ("pass", "regression", "inconclusive")


@dataclass
class GateCheck:
    name: str
    value: Any
    threshold: Any
    passed: bool  # False only for a failing check; warn/skip/inconclusive do not fail the run by themselves
    explanation: str
    status: str = PASS  # pass | fail | warn | skip | inconclusive


@dataclass
class GateResult:
    passed: bool  # True only when the verdict is "pass"
    checks: list[GateCheck]
    candidate: str = ""
    baseline: str = ""
    mode: str = ""  # paired | unpaired
    warnings: list[str] = field(default_factory=list)
    verdict: str = "pass"  # pass | regression | inconclusive
    exit_code: int = EXIT_PASS  # 0 pass or inconclusive (1 with gate.fail_inconclusive), 1 regression
    design: str = "fixed"  # fixed | sequential
    family: dict[str, Any] = field(default_factory=dict)  # method, size, alpha, p_raw, p_adjusted
    evidence: dict[str, Any] = field(default_factory=dict)  # the success test's numbers (SuccessEvidence)

    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if c.status == FAIL]

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else str(float(x))  # JSON has no inf/nan
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# ---------------------------------------------------------------------------------------------
# Evidence: what the data say, before any family adjustment
# ---------------------------------------------------------------------------------------------


@dataclass
class SuccessEvidence:
    mode: str  # paired | unpaired
    design: str  # fixed | sequential
    p_regression: float  # raw regression p-value (H1: candidate worse)
    noninferior: bool  # the drop is shown < margin
    p_noninferior: float | None  # fixed design: its p-value; sequential: None (see `sequential`)
    detectable_drop: float  # smallest drop caught with probability >= power, conservative discordance
    episodes_needed: int | None  # episodes the fixed test needs for detectable_drop <= margin (None: not reachable)
    n: int  # paired episodes, or candidate episodes when unpaired
    n_base: int
    b: int | None = None  # lost pairs (paired)
    c: int | None = None  # gained pairs (paired)
    rates: str = ""
    test: str = ""
    power_note: str = ""
    sequential: dict[str, Any] | None = None  # SequentialOutcome.to_dict()


def _as_run(x: StoredRun | RunSummary | dict, label: str) -> StoredRun:
    if isinstance(x, StoredRun):
        return x
    if isinstance(x, (dict, RunSummary)):
        return StoredRun.from_summary(x, ref=label)
    raise BadInput(f"{label}: expected a StoredRun or a summary dict, got {type(x).__name__}")


def _fmt_rate(x: int, n: int) -> str:
    lo, hi = S.wilson_interval(x, n)
    return f"{x}/{n} = {x / n:.1%} [{lo:.1%}, {hi:.1%}]" if n else "0/0"


def _counts(run: StoredRun) -> tuple[int, int]:
    if run.episodes is not None and len(run.episodes):
        return int(run.episodes["success"].astype(bool).sum()), len(run.episodes)
    counts = run.summary.episode_counts()
    if counts is None:
        raise BadInput(f"run {run.ref} has no episode count in its summary")
    return counts


def _pair(cand: pd.DataFrame, base: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    keys = [k for k in ("suite", "task_id", "init_state_id") if k in cand.columns and k in base.columns]
    notes: list[str] = []
    if "init_state_id" not in keys or "task_id" not in keys:
        raise BadInput("episode tables need task_id and init_state_id columns to pair episodes")
    for name, df in (("candidate", cand), ("baseline", base)):
        if df.duplicated(keys).any() and "seed" in cand.columns and "seed" in base.columns:
            keys = keys + ["seed"]
            break
    for name, df in (("candidate", cand), ("baseline", base)):
        if df.duplicated(keys).any():
            raise BadInput(f"{name} episode table repeats {keys}: cannot pair episodes")
    merged = cand[keys + ["success"]].merge(base[keys + ["success"]], on=keys, suffixes=("_c", "_b"), how="inner")
    lone_c, lone_b = len(cand) - len(merged), len(base) - len(merged)
    if lone_c or lone_b:
        notes.append(
            f"paired on {len(merged)} identical {'/'.join(keys)}; {lone_c} candidate and {lone_b} baseline "
            "episodes without a partner are left out of the paired test"
        )
    return merged, notes


def cell_alpha(cfg: GateConfig) -> float:
    """Per-comparison level the detectable drop and the sequential boundary use: alpha / family_size."""
    return cfg.alpha / max(int(cfg.family_size), 1)


def _paired_evidence(merged: pd.DataFrame, base_eps: pd.DataFrame, cfg: GateConfig) -> SuccessEvidence:
    sc = merged["success_c"].astype(bool).to_numpy()
    sb = merged["success_b"].astype(bool).to_numpy()
    n = len(merged)
    b, c = S.discordant_counts(sb, sc)
    a = cell_alpha(cfg)
    psi_u = S.discordance_upper(c, n)
    mde = S.detectable_drop_paired(n, a, cfg.power, psi_u, baseline_rate=float(sb.mean()))
    need = None if mde <= cfg.max_drop else S.episodes_needed_paired(cfg.max_drop, a, cfg.power, gained_fraction=c / n)
    rates = f"candidate {_fmt_rate(int(sc.sum()), n)} vs baseline {_fmt_rate(int(sb.sum()), n)}"
    note = f"background discordance <= {psi_u:.3f} (2 x the 95% upper bound of {c} gained / {n})"
    if cfg.sequential:
        tk = merged["task_id"].astype(int).to_numpy()
        ik = merged["init_state_id"].astype(int).to_numpy()
        cand = dict(zip(zip(tk, ik), sc.tolist()))
        if "suite" in merged.columns and "suite" in base_eps.columns:
            base_eps = base_eps[base_eps["suite"].isin(set(merged["suite"]))]
        base = {(int(t), int(i)): bool(s) for t, i, s in zip(base_eps["task_id"], base_eps["init_state_id"], base_eps["success"])}
        out = SEQ.evaluate(base, cand, cfg)
        how = out.describe(cfg)
        test = f"sequential (group-sequential) test on {n} paired episodes, {b} lost, {c} gained: {how}"
        return SuccessEvidence("paired", "sequential", out.p_regression, out.decision == "pass", None, mde, need,
                               n, n, b, c, rates, test, note, out.to_dict())
    p = S.mcnemar_exact(b, c, "greater")
    p_ni = S.noninferiority_p_paired(b, c, n, cfg.max_drop)
    test = (f"exact McNemar on {n} paired episodes: {b} lost (baseline ok, candidate failed), {c} gained; "
            f"one-sided p = {p:.4g}; non-inferiority (Tango, exact) p = {p_ni:.4g}")
    return SuccessEvidence("paired", "fixed", p, p_ni <= cfg.alpha, p_ni, mde, need, n, n, b, c, rates, test, note)


def _unpaired_evidence(cand: StoredRun, base: StoredRun, cfg: GateConfig, why: str) -> SuccessEvidence:
    xc, nc = _counts(cand)
    xb, nb = _counts(base)
    if nc == 0 or nb == 0:
        raise BadInput("both runs need at least one episode for the success gate")
    a = cell_alpha(cfg)
    p = S.fisher_worse_p(xc, nc, xb, nb)
    p_ni = S.noninferiority_p_unpaired(xc, nc, xb, nb, cfg.max_drop)
    lo, hi = S.wilson_interval(xb, nb)
    rate = min(max(0.5, lo), hi)  # the baseline rate in its interval with the largest variance: conservative power
    mde = S.detectable_drop_unpaired(nc, nb, rate, a, cfg.power)
    need = None if mde <= cfg.max_drop else _episodes_needed_unpaired(nb, rate, a, cfg)
    test = (f"one-sided Fisher exact test ({why}): p = {p:.4g}; non-inferiority (Chan's exact score test) "
            f"p = {p_ni:.4g}")
    if cfg.sequential:
        test += "; gate.sequential needs paired episodes: fixed-size tests used"
    rates = f"candidate {_fmt_rate(xc, nc)} vs baseline {_fmt_rate(xb, nb)}"
    return SuccessEvidence("unpaired", "fixed", p, p_ni <= cfg.alpha, p_ni, mde, need, nc, nb, None, None, rates, test,
                           f"baseline rate taken as {rate:.3f} (its 95% interval's most variable value)")


def _episodes_needed_unpaired(n_base: int, rate: float, a: float, cfg: GateConfig) -> int | None:
    """Candidate episodes for a detectable drop <= margin against this baseline sample (None: not reachable)."""
    f = lambda n: S.power_unpaired(n, n_base, rate, cfg.max_drop, a) >= cfg.power  # noqa: E731
    hi = 4 * n_base
    if not f(hi):
        return None
    lo = 1
    while hi - lo > max(1, hi // 50):  # 2 % resolution is enough for advice and keeps the tables few
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if f(mid) else (mid, hi)
    return hi


def success_evidence(cand: StoredRun, base: StoredRun, cfg: GateConfig) -> tuple[SuccessEvidence, list[str]]:
    warnings: list[str] = []
    if cand.episodes is not None and base.episodes is not None and len(cand.episodes) and len(base.episodes):
        merged, notes = _pair(cand.episodes, base.episodes)
        warnings += notes
        if len(merged):
            return _paired_evidence(merged, base.episodes, cfg), warnings
        warnings.append("no episode shares (task_id, init_state_id) with the baseline: unpaired test instead")
        return _unpaired_evidence(cand, base, cfg, "no episode pairs"), warnings
    return _unpaired_evidence(cand, base, cfg, "no episode pairing available"), warnings


# ---------------------------------------------------------------------------------------------
# Checks and verdict
# ---------------------------------------------------------------------------------------------


def success_verdict(noninferior: bool, p_adjusted: float, alpha: float) -> str:
    """pass when non-inferiority is shown; else regression when the adjusted p <= alpha; else inconclusive."""
    if noninferior:
        return "pass"
    return "regression" if p_adjusted <= alpha else "inconclusive"


def success_verdicts(noninferior: np.ndarray, p_adjusted: np.ndarray, alpha: float) -> np.ndarray:
    """`success_verdict` over arrays (the calibration bench): 0 pass, 1 regression, 2 inconclusive."""
    ni = np.asarray(noninferior, dtype=bool)
    return np.where(ni, 0, np.where(np.asarray(p_adjusted) <= alpha, 1, 2))


def _success_checks(ev: SuccessEvidence, cfg: GateConfig, p_adj: float, family: dict[str, Any]) -> tuple[list[GateCheck], str, list[str]]:
    verdict = success_verdict(ev.noninferior, p_adj, cfg.alpha)
    warnings: list[str] = []
    fam = ""
    if family.get("method") not in (None, "none") and family.get("size", 1) > 1:
        fam = f"; adjusted p = {p_adj:.4g} ({family['method']}, family of {family['size']}, alpha {cfg.alpha})"
    sig_drop = p_adj <= cfg.alpha
    say = {
        "pass": ("drop shown < max_drop: pass" + (" (a drop > 0 is significant but within the allowance)" if sig_drop else "")),
        "regression": "significant drop, not shown within max_drop: regression",
        "inconclusive": "neither a drop nor non-inferiority is shown: inconclusive",
    }[verdict]
    checks = [GateCheck(
        f"success ({ev.mode})", float(p_adj), f"p > {cfg.alpha}", verdict != "regression",
        f"{ev.rates}; {ev.test}; raw p = {ev.p_regression:.4g}{fam}; {say}",
        {"regression": FAIL, "inconclusive": INCONCLUSIVE}.get(verdict, WARN if sig_drop else PASS),
    )]
    if ev.design == "sequential":
        sq = ev.sequential or {}
        e_ni = math.exp(sq.get("log_e_noninferior", 0.0))
        thr = 1 / (cfg.alpha * SEQ.NI_INTERIM_SHARE)
        txt = f"anytime-valid e-value for 'drop < {cfg.max_drop}' = {e_ni:.3g} (boundary {thr:.3g})"
        if sq.get("stage") != "interim":
            txt += f"; final exact test p = {sq.get('p_noninferior_final', math.nan):.4g} (level {cfg.alpha * (1 - SEQ.NI_INTERIM_SHARE):.3g})"
        checks.append(GateCheck(
            "non-inferiority", float(e_ni), f"E >= {thr:.3g} or final p <= {cfg.alpha * (1 - SEQ.NI_INTERIM_SHARE):.3g} "
            f"(drop < {cfg.max_drop})", True, txt + (": shown" if ev.noninferior else ": not shown"),
            PASS if ev.noninferior else INCONCLUSIVE,
        ))
    else:
        checks.append(GateCheck(
            "non-inferiority", float(ev.p_noninferior), f"p <= {cfg.alpha} (drop < {cfg.max_drop})", True,
            f"exact test of 'drop < {cfg.max_drop}': p = {ev.p_noninferior:.4g}" + (": shown" if ev.noninferior else ": not shown"),
            PASS if ev.noninferior else INCONCLUSIVE,
        ))
    mde, need = ev.detectable_drop, ev.episodes_needed
    unit = "paired episodes" if ev.mode == "paired" else "candidate episodes"
    mde_txt = "no drop" if math.isinf(mde) else f"a drop of {mde:.3f}"
    expl = (f"with these {ev.n} {unit} the fixed test catches {mde_txt} with probability >= {cfg.power} at level "
            f"{cell_alpha(cfg):.3g} ({ev.power_note}); max_drop {cfg.max_drop}")
    if mde <= cfg.max_drop:
        status = PASS
    else:
        more = (f"about {need} {unit} with the same outcomes would catch a drop of {cfg.max_drop}" if need
                else f"no number of {unit} reaches it against this baseline" + (" (it needs more baseline episodes)" if ev.mode == "unpaired" else ""))
        expl += f"; {more}"
        status = INCONCLUSIVE if verdict == "inconclusive" else WARN
        if verdict == "inconclusive":
            warnings.append(f"inconclusive: {ev.n} {unit} cannot vouch for a drop of {cfg.max_drop} "
                            f"(detectable {mde_txt}); {more}")
        elif verdict == "pass":
            expl += "; non-inferiority was shown directly, which is the stronger statement"
    checks.append(GateCheck("detectable drop", float(mde), f"<= {cfg.max_drop}", True, expl, status))
    return checks, verdict, warnings


def _device(run: StoredRun) -> str | None:
    # the GPU's name when the run recorded it ("NVIDIA H100 80GB HBM3"): "cuda" alone does not say which GPU
    return (run.summary.device_name or run.summary.latency.device_name or run.params.get("device")
            or run.summary.params.device)


def _latency_check(cand: StoredRun, base: StoredRun, cfg: GateConfig) -> GateCheck:
    """Fails only when the candidate's p50 is above max_latency_ratio x the baseline's with 95% confidence
    (bootstrap of the raw call times) and grew by more than latency_min_delta_ms."""
    name = "latency p50 ratio"
    thr = f"<= {cfg.max_latency_ratio}"
    lc, lb = cand.summary.latency, base.summary.latency
    raw = cand.latency_calls is not None and base.latency_calls is not None and len(cand.latency_calls) and len(base.latency_calls)
    if not raw and (not lc.p50_ms or not lb.p50_ms):
        return GateCheck(name, None, thr, True, "skipped: a run has no latency numbers", SKIP)
    dc, db = _device(cand), _device(base)
    if dc is None or db is None or str(dc) != str(db):
        return GateCheck(name, None, thr, True,
                         f"skipped: latency is only compared on the same device (candidate {dc}, baseline {db})", SKIP)
    if raw:
        cc, cb = np.asarray(cand.latency_calls, float), np.asarray(base.latency_calls, float)
        est = S.latency_ratio(cc, cb)
        p50c, p50b = float(np.median(cc)), float(np.median(cb))
        shown = math.isfinite(est.low) and est.low > cfg.max_latency_ratio
        spread = f"95% interval {est.low:.3f}..{est.high:.3f} ({est.method})"
    else:
        est = S.latency_ratio_from_quantiles(lc.to_dict(), lb.to_dict())
        p50c, p50b = float(lc.p50_ms), float(lb.p50_ms)
        shown = True  # two stored numbers carry no uncertainty: the point ratio decides, as it always did
        spread = f"p50..p99 ratios span {est.low:.3f}..{est.high:.3f} ({est.method})"
    delta = p50c - p50b
    expl = f"p50 {p50c:.3f} ms vs {p50b:.3f} ms on {dc}; {spread}"
    if est.ratio <= cfg.max_latency_ratio:
        return GateCheck(name, float(est.ratio), thr, True, expl, PASS)
    if delta <= cfg.latency_min_delta_ms:
        return GateCheck(name, float(est.ratio), thr, True, expl + f"; the p50 grew by {delta:.3f} ms <= "
                         f"gate.latency_min_delta_ms={cfg.latency_min_delta_ms}: timer noise, not a regression", WARN)
    if not shown:
        return GateCheck(name, float(est.ratio), thr, True, expl + "; above the maximum but the interval includes it: "
                         "not shown slower", WARN)
    return GateCheck(name, float(est.ratio), thr, False, expl, FAIL)


def _shown(v: Any) -> Any:
    return "?" if v is None else v


def _fidelity_check(cand: StoredRun) -> GateCheck | None:
    fid = cand.summary.fidelity
    if not fid:
        return None
    bad, ok = fid.failed_checks, fid.passed
    # re-judging never rebuilds the models: it reuses the verdict the run measured (say so, and what it was)
    how = (f"reused the fidelity verdict stored with {cand.ref} at run time (not recomputed: "
           f"{len(fid.checks)} checks, {_shown(fid.precision_class)} budgets vs "
           f"{_shown(fid.reference_backend)}, {_shown(fid.probes)} held-out probes)")
    return GateCheck(
        "fidelity", "pass" if ok else "fail", "all checks pass", ok,
        (f"{how}: every check passed" if ok else f"{how}: failed {', '.join(bad)}"), PASS if ok else FAIL,
    )


@dataclass
class Comparison:
    """One candidate vs baseline, evaluated but not yet decided (the family adjusts `evidence.p_regression`)."""

    candidate: str
    baseline: str
    evidence: SuccessEvidence
    other_checks: list[GateCheck]  # fidelity first, latency last (success checks go between)
    warnings: list[str]


def compare(candidate: StoredRun | dict, baseline: StoredRun | dict, cfg: GateConfig) -> Comparison:
    cand, base = _as_run(candidate, "candidate"), _as_run(baseline, "baseline")
    check_sim_versions(cand.summary, base.summary, cfg.allow_sim_mismatch)  # exit 2: runs on different simulators
    sc = cand.params.get("suite") or cand.summary.params.suite
    sb = base.params.get("suite") or base.summary.params.suite
    if sc and sb and sc != sb:
        raise BadInput(f"candidate suite '{sc}' differs from baseline suite '{sb}': nothing to compare")
    ev, warnings = success_evidence(cand, base, cfg)
    checks: list[GateCheck] = []
    fid = _fidelity_check(cand)
    if fid:
        checks.append(fid)
    checks.append(_latency_check(cand, base, cfg))
    if cand.episodes is not None and "failure_reason" in cand.episodes.columns:
        reasons = cand.episodes["failure_reason"].dropna().astype(str)
        broken = reasons[~reasons.eq("timeout")]
        if len(broken):
            kinds = broken.str.split(":").str[0].value_counts().to_dict()
            warnings.append(f"candidate episodes that crashed count as failures: {kinds}")
    pc, pb = cand.summary.protocol, base.summary.protocol
    if pc and pb:
        diff = sorted(k for k in set(pc) | set(pb) if pc.get(k) != pb.get(k))
        if diff:
            warnings.append(f"protocols differ in {', '.join(diff)}: success rates may not be comparable")
    for p in ("policy", "denoise_steps"):
        if cand.params.get(p) is not None and base.params.get(p) is not None and str(cand.params[p]) != str(base.params[p]):
            warnings.append(f"{p} differs: candidate {cand.params[p]}, baseline {base.params[p]}")
    return Comparison(cand.ref, base.ref, ev, checks, warnings)


def decide(comp: Comparison, cfg: GateConfig, p_adjusted: float, family: dict[str, Any]) -> GateResult:
    """Assemble the GateResult of a comparison given its (family-)adjusted regression p-value."""
    success, verdict, more = _success_checks(comp.evidence, cfg, p_adjusted, family)
    others = comp.other_checks
    checks = [c for c in others if c.name == "fidelity"] + success + [c for c in others if c.name != "fidelity"]
    if any(c.status == FAIL for c in checks):
        verdict = "regression"
    if verdict == "regression":
        code = EXIT_REGRESSION
    elif verdict == "inconclusive":
        code = EXIT_REGRESSION if cfg.fail_inconclusive else EXIT_PASS
    else:
        code = EXIT_PASS
    return GateResult(
        passed=verdict == "pass", checks=checks, candidate=comp.candidate, baseline=comp.baseline,
        mode=comp.evidence.mode, warnings=comp.warnings + more, verdict=verdict, exit_code=code,
        design=comp.evidence.design, family={**family, "p_raw": comp.evidence.p_regression, "p_adjusted": p_adjusted},
        evidence=asdict(comp.evidence),
    )


def lone_adjustment(p: float, cfg: GateConfig) -> tuple[float, dict[str, Any]]:
    """A cell judged without its family: Bonferroni over family_size (Holm's bound when the others are unknown)."""
    k = max(int(cfg.family_size), 1)
    if k == 1 or cfg.family_method == "none":
        return p, {"method": "none", "size": 1, "alpha": cfg.alpha}
    return min(1.0, k * p), {"method": f"bonferroni (judged alone in a family of {k})", "size": k, "alpha": cfg.alpha}


def judge(candidate: StoredRun | dict, baseline: StoredRun | dict, thresholds: GateConfig | None = None) -> GateResult:
    """Judge a candidate run against a baseline; every check is listed with value, threshold, explanation."""
    cfg = (thresholds or GateConfig()).validate()
    comp = compare(candidate, baseline, cfg)
    p_adj, family = lone_adjustment(comp.evidence.p_regression, cfg)
    return decide(comp, cfg, p_adj, family)
