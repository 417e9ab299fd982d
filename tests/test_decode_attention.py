"""The expert's decode attention setting (CPU): how `decode_attention` resolves, its errors, and that the
custom op computes SDPA's result. The Triton kernel itself is checked on the GPU (tests/test_decode_attention_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from evalkit.kernels.decode_attention import (
    decode_attention,
    reference_decode_attention,
)

from evalkit.errors import BadInput, CapabilityError
from evalkit.policies.pi05.policy import resolve_impl
from evalkit.policies.pi05.testing import batch, tiny_policy


def test_auto_is_sdpa_off_gpu_and_forced_triton_fails_clearly():
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu, 256, 10, graphs=True) == "sdpa"
    assert resolve_impl("sdpa", cpu, 256, 10, graphs=True) == "sdpa"
    with pytest.raises(CapabilityError, match="decode_attention=triton cannot run: device is not CUDA"):
        resolve_impl("triton", cpu, 256, 10, graphs=True)


def test_auto_takes_the_kernel_only_under_cuda_graphs(monkeypatch):
    """Launched one by one, Triton's launcher costs more than the kernel saves: auto picks it only for graphs."""
    from evalkit.kernels import decode_attention as da

    monkeypatch.setattr(da, "triton_fits", lambda head_dim, queries: None)  # as on a GPU machine
    cuda = torch.device("cuda")
    assert resolve_impl("auto", cuda, 256, 10, graphs=True) == "triton"
    assert resolve_impl("auto", cuda, 256, 10, graphs=False) == "sdpa"
    assert resolve_impl("triton", cuda, 256, 10, graphs=False) == "triton"
    monkeypatch.setattr(da, "triton_fits", lambda head_dim, queries: "head_dim 96 is not a power of two >= 16")
    assert resolve_impl("auto", cuda, 96, 10, graphs=True) == "sdpa"
    with pytest.raises(CapabilityError, match="head_dim 96"):
        resolve_impl("triton", cuda, 96, 10, graphs=True)


def test_unknown_value_lists_choices():
    with pytest.raises(BadInput, match=r"\['auto', 'triton', 'sdpa'\].*'flash'"):
        resolve_impl("flash", torch.device("cpu"), 256, 10, graphs=False)
    with pytest.raises(BadInput, match="decode_attention"):
        tiny_policy(decode_attention="flash")


def test_policy_records_resolved_impl():
    assert tiny_policy().model.decode_impl == "sdpa"


def test_pdl_setting_reaches_the_model_and_a_non_bool_is_bad_input():
    """decode_attention_pdl (default true): the attention kernel as a programmatic dependent launch."""
    assert tiny_policy().model.decode_pdl is True
    assert tiny_policy(decode_attention_pdl=False).model.decode_pdl is False
    with pytest.raises(BadInput, match="decode_attention_pdl must be true or false, got 'yes'"):
        tiny_policy(decode_attention_pdl="yes")


def test_pdl_flag_is_ignored_off_gpu():
    """On CPU the op is SDPA whatever the flag says (PDL is a launch attribute of the GPU kernel)."""
    torch.manual_seed(0)
    q = torch.randn(1, 3, 4, 16).transpose(1, 2)
    k, v = torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 16)
    torch.testing.assert_close(decode_attention(q, k, v, None, pdl=True), decode_attention(q, k, v, None, pdl=False))


def test_op_on_cpu_is_sdpa_in_output_layout():
    torch.manual_seed(0)
    b, h, t, s, d = 2, 4, 3, 11, 16
    q = torch.randn(b, t, h, d).transpose(1, 2)  # the strides the model hands over (after the head split)
    k, v = torch.randn(b, 1, s, d), torch.randn(b, 1, s, d)
    mask = torch.rand(b, s) > 0.3
    mask[:, -t:] = True
    out = decode_attention(q, k, v, mask)
    assert out.shape == (b, t, h * d)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.expand(b, h, s, d), v.expand(b, h, s, d),
                                                           attn_mask=mask[:, None, None])
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(b, t, h * d))
    torch.testing.assert_close(reference_decode_attention(q, k, v, mask), out)


def test_new_key_form_is_what_the_sdpa_layer_computes():
    """The kernel's second form (raw q/k/v of the step, RoPE inside, the cache's step slots not read) against
    GemmaAttention's sdpa path on the same layer; on CPU the op runs its reference, so this pins the reference
    that the GPU tests hold the kernel to."""
    from evalkit.policies.pi05.config import GemmaSize
    from evalkit.policies.pi05.layers import AttnContext, GemmaAttention, rope_tables

    torch.manual_seed(0)
    size = GemmaSize(width=32, depth=1, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16)
    attn = GemmaAttention(size, 0)
    b, t, p = 2, 3, 9
    x = torch.randn(b, t, 32)
    cos, sin = rope_tables(torch.arange(t)[None].expand(b, t) + p, 16, 10000.0, torch.float32)
    mask = torch.ones(b, p + t, dtype=torch.bool)
    mask[0, 5:p] = False

    def run(impl):
        cache = {0: (torch.randn(b, 1, p + t, 16, generator=torch.Generator().manual_seed(1)),
                     torch.randn(b, 1, p + t, 16, generator=torch.Generator().manual_seed(2)))}
        cache[0][0][:, :, p:] = 1e4  # stale step slots: the sdpa path overwrites them, the kernel never reads them
        ctx = AttnContext(cos=cos, sin=sin, key_mask=mask, cache=cache, read_cache=True, decode_impl=impl)
        return attn(x, ctx)

    torch.testing.assert_close(run("triton"), run("sdpa"))


def test_sdpa_setting_gives_same_actions_as_default_on_cpu():
    a = tiny_policy().predict(batch(0, 1), noise_seed=3)
    b = tiny_policy(decode_attention="sdpa").predict(batch(0, 1), noise_seed=3)
    assert (a == b).all()
