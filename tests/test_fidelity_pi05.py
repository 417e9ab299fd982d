"""Fidelity on the real pi05_tiny policy with the real backends: healthy backends pass, every fault backend fails
and the failing check names the fault. Probes are synthetic observations (the real-env probe set is tested in
test_fidelity_probes.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pi05 = pytest.importorskip("evalkit.policies.pi05.policy")
from backends.registry import get_backend  # noqa: E402
from evalkit.fidelity import run_fidelity  # noqa: E402
from evalkit.gate.config import GateConfig  # noqa: E402
from evalkit.policies.base import ObsBatch, Observation  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf" / "policy" / "pi05_tiny.yaml"


def probes(n=3) -> ObsBatch:
    rng = np.random.default_rng(0)
    return ObsBatch([
        Observation(state=rng.normal(size=8).astype(np.float32), instruction=f"put the bowl on plate {i}",
                    episode_key=f"probe/{i}", step=0,
                    agentview=rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
                    wrist=rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
        for i in range(n)
    ])


def policy(backend: str, **opts):
    cfg = yaml.safe_load(CONF.read_text())
    cfg["denoise_steps"] = 3
    p = pi05.build(cfg, torch.device("cpu"))
    rep = get_backend(backend, **opts).apply(p.model)
    return p, rep


@pytest.fixture(scope="module")
def reference():
    return policy("bf16")[0]


@pytest.mark.parametrize("backend,opts", [
    ("bf16", {}), ("fp16", {}), ("int8", {}), ("int8_weight_only", {}),
    ("fp8", {"engine": "emulated"}), ("int4", {"engine": "emulated", "group_size": 32}),
])
def test_healthy_backends_pass(reference, backend, opts):
    cand, rep = policy(backend, **opts)
    fr = run_fidelity(reference, cand, probes(), rep, GateConfig())
    assert fr.passed, [(c.name, c.value, c.detail) for c in fr.failed()]
    assert fr.check("denoise_steps").value == 3


@pytest.mark.parametrize("backend,opts,caught", [
    ("fault_shared_layer_weights", {}, {"weight_distinct", "weight_match", "layer_cosine"}),
    ("fault_drop_mlp_residual", {}, {"layer_cosine"}),
    ("fault_ignored_scale", {"inner": "int8_weight_only"}, {"weight_match", "layer_cosine"}),
    ("fault_silent_fallback", {}, {"silent_fallback"}),
])
def test_fault_backends_fail_naming_the_check(reference, backend, opts, caught):
    cand, rep = policy(backend, **opts)
    fr = run_fidelity(reference, cand, probes(), rep, GateConfig())
    assert not fr.passed
    assert caught <= {c.name for c in fr.failed()}
    if backend in ("fault_drop_mlp_residual", "fault_ignored_scale"):
        assert fr.first_divergent_layer == "prefix.layers.0"


def test_denoise_counter_mismatch(reference):
    cand, rep = policy("bf16")
    fr = run_fidelity(reference, cand, probes(), rep, GateConfig(), denoise_steps=10)
    assert not fr.check("denoise_steps").passed and fr.check("denoise_steps").value == 3


class ImageEnv:
    """Stands in for LiberoEnv in the stage test (the real env is exercised in test_fidelity_probes.py)."""

    def __init__(self, spec, task_id):
        self.task_id = task_id

    def reset(self, i):
        return probes(1).observations[0]

    def close(self):
        pass


def test_fidelity_stage_builds_reference_and_probes(tmp_path):
    from suites.specs import get_suite

    from evalkit.fidelity.stage import fidelity_for_run

    cfg = yaml.safe_load(CONF.read_text())
    cfg.update(denoise_steps=3, name="pi05_tiny")
    spec = get_suite("libero_spatial_quick")
    for backend, opts, ok in [("int8", {}, True), ("fault_drop_mlp_residual", {}, False)]:
        cand = pi05.build(dict(cfg), torch.device("cpu"))
        rep = get_backend(backend, **opts).apply(cand.model)
        fr = fidelity_for_run(dict(cfg), torch.device("cpu"), cand, rep, spec, {"reference_backend": "bf16"},
                              cache_dir=tmp_path, make_env=ImageEnv)
        assert fr.passed is ok and fr.probes == len(spec.task_ids)
        d = fr.to_dict()
        assert "layer_cosine_min" in d and d["failed"] == [c.name for c in fr.failed()]

    class NoModel:
        model = None

    assert fidelity_for_run(cfg, "cpu", NoModel(), None, spec, {}, cache_dir=tmp_path, make_env=ImageEnv) is None
