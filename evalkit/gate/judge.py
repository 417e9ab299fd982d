"""The regression gate: a pure function of (candidate, baseline, thresholds) -> GateResult.

The statistics come from evalkit.stats (scipy.stats underneath): exact McNemar on paired
episodes, the one-sided score test on two proportions otherwise, exact power for the
detectable drop, Wilson intervals for every rate. pandas pairs the episode tables.

Success check: fails when the candidate is significantly worse than the baseline (one-sided
p <= alpha), so an unchanged policy fails with probability <= alpha. A second check reports the
smallest drop this many episodes catches with probability >= power and warns when that is
larger than `max_drop` (the run was too small to vouch for the drop you care about).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from evalkit import stats as S
from evalkit.errors import BadInput
from evalkit.gate.config import GateConfig
from evalkit.gate.runs import StoredRun

PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"


@dataclass
class GateCheck:
    name: str
    value: Any
    threshold: Any
    passed: bool  # False only for a failing check; warn/skip count as passed
    explanation: str
    status: str = PASS  # pass | fail | warn | skip


@dataclass
class GateResult:
    passed: bool
    checks: list[GateCheck]
    candidate: str = ""
    baseline: str = ""
    mode: str = ""  # paired | unpaired
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if c.status == FAIL]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for c in d["checks"]:
            for k in ("value", "threshold"):
                if isinstance(c[k], float) and not math.isfinite(c[k]):
                    c[k] = str(c[k])  # JSON has no inf/nan
        return d


def _check(name, value, threshold, status, explanation) -> GateCheck:
    return GateCheck(name, value, threshold, status != FAIL, explanation, status)


def _as_run(x: StoredRun | dict, label: str) -> StoredRun:
    if isinstance(x, StoredRun):
        return x
    if isinstance(x, dict):
        return StoredRun.from_summary(x, ref=label)
    raise BadInput(f"{label}: expected a StoredRun or a summary dict, got {type(x).__name__}")


def _fmt_rate(x: int, n: int) -> str:
    lo, hi = S.wilson_interval(x, n)
    return f"{x}/{n} = {x / n:.1%} [{lo:.1%}, {hi:.1%}]" if n else "0/0"


def _counts(run: StoredRun) -> tuple[int, int]:
    if run.episodes is not None and len(run.episodes):
        return int(run.episodes["success"].astype(bool).sum()), len(run.episodes)
    s = run.summary
    if "episodes" not in s:
        raise BadInput(f"run {run.ref} has no episode count in its summary")
    n = int(s["episodes"])
    x = int(s["successes"]) if "successes" in s else int(round(float(s["success_rate"]) * n))
    return x, n


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


def _success_checks(cand: StoredRun, base: StoredRun, cfg: GateConfig) -> tuple[list[GateCheck], str, list[str]]:
    warnings: list[str] = []
    merged = None
    if cand.episodes is not None and base.episodes is not None and len(cand.episodes) and len(base.episodes):
        merged, notes = _pair(cand.episodes, base.episodes)
        warnings += notes
        if not len(merged):
            warnings.append("no episode shares (task_id, init_state_id) with the baseline: unpaired test instead")
            merged = None
    if merged is not None:
        mode = "paired"
        sc, sb = merged["success_c"].astype(bool).to_numpy(), merged["success_b"].astype(bool).to_numpy()
        n = len(merged)
        b, c = S.discordant_counts(sb, sc)
        p = S.mcnemar_exact(b, c, "greater")
        psi0 = min(2 * c / n, 1.0)  # symmetric flips seen in the data = noise that is not a regression
        mde = S.detectable_drop_paired(n, cfg.alpha, cfg.power, psi0, baseline_rate=float(sb.mean()))
        test = (
            f"exact McNemar on {n} paired episodes: {b} lost (baseline ok, candidate failed), {c} gained; "
            f"one-sided p = {p:.4g}"
        )
        rates = f"candidate {_fmt_rate(int(sc.sum()), n)} vs baseline {_fmt_rate(int(sb.sum()), n)}"
        power_note = f"background discordance {psi0:.3f} (2 x gained / n)"
    else:
        mode = "unpaired"
        xc, nc = _counts(cand)
        xb, nb = _counts(base)
        if nc == 0 or nb == 0:
            raise BadInput("both runs need at least one episode for the success gate")
        p = S.two_proportion_test(xc, nc, xb, nb, margin=0.0, alternative="worse")
        mde = S.detectable_drop_unpaired(nc, nb, xb / nb, cfg.alpha, cfg.power)
        test = f"one-sided score test on two proportions (no episode pairing available): p = {p:.4g}"
        rates = f"candidate {_fmt_rate(xc, nc)} vs baseline {_fmt_rate(xb, nb)}"
        power_note = f"baseline rate {xb / nb:.3f}"
    failed = p <= cfg.alpha
    verdict = "significant drop: regression" if failed else "no significant drop"
    checks = [
        _check(
            f"success ({mode})",
            float(p),
            f"p > {cfg.alpha}",
            FAIL if failed else PASS,
            f"{rates}; {test}; {verdict} at alpha = {cfg.alpha}",
        )
    ]
    mde_txt = "no drop" if math.isinf(mde) else f"a drop of {mde:.3f}"
    underpowered = mde > cfg.max_drop
    expl = (
        f"with these episodes the test catches {mde_txt} with probability >= {cfg.power} "
        f"({power_note}); allowed drop {cfg.max_drop}"
    )
    if underpowered:
        n_used = len(merged) if merged is not None else None
        what = (f"no drop at all is detectable with {n_used} paired episodes" if math.isinf(mde) and n_used
                else "no drop at all is detectable with these episodes" if math.isinf(mde)
                else f"smallest detectable drop {mde:.3f}")
        warnings.append(f"underpowered: {what} > allowed drop {cfg.max_drop}; run more episodes to vouch for it")
    checks.append(_check("detectable drop", float(mde), f"<= {cfg.max_drop}",
                         WARN if underpowered else PASS, expl))
    return checks, mode, warnings


def _device(run: StoredRun) -> str | None:
    # the GPU's name when the run recorded it ("NVIDIA H100 80GB HBM3"): "cuda" alone does not say which GPU
    lat = run.summary.get("latency") or {}
    return (run.summary.get("device_name") or lat.get("device_name") or run.params.get("device")
            or (run.summary.get("params") or {}).get("device"))


def _latency_check(cand: StoredRun, base: StoredRun, cfg: GateConfig) -> GateCheck:
    name = "latency p50 ratio"
    lc, lb = cand.summary.get("latency") or {}, base.summary.get("latency") or {}
    if not lc.get("latency_ms_p50") or not lb.get("latency_ms_p50"):
        return _check(name, None, f"<= {cfg.max_latency_ratio}", SKIP, "skipped: a run has no latency_ms_p50")
    dc, db = _device(cand), _device(base)
    if dc is None or db is None or str(dc) != str(db):
        return _check(
            name, None, f"<= {cfg.max_latency_ratio}", SKIP,
            f"skipped: latency is only compared on the same device (candidate {dc}, baseline {db})",
        )
    est = S.latency_ratio_from_quantiles(lc, lb)
    delta = lc["latency_ms_p50"] - lb["latency_ms_p50"]
    ok = est.ratio <= cfg.max_latency_ratio
    status = PASS if ok else (WARN if delta <= cfg.latency_min_delta_ms else FAIL)
    expl = (f"p50 {lc['latency_ms_p50']:.2f} ms vs {lb['latency_ms_p50']:.2f} ms on {dc}; "
            f"p50..p99 ratios span {est.low:.3f}..{est.high:.3f}")
    if status == WARN:
        expl += f"; the p50 grew by {delta:.3f} ms <= gate.latency_min_delta_ms={cfg.latency_min_delta_ms}: timer noise, not a regression"
    return _check(name, float(est.ratio), f"<= {cfg.max_latency_ratio}", status, expl)


def _fidelity_check(cand: StoredRun) -> GateCheck | None:
    fid = cand.summary.get("fidelity")
    if not fid:
        return None
    bad = [c["name"] for c in fid.get("checks", []) if c.get("passed") is False]
    ok = bool(fid.get("passed", not bad))
    return _check(
        "fidelity", "pass" if ok else "fail", "all checks pass", PASS if ok else FAIL,
        "fidelity checks passed" if ok else f"fidelity failed before rollouts: {', '.join(bad)}",
    )


def judge(candidate: StoredRun | dict, baseline: StoredRun | dict, thresholds: GateConfig | None = None) -> GateResult:
    """Judge a candidate run against a baseline; every check is listed with value, threshold, explanation."""
    cfg = thresholds or GateConfig()
    cand, base = _as_run(candidate, "candidate"), _as_run(baseline, "baseline")
    sc = cand.params.get("suite") or (cand.summary.get("params") or {}).get("suite")
    sb = base.params.get("suite") or (base.summary.get("params") or {}).get("suite")
    if sc and sb and sc != sb:
        raise BadInput(f"candidate suite '{sc}' differs from baseline suite '{sb}': nothing to compare")
    checks: list[GateCheck] = []
    fid = _fidelity_check(cand)
    if fid:
        checks.append(fid)
    success, mode, warnings = _success_checks(cand, base, cfg)
    checks += success
    checks.append(_latency_check(cand, base, cfg))
    if cand.episodes is not None and "failure_reason" in cand.episodes.columns:
        reasons = cand.episodes["failure_reason"].dropna().astype(str)
        broken = reasons[~reasons.eq("timeout")]
        if len(broken):
            kinds = broken.str.split(":").str[0].value_counts().to_dict()
            warnings.append(f"candidate episodes that crashed count as failures: {kinds}")
    pc, pb = cand.summary.get("protocol") or {}, base.summary.get("protocol") or {}
    if pc and pb:
        diff = sorted(k for k in set(pc) | set(pb) if pc.get(k) != pb.get(k))
        if diff:
            warnings.append(f"protocols differ in {', '.join(diff)}: success rates may not be comparable")
    for p in ("policy", "denoise_steps"):
        if cand.params.get(p) is not None and base.params.get(p) is not None and str(cand.params[p]) != str(base.params[p]):
            warnings.append(f"{p} differs: candidate {cand.params[p]}, baseline {base.params[p]}")
    return GateResult(
        passed=all(c.passed for c in checks), checks=checks, candidate=cand.ref, baseline=base.ref,
        mode=mode, warnings=warnings,
    )
