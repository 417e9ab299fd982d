"""evalkit.latency: stage timer and report (CPU). Speed itself is never asserted."""

from __future__ import annotations

import time

import pytest

from evalkit.latency import LatencyReport, StageTimer, measure
from evalkit.policies.pi05.testing import batch, tiny_policy


def test_timer_records_each_occurrence():
    t = StageTimer("cpu")
    t.begin_call()
    for _ in range(3):
        with t.stage("denoise"):
            time.sleep(0.002)
    with t.stage("post"):
        pass
    out = t.end_call()
    assert len(out["denoise"]) == 3 and all(ms >= 1.5 for ms in out["denoise"]) and len(out["post"]) == 1


def test_measure_policy_stages_and_warmup_excluded():
    p = tiny_policy(denoise_steps=4)
    b = batch(0)
    calls = []
    rep = measure(lambda timer: calls.append(p.predict(b, noise_seed=0, timer=timer)), "cpu", calls=8, warmup=2)
    assert isinstance(rep, LatencyReport) and len(calls) == 10 and rep.calls == 8
    assert set(rep.stages) == {"pre", "encode", "prefill", "time_cond", "denoise", "post"}
    assert rep.per_occurrence["denoise"].n == 8 * 4 and rep.stages["denoise"].n == 8
    s = rep.end_to_end
    assert s.n == 8 and s.min <= s.p50 <= s.p90 <= s.p99 <= s.max
    stage_sum = sum(st.p50 for st in rep.stages.values())
    assert stage_sum <= s.max * 1.5  # stages are parts of the call
    m = rep.metrics()
    assert {"latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms/denoise", "hz"} <= set(m)


def test_measure_rejects_zero_calls():
    with pytest.raises(ValueError):
        measure(lambda timer: None, "cpu", calls=0)


def test_bench_cli_writes_json_and_refuses_gpu_options_on_cpu(tmp_path, capsys):
    import json

    from evalkit.bench import main

    out = tmp_path / "bench.json"
    rc = main(["policy=pi05_tiny", "backend=bf16", "denoise_steps=[1,2]", "views=[1,2]",
               "calls=3", "warmup=1", "device=cpu", f"out={out}", "mlflow=false"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [(r["views"], r["denoise_steps"]) for r in res["rows"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert res["backend_report"]["by_precision"] and all(r["latency"]["calls"] == 3 for r in res["rows"])
    assert res["rows"][1]["latency"]["per_occurrence"]["denoise"]["n"] == 3 * 2
    assert main(["policy=pi05_tiny", "device=cpu", "cuda_graph=true", "mlflow=false"]) == 2
    assert main(["policy=nope", "device=cpu", "mlflow=false"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
