"""Fidelity checks on a tiny fake TorchPolicy with injected faults (each must be caught, a healthy one must pass)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backends.base import BackendReport, ModuleReport
from evalkit.fidelity import run_fidelity
from evalkit.fidelity.fallback import precision_bits
from evalkit.gate.config import GateConfig
from evalkit.policies.base import ObsBatch, Observation, TorchPolicy

D, H = 32, 4


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(D, 2 * D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Linear(D, D)
        self.mlp = MLP()
        self.drop_mlp = False  # fault: h = x + attn(x); out = h (the MLP branch never reaches the residual)

    def forward(self, x):
        h = x + self.self_attn(x)
        return h if self.drop_mlp else h + self.mlp(h)


class Stack(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer() for _ in range(n)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, D)
        self.prefix = Stack(3)
        self.expert = Stack(2)
        self.act_in, self.act_out = nn.Linear(7, D), nn.Linear(D, 7)
        self.expert_calls = 0
        self.skip_steps = 0  # fault: the denoise loop silently runs fewer steps

    def sample(self, state, noise, steps):
        dt = next(self.parameters()).dtype
        p = self.prefix(self.embed(state.to(dt)))
        x = noise
        for _ in range(steps - self.skip_steps):
            self.expert_calls += 1
            v = self.act_out(self.expert(self.act_in(x.to(dt)) + p[:, None])).float()
            x = x - v / steps
        return x


class FakePolicy(TorchPolicy):
    name = "fake"
    action_horizon = H

    def __init__(self, model: TinyModel, denoise_steps: int = 5) -> None:
        self.model = model
        self.denoise_steps = denoise_steps

    def transformer_stacks(self):
        return {"prefix": self.model.prefix.layers, "expert": self.model.expert.layers}

    @torch.no_grad()
    def predict(self, batch: ObsBatch, noise_seed=None):
        state = torch.from_numpy(batch.stacked_state())
        g = torch.Generator().manual_seed(int(noise_seed or 0))
        noise = torch.randn((len(batch), H, 7), generator=g)
        return self.model.sample(state, noise, self.denoise_steps).float().numpy()


class Int8Linear(nn.Module):
    """Per-row symmetric int8 weights (a correct weight-only quantization, or one whose scale is ignored)."""

    weight_store = "qweight"

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        w = lin.weight.detach().float()
        s = (w.abs().amax(1) / 127).clamp(min=1e-12)
        self.register_buffer("qweight", torch.round(w / s[:, None]).to(torch.int8))
        self.register_buffer("scale", s)
        self.register_buffer("bias", lin.bias.detach().clone())

    def dequantized_weight(self):
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x):
        return F.linear(x.float(), self.dequantized_weight(), self.bias.float()).to(x.dtype)


def quantize_mlps(model: nn.Module) -> list[ModuleReport]:
    rows = []
    for stack in ("prefix", "expert"):
        for i, layer in enumerate(getattr(model, stack).layers):
            for n in ("gate_proj", "up_proj", "down_proj"):
                q = Int8Linear(getattr(layer.mlp, n))
                setattr(layer.mlp, n, q)
                rows.append(ModuleReport(f"{stack}.layers.{i}.mlp.{n}", "Int8Linear", "torch.int8 (per-row)", 0, "bf16", "fake"))
    return rows


def probes(n=6) -> ObsBatch:
    rng = np.random.default_rng(0)
    return ObsBatch([Observation(state=rng.normal(size=8).astype(np.float32), instruction="pick", episode_key=f"p/{i}", step=0) for i in range(n)])


def make_pair():
    torch.manual_seed(0)
    ref = TinyModel()
    return FakePolicy(ref), FakePolicy(copy.deepcopy(ref))


def report(backend="fp32", rows=None) -> BackendReport:
    return BackendReport(backend=backend, device="cpu", modules=rows or [])


CFG = GateConfig(reference_backend="fp32")


def names_failed(rep):
    return {c.name for c in rep.failed()}


def test_identical_candidate_passes_every_check():
    ref, cand = make_pair()
    rep = run_fidelity(ref, cand, probes(), report(), CFG)
    assert rep.passed, [(c.name, c.detail) for c in rep.checks]
    assert [c.name for c in rep.checks] == [
        "action_cosine", "action_sqnr", "layer_cosine", "weight_match", "weight_distinct", "silent_fallback", "denoise_steps",
    ]
    assert rep.check("denoise_steps").value == 5 and len(rep.layers) == 5
    assert rep.layers[0].layer == "prefix.layers.0" and rep.layers[-1].calls == 5  # expert layers: one call per step
    json.dumps(rep.to_dict())
    assert set(rep.metrics()) == {"action_cosine_min", "layer_cosine_min"}  # identical: SQNR is inf, not a metric


def test_correct_int8_and_bf16_candidates_pass():
    ref, cand = make_pair()
    rows = quantize_mlps(cand.model)
    rep = run_fidelity(ref, cand, probes(), report("int8_weight_only", rows), CFG)
    assert rep.passed, [(c.name, c.value, c.detail) for c in rep.failed()]
    assert rep.check("silent_fallback").detail.startswith("15 modules claim")
    assert 30 < rep.check("weight_match").value < 60  # int8 per-row: ~40 dB

    ref, cand = make_pair()
    cand.model.to(torch.bfloat16)
    rep = run_fidelity(ref, cand, probes(), report("bf16"), CFG)
    assert rep.passed, [(c.name, c.value, c.detail) for c in rep.failed()]
    assert rep.check("action_cosine").value < 1.0  # bf16 really changed the numbers


def test_shared_layer0_mlp_weights_are_caught():
    ref, cand = make_pair()
    for layer in cand.model.prefix.layers[1:]:
        layer.mlp = cand.model.prefix.layers[0].mlp
    rep = run_fidelity(ref, cand, probes(), report(), CFG)
    assert {"weight_distinct", "weight_match", "layer_cosine"} <= names_failed(rep)
    assert "prefix.layers.1 == prefix.layers.0 (mlp.gate_proj)" in rep.check("weight_distinct").detail
    assert rep.first_divergent_layer == "prefix.layers.1"


def test_dropped_mlp_residual_is_caught_at_the_first_layer():
    ref, cand = make_pair()
    for layer in cand.model.prefix.layers:
        layer.drop_mlp = True
    rep = run_fidelity(ref, cand, probes(), report(), CFG)
    assert "layer_cosine" in names_failed(rep)
    assert rep.first_divergent_layer == "prefix.layers.0"
    assert rep.check("weight_match").passed  # the weights are fine; only the computation is wrong


def test_ignored_quant_scale_is_caught():
    ref, cand = make_pair()
    rows = quantize_mlps(cand.model)
    for m in cand.model.modules():
        if isinstance(m, Int8Linear):
            m.scale = torch.ones_like(m.scale)  # the kernel multiplies by q, not q * scale
    rep = run_fidelity(ref, cand, probes(), report("int8_weight_only", rows), CFG)
    assert {"weight_match", "action_sqnr", "layer_cosine"} <= names_failed(rep)
    assert rep.check("weight_match").value < 0  # dB: the error is larger than the weight


def test_uniform_scale_error_fails_sqnr_even_where_cosine_is_blind():
    ref, cand = make_pair()
    with torch.no_grad():
        cand.model.act_out.weight.mul_(1.3)
        cand.model.act_out.bias.mul_(1.3)
    rep = run_fidelity(ref, cand, probes(), report(), CFG)
    assert rep.check("layer_cosine").passed
    assert "action_sqnr" in names_failed(rep)


def test_fp8_claim_with_bf16_weights_and_identical_output_is_silent_fallback():
    torch.manual_seed(0)
    base = TinyModel().to(torch.bfloat16)
    ref, cand = FakePolicy(base), FakePolicy(copy.deepcopy(base))
    rows = [
        ModuleReport(f"prefix.layers.{i}.mlp.up_proj", "Linear", "torch.float8_e4m3fn (e4m3, per-channel fp32 scales)", 0,
                     "fp8_e4m3 (dynamic per-token)", "torch._scaled_mm")
        for i in range(3)
    ]
    rep = run_fidelity(ref, cand, probes(), report("fp8", rows), GateConfig(reference_backend="bf16"))
    c = rep.check("silent_fallback")
    assert not c.passed and "bit-identical" in c.detail and "stores torch.bfloat16" in c.detail
    assert names_failed(rep) == {"silent_fallback"}  # every numeric check passes: only this check sees it


def test_denoise_steps_mismatch_is_caught():
    ref, cand = make_pair()
    cand.model.skip_steps = 2
    rep = run_fidelity(ref, cand, probes(), report(), CFG)
    d = rep.check("denoise_steps")
    assert not d.passed and d.value == 3 and d.threshold == 5


@pytest.mark.parametrize("text,bits", [("torch.float8_e4m3fn", 8), ("torch.uint8 (int4 x2 nibble-packed)", 4),
                                       ("bf16", 16), ("torch.float32", 32), ("fp8_e4m3 (dynamic per-token)", 8), ("-", None)])
def test_precision_bits(text, bits):
    assert precision_bits(text) == bits


class GraphedPolicy(FakePolicy):
    """Replays a 'CUDA graph' (no module forward runs, so no hook fires) unless _graphs is lifted."""

    _graphs = "captured graph"

    def predict(self, batch, noise_seed=None):
        if self._graphs is not None:
            return np.zeros((len(batch), H, 7), np.float32)
        return super().predict(batch, noise_seed)


def test_graph_replay_is_bypassed_for_the_checks_and_restored():
    torch.manual_seed(0)
    base = TinyModel()
    ref, cand = GraphedPolicy(base), GraphedPolicy(copy.deepcopy(base))
    for layer in cand.model.prefix.layers:
        layer.drop_mlp = True
    rep = run_fidelity(ref, cand, probes(), report(), CFG)
    assert rep.first_divergent_layer == "prefix.layers.0" and len(rep.layers) == 5
    assert cand._graphs == "captured graph" and ref._graphs == "captured graph"


def test_nan_outputs_never_pass():
    from evalkit.fidelity.metrics import cosine_per_row, sqnr_db_per_row, update_agreement_per_row

    ref = torch.ones(2, 4)
    bad = torch.tensor([[1.0, float("nan"), 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert cosine_per_row(ref, bad)[0] == 0.0 and cosine_per_row(ref, bad)[1] == pytest.approx(1.0)
    assert sqnr_db_per_row(ref, bad)[0] == -float("inf")
    assert update_agreement_per_row(torch.zeros(2, 4), ref, bad)[0] == 0.0

    ref_p, cand = make_pair()
    with torch.no_grad():
        cand.model.prefix.layers[2].self_attn.weight[0, 0] = float("nan")
    rep = run_fidelity(ref_p, cand, probes(), report(), CFG)
    assert {"action_cosine", "action_sqnr", "layer_cosine", "weight_match"} <= names_failed(rep)
    assert rep.first_divergent_layer == "prefix.layers.2"
