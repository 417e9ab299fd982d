"""Fidelity checks on a tiny fake TorchPolicy with injected faults: the logic of each check, in milliseconds.
The same checks on the trained reference policy with real probes and real backends: test_fidelity_reference.py."""

from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from evalkit.backends.base import BackendReport, ModuleReport
from torch import nn

from evalkit.fidelity import run_fidelity
from evalkit.fidelity.config import FidelityConfig
from evalkit.fidelity.fallback import precision_bits
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


CFG = FidelityConfig(reference_backend="fp32")


def names_failed(rep):
    return {c.name for c in rep.failed()}


def test_identical_candidate_passes_every_check():
    ref, cand = make_pair()
    rep = run_fidelity(ref, cand, probes(), report(), CFG, denoise_steps=5)
    assert rep.passed, [(c.name, c.detail) for c in rep.checks]
    assert [c.name for c in rep.checks] == [
        "calls", "action_sqnr", "layer_cosine", "layer_states", "execution_order", "denoise_steps", "weight_match",
        "weight_distinct", "silent_fallback",
    ]
    assert rep.calls == 5 and rep.check("denoise_steps").value == 5 and len(rep.layers) == 5  # 6 probes: 1, 1, 2, 2 + 2 again
    assert rep.layers[0].layer == "prefix.layers.0" and rep.layers[-1].calls == 5 * rep.calls  # expert: one per step
    json.dumps(rep.to_dict())
    assert {"action_cosine_min", "layer_cosine_min"} <= set(rep.metrics())  # identical: the SQNRs are inf, not metrics
    assert "action_sqnr_db_min" not in rep.metrics()


def test_correct_int8_and_bf16_candidates_pass():
    ref, cand = make_pair()
    rows = quantize_mlps(cand.model)
    rep = run_fidelity(ref, cand, probes(), report("int8_weight_only", rows), CFG, precision_class="8-bit",
                       targets="prefix_mlp,expert_mlp")
    assert rep.passed, [(c.name, c.value, c.detail) for c in rep.failed()]
    assert "compute differently from the reference" in rep.check("silent_fallback").detail
    assert 30 < rep.check("weight_match").value < 60  # int8 per-row: ~40 dB (the worst targeted module)

    ref, cand = make_pair()
    cand.model.to(torch.bfloat16)
    rep = run_fidelity(ref, cand, probes(), report("bf16"), CFG)
    assert rep.passed, [(c.name, c.value, c.detail) for c in rep.failed()]
    assert rep.action_cosine_min < 1.0  # bf16 really changed the numbers


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
    rep = run_fidelity(ref, cand, probes(), report("int8_weight_only", rows), CFG, precision_class="8-bit",
                       targets="prefix_mlp,expert_mlp")
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


@pytest.mark.parametrize("rows_claim", ["fp8", "bf16"])
def test_8bit_class_that_computes_bf16_is_silent_fallback_whatever_its_rows_say(rows_claim):
    torch.manual_seed(0)
    base = TinyModel().to(torch.bfloat16)
    ref, cand = FakePolicy(base), FakePolicy(copy.deepcopy(base))
    dtype = "torch.float8_e4m3fn (e4m3, per-channel fp32 scales)" if rows_claim == "fp8" else "torch.bfloat16"
    rows = [ModuleReport(f"prefix.layers.{i}.mlp.up_proj", "Linear", dtype, 0, rows_claim, "?") for i in range(3)]
    rep = run_fidelity(ref, cand, probes(), report("fp8", rows), FidelityConfig(reference_backend="bf16"),
                       precision_class="8-bit", targets="prefix_mlp")
    c = rep.check("silent_fallback")
    assert not c.passed and "bit-identically" in c.detail
    assert names_failed(rep) == {"silent_fallback"}  # every numeric check passes: only this check sees it


