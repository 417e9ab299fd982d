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
                v = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))  # round half away from zero
                tl.store(q_row + offs, v.to(tl.int8), mask=offs < K)
            else:
                tl.store(q_row + offs, v.to(tl.float8e4nv), mask=offs < K)


    @triton.jit
    def _geglu_quant_kernel(g_ptr, u_ptr, q_ptr, s_ptr, K, stride_g, stride_u, stride_q, BLOCK: tl.constexpr):
        """h = gelu_tanh(g) * u in fp32, then per-row e4m3 quantization of h, without writing h."""
        row = tl.program_id(0).to(tl.int64)
        g_row, u_row, q_row = g_ptr + row * stride_g, u_ptr + row * stride_u, q_ptr + row * stride_q
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, K, BLOCK):
            offs = k + tl.arange(0, BLOCK)
            g = tl.load(g_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            u = tl.load(u_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            a = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            h = 0.5 * g * (2.0 * tl.sigmoid(2.0 * a)) * u  # 1 + tanh(a) = 2 sigmoid(2a)
            acc = tl.maximum(acc, tl.abs(h))
        amax = tl.maximum(tl.max(acc, axis=0), 1e-12)
        tl.store(s_ptr + row, amax / 448.0)
        inv = 448.0 / amax
        for k in range(0, K, BLOCK):
            offs = k + tl.arange(0, BLOCK)
            g = tl.load(g_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            u = tl.load(u_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            a = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            h = 0.5 * g * (2.0 * tl.sigmoid(2.0 * a)) * u * inv
            h = tl.minimum(tl.maximum(h, -448.0), 448.0)
            tl.store(q_row + offs, h.to(tl.float8e4nv), mask=offs < K)

    @triton.jit
    def _int4_tile(w_ptr, sz_ptr, offs_n, k0, N, stride_wn, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   NG: tl.constexpr):
        """Dequantized bf16 tile [BLOCK_N, BLOCK_K] of a nibble-packed uint4 weight [N, K/2] (even k in the
        high nibble) with scales/zeros [K/GROUP, N, 2] (w = (q - 8) * s + z). BLOCK_K divides GROUP or is a
        multiple of it (then each tile spans NG = BLOCK_K / GROUP groups)."""
        offs_kh = tl.arange(0, BLOCK_K // 2)
        b = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k0 // 2 + offs_kh)[None, :])
        q = tl.interleave((b >> 4).to(tl.float32), (b & 0xF).to(tl.float32))
        if NG == 1:
            sz = ((k0 // GROUP) * N + offs_n) * 2
            w = (q - 8.0) * tl.load(sz_ptr + sz).to(tl.float32)[:, None] + tl.load(sz_ptr + sz + 1).to(tl.float32)[:, None]
        else:
            offs_g = k0 // GROUP + tl.arange(0, NG)
            sz = (offs_g[None, :] * N + offs_n[:, None]) * 2  # [BLOCK_N, NG]
            s = tl.load(sz_ptr + sz).to(tl.float32)
            z = tl.load(sz_ptr + sz + 1).to(tl.float32)
            q3 = tl.reshape(q, (BLOCK_N, NG, GROUP))
            w = tl.reshape((q3 - 8.0) * s[:, :, None] + z[:, :, None], (BLOCK_N, BLOCK_K))
        return w.to(tl.bfloat16)

    @triton.jit
    def _w4a16_kernel(x_ptr, w_ptr, sz_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NG: tl.constexpr):
        """y[M, N] = x[M, K] @ dequant(w)^T (int4 w as in _int4_tile). Small-M path."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :], mask=offs_m[:, None] < M, other=0.0)
            w = _int4_tile(w_ptr, sz_ptr, offs_n, k0, N, stride_wn, GROUP, BLOCK_N, BLOCK_K, NG)
            acc += tl.dot(x, tl.trans(w))
        tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(tl.bfloat16), mask=offs_m[:, None] < M)

    @triton.jit
    def _w4a16_geglu_kernel(x_ptr, wg_ptr, wu_ptr, szg_ptr, szu_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                            GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NG: tl.constexpr):
        """h[M, N] = gelu_tanh(x @ dequant(wg)^T) * (x @ dequant(wu)^T): a GeGLU's gate and up projections and
        its activation in one launch. Small-M path."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :], mask=offs_m[:, None] < M, other=0.0)
            wg = _int4_tile(wg_ptr, szg_ptr, offs_n, k0, N, stride_wn, GROUP, BLOCK_N, BLOCK_K, NG)
            wu = _int4_tile(wu_ptr, szu_ptr, offs_n, k0, N, stride_wn, GROUP, BLOCK_N, BLOCK_K, NG)
            acc_g += tl.dot(x, tl.trans(wg))
            acc_u += tl.dot(x, tl.trans(wu))
        a = 0.7978845608028654 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
        h = 0.5 * acc_g * (2.0 * tl.sigmoid(2.0 * a)) * acc_u
        tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], h.to(tl.bfloat16), mask=offs_m[:, None] < M)


# Tile configs the per-shape chooser tries for the small-M int4 kernels: (BLOCK_N, BLOCK_K, num_warps, num_stages).
W4A16_CONFIGS = {"n16k128": (16, 128, 4, 4), "n16k256": (16, 256, 4, 3), "n16k512": (16, 512, 4, 2),
                 "n32k256": (32, 256, 4, 3), "n32k512": (32, 512, 8, 2)}


def _w4a16_launch(kernel, args: tuple, m: int, n: int, k: int, group: int, config: str) -> None:
    block_n, block_k, warps, stages = W4A16_CONFIGS[config]
    if n % block_n or k % block_k or not (group % block_k == 0 or block_k % group == 0):
        raise ValueError(f"int4 triton config {config} does not tile N={n}, K={k}, group={group}")
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    grid = (n // block_n, triton.cdiv(m, block_m))
    kernel[grid](*args, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NG=max(1, block_k // group),
                 num_warps=warps, num_stages=stages)


def w4a16_gemm(x2d: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor, group: int, config: str = "n16k128") -> torch.Tensor:
    """Small-M W4A16 GEMM (our Triton kernel): x [M, K] bf16, qweight uint8 [N, K/2], scales_zeros [K/g, N, 2] bf16."""
    assert _HAVE_TRITON and x2d.is_cuda and x2d.stride(-1) == 1
    m, k = x2d.shape
    n = qweight.shape[0]
    y = torch.empty((m, n), device=x2d.device, dtype=torch.bfloat16)
    _w4a16_launch(_w4a16_kernel, (x2d, qweight, scales_zeros, y, m, n, k, x2d.stride(0), qweight.stride(0), y.stride(0)),
                  m, n, k, group, config)
    return y


def w4a16_geglu(x2d: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, szg: torch.Tensor, szu: torch.Tensor, group: int,
                config: str = "n16k128") -> torch.Tensor:
    """gelu_tanh(x @ Wg^T) * (x @ Wu^T) for int4 Wg, Wu (packed as for w4a16_gemm), one Triton launch."""
    assert _HAVE_TRITON and x2d.is_cuda and x2d.stride(-1) == 1 and wg.shape == wu.shape
    m, k = x2d.shape
    n = wg.shape[0]
    y = torch.empty((m, n), device=x2d.device, dtype=torch.bfloat16)
    _w4a16_launch(_w4a16_geglu_kernel, (x2d, wg, wu, szg, szu, y, m, n, k, x2d.stride(0), wg.stride(0), y.stride(0)),
                  m, n, k, group, config)
    return y


def geglu_quant_fp8(g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate/up outputs [M, I] (bf16, CUDA) -> (e4m3 h [M, I], row scales [M, 1]) with h = gelu_tanh(g) * u."""
    assert _HAVE_TRITON and g.is_cuda and g.shape == u.shape and g.stride(-1) == 1 and u.stride(-1) == 1
    m, k = g.shape
    q = torch.empty((m, k), device=g.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((m, 1), device=g.device, dtype=torch.float32)
    block = min(4096, triton.next_power_of_2(k))
    _geglu_quant_kernel[(m,)](g, u, q, s, k, g.stride(0), u.stride(0), q.stride(0), BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return q, s


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
