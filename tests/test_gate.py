"""The gate as a pure function over small hand-made runs (episode tables and summaries)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from evalkit import stats as S
from evalkit.errors import BadInput
from evalkit.gate import GateConfig, StoredRun, judge
from evalkit.gate.family import judge_family
from evalkit.gate.judge import success_verdict
from evalkit.gate.render import print_gate, verdict_line
from evalkit.results.summary import FidelitySummary

sm_mt = pytest.importorskip("statsmodels.stats.multitest")


def episodes(success: list[bool], suite="libero_spatial", tasks=3) -> pd.DataFrame:
    n = len(success)
    return pd.DataFrame(
        {
            "suite": suite,
            "task_id": [i % tasks for i in range(n)],
            "task_name": [f"task{i % tasks}" for i in range(n)],
            "init_state_id": [i // tasks for i in range(n)],
            "seed": 7,
            "success": success,
            "steps": 100,
            "failure_reason": [None if s else "timeout" for s in success],
            "wall_time_s": 1.0,
            "policy_time_s": 0.5,
            "video_path": None,
        }
    )


def run(success, p50=10.0, device="cuda:H100", with_episodes=True, tasks=3, calls=None, **params) -> StoredRun:
    df = episodes(list(success), tasks=tasks)
    x, n = int(df.success.sum()), len(df)
    lo, hi = S.wilson_interval(x, n)
    p = {"policy": "pi05_tiny", "backend": "bf16", "suite": "libero_spatial", "denoise_steps": 10, "device": device, **params}
    summary = {
        "success_rate": x / n, "success_ci_low": lo, "success_ci_high": hi, "episodes": n, "successes": x,
        "per_task": {}, "latency": {"latency_ms_p50": p50, "latency_ms_p90": p50 * 1.2, "latency_ms_p99": p50 * 1.5},
        "params": p, "fidelity": None, "gate": None,
    }
    return StoredRun(summary, df if with_episodes else None, p, {}, ref=f"run{n}",
                     latency_calls=None if calls is None else np.asarray(calls, float))


def by_name(result, prefix):
    return next(c for c in result.checks if c.name.startswith(prefix))


def test_identical_runs_pass_and_every_check_is_listed():
    s = [True] * 90 + [False] * 10
    r = judge(run(s), run(s), GateConfig())
    assert r.verdict == "pass" and r.passed and r.exit_code == 0 and r.mode == "paired" and r.design == "fixed"
    names = [c.name for c in r.checks]
    assert names == ["success (paired)", "non-inferiority", "detectable drop", "latency p50 ratio"]
    assert all(c.explanation for c in r.checks)
    assert by_name(r, "non-inferiority").value == pytest.approx(S.noninferiority_p_paired(0, 0, 100, 0.05))
    d = json.loads(json.dumps(r.to_dict()))  # summary.json-safe
    assert d["verdict"] == "pass" and d["exit_code"] == 0 and d["evidence"]["b"] == 0


def test_paired_drop_fails_with_mcnemar_p_value():
    base = [True] * 50
    cand = [True] * 38 + [False] * 12
    r = judge(run(cand), run(base), GateConfig())
    c = by_name(r, "success")
    assert r.verdict == "regression" and not r.passed and r.exit_code == 1 and c.status == "fail"
    assert c.value == pytest.approx(S.mcnemar_exact(12, 0), rel=1e-9)
    assert "12 lost" in c.explanation
    assert verdict_line(r).startswith("gate: REGRESSION: success (paired)")


def test_paired_uses_pairs_not_totals():
    # Same totals (25/50 each) but 15 pairs lost and 15 gained: b=15, c=15, no evidence either way.
    base = np.array([True] * 25 + [False] * 25)
    cand = base.copy()
    cand[:15] = False  # lose 15
    cand[25:40] = True  # gain 15 -> totals equal, no regression
    r = judge(run(list(cand)), run(list(base)), GateConfig())
    assert r.verdict == "inconclusive" and "15 lost" in by_name(r, "success").explanation
    assert by_name(r, "success").value == pytest.approx(S.mcnemar_exact(15, 15), rel=1e-9)


def test_max_drop_is_a_non_inferiority_margin():
    # 400 pairs, 8 lost, none gained: a 2 pp drop, significant, but shown < 5 pp: within the allowance.
    base = [True] * 400
    small = [False] * 8 + [True] * 392
    r = judge(run(small), run(base), GateConfig(max_drop=0.05))
    assert r.verdict == "pass" and r.exit_code == 0
    assert by_name(r, "success").status == "warn" and "within the allowance" in by_name(r, "success").explanation
    assert S.mcnemar_exact(8, 0) < 0.01 and by_name(r, "non-inferiority").value < 0.05
    # the same 2 pp drop fails a margin it does not fit in
    tight = judge(run(small), run(base), GateConfig(max_drop=0.02))
    assert tight.verdict == "regression"
    # a drop at the margin is never shown within it
    at = judge(run([False] * 20 + [True] * 380), run(base), GateConfig(max_drop=0.05))
    assert at.verdict == "regression" and by_name(at, "non-inferiority").status == "inconclusive"


def test_unpaired_when_baseline_has_no_episode_table():
    base = run([True] * 45 + [False] * 5, with_episodes=False)
    cand = run([True] * 30 + [False] * 20)
    r = judge(cand, base, GateConfig())
    assert r.mode == "unpaired" and r.verdict == "regression"
    ref = sps.fisher_exact([[30, 45], [20, 5]], alternative="less").pvalue
    assert by_name(r, "success").value == pytest.approx(ref, rel=1e-9)
    r2 = judge(cand.summary.to_dict(), base.summary)  # a plain summary dict or a RunSummary works too
    assert r2.mode == "unpaired" and r2.verdict == "regression"


def test_29_of_30_against_500_of_500_is_not_a_regression():
    r = judge({"episodes": 30, "successes": 29}, {"episodes": 500, "successes": 500})
    assert r.mode == "unpaired" and r.verdict == "inconclusive" and r.exit_code == 0 and not r.passed
    assert by_name(r, "success").value == pytest.approx(0.0566, abs=1e-4)
    assert "candidate episodes" in by_name(r, "detectable drop").explanation


def test_small_run_is_inconclusive_not_a_pass(capsys):
    s = [True] * 9
    r = judge(run(s), run(s), GateConfig(max_drop=0.05))
    assert r.verdict == "inconclusive" and not r.passed and r.exit_code == 0
    mde = by_name(r, "detectable drop")
    assert mde.status == "inconclusive" and "paired episodes with the same outcomes would catch" in mde.explanation
    assert any(w.startswith("inconclusive:") for w in r.warnings)
    print_gate(r)
    out = capsys.readouterr().out
    assert "gate: INCONCLUSIVE (not a pass; exit 0" in out and "gate: PASS" not in out
    strict = judge(run(s), run(s), GateConfig(fail_inconclusive=True))
    assert strict.verdict == "inconclusive" and strict.exit_code == 1


def test_detectable_drop_uses_a_conservative_discordance():
    # 300 pairs, nothing gained: the old plug-in (2c/n = 0) claims too much; the bound is honest about luck
    s = [True] * 270 + [False] * 30
    r = judge(run(s), run(s), GateConfig())
    mde = by_name(r, "detectable drop")
    assert mde.value > S.detectable_drop_paired(300, 0.05, 0.8, 0.0, 0.9) + 0.005
    assert mde.value == pytest.approx(S.detectable_drop_paired(300, 0.05, 0.8, S.discordance_upper(0, 300), 0.9))


def test_judge_family_adjusts_with_holm_and_shows_raw_and_adjusted():
    base = run([True] * 60)
    cands = [run([True] * 55 + [False] * 5), run([True] * 52 + [False] * 8), run([True] * 60)]
    results = judge_family([(c, base) for c in cands], GateConfig())
    raw = [S.mcnemar_exact(5, 0), S.mcnemar_exact(8, 0), 1.0]
    ref = sm_mt.multipletests(raw, method="holm")[1]
    for r, p, q in zip(results, raw, ref):
        assert r.family["p_raw"] == pytest.approx(p) and r.family["p_adjusted"] == pytest.approx(q)
        assert r.family["method"] == "holm" and r.family["size"] == 3
    assert raw[0] <= 0.05 < ref[0]  # significant alone, not in a family of 3
    assert [r.verdict for r in results] == ["inconclusive", "regression", "pass"]  # 60 identical pairs show < 5 pp
    assert "family of 3" in by_name(results[1], "success").explanation
    bh = judge_family([(c, base) for c in cands], GateConfig(family_method="bh"))
    assert bh[0].family["p_adjusted"] == pytest.approx(sm_mt.multipletests(raw, method="fdr_bh")[1][0])
    bad = judge_family([(run([True] * 9, suite="libero_goal"), run([True] * 9)), (cands[1], base)], GateConfig())
    assert isinstance(bad[0], BadInput) and bad[1].family["size"] == 1


def test_a_cell_judged_alone_in_a_family_uses_bonferroni():
    r = judge(run([True] * 52 + [False] * 8), run([True] * 60), GateConfig(family_size=28))
    assert r.family["p_adjusted"] == pytest.approx(min(1.0, 28 * S.mcnemar_exact(8, 0)))
    assert r.verdict == "inconclusive"


def test_latency_judged_from_raw_call_times():
    rng = np.random.default_rng(0)
    base_calls = rng.lognormal(np.log(10.0), 0.05, 400)
    s = [True] * 30
    slow = judge(run(s, calls=base_calls * 1.2), run(s, calls=base_calls))
    lat = by_name(slow, "latency")
    assert lat.status == "fail" and lat.value == pytest.approx(1.2, rel=0.02) and "bootstrap" in lat.explanation
    noisy = judge(run(s, calls=rng.lognormal(np.log(11.2), 0.3, 20)), run(s, calls=rng.lognormal(np.log(10.0), 0.3, 20)))
    lat = by_name(noisy, "latency")
    if lat.value > 1.1:  # above the maximum, but 20 noisy calls cannot show it
        assert lat.status == "warn" and "not shown slower" in lat.explanation
    ok = judge(run(s, calls=base_calls * 1.02), run(s, calls=base_calls))
    assert by_name(ok, "latency").status == "pass"
    quant = judge(run(s, p50=12.0), run(s, p50=10.0))  # no raw calls: the stored p50s, said so
    assert by_name(quant, "latency").status == "fail" and "no raw call times" in by_name(quant, "latency").explanation


def test_latency_ratio_gate_and_device_skip():
    s = [True] * 20
    ok = judge(run(s, p50=10.5), run(s, p50=10.0))
    assert by_name(ok, "latency").status == "pass"
    jitter = judge(run(s, p50=0.11), run(s, p50=0.09))  # +22 % but 0.02 ms: a tiny policy's timer noise
    assert by_name(jitter, "latency").status == "warn" and jitter.exit_code == 0 and "timer noise" in by_name(jitter, "latency").explanation
    strict = judge(run(s, p50=0.11), run(s, p50=0.09), GateConfig(latency_min_delta_ms=0.0))
    assert by_name(strict, "latency").status == "fail" and strict.verdict == "regression"
    other = judge(run(s, p50=30.0, device="cpu"), run(s, p50=10.0))
    lat = by_name(other, "latency")
    assert lat.status == "skip" and other.exit_code == 0 and "same device" in lat.explanation


def test_failed_fidelity_in_summary_fails_the_gate():
    cand = run([True] * 20)
    cand.summary.fidelity = FidelitySummary({"passed": False, "checks": [{"name": "layer_cosine", "passed": False}]})
    r = judge(cand, run([True] * 20))
    assert r.verdict == "regression" and "layer_cosine" in by_name(r, "fidelity").explanation
    assert "reused the fidelity verdict stored with" in by_name(r, "fidelity").explanation  # re-judging never recomputes


def test_bad_input():
    with pytest.raises(BadInput):
        judge(run([True] * 9, suite="libero_goal"), run([True] * 9))
    with pytest.raises(BadInput, match="family_method"):
        judge(run([True] * 9), run([True] * 9), GateConfig(family_method="sidak"))
    with pytest.raises(BadInput, match="max_drop"):
        judge(run([True] * 9), run([True] * 9), GateConfig(max_drop=0.0))


def test_unpairable_episodes_fall_back_to_unpaired():
    cand = run([True] * 9)
    cand.episodes["init_state_id"] += 100
    r = judge(cand, run([True] * 9))
    assert r.mode == "unpaired" and any("unpaired" in w for w in r.warnings)


def test_gate_run_stage_against_a_run_dir(tmp_path):
    from evalkit.gate import gate_run
    from evalkit.gate.runs import write_latency_calls

    base = run([True] * 30)
    base.episodes.to_parquet(tmp_path / "episodes.parquet")
    (tmp_path / "summary.json").write_text(json.dumps(base.summary.to_dict()))
    cand = run([True] * 15 + [False] * 15)
    r = gate_run(cand.summary, cand.episodes, str(tmp_path), {"max_drop": 0.1})
    assert r.verdict == "regression" and r.mode == "paired"
    with pytest.raises(BadInput, match="unknown gate fields"):
        gate_run(cand.summary, cand.episodes, str(tmp_path), {"max_dorp": 0.1})
    # raw call times of this run (run_dir) and of the baseline (its dir) are used when both exist
    write_latency_calls(tmp_path, [0.5] + [0.010] * 50)
    me = tmp_path / "me"
    write_latency_calls(me, [0.5] + [0.015] * 50)
    r = gate_run(cand.summary, cand.episodes, str(tmp_path), {}, run_dir=me)
    assert by_name(r, "latency").status == "fail" and "bootstrap" in by_name(r, "latency").explanation


def test_judge_decision_is_the_simulated_decision_rule():
    # bench/gate_calibration.py measures the rule "pass iff non-inferiority p <= alpha, else regression iff
    # regression p <= alpha" on the stats functions; judge must apply exactly that rule.
    rng = np.random.default_rng(5)
    for _ in range(25):
        n = int(rng.choice([23, 60, 101]))  # a few sizes: the exact tests' tables are computed once per size
        base = rng.random(n) < 0.8
        cand = np.where(rng.random(n) < 0.3, rng.random(n) < 0.75, base)
        r = judge(run(list(cand)), run(list(base)), GateConfig(alpha=0.1))
        b, c = S.discordant_counts(base, cand)
        assert r.verdict == success_verdict(S.noninferiority_p_paired(b, c, n, 0.05) <= 0.1, S.mcnemar_exact(b, c), 0.1)
        ru = judge(run(list(cand), with_episodes=False), run(list(base), with_episodes=False), GateConfig(alpha=0.1))
        xc, xb = int(cand.sum()), int(base.sum())
        assert ru.verdict == success_verdict(S.noninferiority_p_unpaired(xc, n, xb, n, 0.05) <= 0.1,
                                             S.fisher_worse_p(xc, n, xb, n), 0.1)


def test_crashed_episodes_are_failures_with_a_warning():
    cand = run([True] * 8 + [False])
    cand.episodes.loc[8, "failure_reason"] = "exception: CUDA error"
    r = judge(cand, run([True] * 9))
    assert any("crashed" in w and "exception" in w for w in r.warnings)


def test_protocol_difference_is_warned():
    cand, base = run([True] * 9), run([True] * 9)
    cand.summary.protocol = {"max_steps": 220, "replan_steps": 5}
    base.summary.protocol = {"max_steps": 300, "replan_steps": 5}
    assert any("protocols differ in max_steps" in w for w in judge(cand, base).warnings)
