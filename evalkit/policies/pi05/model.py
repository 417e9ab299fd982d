"""π0.5 as one nn.Module: prefix (SigLIP views or state tokens + instruction) -> Gemma-2B KV cache ->
Gemma-300M-sized action expert with adaRMSNorm time conditioning -> flow-matching Euler steps.

Stage-level methods (`embed_prefix`, `prefill`, `denoise_step`) are public so the latency timer and
CUDA-graph runner can wrap each one; `sample` chains them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evalkit.backends import fusions
from evalkit.latency.timer import NullTimer
from evalkit.policies.base import check_denoise_steps
from evalkit.policies.pi05.config import Pi05Config
from evalkit.policies.pi05.layers import (
    AttnContext,
    GemmaStack,
    SiglipVision,
    rope_tables,
)

# π0.5's own fp8 fusion (adaRMS norms and residual adds inside the expert's mma launches, fused_layer.py): the
# fp8 backend runs it after quantizing, without knowing the model.
fusions.register("fp8", "evalkit.policies.pi05.fused_layer:install")


@dataclass
class PrefixCache:
    """The prefix KV cache, built once per call and read by every expert step."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # per layer [B, kv_heads, P + action_horizon, head_dim]
    key_mask: torch.Tensor | None  # bool [B, P]; None = every prefix token valid
    valid_len: torch.Tensor  # long [B]: number of valid prefix tokens (suffix positions start here)


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3,
                              max_period: float = 4.0) -> torch.Tensor:
    """openpi's sine-cosine embedding of the flow-matching time t in [0, 1] -> [B, dim] (fp32)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    scale = (2 * math.pi / period).to(torch.float32)
    x = t.to(torch.float32)[:, None] * scale[None]
    return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)


class Pi05Model(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.prefix_inputs == "images":
            self.vision = SiglipVision(cfg.vision, cfg.layernorm_eps)
            self.projector = nn.Linear(cfg.vision.width, cfg.prefix.width)
        else:
            self.state_encoder = nn.Linear(cfg.state_feature_dim, cfg.state_prefix_tokens * cfg.prefix.width)
        self.prefix = GemmaStack(cfg.prefix, cfg.rms_eps, adaptive=False, vocab_size=cfg.vocab_size)
        self.expert = GemmaStack(cfg.expert, cfg.rms_eps, adaptive=True, vocab_size=None)
        w = cfg.expert.width
        self.action_in_proj = nn.Linear(cfg.action_dim, w)
        self.action_out_proj = nn.Linear(w, cfg.action_dim)
        self.time_mlp_in = nn.Linear(w, w)
        self.time_mlp_out = nn.Linear(w, w)
        self.expert_calls = 0  # incremented once per expert forward (denoise step)
        # The expert's attention over the cache: "sdpa" or "triton" (decode_attention.py); the policy builder
        # resolves its `decode_attention` setting (auto: triton under CUDA graphs) into this.
        self.decode_impl = "sdpa"
        self.decode_pdl = True  # the Triton kernel as a programmatic dependent launch (policy's decode_attention_pdl)

    # ------------------------------------------------------------------ helpers
    @property
    def compute_dtype(self) -> torch.dtype:
        """The activation dtype: the dtype of the token embedding (backends cast it with everything else)."""
        return self.prefix.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.prefix.embed_tokens.weight.device

    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Seeded random weights for latency work and tests, drawn on the device the model lives on.

        adaRMS dense layers get small random weights too (openpi zero-inits them, which would make every
        expert branch a no-op and hide faults)."""
        gens: dict[str, torch.Generator] = {}
        with torch.no_grad():
            for name, p in self.named_parameters():
                g = gens.setdefault(str(p.device), torch.Generator(device=p.device).manual_seed(seed))
                if "layer_norm" in name or "post_layernorm" in name:  # SigLIP LayerNorm
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("norm.weight"):  # Gemma RMSNorm scales by (1 + weight)
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=g)

    # ------------------------------------------------------------------ stage 1: encode
    def embed_prefix(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor | None,
        images: torch.Tensor | None = None,
        state_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefix embeddings [B, P, width] and key mask [B, P] (None when all valid).

        images: float [B, V, 3, H, W] in [-1, 1]; tokens/token_mask: [B, L] (mask None = all valid);
        state_features: float [B, F] for prefix_inputs=state_tokens.
        """
        dt = self.compute_dtype
        parts, masks = [], []
        b = tokens.shape[0]
        if self.cfg.prefix_inputs == "images":
            if images is None:
                raise ValueError("pi05 (prefix_inputs=images) needs images [B, V, 3, H, W]")
            v = images.shape[1]
            feats = self.vision(images.flatten(0, 1).to(dt))  # all views in one batch
            img = self.projector(feats.to(dt)).to(dt)
            parts.append(img.reshape(b, v * img.shape[1], img.shape[2]))
            masks.append(torch.ones(b, parts[-1].shape[1], dtype=torch.bool, device=tokens.device))
        else:
            if state_features is None:
                raise ValueError("pi05 (prefix_inputs=state_tokens) needs state_features [B, F]")
            s = self.state_encoder(state_features.to(dt)).to(dt)
            parts.append(s.view(b, self.cfg.state_prefix_tokens, self.cfg.prefix.width))
            masks.append(torch.ones(b, self.cfg.state_prefix_tokens, dtype=torch.bool, device=tokens.device))
        lang = self.prefix.embed_tokens(tokens).to(dt)
        parts.append(lang * math.sqrt(lang.shape[-1]))
        embs = torch.cat(parts, dim=1)
        if token_mask is None:
            return embs, None
        masks.append(token_mask.to(torch.bool))
        return embs, torch.cat(masks, dim=1)

    # ------------------------------------------------------------------ stage 2: prefill
    def prefill(self, embs: torch.Tensor, key_mask: torch.Tensor | None) -> PrefixCache:
        """Run the prefix stack once (bidirectional over the whole prefix) and keep each layer's K/V."""
        b, p, _ = embs.shape
        if key_mask is None:
            positions = torch.arange(p, device=embs.device)[None].expand(b, p)
            valid = torch.full((b,), p, dtype=torch.long, device=embs.device)
        else:
            positions = torch.cumsum(key_mask.long(), dim=1) - 1
            valid = key_mask.long().sum(dim=1)
        kv = self.prefix_kv(embs, positions, key_mask)
        return PrefixCache(kv=dict(enumerate(kv)), key_mask=key_mask, valid_len=valid)

    def prefix_kv(self, embs: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None):
        """The prefix stack's per-layer (k, v) after RoPE, as a tuple (a pure tensor function: compilable)."""
        cos, sin = rope_tables(positions, self.cfg.prefix.head_dim, self.cfg.rope_theta, embs.dtype)
        ctx = AttnContext(cos=cos, sin=sin, key_mask=key_mask, write_cache=True)
        self.prefix(embs, ctx)
        h = self.cfg.action_horizon  # reserve the expert's slots once, so no step copies the prefix K/V
        return tuple((F.pad(k, (0, 0, 0, h)), F.pad(v, (0, 0, 0, h)))
                     for k, v in (ctx.cache[i] for i in range(len(self.prefix.layers))))

    # ------------------------------------------------------------------ stage 3: expert steps
    def time_condition(self, t: torch.Tensor) -> torch.Tensor:
        """adaRMS condition silu(mlp_out(silu(mlp_in(sincos(t))))) [N, width] for times t [N]."""
        dt = self.compute_dtype
        temb = sinusoidal_time_embedding(t, self.cfg.expert.width).to(dt)
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(temb)))).to(dt)

    def expert_modulations(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every expert adaRMSNorm's dense(cond), in AttnContext.mods order; cond [..., width]."""
        return tuple(n.modulation(cond.to(self.compute_dtype)) for n in self.expert.adaptive_norms())

    def denoise_step(self, cache: PrefixCache, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity v(x_t, t) [B, H, action_dim] (fp32). x_t fp32 [B, H, action_dim]; t [B]."""
        self.expert_calls += 1
        return self.velocity(cache, x_t, t)

    def velocity(self, cache: PrefixCache, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`denoise_step` without its call counter (training's loss: a counter bump would recompile a compiled step)."""
        kv = tuple(cache.kv[i] for i in range(len(cache.kv)))
        mods = self.expert_modulations(self.time_condition(t))
        return self.expert_forward(kv, cache.key_mask, cache.valid_len, x_t, mods)

    def expert_forward(self, kv, prefix_mask: torch.Tensor | None, valid_len: torch.Tensor, x_t: torch.Tensor,
                       mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One action-expert pass over the cached prefix (a pure tensor function: compilable).

        mods: the adaRMS modulations [B, 3*width] of this step (`expert_modulations`)."""
        dt = self.compute_dtype
        b, h, _ = x_t.shape
        if h != self.cfg.action_horizon:
            raise ValueError(f"action chunk has {h} steps, the model's action_horizon is {self.cfg.action_horizon}")
        x = self.action_in_proj(x_t.to(dt)).to(dt)
        positions = valid_len[:, None] + torch.arange(h, device=x.device)[None]
        cos, sin = rope_tables(positions, self.cfg.expert.head_dim, self.cfg.rope_theta, dt)
        key_mask = None
        if prefix_mask is not None:
            key_mask = torch.cat([prefix_mask, torch.ones(b, h, dtype=torch.bool, device=x.device)], dim=1)
        ctx = AttnContext(cos=cos, sin=sin, key_mask=key_mask, cache=dict(enumerate(kv)), read_cache=True, mods=mods,
                          decode_impl=self.decode_impl, decode_pdl=self.decode_pdl)
        out = self.expert(x, ctx)
        return self.action_out_proj(out).float()

    @staticmethod
    def euler_times(steps: int, device: torch.device) -> torch.Tensor:
        """t_k = 1 - k/steps for k = 0..steps-1 (openpi integrates from t=1 (noise) to t=0)."""
        return 1.0 - torch.arange(steps, dtype=torch.float32, device=device) / steps

    def denoise(self, cache: PrefixCache, noise: torch.Tensor, steps: int, timer=None) -> torch.Tensor:
        """`steps` Euler steps from t=1 to 0; the expert runs exactly `steps` times.

        The time conditioning of all steps depends on t alone, so it is computed once per call
        (one GEMM of M=steps*B per adaRMS dense layer instead of `steps` GEMVs); stage "time_cond".
        """
        check_denoise_steps(steps)  # 0 steps would return the noise itself
        timer = timer or NullTimer()
        x = noise.float()
        b = x.shape[0]
        kv = tuple(cache.kv[i] for i in range(len(cache.kv)))
        times = self.euler_times(steps, x.device)
        with timer.stage("time_cond"):
            mods_all = self.expert_modulations(self.time_condition(times.repeat_interleave(b)))
            mods_all = tuple(m.view(steps, b, -1) for m in mods_all)
        dt = -1.0 / steps
        for k in range(steps):
            with timer.stage("denoise"):
                self.expert_calls += 1
                v = self.expert_forward(kv, cache.key_mask, cache.valid_len, x, tuple(m[k] for m in mods_all))
                x = x + dt * v
        return x

    @torch.no_grad()
    def sample(self, tokens, token_mask, noise, steps, images=None, state_features=None) -> torch.Tensor:
        embs, key_mask = self.embed_prefix(tokens, token_mask, images=images, state_features=state_features)
        cache = self.prefill(embs, key_mask)
        return self.denoise(cache, noise, steps)

    # ------------------------------------------------------------------ training
    def flow_matching_loss(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor | None,
        actions: torch.Tensor,
        noise: torch.Tensor | None = None,
        time: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        state_features: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """openpi's π0 flow-matching loss (scalar mean of the per-element MSE).

        x_t = t*noise + (1-t)*actions, target u = noise - actions, prediction v(x_t, t) from one expert pass
        over the prefix KV cache (identical to openpi's joint forward: the prefix never attends to actions).
        Default time ~ Beta(1.5, 1) * 0.999 + 0.001, default noise ~ N(0, 1).
        """
        b = actions.shape[0]
        actions = actions.float()
        if noise is None:
            noise = torch.randn(actions.shape, generator=generator, device=actions.device)
        if time is None:
            beta = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0))
            time = (beta.sample((b,)) * 0.999 + 0.001).to(actions.device)
        tt = time.float()[:, None, None]
        x_t = tt * noise + (1 - tt) * actions
        u_t = noise - actions
        embs, key_mask = self.embed_prefix(tokens, token_mask, images=images, state_features=state_features)
        cache = self.prefill(embs, key_mask)
        v_t = self.velocity(cache, x_t, time.float())
        return F.mse_loss(v_t, u_t)
