"""The seeded mini version of bench/gate_calibration.py: every false-alarm and false-pass rate within its bound
(plus Monte-Carlo error), the family-wise rate of a 28-cell night, and the bench's decision functions agree with
judge() on simulated runs."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evalkit.gate import GateConfig, StoredRun, judge

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gate_calibration", REPO / "bench" / "gate_calibration.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick(bench):
    return bench.run(quick=True, seed=2026, reps=None)


def test_every_rate_within_its_bound(bench, quick):
    assert bench.violations(quick) == []
    assert {r["test"] for r in quick["rows"]} == {"paired fixed", "paired sequential", "unpaired fixed"}
    assert {r["n"] for r in quick["rows"]} == {30, 100}
    assert len(quick["family"]) == 4 and all(r["family_false_alarm"] <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / r["reps"])
                                             for r in quick["family"])
    assert quick["unpaired_exact"][0]["worst_false_alarm"] <= 0.05  # 30 vs 500 episodes, every common rate


def test_without_adjustment_a_family_would_alarm_often(quick):
    # the point of Holm: the same 28 unchanged cells, unadjusted, fail a night far more often than alpha
    noisy = [r for r in quick["family"] if r["mu"] == 0.6]
    assert max(r["family_false_alarm_unadjusted"] for r in noisy) > 0.1


def test_sequential_decides_a_clear_drop_early(quick):
    seq = [r for r in quick["rows"] if r["test"] == "paired sequential" and r["n"] == 100 and r["rho"] == 0.9]
    assert seq and all(r["reg@0.20"] >= 0.95 and r["episodes@0.20"] <= 60 for r in seq)


def _stored(outcomes: np.ndarray) -> StoredRun:
    trials, tasks = outcomes.shape
    df = pd.DataFrame({"suite": "libero_spatial", "task_id": np.tile(np.arange(tasks), trials),
                       "init_state_id": np.repeat(np.arange(trials), tasks), "success": outcomes.ravel()})
    params = {"suite": "libero_spatial"}
    return StoredRun({"episodes": len(df), "successes": int(df.success.sum()), "params": params}, df, params, {}, ref="sim")


@pytest.mark.parametrize("sequential", [False, True])
def test_bench_decisions_are_judge_decisions(bench, sequential):
    rng = np.random.default_rng(9)
    cfg = GateConfig(sequential=sequential)
    sc = bench.Scenario(100, 0.8, 0.7)
    for drop in (0.0, 0.05, 0.2):
        base, cand = bench.simulate_pairs(sc, drop, 6, rng)
        if sequential:
            paths = bench.paired_sequential(base, cand, cfg)
            want = np.where(paths.kind == 1, 0, np.where(paths.kind == 2, 1, bench.verdicts(
                np.zeros(6, bool), paths.p_regression, cfg)))
        else:
            want = bench.verdicts(*bench.paired_fixed(base, cand, cfg), cfg)
        got = [judge(_stored(c), _stored(b), cfg).verdict for b, c in zip(base, cand)]
        assert got == [("pass", "regression", "inconclusive")[v] for v in want]
