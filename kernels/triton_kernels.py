"""Our own Triton kernels, written where no library kernel does the job fast enough:
- fused per-token (row-wise) activation quantization (fp8 e4m3 / int8), one pass for amax and one for the
  cast in a single launch, and the same fused with a GeGLU (gelu(gate) * up), so dynamic W8A8 does not pay
  separate amax/divide/cast kernels;
- W4A16 int4 GEMMs: small-M (the denoise loop) with K split across programs and reduced in the same launch,
  optionally computing a GeGLU's gate + up + gelu at once; large-M tiles; a one-launch int4 -> bf16 unpack.

Imported lazily: the CPU machine has no Triton; backends that need these check `triton_available()` up front.
With TRITON_INTERPRET=1 (Triton installed on a CPU machine) the int4 kernels run on CPU tensors for checks.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch only
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter runs the kernels on CPU tensors
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
    def _gelu_tanh_mul(g, u):
        """gelu_tanh(g) * u in fp32 (1 + tanh(a) = 2 sigmoid(2a))."""
        a = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (2.0 * tl.sigmoid(2.0 * a)) * u

    @triton.jit
    def _geglu_quant_kernel(g_ptr, u_ptr, q_ptr, s_ptr, K, stride_g, stride_u, stride_q, BLOCK: tl.constexpr,
                            ONE_PASS: tl.constexpr):
        """h = gelu_tanh(g) * u in fp32, then per-row e4m3 quantization of h, without writing h. ONE_PASS
        (BLOCK >= K): the row stays in registers between amax and cast (g and u are read once)."""
        row = tl.program_id(0).to(tl.int64)
        g_row, u_row, q_row = g_ptr + row * stride_g, u_ptr + row * stride_u, q_ptr + row * stride_q
        if ONE_PASS:
            offs = tl.arange(0, BLOCK)
            g = tl.load(g_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            u = tl.load(u_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            h = _gelu_tanh_mul(g, u)
            amax = tl.maximum(tl.max(tl.abs(h), axis=0), 1e-12)
            tl.store(s_ptr + row, amax / 448.0)
            h = tl.minimum(tl.maximum(h * (448.0 / amax), -448.0), 448.0)
            tl.store(q_row + offs, h.to(tl.float8e4nv), mask=offs < K)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for k in range(0, K, BLOCK):
                offs = k + tl.arange(0, BLOCK)
                g = tl.load(g_row + offs, mask=offs < K, other=0.0).to(tl.float32)
                u = tl.load(u_row + offs, mask=offs < K, other=0.0).to(tl.float32)
                h = _gelu_tanh_mul(g, u)
                acc = tl.maximum(acc, tl.abs(h))
            amax = tl.maximum(tl.max(acc, axis=0), 1e-12)
            tl.store(s_ptr + row, amax / 448.0)
            inv = 448.0 / amax
            for k in range(0, K, BLOCK):
                offs = k + tl.arange(0, BLOCK)
                g = tl.load(g_row + offs, mask=offs < K, other=0.0).to(tl.float32)
                u = tl.load(u_row + offs, mask=offs < K, other=0.0).to(tl.float32)
                h = _gelu_tanh_mul(g, u) * inv
                h = tl.minimum(tl.maximum(h, -448.0), 448.0)
                tl.store(q_row + offs, h.to(tl.float8e4nv), mask=offs < K)

    @triton.jit
    def _int4_tile(w_ptr, sz_ptr, offs_n, k0, N, stride_wn, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   NG: tl.constexpr):
        """Dequantized fp32 tile [BLOCK_N, BLOCK_K] of a nibble-packed uint4 weight [N, K/2] (even k in the
        high nibble) with scales/zeros [K/GROUP, N, 2] (w = (q - 8) * s + z). BLOCK_K divides GROUP or is a
        multiple of it (then each tile spans NG = BLOCK_K / GROUP groups). (Applying the scales after the dot
        instead, with the nibbles split into even/odd dots, was slower at the expert's shapes; even/odd nibble
        tiles dequantized to bf16 by a bit trick in inline PTX (no int->float conversions, two values per FMA),
        also with the weights as the MMA's A operand, were no faster: docs/backends.md.)"""
        offs_kh = tl.arange(0, BLOCK_K // 2)
        b = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k0 // 2 + offs_kh)[None, :])
        q = tl.interleave((b >> 4).to(tl.float32), (b & 0xF).to(tl.float32))
        # scale and zero are adjacent: one 4-byte load per (row, group), which Triton's pipeliner can issue
        # ahead as cp.async (two 2-byte loads were synchronous in every K step)
        pair = tl.arange(0, 2)
        if NG == 1:
            sz = ((k0 // GROUP) * N + offs_n) * 2
            s, z = tl.split(tl.load(sz_ptr + sz[:, None] + pair[None, :]).to(tl.float32))
            w = (q - 8.0) * s[:, None] + z[:, None]
        else:
            offs_g = k0 // GROUP + tl.arange(0, NG)
            sz = (offs_g[None, :] * N + offs_n[:, None]) * 2  # [BLOCK_N, NG]
            s, z = tl.split(tl.load(sz_ptr + sz[:, :, None] + pair[None, None, :]).to(tl.float32))
            q3 = tl.reshape(q, (BLOCK_N, NG, GROUP))
            w = tl.reshape((q3 - 8.0) * s[:, :, None] + z[:, :, None], (BLOCK_N, BLOCK_K))
        return w

    @triton.jit
    def _w4a16_splitk_kernel(x_ptr, wa_ptr, wb_ptr, sza_ptr, szb_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, M_PAD,
                             stride_xm, stride_wn, stride_ym, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NG: tl.constexpr, SPLIT: tl.constexpr,
                             GEGLU: tl.constexpr):
        """Small-M W4A16 GEMM, split over K. y = x @ dequant(wa)^T, or with GEGLU
        y = gelu_tanh(x @ dequant(wa)^T) * (x @ dequant(wb)^T) (a GeGLU's gate, up and activation in one launch).

        Grid (N / BLOCK_N, SPLIT, M tiles). Each program reduces one K slice of one output tile. With SPLIT > 1
        the partial sums go to an fp32 workspace [SPLIT, 1 + GEGLU, M_PAD, N]; the program that arrives last
        at the tile's counter (one atomic per program) adds them up, writes y and resets the counter, so
        a whole small-M GEMM is one launch with enough programs to keep every SM reading weights."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        k_slice = K // SPLIT
        acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_s * k_slice, (pid_s + 1) * k_slice, BLOCK_K):
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :], mask=offs_m[:, None] < M, other=0.0)
            wa = _int4_tile(wa_ptr, sza_ptr, offs_n, k0, N, stride_wn, GROUP, BLOCK_N, BLOCK_K, NG).to(x.dtype)
            acc_a += tl.dot(x, tl.trans(wa))
            if GEGLU:
                wb = _int4_tile(wb_ptr, szb_ptr, offs_n, k0, N, stride_wn, GROUP, BLOCK_N, BLOCK_K, NG).to(x.dtype)
                acc_b += tl.dot(x, tl.trans(wb))
        y_offs = offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        if SPLIT == 1:
            _w4a16_store(y_ptr + y_offs, acc_a, acc_b, offs_m[:, None] < M, GEGLU)
        else:
            plane = M_PAD * N
            nout = 2 if GEGLU else 1
            ws_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
            rows = offs_m[:, None] < M  # padding rows are neither written nor read back
            tl.store(ws_ptr + pid_s * nout * plane + ws_offs, acc_a, mask=rows)
            if GEGLU:
                tl.store(ws_ptr + (pid_s * nout + 1) * plane + ws_offs, acc_b, mask=rows)
            tl.debug_barrier()  # every thread's partial is written before the one atomic below releases them
            tile = pid_m * tl.num_programs(0) + pid_n
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT - 1:  # last program of this tile: reduce the partials (read from L2, not L1)
                acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in range(SPLIT):
                    acc_a += tl.load(ws_ptr + s * nout * plane + ws_offs, mask=rows, other=0.0, cache_modifier=".cg")
                    if GEGLU:
                        acc_b += tl.load(ws_ptr + (s * nout + 1) * plane + ws_offs, mask=rows, other=0.0, cache_modifier=".cg")
                _w4a16_store(y_ptr + y_offs, acc_a, acc_b, offs_m[:, None] < M, GEGLU)
                tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next call (and the next CUDA-graph replay)

    @triton.jit
    def _int4_dequant_kernel(w_ptr, sz_ptr, out_ptr, N, K, stride_wn, stride_on, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, NG: tl.constexpr):
        """out [N, K] = dequant(w) in out's dtype, one tile per program (unpack for the cuBLAS large-M path)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        w = _int4_tile(w_ptr, sz_ptr, offs_n, k0, N, stride_wn, GROUP, BLOCK_N, BLOCK_K, NG)
        ptrs = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + (k0 + tl.arange(0, BLOCK_K))[None, :]
        tl.store(ptrs, w.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _w4a16_store(ptrs, acc_a, acc_b, mask, GEGLU: tl.constexpr):
        if GEGLU:
            acc_a = _gelu_tanh_mul(acc_a, acc_b)
        tl.store(ptrs, acc_a.to(ptrs.dtype.element_ty), mask=mask)


# Tile configs the per-shape chooser tries for the small-M int4 kernel: name -> (BLOCK_N, BLOCK_K, SPLIT,
# num_warps, num_stages). SPLIT > 1 splits K across programs (the down projection, K = 4 N, has too few
# output tiles to fill the GPU otherwise); a config that does not tile a shape is skipped for it.
W4A16_CONFIGS = {
    "n16k128s1": (16, 128, 1, 4, 4), "n32k256s1": (32, 256, 1, 4, 3),
    "n16k256s2": (16, 256, 2, 4, 3), "n32k256s2": (32, 256, 2, 4, 3),
    "n16k256s4": (16, 256, 4, 4, 3), "n32k256s4": (32, 256, 4, 4, 3), "n64k128s4": (64, 128, 4, 4, 3),
    "n32k128s8": (32, 128, 8, 4, 3), "n16k256s8": (16, 256, 8, 4, 2), "n32k256s8": (32, 256, 8, 4, 2),
    "n32k256s16": (32, 256, 16, 4, 2),
}
# Large-M (prefill) tiles for the same kernel, no split: name -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
W4A16_LARGE_M_CONFIGS = {
    "m64n128k64": (64, 128, 64, 4, 3), "m128n128k64": (128, 128, 64, 8, 3), "m128n64k128": (128, 64, 128, 8, 3),
    "m64n64k128": (64, 64, 128, 4, 3), "m128n256k64": (128, 256, 64, 8, 3),
}
_COUNTERS: dict[tuple, torch.Tensor] = {}


def _w4a16_config(config: str) -> tuple[int | None, int, int, int, int, int]:
    """(BLOCK_M or None = by M, BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages) of a small- or large-M config."""
    if config in W4A16_CONFIGS:
        return (None, *W4A16_CONFIGS[config])
    block_m, block_n, block_k, warps, stages = W4A16_LARGE_M_CONFIGS[config]
    return block_m, block_n, block_k, 1, warps, stages


def w4a16_config_fits(config: str, n: int, k: int, group: int) -> bool:
    if config not in W4A16_CONFIGS and config not in W4A16_LARGE_M_CONFIGS:
        return False
    _, block_n, block_k, split, _, _ = _w4a16_config(config)
    return n % block_n == 0 and k % (block_k * split) == 0 and (group % block_k == 0 or block_k % group == 0)


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for the split-K / split-KV reductions (the int4 and fp8 GEMMs, π0.5's decode
    attention); each launch leaves them zero again. One buffer per device (allocated on the first, eager call;
    CUDA-graph capture runs on its own stream, so a per-stream buffer could not be allocated there): the policy
    runs its kernels on one stream, one at a time."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K arrival counters not allocated; run one eager forward before CUDA-graph capture")
        buf = _COUNTERS[key] = torch.zeros(max(tiles, 4096), device=device, dtype=torch.int32)
    return buf


def _w4a16_launch(x2d: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor | None, sza: torch.Tensor,
                  szb: torch.Tensor | None, group: int, config: str) -> torch.Tensor:
    assert _HAVE_TRITON and (x2d.is_cuda or _INTERPRET) and x2d.stride(-1) == 1
    m, k = x2d.shape
    n = wa.shape[0]
    if not w4a16_config_fits(config, n, k, group):
        raise ValueError(f"int4 triton config {config} does not tile N={n}, K={k}, group={group}")
    block_m, block_n, block_k, split, warps, stages = _w4a16_config(config)
    block_m = block_m or (16 if m <= 16 else (32 if m <= 32 else 64))
    m_tiles = triton.cdiv(m, block_m)
    grid = (n // block_n, split, m_tiles)
    y = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype)  # bf16 (or fp16; fp32 under the interpreter)
    geglu = wb is not None
    if split > 1:
        ws = torch.empty((split, 2 if geglu else 1, m_tiles * block_m, n), device=x2d.device, dtype=torch.float32)
        cnt = _counters(x2d.device, grid[0] * m_tiles)
    else:
        ws = cnt = y  # unused
    _w4a16_splitk_kernel[grid](x2d, wa, wb if geglu else wa, sza, szb if geglu else sza, y, ws, cnt, m, n, k,
                               m_tiles * block_m, x2d.stride(0), wa.stride(0), y.stride(0), GROUP=group,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NG=max(1, block_k // group),
                               SPLIT=split, GEGLU=geglu, num_warps=warps, num_stages=stages)
    return y


def w4a16_gemm(x2d: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor, group: int, config: str = "n16k128s1") -> torch.Tensor:
    """W4A16 GEMM (our Triton kernel; small-M split-K configs or large-M tiles): x [M, K] bf16 (y has x's
    dtype), qweight uint8 [N, K/2], scales_zeros [K/g, N, 2] bf16."""
    return _w4a16_launch(x2d, qweight, None, scales_zeros, None, group, config)


def w4a16_geglu(x2d: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, szg: torch.Tensor, szu: torch.Tensor, group: int,
                config: str = "n16k128s1") -> torch.Tensor:
    """gelu_tanh(x @ Wg^T) * (x @ Wu^T) for int4 Wg, Wu (packed as for w4a16_gemm), one Triton launch."""
    assert wg.shape == wu.shape
    return _w4a16_launch(x2d, wg, wu, szg, szu, group, config)


def int4_dequant(qweight: torch.Tensor, scales_zeros: torch.Tensor, group: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Nibble-packed int4 [N, K/2] + scales/zeros [K/g, N, 2] -> dense [N, K] in one Triton launch."""
    assert _HAVE_TRITON and (qweight.is_cuda or _INTERPRET)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    block_k = 128 if (group % 128 == 0 or 128 % group == 0) else group
    if k % block_k or n % 32:
        raise ValueError(f"int4_dequant needs N % 32 == 0 and K % {block_k} == 0, got N={n}, K={k}")
    out = torch.empty((n, k), device=qweight.device, dtype=dtype)
    _int4_dequant_kernel[(n // 32, k // block_k)](qweight, scales_zeros, out, n, k, qweight.stride(0), out.stride(0), GROUP=group,
                                                 BLOCK_N=32, BLOCK_K=block_k, NG=max(1, block_k // group), num_warps=4)
    return out


def geglu_quant_fp8(g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate/up outputs [M, I] (bf16, CUDA) -> (e4m3 h [M, I], row scales [M, 1]) with h = gelu_tanh(g) * u."""
    assert _HAVE_TRITON and g.is_cuda and g.shape == u.shape and g.stride(-1) == 1 and u.stride(-1) == 1
    m, k = g.shape
    q = torch.empty((m, k), device=g.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((m, 1), device=g.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    if block <= 16384:  # one pass, the row in registers (<= 32 values of g and of u per thread at 16 warps)
        warps = max(4, min(16, block // 1024))
        _geglu_quant_kernel[(m,)](g, u, q, s, k, g.stride(0), u.stride(0), q.stride(0), BLOCK=block, ONE_PASS=True, num_warps=warps)
    else:
        _geglu_quant_kernel[(m,)](g, u, q, s, k, g.stride(0), u.stride(0), q.stride(0), BLOCK=4096, ONE_PASS=False, num_warps=8)
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