def test_fallback_is_seen_against_an_fp32_reference_too():
    """gate=strict: a bf16 fallback is not bit-identical to the fp32 reference, but to the reference computed in bf16."""
    ref, cand = make_pair()
    cand.model.to(torch.bfloat16)
    rep = run_fidelity(ref, cand, probes(), report("fp8"), CFG, precision_class="8-bit", targets="prefix_mlp")
    assert "= the bfloat16 reference" in rep.check("silent_fallback").detail


def test_denoise_steps_mismatch_is_caught():
    ref, cand = make_pair()
    cand.model.skip_steps = 2
    rep = run_fidelity(ref, cand, probes(), report(), CFG, denoise_steps=5)
    d = rep.check("denoise_steps")
    assert not d.passed and d.value == 3 and d.threshold == 5
    assert "expert.layers.0 ran 3 times (hooks), the reference's 5" in d.detail


def test_a_counter_that_lies_is_caught():
    ref, cand = make_pair()
    plain = cand.model.sample

    def sample(state, noise, steps):
        out = plain(state, noise, 1)
        cand.model.expert_calls += steps - 1
        return out

    cand.model.sample = sample
    rep = run_fidelity(ref, cand, probes(), report(), CFG, denoise_steps=5)
    assert "counter says 5 steps, hooks saw expert.layers.0 run 1 times" in rep.check("denoise_steps").detail


def test_state_kept_across_calls_is_caught():
    """A layer that memoizes its first output per input shape: every later call of that shape is wrong."""
    ref, cand = make_pair()
    layer = cand.model.prefix.layers[0]
    plain, memo = layer.forward, {}
    layer.forward = lambda x: memo.setdefault(tuple(x.shape), plain(x))
    rep = run_fidelity(ref, cand, probes(), report(), CFG)
    assert "layer_states" in names_failed(rep)


def test_swapped_layer_order_is_caught_with_the_first_difference():
    ref, cand = make_pair()
    layers = cand.model.prefix.layers

    class Swapped(type(layers)):
        def __iter__(self):
            return iter([self[0], self[2], self[1]])

    layers.__class__ = Swapped
    rep = run_fidelity(ref, cand, probes(), report(), CFG)
    assert {"execution_order", "layer_states"} <= names_failed(rep)
    assert "reference ran prefix.layers.1, candidate ran prefix.layers.2" in rep.check("execution_order").detail


def test_split_calls_repeat_every_size():
    from evalkit.fidelity.run import split_calls

    calls = split_calls(9, 10)
    assert [len(c) for c in calls] == [1, 1, 2, 2, 3, 2]
    assert sorted(i for c in calls[:-1] for i in c) == list(range(9)) and calls[0] == [8]  # reversed order
    assert calls[-1] == calls[2][::-1]  # the first batch of two again, rows swapped: same shapes, other rows
    assert [len(c) for c in split_calls(100, 4)] == [1, 1, 2, 96, 2]
    assert split_calls(1, 10) == [[0]]


@pytest.mark.parametrize("text,bits", [("torch.float8_e4m3fn", 8), ("torch.uint8 (int4 x2 nibble-packed)", 4),
                                       ("bf16", 16), ("torch.float32", 32), ("fp8_e4m3 (dynamic per-token)", 8), ("-", None)])
def test_precision_bits(text, bits):
    assert precision_bits(text) == bits


