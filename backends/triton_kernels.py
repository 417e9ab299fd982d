"""Our own Triton kernels: fused per-token (row-wise) activation quantization, one pass for amax and one
for the cast, in a single launch, so dynamic W8A8 does not pay separate amax/divide/cast kernels.

Imported lazily: the CPU machine has no Triton; backends that need these check `triton_available()` up front.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch only
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU machines
    _HAVE_TRITON = False


def triton_available() -> str | None:
    """Triton version string, or None when it cannot be imported."""
    return triton.__version__ if _HAVE_TRITON else None


if _HAVE_TRITON:

    @triton.jit
    def _rowwise_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, QMAX: tl.constexpr, IS_INT8: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: M*K passes 2^31 at the largest sweep shapes
        x_row = x_ptr + row * stride_x
        q_row = q_ptr + row * stride_q
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, K, BLOCK):
            offs = k + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(v))
        amax = tl.maximum(tl.max(acc, axis=0), 1e-12)
        tl.store(s_ptr + row, amax / QMAX)
        inv = QMAX / amax
        for k in range(0, K, BLOCK):
            offs = k + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32) * inv
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
            if IS_INT8:
                v = tl.extra.cuda.libdevice.rint(v)
                tl.store(q_row + offs, v.to(tl.int8), mask=offs < K)
            else:
                tl.store(q_row + offs, v.to(tl.float8e4nv), mask=offs < K)


def rowwise_quant(x2d: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16/fp16/fp32, CUDA) -> (q [M, K] fp8 e4m3 or int8, scale [M, 1] fp32), x ≈ q * scale."""
    assert _HAVE_TRITON and x2d.is_cuda and x2d.dim() == 2
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    m, k = x2d.shape
    is_int8 = kind == "int8"
    q = torch.empty((m, k), device=x2d.device, dtype=torch.int8 if is_int8 else torch.float8_e4m3fn)
    s = torch.empty((m, 1), device=x2d.device, dtype=torch.float32)
    block = min(4096, triton.next_power_of_2(k))
    _rowwise_quant_kernel[(m,)](
        x2d, q, s, k, x2d.stride(0), q.stride(0),
        QMAX=127.0 if is_int8 else 448.0, IS_INT8=is_int8, BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    return q, s
