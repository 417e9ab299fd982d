"""Our decode attention kernel (kernels/decode_attention.py) on the GPU against SDPA: masks, GQA,
several splits and one, fp32 and bf16, repeated calls and CUDA-graph replays (the arrival counters must come
back to zero), and a whole π0.5 call with the kernel vs with SDPA.
Run on the device machine: `pytest -m gpu tests/test_decode_attention_gpu.py`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from evalkit.kernels.decode_attention import (
    launch_decode_attention,
    reference_decode_attention,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [  # b, h, hkv, t, s, d, keys_per_split, block_n, masked
    (1, 8, 1, 10, 555, 256, 64, 64, False),
    (1, 8, 1, 10, 555, 256, 128, 64, True),
    (2, 8, 1, 10, 300, 256, 64, 32, True),
    (3, 4, 2, 5, 97, 64, 32, 32, True),
    (1, 8, 1, 10, 60, 256, 64, 64, False),  # one split: no combine
    (1, 4, 1, 16, 1000, 16, 256, 64, False),
]


def _inputs(b, h, hkv, t, s, d, masked, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, t, h, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype, generator=g)
    mask = None
    if masked:
        mask = torch.rand(b, s, device="cuda", generator=g) > 0.4
        mask[:, -t:] = True
        mask[:, :70] = False  # whole splits with no valid key
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_sdpa(shape, dtype):
    b, h, hkv, t, s, d, kps, bn, masked = shape
    q, k, v, mask = _inputs(b, h, hkv, t, s, d, masked, dtype)
    out = launch_decode_attention(q, k, v, mask, kps, bn)
    ref = reference_decode_attention(q.float(), k.float(), v.float(), mask)
    rel = float((out.float() - ref).norm() / ref.norm())
    assert rel < (1e-5 if dtype == torch.float32 else 5e-3), rel
    again = launch_decode_attention(q, k, v, mask, kps, bn)
    assert torch.equal(out, again)  # counters were reset; the combine is deterministic


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_new_key_form_matches_sdpa(shape, dtype, pdl):
    """The model's form: raw q/k/v projections of the step (views into one q|k|v output, as FusedQKV gives),
    RoPE in the kernel, the cache's step slots holding garbage that must not be read."""
    from evalkit.policies.pi05.layers import rope_tables

    b, h, hkv, t, s, d, kps, bn, masked = shape
    _, k, v, mask = _inputs(b, h, hkv, t, s, d, masked, dtype)
    k[:, :, s - t:], v[:, :, s - t:] = 1e4, -1e4
    g = torch.Generator(device="cuda").manual_seed(5)
    qkv = torch.randn(b, t, (h + 2 * hkv) * d, device="cuda", dtype=dtype, generator=g)
    q, kn, vn = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    cos, sin = rope_tables(torch.arange(t, device="cuda")[None].expand(b, t) + s - t, d, 10000.0, dtype)
    out = launch_decode_attention(q, k, v, mask, kps, bn, new=(kn, vn, cos, sin), pdl=pdl)
    ref = reference_decode_attention(q.float(), k.float(), v.float(), mask, new=(kn.float(), vn.float(), cos.float(), sin.float()))
    rel = float((out.float() - ref).norm() / ref.norm())
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel


def test_changed_value_changes_output():
    q, k, v, _ = _inputs(1, 8, 1, 10, 555, 256, False, torch.bfloat16)
    a = launch_decode_attention(q, k, v, None)
    v[:, :, 300] += 5.0
    assert not torch.equal(a, launch_decode_attention(q, k, v, None))


def test_cuda_graph_replays():
    q, k, v, mask = _inputs(1, 8, 1, 10, 555, 256, True, torch.bfloat16)
    launch_decode_attention(q, k, v, mask)  # allocates the counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launch_decode_attention(q, k, v, mask)
    for seed in range(3):
        q2, k2, v2, _ = _inputs(1, 8, 1, 10, 555, 256, False, torch.bfloat16, seed=seed + 1)
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        graph.replay()
        torch.testing.assert_close(out, launch_decode_attention(q, k, v, mask), rtol=0, atol=0)


