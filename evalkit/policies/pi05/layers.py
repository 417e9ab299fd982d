"""Building blocks: Gemma decoder layers (prefix LM and action expert) and SigLIP encoder layers.

Every projection is a plain `torch.nn.Linear`, so backends can replace them by dotted name.
Every layer's forward is the plain pre-norm residual form
    h = x + attn(norm1(x));  out = h + mlp(norm2(h))
(the expert multiplies each branch by its adaRMSNorm gate), so a fault that drops the MLP residual
or swaps `layer.mlp` changes exactly what it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from evalkit.kernels.decode_attention import decode_attention
from evalkit.kernels.rope import apply_rope
from evalkit.policies.pi05.config import GemmaSize, VisionSize


# ----------------------------------------------------------------------------------------------- context
@dataclass
class AttnContext:
    """What attention needs beyond the hidden states, shared by all layers of one forward.

    cos/sin: RoPE tables for the query tokens [B, T, head_dim].
    key_mask: bool [B, S_total] (True = attend) or None when every key is valid (lets SDPA use flash).
    cache: prefill fills it (layer index -> (k, v) after RoPE); the expert writes its own keys into the
           slots reserved after the prefix and attends to the whole buffer.
    cond: adaRMSNorm condition [B, width] for the expert, None for the prefix.
    mods: precomputed adaRMSNorm modulations [B, 3*width], one per expert norm in order
          (layer 0 input, layer 0 post-attention, layer 1 input, ..., final norm); None = compute from cond.
    decode_impl: the expert's attention over the cache: "sdpa" or "triton" (decode_attention.py; resolved
          from the policy's `decode_attention` setting by the model).
    decode_pdl: the Triton kernel launches as a programmatic dependent of the q|k|v projection (sm_90+; the
          policy's `decode_attention_pdl`).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    key_mask: torch.Tensor | None = None
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    write_cache: bool = False
    read_cache: bool = False
    cond: torch.Tensor | None = None
    mods: tuple[torch.Tensor, ...] | None = None
    decode_impl: str = "sdpa"
    decode_pdl: bool = True

    def mod(self, k: int) -> torch.Tensor | None:
        return None if self.mods is None else self.mods[k]


# The expert's attention (horizon x batch queries over the cached prefix) when it runs through SDPA
# (decode_impl="sdpa"; under CUDA graphs the default is our one-launch kernel, decode_attention.py): Flash first.
# At 10 queries x 8 heads over ~555 keys, cuDNN's kernel (PyTorch's own pick) takes about twice FlashAttention's time
# per call, which adds up over a compiled π0.5 call (docs/backends.md). Flash takes no mask: with a key mask the next
# backend in this order runs.
DECODE_SDPA_ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """RoPE cos/sin [B, T, head_dim] for integer positions [B, T] (Gemma's half-split layout), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ----------------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """Gemma RMSNorm: x / rms(x) * (1 + weight), computed in fp32. Returns (y, gate=None)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, mod: torch.Tensor | None = None):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype), None


