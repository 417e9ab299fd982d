"""Fidelity on the real pi05_tiny policy (random init, both cameras) with the real backends: healthy backends pass
on real held-out probes under the default and the strict gate, the stage wires reference, probes and checks.
Faults are proven on the trained reference policy (test_fidelity_reference.py): pi05_tiny's actions barely depend
on what it observes, so a fault in how the expert reads the prefix would be invisible here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pi05 = pytest.importorskip("evalkit.policies.pi05.policy")
from evalkit.backends.registry import get_backend  # noqa: E402

from evalkit.fidelity import run_fidelity  # noqa: E402
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


@pytest.fixture(scope="module")
def real_probes():
    """Held-out check probes with images (pi05_tiny reads both cameras), one task to keep the default tier fast."""
    from evalkit.suites.specs import customize, get_suite

    from evalkit.fidelity.config import FidelityConfig
    from evalkit.fidelity.stage import DEFAULT_PROBE_CACHE, check_probes

    return check_probes(customize(get_suite("libero_spatial_quick"), tasks=[0]), FidelityConfig(), images=True,
                        cache_dir=DEFAULT_PROBE_CACHE)


REFERENCES: dict = {}
QUANTIZED = [("int8", {}), ("fp8", {"engine": "emulated"}), ("int4", {"engine": "emulated", "group_size": 32}),
             ("nvfp4", {"engine": "emulated"})]
HEALTHY = [(b, o, False) for b, o in [("bf16", {}), ("fp16", {}), ("fp32", {}), ("int8_weight_only", {})] + QUANTIZED]
HEALTHY += [(b, o, True) for b, o in QUANTIZED]  # the strict gate


@pytest.mark.parametrize("backend,opts,strict", HEALTHY, ids=[b + ("-strict" if s else "") for b, _, s in HEALTHY])
def test_healthy_backends_pass_on_real_probes(real_probes, backend, opts, strict):
    """No false alarm on pi05_tiny (random init) either: its statistics sit far from its class budgets."""
    from evalkit.fidelity.budgets import class_of_backend
    from evalkit.fidelity.config import FidelityConfig

    cfg = FidelityConfig(reference_backend="fp32", margin_db=2.0) if strict else FidelityConfig()
    if cfg.reference_backend not in REFERENCES:  # one reference per module: its calls are memoized across backends
        REFERENCES[cfg.reference_backend] = policy(cfg.reference_backend)[0]
    ref = REFERENCES[cfg.reference_backend]
    cand, rep = policy(backend, **opts)
    b = get_backend(backend, **opts)
    cls, src = class_of_backend(b)
    fr = run_fidelity(ref, cand, real_probes, rep, cfg, cls, src, denoise_steps=3, targets=b.targets)
    assert fr.passed, [(c.name, c.value, c.detail) for c in fr.failed()]
    assert fr.check("denoise_steps").value == 3


def test_denoise_steps_are_measured_against_the_configured_count(reference):
    cand, rep = policy("bf16")
    fr = run_fidelity(reference, cand, probes(), rep, {}, denoise_steps=10)
    d = fr.check("denoise_steps")
    assert not d.passed and "configured 10" in d.detail


class ImageEnv:
    """Stands in for LiberoEnv in the stage test (the real env is exercised in test_fidelity_probes.py)."""

    def __init__(self, spec, task_id):
        self.task_id = task_id

    def reset(self, i):
        return probes(1).observations[0]

    def close(self):
        pass


def test_fidelity_stage_builds_reference_and_probes(tmp_path):
    from evalkit.suites.specs import get_suite

    from evalkit.fidelity.stage import fidelity_for_run

    cfg = yaml.safe_load(CONF.read_text())
    cfg.update(denoise_steps=3, name="pi05_tiny")
    spec = get_suite("libero_spatial_quick")
    fid = {"check_steps": [0]}  # the fake env cannot step: t = 0 probes only
    for backend, opts, ok in [("int8", {}, True), ("fault_drop_mlp_residual", {}, False)]:
        cand = pi05.build(dict(cfg), torch.device("cpu"))
        b = get_backend(backend, **opts)
        rep = b.apply(cand.model)
        fr = fidelity_for_run(dict(cfg), torch.device("cpu"), cand, b, rep, spec, fid, denoise_steps=3,
                              cache_dir=tmp_path, make_env=ImageEnv)
        assert fr.passed is ok and fr.probes == len(spec.task_ids)
        assert fr.precision_class == ("8-bit" if backend == "int8" else "16-bit")
        d = fr.to_dict()
        assert "layer_cosine_min" in d and d["failed"] == [c.name for c in fr.failed()]

    class NoModel:
        model = None

    assert fidelity_for_run(cfg, "cpu", NoModel(), None, None, spec, {}, cache_dir=tmp_path, make_env=ImageEnv) is None