@pytest.mark.parametrize("pdl", [False, True])
def test_plain_form_under_pdl_matches_sdpa(pdl):
    q, k, v, mask = _inputs(1, 8, 1, 10, 555, 256, True, torch.bfloat16)
    out = launch_decode_attention(q, k, v, mask, pdl=pdl)
    ref = reference_decode_attention(q.float(), k.float(), v.float(), mask)
    assert float((out.float() - ref).norm() / ref.norm()) < 5e-3


@torch.no_grad()
@pytest.mark.parametrize("masked", [False, True])
def test_pdl_chain_after_the_mma_projection_reads_its_output(masked):
    """The model's chain under CUDA graphs: our fp8 mma q|k|v kernel (which lets its dependents launch at once)
    writes the step's projections, the attention launched as its programmatic dependent reads them. New inputs
    every replay; the replay must equal the same two kernels launched one after the other (no PDL), bit for bit:
    a q or new-key load that moved before the kernel's wait would read the previous replay's projection."""
    from evalkit.backends.fp8 import Fp8Linear
    from evalkit.kernels.mma_small_m import fp8_mma_gemm
    from torch import nn

    from evalkit.policies.pi05.layers import rope_tables

    h, d, t, p = 8, 256, 10, 545
    torch.manual_seed(0)
    lin = Fp8Linear(nn.Linear(1024, (h + 2) * d, bias=False).cuda(), torch.bfloat16, emulated=False, mma_pack=True)
    _, k, v, mask = _inputs(1, h, 1, t, p + t, d, masked, torch.bfloat16)
    cos, sin = rope_tables(torch.arange(p, p + t, device="cuda")[None], d, 10000.0, torch.bfloat16)
    x = torch.randn(t, 1024, device="cuda", dtype=torch.bfloat16)

    def step(pdl: bool) -> torch.Tensor:
        qkv = fp8_mma_gemm(x, lin.mma_words, lin.wscale, "t1w8s1", pdl=pdl).view(1, t, -1)
        q, kn, vn = qkv.split([h * d, d, d], dim=-1)
        return launch_decode_attention(q, k, v, mask, new=(kn, vn, cos, sin), pdl=pdl)

    step(True), step(False)  # compiles both outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(True)
    for seed in range(4):
        x.copy_(torch.randn(t, 1024, device="cuda", dtype=torch.bfloat16, generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        want = step(False)
        torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_pi05_actions_match_sdpa(padded):
    """True-size π0.5 (random weights, bf16): compiled + CUDA graphs with our kernel vs eager SDPA. Two prompts
    of different lengths pad the shorter one in the eager policy; under graphs every prompt pads to max_token_len."""
    from evalkit.policies.base import ObsBatch
    from evalkit.policies.pi05.policy import build
    from evalkit.policies.pi05.testing import make_obs

    cfg = {"kind": "pi05", "variant": "full", "init": "random", "tokenizer": "bytes", "denoise_steps": 10,
           "dtype": "bfloat16"}
    ours = build({**cfg, "decode_attention": "auto", "compile": True, "cuda_graph": True}, torch.device("cuda"))
    sdpa = build({**cfg, "decode_attention": "sdpa"}, torch.device("cuda"))
    assert ours.model.decode_impl == "triton" and sdpa.model.decode_impl == "sdpa"
    texts = ["pick up the black bowl", "put the black bowl on the plate next to the cookie box" if padded else
             "pick up the white bowl"]
    obs = ObsBatch([make_obs(i, instruction=s) for i, s in enumerate(texts)])
    assert ours.preprocess(obs)["token_mask"] is not None  # under CUDA graphs prompts pad to max_token_len
    assert (sdpa.preprocess(obs)["token_mask"] is not None) == padded
    a, b = ours.predict(obs, noise_seed=0), sdpa.predict(obs, noise_seed=0)
    cos = F.cosine_similarity(torch.from_numpy(a).flatten(), torch.from_numpy(b).flatten(), dim=0)
    assert cos > 0.999, float(cos)