class AdaRMSNorm(nn.Module):
    """π0.5's adaptive RMSNorm: `dense(cond)` -> (scale, shift, gate); y = norm(x)*(1+scale)+shift.

    The gate multiplies the residual branch that follows this norm. `mod` (= dense(cond), precomputed
    for all denoise steps at once: it depends on the time only) skips the per-step dense layer.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim, bias=True)

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        return self.dense(cond)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, mod: torch.Tensor | None = None):
        if mod is None:
            if cond is None:
                raise ValueError("AdaRMSNorm needs the time condition")
            mod = self.modulation(cond)
        return ada_rms_norm(x, mod, self.eps)


def ada_rms_norm(x: torch.Tensor, mod: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x) * (1 + scale) + shift, gate) in x's dtype, computed in fp32; mod [B, 3*width] = scale | shift | gate
    (x [B, width] or [B, T, width]). The fp8 kernels that fold this norm in reproduce these roundings
    (kernels/mma_small_m.cu: adarms_norm)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if x.dim() == 3:
        mod = mod[:, None, :]
    scale, shift, gate = mod.chunk(3, dim=-1)
    y = y * (1.0 + scale.float()) + shift.float()
    return y.to(x.dtype), gate.to(x.dtype)


def _gated(branch: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return branch if gate is None else branch * gate


# ----------------------------------------------------------------------------------------------- gemma
class GemmaAttention(nn.Module):
    """Grouped-query attention (num_kv_heads shared by all query heads) with RoPE and the prefix KV cache."""

    def __init__(self, size: GemmaSize, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = size.num_heads, size.num_kv_heads, size.head_dim
        self.q_proj = nn.Linear(size.width, size.num_heads * size.head_dim, bias=False)
        self.k_proj = nn.Linear(size.width, size.num_kv_heads * size.head_dim, bias=False)
        self.v_proj = nn.Linear(size.width, size.num_kv_heads * size.head_dim, bias=False)
        self.o_proj = nn.Linear(size.num_heads * size.head_dim, size.width, bias=False)
        # A backend may set a callable x -> (q, k, v) that runs the three projections as one GEMM
        # (backends/fused_qkv.py); a plain attribute, so modules and state_dict stay the same.
        self.qkv = None

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        q, k, v = (self.q_proj(x), self.k_proj(x), self.v_proj(x)) if self.qkv is None else self.qkv(x)
        return self.o_proj(self.attend(q, k, v, ctx))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """Attention of the projected q, k, v [B, T, heads*head_dim] (RoPE, the cache): [B, T, num_heads*head_dim],
        what o_proj reads."""
        b, t, _ = q.shape
        if ctx.read_cache and ctx.decode_impl == "triton":  # RoPE, the step's own keys and attention in one kernel
            pk, pv = ctx.cache[self.layer_idx]
            return decode_attention(q, pk, pv, ctx.key_mask, new=(k, v, ctx.cos, ctx.sin), pdl=ctx.decode_pdl)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, ctx.cos, ctx.sin)
        k = apply_rope(k, ctx.cos, ctx.sin)
        if ctx.write_cache:
            ctx.cache[self.layer_idx] = (k, v)
        if ctx.read_cache:
            # The cache holds [prefix | t free slots] (reserved at prefill): writing this step's keys in
            # place avoids copying the whole prefix K/V every step (what torch.cat would do).
            pk, pv = ctx.cache[self.layer_idx]
            p = pk.shape[2] - t
            pk[:, :, p:] = k.to(pk.dtype)
            pv[:, :, p:] = v.to(pv.dtype)
            k, v = pk, pv
        mask = None if ctx.key_mask is None else ctx.key_mask[:, None, None, :]
        gqa = self.num_kv_heads != self.num_heads
        if ctx.read_cache:
            with sdpa_kernel(DECODE_SDPA_ORDER, set_priority=True):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)


class GemmaMLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    mlp_kind = "geglu_tanh"  # what backends fuse by (evalkit.backends.targets.is_geglu_mlp), not by class name

    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, mlp_dim, bias=False)
        self.up_proj = nn.Linear(width, mlp_dim, bias=False)
        self.down_proj = nn.Linear(mlp_dim, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, size: GemmaSize, layer_idx: int, eps: float, adaptive: bool) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(size, layer_idx)
        self.mlp = GemmaMLP(size.width, size.mlp_dim)
        norm = (lambda: AdaRMSNorm(size.width, size.width, eps)) if adaptive else (lambda: RMSNorm(size.width, eps))
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        # A backend may set a callable (x, ctx) -> out | None that runs this layer with its norms and residual adds
        # folded into its GEMMs (evalkit/policies/pi05/fused_layer.py); None from it: the plain forward runs. A plain
        # attribute like GemmaAttention.qkv: modules and state_dict stay the same.
        self.fused = None

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        if self.fused is not None:
            out = self.fused(x, ctx)
            if out is not None:
                return out
        return self.plain_forward(x, ctx)

    def plain_forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        i = self.self_attn.layer_idx
        a, gate = self.input_layernorm(x, ctx.cond, ctx.mod(2 * i))
        h = x + _gated(self.self_attn(a, ctx), gate)
        m, gate = self.post_attention_layernorm(h, ctx.cond, ctx.mod(2 * i + 1))
        return h + _gated(self.mlp(m), gate)


class GemmaStack(nn.Module):
    """`layers` + final `norm`; the prefix stack also owns `embed_tokens` (tied with PaliGemma's lm_head)."""

    def __init__(self, size: GemmaSize, eps: float, adaptive: bool, vocab_size: int | None) -> None:
        super().__init__()
        self.size = size
        if vocab_size is not None:
            self.embed_tokens = nn.Embedding(vocab_size, size.width)
        self.layers = nn.ModuleList([GemmaDecoderLayer(size, i, eps, adaptive) for i in range(size.depth)])
        self.norm = AdaRMSNorm(size.width, size.width, eps) if adaptive else RMSNorm(size.width, eps)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x, ctx.cond, ctx.mod(2 * len(self.layers)))[0]

    def adaptive_norms(self) -> list[nn.Module]:
        """The norms in AttnContext.mods order (expert only)."""
        norms = [n for layer in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        return norms + [self.norm]


# ----------------------------------------------------------------------------------------------- siglip
class SiglipAttention(nn.Module):
    def __init__(self, size: VisionSize) -> None:
        super().__init__()
        self.num_heads = size.num_heads
        self.q_proj = nn.Linear(size.width, size.width)
        self.k_proj = nn.Linear(size.width, size.width)
        self.v_proj = nn.Linear(size.width, size.width)
        self.out_proj = nn.Linear(size.width, size.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        h = self.num_heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, w // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, t, w))


class SiglipMLP(nn.Module):
    def __init__(self, size: VisionSize) -> None:
        super().__init__()
        self.fc1 = nn.Linear(size.width, size.mlp_dim)
        self.fc2 = nn.Linear(size.mlp_dim, size.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, size: VisionSize, eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(size.width, eps=eps)
        self.self_attn = SiglipAttention(size)
        self.layer_norm2 = nn.LayerNorm(size.width, eps=eps)
        self.mlp = SiglipMLP(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.layer_norm1(x))
        return h + self.mlp(self.layer_norm2(h))


class SiglipEmbeddings(nn.Module):
    def __init__(self, size: VisionSize) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, size.width, kernel_size=size.patch_size, stride=size.patch_size)
        self.position_embedding = nn.Embedding(size.tokens_per_view, size.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight[None].to(x.dtype)


class SiglipVision(nn.Module):
    """SigLIP So400m/14 without the pooling head (PaliGemma uses every patch token)."""

    def __init__(self, size: VisionSize, eps: float) -> None:
        super().__init__()
        self.size = size
        self.embeddings = SiglipEmbeddings(size)
        self.layers = nn.ModuleList([SiglipEncoderLayer(size, eps) for _ in range(size.depth)])
        self.post_layernorm = nn.LayerNorm(size.width, eps=eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)
