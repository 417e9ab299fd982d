"""The gate as a pure function over small hand-made runs (episode tables and summaries)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from evalkit import stats as S
from evalkit.errors import BadInput
from evalkit.gate import GateConfig, StoredRun, judge


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


def run(success, p50=10.0, device="cuda:H100", with_episodes=True, **params) -> StoredRun:
    df = episodes(success)
    x, n = int(df.success.sum()), len(df)
    lo, hi = S.wilson_interval(x, n)
    p = {"policy": "pi05_tiny", "backend": "bf16", "suite": "libero_spatial", "denoise_steps": 10, "device": device, **params}
    summary = {
        "success_rate": x / n, "success_ci_low": lo, "success_ci_high": hi, "episodes": n, "successes": x,
        "per_task": {}, "latency": {"latency_ms_p50": p50, "latency_ms_p90": p50 * 1.2, "latency_ms_p99": p50 * 1.5},
        "params": p, "fidelity": None, "gate": None,
    }
    return StoredRun(summary, df if with_episodes else None, p, {}, ref=f"run{n}")


def by_name(result, prefix):
    return next(c for c in result.checks if c.name.startswith(prefix))


def test_identical_runs_pass_and_every_check_is_listed():
    s = [True] * 40 + [False] * 10
    r = judge(run(s), run(s), GateConfig())
    assert r.passed and r.exit_code == 0 and r.mode == "paired"
    names = [c.name for c in r.checks]
    assert names == ["success (paired)", "detectable drop", "latency p50 ratio"]
    assert all(c.explanation for c in r.checks)
    json.dumps(r.to_dict())  # summary.json-safe


def test_paired_drop_fails_with_mcnemar_p_value():
    base = [True] * 50
    cand = [True] * 38 + [False] * 12
    r = judge(run(cand), run(base), GateConfig())
    c = by_name(r, "success")
    assert not r.passed and r.exit_code == 1 and c.status == "fail"
    assert c.value == pytest.approx(S.mcnemar_exact(12, 0), rel=1e-5)
    assert "12 lost" in c.explanation


def test_paired_uses_pairs_not_totals():
    # Same totals (25/50 each) but the candidate fails exactly where the baseline succeeded on 10 more
    # pairs than the reverse: the paired test sees b=15, c=5.
    base = np.array([True] * 25 + [False] * 25)
    cand = base.copy()
    cand[:15] = False  # lose 15
    cand[25:40] = True  # gain 15 -> totals equal, no regression
    r = judge(run(list(cand)), run(list(base)), GateConfig())
    assert r.passed and "15 lost" in by_name(r, "success").explanation
    assert by_name(r, "success").value == pytest.approx(S.mcnemar_exact(15, 15), rel=1e-5)


def test_unpaired_when_baseline_has_no_episode_table():
    base = run([True] * 45 + [False] * 5, with_episodes=False)
    cand = run([True] * 30 + [False] * 20)
    r = judge(cand, base, GateConfig())
    assert r.mode == "unpaired" and not r.passed
    assert by_name(r, "success").value == pytest.approx(S.two_proportion_test(30, 50, 45, 50), rel=1e-5)
    # plain summary dicts work too
    r2 = judge(cand.summary, base.summary)
    assert r2.mode == "unpaired" and not r2.passed


def test_small_run_warns_underpowered_but_does_not_fail():
    s = [True] * 9
    r = judge(run(s), run(s), GateConfig(max_drop=0.05))
    mde = by_name(r, "detectable drop")
    assert r.passed and mde.status == "warn"
    assert any("underpowered" in w for w in r.warnings)


def test_large_run_detectable_drop_within_allowance():
    s = [True] * 450 + [False] * 50
    r = judge(run(s, with_episodes=False), run(s, with_episodes=False), GateConfig(max_drop=0.1))
    assert by_name(r, "detectable drop").status == "pass"
    assert by_name(r, "detectable drop").value < 0.1


def test_latency_ratio_gate_and_device_skip():
    s = [True] * 20
    slow = judge(run(s, p50=12.0), run(s, p50=10.0))
    assert by_name(slow, "latency").status == "fail" and by_name(slow, "latency").value == pytest.approx(1.2)
    ok = judge(run(s, p50=10.5), run(s, p50=10.0))
    assert by_name(ok, "latency").status == "pass"
    jitter = judge(run(s, p50=0.11), run(s, p50=0.09))  # +22 % but 0.02 ms: a tiny policy's timer noise
    assert by_name(jitter, "latency").status == "warn" and jitter.passed and "timer noise" in by_name(jitter, "latency").explanation
    strict = judge(run(s, p50=0.11), run(s, p50=0.09), GateConfig(latency_min_delta_ms=0.0))
    assert by_name(strict, "latency").status == "fail" and not strict.passed
    other = judge(run(s, p50=30.0, device="cpu"), run(s, p50=10.0))
    lat = by_name(other, "latency")
    assert lat.status == "skip" and other.passed and "same device" in lat.explanation


def test_failed_fidelity_in_summary_fails_the_gate():
    cand = run([True] * 20)
    cand.summary["fidelity"] = {"passed": False, "checks": [{"name": "layer_cosine", "passed": False}]}
    r = judge(cand, run([True] * 20))
    assert not r.passed and "layer_cosine" in by_name(r, "fidelity").explanation


def test_different_suites_are_bad_input():
    with pytest.raises(BadInput):
        judge(run([True] * 9, suite="libero_goal"), run([True] * 9))


def test_unpairable_episodes_fall_back_to_unpaired():
    cand = run([True] * 9)
    cand.episodes["init_state_id"] += 100
    r = judge(cand, run([True] * 9))
    assert r.mode == "unpaired" and any("unpaired" in w for w in r.warnings)


def test_gate_run_stage_against_a_run_dir(tmp_path):
    import json as _json

    from evalkit.gate import gate_run

    base = run([True] * 30)
    base.episodes.to_parquet(tmp_path / "episodes.parquet")
    (tmp_path / "summary.json").write_text(_json.dumps(base.summary))
    cand = run([True] * 15 + [False] * 15)
    r = gate_run(cand.summary, cand.episodes, str(tmp_path), {"max_drop": 0.1})
    assert not r.passed and r.mode == "paired"
    with pytest.raises(BadInput, match="unknown gate fields"):
        gate_run(cand.summary, cand.episodes, str(tmp_path), {"max_dorp": 0.1})


def test_judge_decision_is_the_simulated_decision_rule():
    # test_stats' Monte-Carlo checks the rule "fail iff exact McNemar p <= alpha" (paired) and
    # "fail iff score-test p <= alpha" (unpaired); judge must apply exactly that rule.
    rng = np.random.default_rng(5)
    for _ in range(25):
        n = int(rng.integers(10, 60))
        base = rng.random(n) < 0.8
        cand = np.where(rng.random(n) < 0.3, rng.random(n) < 0.6, base)
        r = judge(run(list(cand)), run(list(base)), GateConfig(alpha=0.1))
        b, c = S.discordant_counts(base, cand)
        assert r.passed == (S.mcnemar_exact(b, c) > 0.1)
        ru = judge(run(list(cand), with_episodes=False), run(list(base), with_episodes=False), GateConfig(alpha=0.1))
        assert ru.passed == (S.two_proportion_test(int(cand.sum()), n, int(base.sum()), n) > 0.1)


def test_crashed_episodes_are_failures_with_a_warning():
    cand = run([True] * 8 + [False])
    cand.episodes.loc[8, "failure_reason"] = "exception: CUDA error"
    r = judge(cand, run([True] * 9))
    assert any("crashed" in w and "exception" in w for w in r.warnings)


def test_protocol_difference_is_warned():
    cand, base = run([True] * 9), run([True] * 9)
    cand.summary["protocol"] = {"max_steps": 220, "replan_steps": 5}
    base.summary["protocol"] = {"max_steps": 300, "replan_steps": 5}
    assert any("protocols differ in max_steps" in w for w in judge(cand, base).warnings)
