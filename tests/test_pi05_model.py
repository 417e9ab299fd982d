"""pi05 policy behaviour on the tiny model (CPU): determinism, sensitivity, step count, fault hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evalkit.errors import BadInput, CapabilityError
from evalkit.policies.base import ObsBatch
from evalkit.policies.pi05.layers import GemmaDecoderLayer
from evalkit.policies.pi05.processing import images_to_model
from evalkit.policies.pi05.testing import batch, make_obs, tiny_policy


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


def test_shape_dtype_and_stable_names(policy):
    a = policy.predict(batch(0, 1), noise_seed=0)
    assert a.shape == (2, 10, 7) and a.dtype == np.float32 and np.isfinite(a).all()
    m = policy.model
    assert isinstance(m.prefix.layers[1].mlp.gate_proj, torch.nn.Linear)
    assert isinstance(m.expert.layers[0].self_attn.o_proj, torch.nn.Linear)
    assert isinstance(m.vision.layers[0].self_attn.out_proj, torch.nn.Linear)
    assert isinstance(m.vision.layers[0].mlp.fc1, torch.nn.Linear)
    assert set(policy.transformer_stacks()) == {"prefix", "expert", "vision"}
    assert policy.needs_images


def test_fixed_seed_identical_and_seed_matters(policy):
    b = batch(3)
    a1, a2 = policy.predict(b, noise_seed=7), policy.predict(b, noise_seed=7)
    assert np.array_equal(a1, a2)
    assert not np.allclose(a1, policy.predict(b, noise_seed=8))


def test_different_observation_different_actions(policy):
    # Same noise, new observation: the prefix KV cache must be rebuilt per call.
    a = policy.predict(batch(0), noise_seed=1)
    b = policy.predict(batch(1), noise_seed=1)
    c = policy.predict(batch(0, instruction="open the drawer"), noise_seed=1)
    assert not np.allclose(a, b) and not np.allclose(a, c)
    assert np.array_equal(a, policy.predict(batch(0), noise_seed=1))


def test_wrist_view_used(policy):
    o1, o2 = make_obs(0), make_obs(0)
    o2.wrist = np.zeros_like(o2.wrist)
    assert not np.allclose(policy.predict(ObsBatch([o1]), noise_seed=0), policy.predict(ObsBatch([o2]), noise_seed=0))


def test_per_observation_seeds_and_padding_are_batching_invariant(policy):
    # Each observation's own noise_seed seeds its row; a short prompt batched next to a long one is padded
    # and masked, so its actions equal those it gets alone.
    def obs(seed, instr="put the black bowl on the plate"):
        o = make_obs(seed, instruction=instr)
        o.noise_seed = 100 + seed
        return o

    long = obs(1, "pick up the alphabet soup and place it in the basket " * 2)
    host = policy.preprocess(ObsBatch([obs(0), long]))
    assert host["token_mask"] is not None and not host["token_mask"][0].all()
    alone = policy.predict(ObsBatch([obs(0)]))
    mixed = policy.predict(ObsBatch([obs(0), long]))
    np.testing.assert_allclose(mixed[0], alone[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mixed[1], policy.predict(ObsBatch([long]))[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_expert_runs_exactly_n_times(steps):
    p = tiny_policy(denoise_steps=steps)
    before = p.model.expert_calls
    p.predict(batch(0, 1), noise_seed=0)
    assert p.model.expert_calls - before == steps


def test_dropping_mlp_residual_changes_actions(policy, monkeypatch):
    ref = policy.predict(batch(0), noise_seed=0)
    layer = policy.model.prefix.layers[0]

    def attn_only(x, ctx):  # the real bug: `x = x + attn(x)` with no MLP branch
        a, _ = layer.input_layernorm(x, ctx.cond)
        return x + layer.self_attn(a, ctx)

    monkeypatch.setattr(layer, "forward", attn_only)
    assert not np.allclose(ref, policy.predict(batch(0), noise_seed=0), atol=1e-6)
    monkeypatch.undo()
    assert np.array_equal(ref, policy.predict(batch(0), noise_seed=0))


@pytest.mark.parametrize("stack", ["prefix", "expert"])
def test_sharing_layer0_mlp_changes_actions(policy, monkeypatch, stack):
    ref = policy.predict(batch(0), noise_seed=0)
    layers = getattr(policy.model, stack).layers
    for layer in layers[1:]:
        monkeypatch.setattr(layer, "mlp", layers[0].mlp)
    assert not np.allclose(ref, policy.predict(batch(0), noise_seed=0), atol=1e-6)


def test_layer_forward_is_plain_residual():
    # Zeroing the MLP's output projection must make the layer equal to x + attn(norm(x)).
    p = tiny_policy()
    layer: GemmaDecoderLayer = p.model.prefix.layers[0]
    from evalkit.policies.pi05.layers import AttnContext, rope_tables

    x = torch.randn(1, 5, p.model.cfg.prefix.width)
    cos, sin = rope_tables(torch.arange(5)[None], p.model.cfg.prefix.head_dim, 10000.0, x.dtype)
    with torch.no_grad():
        layer.mlp.down_proj.weight.zero_()
        out = layer(x, AttnContext(cos=cos, sin=sin))
        expect = x + layer.self_attn(layer.input_layernorm(x)[0], AttnContext(cos=cos, sin=sin))
    torch.testing.assert_close(out, expect)


def test_layer_runs_a_backends_fused_forward_and_plain_where_it_declines():
    """GemmaDecoderLayer.fused (set by evalkit/policies/pi05/fused_layer.py on GPU): its output is the layer's; None
    from it means the plain forward runs. On CPU the fp8 backend (emulated) installs none."""
    from evalkit.backends.registry import get_backend

    from evalkit.policies.pi05.layers import AttnContext, rope_tables

    p = tiny_policy()
    layer: GemmaDecoderLayer = p.model.prefix.layers[0]
    x = torch.randn(1, 5, p.model.cfg.prefix.width)
    cos, sin = rope_tables(torch.arange(5)[None], p.model.cfg.prefix.head_dim, 10000.0, x.dtype)
    ctx = AttnContext(cos=cos, sin=sin)
    seen = []
    with torch.no_grad():
        want = layer(x, ctx)
        layer.fused = lambda x_, ctx_: seen.append(x_) or None
        torch.testing.assert_close(layer(x, ctx), want)
        layer.fused = lambda x_, ctx_: torch.zeros_like(x_)
        assert torch.equal(layer(x, ctx), torch.zeros_like(x))
        torch.testing.assert_close(layer.plain_forward(x, ctx), want)
    assert len(seen) == 1
    q = tiny_policy()
    report = get_backend("fp8", targets="expert", engine="emulated", fuse_norms=True).apply(q.model)
    assert all(l.fused is None for l in q.model.expert.layers)
    assert not any("adaRMS" in n for n in report.notes)


def test_cuda_graph_and_compile_refused_on_cpu():
    with pytest.raises(CapabilityError, match="cuda_graph"):
        tiny_policy(cuda_graph=True)
    with pytest.raises(CapabilityError, match="compile"):
        tiny_policy(compile=True)


def test_enable_compile_fails_past_the_recompile_limit_instead_of_running_eager():
    # dynamo's cache is per code object: many models in one process (bench rows, a multirun) used to pass its
    # recompile limit and run expert_forward eagerly without a word
    import torch._dynamo

    before = torch._dynamo.config.fail_on_recompile_limit_hit
    try:
        torch._dynamo.config.fail_on_recompile_limit_hit = False
        tiny_policy().enable_compile()  # lazy: nothing compiles until the first call
        assert torch._dynamo.config.fail_on_recompile_limit_hit is True
    finally:
        torch._dynamo.config.fail_on_recompile_limit_hit = before


def test_bad_config_is_bad_input():
    with pytest.raises(BadInput, match="unknown pi05 policy fields"):
        tiny_policy(denoise=3)
    with pytest.raises(BadInput, match="variant"):
        tiny_policy(variant="huge")
    with pytest.raises(BadInput, match="tokenizer"):
        tiny_policy(tokenizer=None)


def test_state_tokens_mode_forward_loss_backward():
    feat_dim = 8 + 3 + 4
    p = tiny_policy(prefix_inputs="state_tokens", state_feature_dim=feat_dim, state_prefix_tokens=3)
    assert not p.needs_images and p.needs_privileged and not hasattr(p.model, "vision")
    priv = {"bowl_pos": np.array([0.1, 0.2, 0.3]), "bowl_quat": np.array([1.0, 0, 0, 0])}
    b = ObsBatch([make_obs(0, privileged=priv), make_obs(1, privileged=priv)])
    a = p.predict(b, noise_seed=0)
    assert a.shape == (2, 10, 7) and np.isfinite(a).all()
    priv2 = {"bowl_pos": np.array([0.5, 0.2, 0.3]), "bowl_quat": np.array([1.0, 0, 0, 0])}
    a2 = p.predict(ObsBatch([make_obs(0, privileged=priv2), make_obs(1, privileged=priv2)]), noise_seed=0)
    assert not np.allclose(a, a2)

    m = p.model
    m.train()
    host = p.preprocess(b)
    actions = torch.randn(2, 10, 32)
    g = torch.Generator().manual_seed(0)
    loss = m.flow_matching_loss(torch.from_numpy(host["tokens"]), None, actions,
                                state_features=torch.from_numpy(host["state_features"]), generator=g)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert m.state_encoder.weight.grad is not None and m.state_encoder.weight.grad.abs().sum() > 0
    assert m.expert.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert m.prefix.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    # A few SGD steps on one fixed batch must lower the loss (the gradient is a real one).
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    noise, time = torch.randn(2, 10, 32), torch.full((2,), 0.5)
    kw = dict(state_features=torch.from_numpy(host["state_features"]))
    first = m.flow_matching_loss(torch.from_numpy(host["tokens"]), None, actions, noise, time, **kw).item()
    for _ in range(3):
        opt.zero_grad()
        m.flow_matching_loss(torch.from_numpy(host["tokens"]), None, actions, noise, time, **kw).backward()
        opt.step()
    assert m.flow_matching_loss(torch.from_numpy(host["tokens"]), None, actions, noise, time, **kw).item() < first


def test_state_tokens_wrong_feature_dim():
    p = tiny_policy(prefix_inputs="state_tokens", state_feature_dim=99)
    with pytest.raises(BadInput, match="state_feature_dim=99"):
        p.predict(batch(0), noise_seed=0)


def test_loss_matches_openpi_definition():
    # v_t from the model vs the target u = noise - actions at x_t = t*noise + (1-t)*actions.
    p = tiny_policy()
    m = p.model
    host = p.preprocess(batch(0))
    tok, img = torch.from_numpy(host["tokens"]), images_to_model(torch.from_numpy(host["images"]))
    actions, noise, t = torch.randn(1, 10, 32), torch.randn(1, 10, 32), torch.tensor([0.3])
    with torch.no_grad():
        loss = m.flow_matching_loss(tok, None, actions, noise, t, images=img)
        embs, km = m.embed_prefix(tok, None, images=img)
        v = m.denoise_step(m.prefill(embs, km), 0.3 * noise + 0.7 * actions, t)
    torch.testing.assert_close(loss, ((v - (noise - actions)) ** 2).mean())


def test_batched_time_conditioning_equals_per_step():
    # denoise() computes every step's adaRMS modulation at once; it must equal calling denoise_step per step.
    p = tiny_policy()
    m = p.model
    host = p.preprocess(batch(0, 1))
    tok, img = torch.from_numpy(host["tokens"]), images_to_model(torch.from_numpy(host["images"]))
    noise = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = m.prefill(*m.embed_prefix(tok, None, images=img))
        fast = m.denoise(cache, noise, 4)
        x = noise.clone()
        for k in range(4):
            x = x + (-1 / 4) * m.denoise_step(cache, x, torch.full((2,), 1 - k / 4))
    torch.testing.assert_close(fast, x, rtol=1e-5, atol=1e-6)
