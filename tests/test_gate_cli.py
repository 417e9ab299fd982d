"""Issue acceptance: each fault backend makes `python -m evalkit policy=pi05_tiny backend=<fault>` exit 1,
naming the check that caught it, before any episode runs; healthy backends pass fidelity and run."""

import json

import pytest

from tests.conftest import run_cli

COMMON = ["policy=pi05_tiny", "suite=libero_spatial_quick", "quiet=true", "tracking=offline", "video=none"]


@pytest.fixture(scope="module")
def probe_cache(tmp_path_factory):
    return {"EVALKIT_CACHE": str(tmp_path_factory.mktemp("cache"))}  # probes rendered once for the module


@pytest.mark.parametrize(
    "fault, check",
    [
        ("fault_shared_layer_weights", "weight_distinct"),
        ("fault_drop_mlp_residual", "layer_cosine"),
        ("fault_ignored_scale", "weight_match"),
        ("fault_silent_fallback", "silent_fallback"),
    ],
)
def test_fault_backend_fails_fast_naming_the_check(tmp_path, probe_cache, fault, check):
    run_dir = tmp_path / fault
    p = run_cli(*COMMON, f"backend={fault}", f"hydra.run.dir={run_dir}", cwd=tmp_path, env=probe_cache)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "caught by fidelity before rollouts" in p.stdout and check in p.stdout.split("caught by fidelity")[1]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["episodes"] == 0 and s["skipped_rollouts"]  # no simulation was spent on a broken backend
    failed = {c["name"] for c in s["fidelity"]["checks"] if not c["passed"]}
    assert check in failed


@pytest.mark.parametrize("backend", [["backend=bf16"], ["backend=fp16"], ["backend=fp8", "backend.engine=emulated"]])
def test_healthy_backend_passes_fidelity_and_runs(tmp_path, probe_cache, backend):
    run_dir = tmp_path / "ok"
    p = run_cli(*COMMON, *backend, "suite.tasks=[0]", "suite.trials=1", "suite.max_steps=2", "workers=0",
                f"hydra.run.dir={run_dir}", cwd=tmp_path, env=probe_cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert all(c["passed"] for c in s["fidelity"]["checks"]) and s["episodes"] == 1