class GraphedPolicy(FakePolicy):
    """Replays a 'CUDA graph' (no module forward runs, so no hook fires) except inside its public `eager()`."""

    _graphs = "captured graph"

    def predict(self, batch, noise_seed=None):
        if self._graphs is not None:
            return np.zeros((len(batch), H, 7), np.float32)
        return super().predict(batch, noise_seed)

    @contextlib.contextmanager
    def eager(self):
        graphs, self._graphs = self._graphs, None
        try:
            yield
        finally:
            self._graphs = graphs


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
    from evalkit.fidelity.metrics import (
        cosine_per_row,
        sqnr_db_per_row,
        update_agreement_per_row,
    )

    ref = torch.ones(2, 4)
    bad = torch.tensor([[1.0, float("nan"), 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert cosine_per_row(ref, bad)[0] == 0.0 and cosine_per_row(ref, bad)[1] == pytest.approx(1.0)
    assert sqnr_db_per_row(ref, bad)[0] == -float("inf")
    assert update_agreement_per_row(torch.zeros(2, 4), ref, bad)[0] == 0.0

    ref_p, cand = make_pair()
    with torch.no_grad():
        cand.model.prefix.layers[2].self_attn.weight[0, 0] = float("nan")
    rep = run_fidelity(ref_p, cand, probes(), report(), CFG)
    assert {"action_sqnr", "layer_cosine", "weight_match"} <= names_failed(rep)
    assert rep.first_divergent_layer == "prefix.layers.2"


def test_class_noise_follows_its_derivation():
    from evalkit.fidelity.budgets import (
        CLASS_NOISE_DB,
        float_format_sqnr_db,
        int_grid_sqnr_db,
    )

    assert float_format_sqnr_db(8) == pytest.approx(CLASS_NOISE_DB["16-bit"], abs=0.1)  # bf16
    assert float_format_sqnr_db(4) == pytest.approx(CLASS_NOISE_DB["8-bit"], abs=0.1)  # fp8 e4m3
    assert float_format_sqnr_db(2) == pytest.approx(CLASS_NOISE_DB["fp4"], abs=0.1)  # e2m1
    assert int_grid_sqnr_db(15, 5.0) == pytest.approx(CLASS_NOISE_DB["4-bit"], abs=0.1)  # int4, group range ~5 sigma
    rng = np.random.default_rng(0)  # 2:4 magnitude pruning of Gaussian weights
    w = rng.normal(size=(200_000, 4))
    kept = np.sort(np.abs(w), axis=1)[:, 2:]
    removed = (w**2).sum() - (kept**2).sum()
    assert 10 * np.log10((w**2).sum() / removed) == pytest.approx(CLASS_NOISE_DB["sparse"], abs=0.2)


def test_budgets_order_and_strictness():
    cfg, strict = FidelityConfig(), FidelityConfig(margin_db=2.0)
    b = {c: cfg.budget(c) for c in ("16-bit", "8-bit", "4-bit", "fp4", "sparse")}
    assert b["16-bit"].weight > b["8-bit"].weight > b["4-bit"].weight > b["fp4"].weight > b["sparse"].weight
    assert strict.budget("8-bit").layer_min == cfg.budget("8-bit").layer_min + 2
    assert min(b["sparse"].__dict__[k] for k in ("layer_p50", "state_p50", "action_p50")) >= 6.0  # the floor
    with pytest.raises(Exception, match="unknown gate.fidelity fields"):
        FidelityConfig.from_dict({"layer_cosine_min": 0.9})
    with pytest.raises(Exception, match="unknown statistics"):
        FidelityConfig.from_dict({"allowance_db": {"actions": 3}})


def test_precision_class_is_declared_named_or_strict_default():
    from evalkit.backends.base import Backend
    from evalkit.backends.registry import get_backend

    from evalkit.fidelity.budgets import class_of_backend

    assert class_of_backend(get_backend("int4")) == ("4-bit", "declared")
    assert class_of_backend(get_backend("fault_ignored_scale"))[0] == "8-bit"  # judged as the backend it wraps
    assert class_of_backend(get_backend("fault_silent_fallback"))[0] == "8-bit"  # its claim is the lie

    class MyFp8(Backend):
        name = "my_fp8_engine"

    class Plain(Backend):
        name = "plain"

    class Bad(Backend):
        name = "bad"
        precision_class = "3-bit"

    assert class_of_backend(MyFp8()) == ("8-bit", "from its name")
    assert class_of_backend(Plain())[0] == "16-bit"
    with pytest.raises(Exception, match="valid: 16-bit, 8-bit"):
        class_of_backend(Bad())
