"""CPU checks of the int4 mma kernel's data layout (kernels/mma_small_m.py, mma_small_m.cu): the packed fragment
words, read the way the kernel reads them (lane by lane, with the PTX ISA's m16n8k16 fragment positions),
multiply to the same product as the dequantized weights. The kernel itself runs in tests/test_backends_gpu.py."""

from __future__ import annotations

import pytest
import torch
from evalkit.backends.quant import dequant_int4_groups, int4_pack, unpack_nibbles
from evalkit.kernels import mma_small_m


@pytest.mark.parametrize("n,k,m,group", [(32, 128, 10, 128), (48, 256, 3, 64), (16, 64, 16, 64), (32, 256, 1, 128)])
def test_fragment_layout_reproduces_the_dequantized_product(n, k, m, group):
    torch.manual_seed(0)
    qweight, sz = int4_pack(torch.randn(n, k), group)
    words, szp = mma_small_m.pack_mma(qweight, sz, group)
    assert words.shape == (n // 16, k // 64, 32, 4) and words.dtype == torch.int32
    assert szp.shape == (n // 16, k // group, 8, 4)
    x = torch.randn(m, k).to(torch.bfloat16).float()
    w = dequant_int4_groups(unpack_nibbles(qweight), sz[..., 0].t(), sz[..., 1].t(), group)
    want = x.double() @ w.to(torch.bfloat16).double().t()
    got = mma_small_m.emulate_mma_gemm(x, words, szp, group)
    assert float((got.double() - want).abs().max()) < 1e-4 * float(want.abs().max())


def test_a_wrong_nibble_order_is_caught():
    """The emulation is sensitive to the layout: swapping two words' halves changes the product."""
    torch.manual_seed(1)
    qweight, sz = int4_pack(torch.randn(16, 64), 64)
    words, szp = mma_small_m.pack_mma(qweight, sz, 64)
    x = torch.randn(4, 64)
    good = mma_small_m.emulate_mma_gemm(x, words, szp, 64)
    bad = mma_small_m.emulate_mma_gemm(x, words.flip(-1).contiguous(), szp, 64)
    assert float((good - bad).norm() / good.norm()) > 0.1


def test_configs_tile_the_expert_shapes_and_reject_bad_ones():
    fits = lambda n, k: [c for c in mma_small_m.CONFIGS if mma_small_m.config_fits(c, n, k, 128)]
    assert "t1w4s1" in fits(4096, 1024) and "t1w4s4" in fits(1024, 4096)
    assert fits(4096, 1000) == [] and fits(4100, 1024) == []
    assert not mma_small_m.config_fits("t1w2s1", 1024, 4096, 128)  # 32 k-pairs per warp: more than MAX_KP registers
    with pytest.raises(ValueError, match="t<n-tiles>w<warps>s<split>"):
        mma_small_m.parse_config("n16k128s1")
    with pytest.raises(ValueError, match="N % 16"):
        mma_small_m.pack_mma(torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(1, 8, 2, dtype=torch.bfloat16), 64)


@pytest.mark.parametrize("n,k,m,kslice", [(32, 256, 10, 256), (16, 512, 3, 128), (48, 256, 16, 64), (16, 256, 1, 32)])
def test_fp8_fragment_layout_reproduces_the_w8a8_product(n, k, m, kslice):
    """fp8_mma_gemm's operands read lane by lane (m16n8k32 e4m3 fragments) give the W8A8 product: x quantized
    to e4m3 per token and K slice, times the e4m3 weights, times both scales."""
    from evalkit.backends.quant import quant_fp8_rows

    torch.manual_seed(0)
    q, s = quant_fp8_rows(torch.randn(n, k))
    words = mma_small_m.pack_fp8_mma(q)
    assert words.shape == (n // 16, k // 32, 32, 4) and words.dtype == torch.int32
    x = torch.randn(m, k).to(torch.bfloat16).float()
    x[:, :kslice] *= 50.0  # one loud slice: a per-token scale would flatten the others
    xq, xs = quant_fp8_rows(x.reshape(m, k // kslice, kslice))
    xdq = (xq.double() * xs.double()[..., None]).reshape(m, k)
    want = (xdq @ q.double().t()) * s.double()[None, :]
    got = mma_small_m.emulate_fp8_mma_gemm(x, words, s, kslice)
    assert float((got.double() - want).abs().max()) < 1e-4 * float(want.abs().max())
    per_token = mma_small_m.emulate_fp8_mma_gemm(x, words, s, k)
    if kslice < k:  # the check above sees which scales were used
        assert float((per_token.double() - want).abs().max()) > 1e-3 * float(want.abs().max())
    assert mma_small_m.fp8_kslice("t1w8s2", 4096) == 256 and mma_small_m.fp8_kslice("t2w4s1", 1024) == 256
    assert not mma_small_m.fp8_config_fits("t1w4s1", n, 96) and mma_small_m.fp8_config_fits("t1w4s1", 4096, 1024)
