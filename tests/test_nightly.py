"""The nightly matrix runner on a fake runner (the real subprocess path runs the evalkit CLI), with a real
sqlite MLflow store for the parent run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from evalkit.errors import BadInput
from evalkit.nightly import (
    Cell,
    CellResult,
    failed,
    load_config,
    main,
    matrix,
    run_nightly,
    verdict,
)

mlflow = pytest.importorskip("mlflow")

N = 30  # episodes per cell: 3 tasks x 10 init states
SUCCESS = {"bf16": 27, "int8": 27, "int4": 12}  # int4 loses 15 episodes: a real regression


def fake_runner(log: list):
    def run(cell: Cell, run_dir: Path, overrides: list) -> int:
        log.append((cell, list(overrides)))
        assert os.environ.get("EVALKIT_PARENT_RUN_ID")  # children can nest under the parent run
        if cell.backend == "broken":
            return 2  # bad input: no summary written
        run_dir.mkdir(parents=True, exist_ok=True)
        k = SUCCESS[cell.backend] - (0 if cell.denoise_steps >= 10 else 1)
        ok = [i < k for i in range(N)]
        df = pd.DataFrame({"suite": cell.suite, "task_id": [i % 3 for i in range(N)], "task_name": [f"t{i % 3}" for i in range(N)],
                           "init_state_id": [i // 3 for i in range(N)], "seed": 7, "success": ok, "steps": 100,
                           "failure_reason": [None if s else "timeout" for s in ok], "wall_time_s": 1.0,
                           "policy_time_s": 0.2, "video_path": None})
        df.to_parquet(run_dir / "episodes.parquet")
        p50 = {"bf16": 50.0, "int8": 40.0, "int4": 35.0}[cell.backend] * cell.denoise_steps / 10
        per_task = {f"t{t}": {"success_rate": float(df[df.task_id == t].success.mean()), "episodes": 10} for t in range(3)}
        summary = {"success_rate": k / N, "episodes": N, "successes": k, "per_task": per_task,
                   "latency": {"latency_ms_p50": p50, "latency_ms_p90": p50 * 1.1, "latency_ms_p99": p50 * 1.3},
                   "params": {"policy": cell.policy, "backend": cell.backend, "suite": cell.suite,
                              "denoise_steps": cell.denoise_steps, "device": "cuda:0"},
                   "fidelity": {"passed": True, "checks": []}, "gate": None}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return 0

    return run


def cfg_for(tmp_path, *over):
    return load_config([f"output_dir={tmp_path / 'out'}", f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", *over])


def test_matrix_puts_baselines_first():
    cfg = load_config(["backends=[int8,bf16]", "suites=[a,b]", "denoise_steps=[10,5]"])
    cells, base = matrix(cfg)
    assert cells[:2] == [base["a"], base["b"]] and len(cells) == 8 and len(set(cells)) == 8


def test_nightly_judges_reports_logs_and_fails_on_regression(tmp_path):
    log: list = []
    cfg = cfg_for(tmp_path, "backends=[bf16,int8,int4]", "suites=[libero_spatial_quick]", "denoise_steps=[10,5]",
                  "overrides=[workers=0]")
    code, root = run_nightly(cfg, runner=fake_runner(log), stamp="night1")
    assert code == 1
    common = [f"tracking.uri={cfg.tracking_uri}", "workers=0"]
    assert len(log) == 6 and log[0][1] == common  # the baseline cell runs plain
    base_dir = tmp_path / "out" / "night1" / "bf16_libero_spatial_quick_d10"
    for cell, o in log[1:]:  # candidates get their baseline and the family, so their runs can stop early
        assert o[:2] == common and o[2] == f"baseline={base_dir}"
        assert "gate.sequential=true" in o and "gate.family_size=5" in o and "gate.family_method=holm" in o
    verdicts = json.loads((root / "nightly.json").read_text())
    assert verdicts["family"] == {"method": "holm", "size": 5, "alpha": 0.05, "sequential": True}
    by = {c["cell"]: c for c in verdicts["cells"]}
    assert by["bf16 / libero_spatial_quick / 10 steps"]["baseline"] is True
    int8 = by["int8 / libero_spatial_quick / 10 steps"]
    assert int8["verdict"] == "INCONCLUSIVE" and int8["gate"]["passed"] is False  # 30 episodes cannot show < 5 pp
    int4 = by["int4 / libero_spatial_quick / 10 steps"]
    assert int4["verdict"] == "REGRESSION" and int4["gate"]["mode"] == "paired" and int4["gate"]["design"] == "sequential"
    assert by["int4 / libero_spatial_quick / 5 steps"]["verdict"] == "REGRESSION"
    fam = int4["gate"]["family"]
    assert fam["size"] == 5 and fam["p_adjusted"] >= fam["p_raw"]
    md = (root / "report.md").read_text()
    assert "REGRESSION" in md and "INCONCLUSIVE" in md and "int4 / libero_spatial_quick / 10 steps" in md
    assert "family: 5 judged cells, holm adjustment" in md and "family-wise alpha 0.05" in md
    assert "<svg" in (root / "report.html").read_text()

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name("evalkit-nightly")
    runs = client.search_runs([exp.experiment_id], "tags.`evalkit.nightly` = 'true'")
    assert len(runs) == 1 and runs[0].data.tags["evalkit.nightly.passed"] == "false"
    assert runs[0].data.metrics["regressions"] == 2  # int4 at 10 and 5 steps
    assert runs[0].data.metrics["inconclusive"] == 3
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {"report.md", "report.html", "nightly.json"}


def test_nightly_passes_and_marks_crashed_cells(tmp_path, capsys):
    code, root = run_nightly(cfg_for(tmp_path, "backends=[bf16,int8]", "suites=[s]", "denoise_steps=[10]"),
                             runner=fake_runner([]), stamp="ok")
    assert code == 0  # inconclusive is not a regression ...
    assert "nightly: PASS with inconclusive cells" in capsys.readouterr().out  # ... and not a plain pass either
    assert (root / "report.md").read_text().splitlines()[2].startswith("**INCONCLUSIVE**")
    cell = json.loads((root / "nightly.json").read_text())["cells"][1]
    res = CellResult(Cell("pi05", "int8", "s", 10), Path(cell["run_dir"]), 0, gate=cell["gate"])
    assert verdict(res) == "INCONCLUSIVE" and not failed(res) and failed(res, fail_inconclusive=True)
    code, root = run_nightly(cfg_for(tmp_path, "backends=[bf16,broken]", "suites=[s]", "denoise_steps=[10]"),
                             runner=fake_runner([]), stamp="crash")
    assert code == 1 and "exit 2, no summary.json" in (root / "report.md").read_text()


def test_fixed_size_family_with_unchanged_cells(tmp_path):
    log: list = []
    cfg = cfg_for(tmp_path, "backends=[bf16,int8]", "suites=[a,b]", "denoise_steps=[10]", "gate={sequential: false}")
    code, root = run_nightly(cfg, runner=fake_runner(log), stamp="fixed")
    assert code == 0 and not any(x.startswith(("baseline=", "gate.")) for _, o in log for x in o)  # no early stop
    cells = json.loads((root / "nightly.json").read_text())["cells"]
    judged = [c for c in cells if not c["baseline"]]
    assert len(judged) == 2 and all(c["gate"]["design"] == "fixed" and c["gate"]["family"]["size"] == 2 for c in judged)


def test_bad_config_is_exit_2(tmp_path, capsys):
    with pytest.raises(BadInput):
        load_config(["denoise_steps=[]"])
    with pytest.raises(BadInput, match="family_method"):
        run_nightly(load_config([f"output_dir={tmp_path}", "gate={family_method: sidak}"]), runner=fake_runner([]))
    assert main(["timeout_s=soon"]) == 2
    assert "nightly" in capsys.readouterr().err


def test_subprocess_runner_calls_the_evalkit_cli(monkeypatch, tmp_path):
    import subprocess as sp

    import evalkit.nightly as nightly

    seen = {}

    def fake_run(cmd, cwd, timeout):
        seen.update(cmd=cmd, cwd=cwd, timeout=timeout)
        return sp.CompletedProcess(cmd, 1)

    monkeypatch.setattr(nightly.subprocess, "run", fake_run)
    code = nightly.subprocess_runner(60)(Cell("pi05", "int8", "libero_spatial", 5), tmp_path / "c", ["workers=2"])
    assert code == 1 and seen["timeout"] == 60
    assert seen["cmd"][1:] == ["-m", "evalkit", "policy=pi05", "backend=int8", "suite=libero_spatial", "denoise_steps=5",
                               f"hydra.run.dir={tmp_path / 'c'}", "workers=2"]


def test_default_suites_are_those_the_policy_covers():
    assert load_config([]).suites == ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
    assert load_config(["policy=reference_vision"]).suites == ["libero_spatial"]
    assert load_config(["policy=reference_vision", "suites=[libero_goal]"]).suites == ["libero_goal"]
    with pytest.raises(BadInput, match="covers"):
        load_config(["policy=random"])
