"""The action expert's attention: a few query tokens (horizon x batch) over the cached prefix, in one launch.

Written here because no library kernel is fast at this shape (10 queries x 8 heads over ~555 keys, one KV head,
head_dim 256): cuDNN's SDPA is slow there, FlashAttention's split-KV path spends about half its time in a separate
combine kernel, and with a key mask Flash does not run at all (per-call times: docs/backends.md). This Triton
kernel splits the keys across programs like Flash's split-KV and combines the splits in the same launch: the
program that arrives last at its (batch, head) counter reads the others' partials from L2.

    out[b, t, h*D:(h+1)*D] = softmax(q[b, h, t] . k[b, h // G]^T / sqrt(D), masked) @ v[b, h // G]

In the model it takes the step's raw q/k/v projections and applies RoPE itself, reading the step's own keys
from the projections rather than from the cache: the RoPE kernel and the cache write before attention are gone
(two launches per layer and step). Output is [B, T, H*D], the layout o_proj reads, so no transpose copy follows.

Grid (splits, B*H): program (s, bh) takes keys [s*KEYS, (s+1)*KEYS) of head bh for all T <= BLOCK_M queries;
given the step's raw projections, those are the cached keys below P = S - T, and one more program per head
takes the step's own T keys (RoPE on T rows, not on every block). Partials are unnormalised (acc, running max
m, running sum l) in base 2, as FlashAttention-2 keeps them. fp32 inputs take IEEE fp32 dots (never TF32),
bf16/fp16 inputs the tensor cores with fp32 accumulation (P rounded to the input dtype, as FlashAttention does).
With RoPE and the step's keys inside it is faster than FlashAttention plus the RoPE and cache-write kernels it
replaces, and than cuDNN with or without a key mask (docs/backends.md).

Programmatic dependent launch (`pdl=True`, the policy's `decode_attention_pdl`, default on; sm_90+): the kernel
may start while the q|k|v projection before it still runs. Each program first lets the next kernel launch
(o_proj's mma kernel then streams its weights in during the attention), loads its first block of cached keys,
values and mask, and only then waits (griddepcontrol.wait) for the projection's output. Contract: in the new-keys
form nothing in the denoise step writes the cached keys below P or the mask (prefill and the step's prologue do,
before the chain of dependent launches starts); the plain form waits before any load.

`decode_attention` is a torch.library custom op (works under torch.compile and in CUDA graphs); on CPU it is
SDPA itself. `reference_decode_attention` is the plain math the tests compare against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from evalkit.kernels.rope import apply_rope

try:  # Triton ships with CUDA builds of torch only
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU machines
    _HAVE_TRITON = False

IMPLS = ("auto", "triton", "sdpa")  # auto: triton under CUDA graphs (resolve_impl)
MAX_QUERIES = 64  # more query rows per head than this: the prefix-style SDPA kernels are the right tool
DEFAULT_KEYS_PER_SPLIT = 64
DEFAULT_BLOCK_N = 64
DEFAULT_WARPS = 8  # 4 warps spill the [16, 256] fp32 tiles (ptxas), 8 do not


def triton_fits(head_dim: int, queries: int) -> str | None:
    """None when the Triton kernel can run this shape, else why not (one line)."""
    if not _HAVE_TRITON:
        return "Triton is not installed (CPU build of torch)"
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 16"
    if queries > MAX_QUERIES:
        return f"{queries} query tokens > {MAX_QUERIES}"
    return None


def reference_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               key_mask: torch.Tensor | None, new: tuple | None = None) -> torch.Tensor:
    """SDPA (what the model's sdpa path computes) -> [B, T, H*D]; arguments as launch_decode_attention's."""
    if new is not None:  # RoPE and the step's own keys, as GemmaAttention's sdpa path does
        k_new, v_new, cos, sin = new
        b, t = q.shape[:2]
        hkv, d = k.shape[1], k.shape[3]
        q = apply_rope(q.reshape(b, t, -1, d).transpose(1, 2), cos, sin)
        k_new = apply_rope(k_new.reshape(b, t, hkv, d).transpose(1, 2), cos, sin)
        p = k.shape[2] - t
        k = torch.cat([k[:, :, :p], k_new.to(k.dtype)], dim=2)
        v = torch.cat([v[:, :, :p], v_new.reshape(b, t, hkv, d).transpose(1, 2).to(v.dtype)], dim=2)
    b, h, t, d = q.shape
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != h)
    return out.transpose(1, 2).reshape(b, t, h * d)


if _HAVE_TRITON:

    @triton.jit
    def _attend(q, kt, vt, ok, m_i, l_i, acc, qk_scale, PREC: tl.constexpr):
        """One block of keys into the running (max, sum, acc) of FlashAttention-2, base 2."""
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale  # [BLOCK_M, keys], log2 units
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no valid key adds nothing
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        return m_new, l_i, acc

    @triton.jit
    def _load_q(q_ptr, cos_ptr, sin_ptr, b, h, sq_b, sq_h, sq_t, sc_b, sc_t, rows, row_ok, dd, half, sign,
                NEW: tl.constexpr):
        """The program's query rows [BLOCK_M, D]; NEW: the raw projection with RoPE applied as apply_rope does
        (fp32 math, one rounding)."""
        q_rows = q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_t
        q = tl.load(q_rows + dd[None, :], mask=row_ok[:, None], other=0.0)
        if NEW:
            cs = b * sc_b + rows[:, None] * sc_t + dd[None, :]
            qr = tl.load(q_rows + half[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
            c = tl.load(cos_ptr + cs, mask=row_ok[:, None], other=0.0).to(tl.float32)
            sn = tl.load(sin_ptr + cs, mask=row_ok[:, None], other=0.0).to(tl.float32)
            q = (q.to(tl.float32) * c + qr * sign[None, :] * sn).to(q_ptr.dtype.element_ty)
        return q

    @triton.jit
    def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, ws_o_ptr, ws_ml_ptr, cnt_ptr,
                            kn_ptr, vn_ptr, cos_ptr, sin_ptr,
                            T, S, P, H, G, sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, so_b, so_t,
                            skn_b, skn_t, svn_b, svn_t, sc_b, sc_t,
                            qk_scale, NSPLIT: tl.constexpr, KEYS: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, D: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                            NEW: tl.constexpr, PDL: tl.constexpr):
        split = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kvh = h // G
        if PDL:  # the next kernel (o_proj) may launch now and stream its weights in while this one runs
            tl.extra.cuda.gdc_launch_dependents()
        rows = tl.arange(0, BLOCK_M)
        dd = tl.arange(0, D)
        half = tl.where(dd < D // 2, dd + D // 2, dd - D // 2)  # rotate_half's source column ...
        sign = tl.where(dd < D // 2, -1.0, 1.0)  # ... and its sign
        row_ok = rows < T
        k_base = k_ptr + b * sk_b + kvh * sk_h
        v_base = v_ptr + b * sv_b + kvh * sv_h
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
        # (the branches name their tiles apart: Triton merges a name assigned in both, and the shapes differ)
        if NEW and split == NSPLIT - 1:  # the last program takes the step's own T keys, RoPE'd here
            if PDL:  # q and the new keys are the previous kernel's output
                tl.extra.cuda.gdc_wait()
            q = _load_q(q_ptr, cos_ptr, sin_ptr, b, h, sq_b, sq_h, sq_t, sc_b, sc_t, rows, row_ok, dd, half, sign, NEW)
            tk = tl.arange(0, BLOCK_M)
            ok_n = tk < T
            kn_rows = kn_ptr + b * skn_b + kvh * D + tk[:, None] * skn_t
            kn = tl.load(kn_rows + dd[None, :], mask=ok_n[:, None], other=0.0).to(tl.float32)
            knr = tl.load(kn_rows + half[None, :], mask=ok_n[:, None], other=0.0).to(tl.float32)
            vn = tl.load(vn_ptr + b * svn_b + kvh * D + tk[:, None] * svn_t + dd[None, :], mask=ok_n[:, None], other=0.0)
            cs = b * sc_b + tk[:, None] * sc_t + dd[None, :]
            c = tl.load(cos_ptr + cs, mask=ok_n[:, None], other=0.0).to(tl.float32)
            sn = tl.load(sin_ptr + cs, mask=ok_n[:, None], other=0.0).to(tl.float32)
            if HAS_MASK:
                ok_n = ok_n & (tl.load(mask_ptr + b * sm_b + P + tk, mask=ok_n, other=0) != 0)
            kn = (kn * c + knr * sign[None, :] * sn).to(vn.dtype)
            m_i, l_i, acc = _attend(q, kn, vn, ok_n, m_i, l_i, acc, qk_scale, PREC)
        else:  # cached keys [split * KEYS, (split + 1) * KEYS) below P
            # The first block's K, V and mask are loaded before anything waits: in the NEW form nothing in the
            # step writes them (prefill wrote the cache, the step's prologue the mask), so under PDL they stream in
            # while the q|k|v projection still runs. The plain form's cache may hold this step's keys: wait first.
            keys0 = split * KEYS + tl.arange(0, BLOCK_N)
            if PDL and not NEW:
                tl.extra.cuda.gdc_wait()
            ok0 = keys0 < P
            kt0 = tl.load(k_base + keys0[:, None] * sk_s + dd[None, :], mask=ok0[:, None], other=0.0)
            vt0 = tl.load(v_base + keys0[:, None] * sv_s + dd[None, :], mask=ok0[:, None], other=0.0)
            if HAS_MASK:
                ok0 = ok0 & (tl.load(mask_ptr + b * sm_b + keys0, mask=ok0, other=0) != 0)
            if PDL and NEW:
                tl.extra.cuda.gdc_wait()
            q = _load_q(q_ptr, cos_ptr, sin_ptr, b, h, sq_b, sq_h, sq_t, sc_b, sc_t, rows, row_ok, dd, half, sign, NEW)
            m_i, l_i, acc = _attend(q, kt0, vt0, ok0, m_i, l_i, acc, qk_scale, PREC)
            for n0 in tl.static_range(BLOCK_N, KEYS, BLOCK_N):
                keys = split * KEYS + n0 + tl.arange(0, BLOCK_N)
                ok = keys < P
                # K, V and the mask are loaded before any math, so their latencies overlap
                kt = tl.load(k_base + keys[:, None] * sk_s + dd[None, :], mask=ok[:, None], other=0.0)
                vt = tl.load(v_base + keys[:, None] * sv_s + dd[None, :], mask=ok[:, None], other=0.0)
                if HAS_MASK:
                    ok = ok & (tl.load(mask_ptr + b * sm_b + keys, mask=ok, other=0) != 0)
                m_i, l_i, acc = _attend(q, kt, vt, ok, m_i, l_i, acc, qk_scale, PREC)
        o_ptrs = o_ptr + b * so_b + rows[:, None] * so_t + h * D + dd[None, :]
        if NSPLIT == 1:
            tl.store(o_ptrs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            part = bh * NSPLIT + split
            tl.store(ws_o_ptr + (part * BLOCK_M + rows[:, None]) * D + dd[None, :], acc, mask=row_ok[:, None])
            tl.store(ws_ml_ptr + (part * BLOCK_M + rows) * 2, m_i, mask=row_ok)
            tl.store(ws_ml_ptr + (part * BLOCK_M + rows) * 2 + 1, l_i, mask=row_ok)
            tl.debug_barrier()  # every thread's partial is written before the one atomic below releases them
            arrived = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
            if arrived == NSPLIT - 1:  # last split of this head: combine (partials read at L2, never stale L1)
                m_all = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
                for s_ in range(NSPLIT):
                    m_s = tl.load(ws_ml_ptr + ((bh * NSPLIT + s_) * BLOCK_M + rows) * 2, mask=row_ok,
                                  other=float("-inf"), cache_modifier=".cg")
                    m_all = tl.maximum(m_all, m_s)
                m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
                num = tl.zeros((BLOCK_M, D), dtype=tl.float32)
                den = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for s_ in range(NSPLIT):  # a loop, not unrolled: unrolled, the hoisted partial loads spilled
                    base = (bh * NSPLIT + s_) * BLOCK_M + rows
                    m_s = tl.load(ws_ml_ptr + base * 2, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                    l_s = tl.load(ws_ml_ptr + base * 2 + 1, mask=row_ok, other=0.0, cache_modifier=".cg")
                    w = tl.exp2(m_s - m_all)
                    a_s = tl.load(ws_o_ptr + base[:, None] * D + dd[None, :], mask=row_ok[:, None], other=0.0,
                                  cache_modifier=".cg")
                    num += a_s * w[:, None]
                    den += l_s * w
                den = tl.where(row_ok, den, 1.0)
                tl.store(o_ptrs, (num / den[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
                tl.atomic_xchg(cnt_ptr + bh, 0)  # ready for the next call (and the next CUDA-graph replay)


def launch_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                            keys_per_split: int = DEFAULT_KEYS_PER_SPLIT, block_n: int = DEFAULT_BLOCK_N,
                            num_warps: int = DEFAULT_WARPS, new: tuple | None = None, pdl: bool = False) -> torch.Tensor:
    """Run the Triton kernel -> [B, T, H*D] in q's dtype; key_mask bool [B, S] or None. pdl: launch as a
    programmatic dependent of the previous kernel on the stream where the GPU has it (sm_90+; else ignored;
    the contract is in the module docstring). Two forms:
    - new=None: q [B, H, T, D] after RoPE (any strides, unit last), k/v [B, Hkv, S, D] hold every key;
    - new=(k_new, v_new, cos, sin): q [B, T, H*D], k_new/v_new [B, T, Hkv*D] are this step's raw projections
      (RoPE with cos/sin [B, T, D] is applied in the kernel, as apply_rope does), k/v [B, Hkv, P + T, D] the
      cache whose first P keys are the prefix: its last T slots are neither read nor written."""
    d = k.shape[3]
    hkv, s = k.shape[1], k.shape[2]
    if new is None:
        b, h, t, _ = q.shape
        q = q if q.stride(-1) == 1 else q.contiguous()
        sq = (q.stride(0), q.stride(1), q.stride(2))
        k_new = v_new = cos = sin = q  # unused
        skn = svn = sc = (0, 0)
    else:
        k_new, v_new, cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in new)
        b, t = q.shape[:2]
        h = q.shape[2] // d
        q = q if q.stride(-1) == 1 else q.contiguous()
        sq = (q.stride(0), d, q.stride(1))
        if k_new.shape != (b, t, hkv * d) or v_new.shape != k_new.shape or cos.shape != (b, t, d) or sin.shape != cos.shape:
            raise ValueError(f"decode attention new keys: k_new {tuple(k_new.shape)} v_new {tuple(v_new.shape)} "
                             f"cos {tuple(cos.shape)}, want [{b}, {t}, {hkv * d}] and [{b}, {t}, {d}]")
        skn, svn, sc = (k_new.stride(0), k_new.stride(1)), (v_new.stride(0), v_new.stride(1)), (cos.stride(0), cos.stride(1))
    why = triton_fits(d, t)
    if why:
        raise ValueError(f"decode attention kernel cannot run: {why}")
    if h % hkv or v.shape[:3] != k.shape[:3] or keys_per_split % block_n or s < t:
        raise ValueError(f"decode attention shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}, "
                         f"keys_per_split {keys_per_split} / block_n {block_n}")
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    use_pdl = bool(pdl) and torch.cuda.get_device_capability(q.device) >= (9, 0)
    block_m = max(16, triton.next_power_of_2(t))
    nsplit = triton.cdiv(s, keys_per_split) if new is None else triton.cdiv(s - t, keys_per_split) + 1
    out = torch.empty((b, t, h * d), device=q.device, dtype=q.dtype)
    if nsplit > 1:
        ws_o = torch.empty((b * h * nsplit * block_m * d,), device=q.device, dtype=torch.float32)
        ws_ml = torch.empty((b * h * nsplit * block_m * 2,), device=q.device, dtype=torch.float32)
        from evalkit.kernels.triton_kernels import (
            _counters,  # the split-K kernels' arrival counters (each launch re-zeroes its own)
        )

        cnt = _counters(q.device, b * h)
    else:
        ws_o = ws_ml = cnt = out  # unused
    mask = out if key_mask is None else key_mask if key_mask.stride(-1) == 1 else key_mask.contiguous()
    _decode_attn_kernel[(nsplit, b * h)](
        q, k, v, mask, out, ws_o, ws_ml, cnt, k_new, v_new, cos, sin,
        t, s, s if new is None else s - t, h, h // hkv, *sq, k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask.stride(0) if key_mask is not None else 0,
        out.stride(0), out.stride(1), *skn, *svn, *sc, (1.0 / math.sqrt(d)) * 1.4426950408889634,
        NSPLIT=nsplit, KEYS=keys_per_split, BLOCK_M=block_m, BLOCK_N=block_n, D=d,
        HAS_MASK=key_mask is not None, PREC="ieee" if q.dtype == torch.float32 else "tf32", NEW=new is not None,
        PDL=use_pdl, num_warps=num_warps, launch_pdl=use_pdl)
    return out


@torch.library.custom_op("evalkit::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                         k_new: torch.Tensor | None, v_new: torch.Tensor | None, cos: torch.Tensor | None,
                         sin: torch.Tensor | None, keys_per_split: int, block_n: int, num_warps: int,
                         pdl: bool = False) -> torch.Tensor:
    new = None if k_new is None else (k_new, v_new, cos, sin)
    if q.is_cuda:
        return launch_decode_attention(q, k, v, key_mask, keys_per_split, block_n, num_warps, new, pdl)
    return reference_decode_attention(q, k, v, key_mask, new)


@_decode_attention_op.register_fake
def _(q, k, v, key_mask, k_new, v_new, cos, sin, keys_per_split, block_n, num_warps, pdl=False):
    if k_new is not None:
        return q.new_empty(q.shape)
    b, h, t, d = q.shape
    return q.new_empty((b, t, h * d))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                     new: tuple | None = None, keys_per_split: int = DEFAULT_KEYS_PER_SPLIT,
                     block_n: int = DEFAULT_BLOCK_N, num_warps: int = DEFAULT_WARPS, pdl: bool = False) -> torch.Tensor:
    """The expert's attention over the cache -> [B, T, H*D] (key_mask bool [B, S], True = attend); the two
    forms of q/k/v/new and pdl as in launch_decode_attention."""
    k_new, v_new, cos, sin = new if new is not None else (None, None, None, None)
    return _decode_attention_op(q, k, v, key_mask, k_new, v_new, cos, sin, keys_per_split, block_n, num_warps, pdl)
