"""Work of one π0.5 call per stage: matmul FLOPs and the bytes that must cross device memory.

FLOPs count 2*M*N*K for every Linear and the two attention matmuls; bytes count every weight
read once per use (the expert's attention+MLP weights once per denoise step: 0.6 GB does not stay in
L2; its adaRMS modulations depend on t only and are computed once per call) plus the KV cache each
expert step reads. The token embedding table is not counted (only a few rows are gathered).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evalkit.backends.base import module_weight_bytes
from evalkit.policies.pi05.model import Pi05Model


@dataclass
class StageWork:
    flops: float
    bytes: float

    def floor_ms(self, peak_tflops: float, bandwidth_gbs: float) -> float:
        return max(self.flops / (peak_tflops * 1e12), self.bytes / (bandwidth_gbs * 1e9)) * 1e3


def _linear_params(module: torch.nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def pi05_work(model: Pi05Model, batch: int, views: int, prompt_tokens: int,
              steps: int) -> tuple[dict[str, StageWork], int]:
    """(work per stage, prefix length in tokens)."""
    cfg = model.cfg
    act_bytes = 2  # bf16 activations / KV cache
    out: dict[str, StageWork] = {}
    if cfg.prefix_inputs == "images":
        n_img = batch * views * cfg.vision.tokens_per_view
        v = cfg.vision
        attn = 4 * batch * views * cfg.vision.tokens_per_view**2 * v.width * v.depth
        conv = 2 * n_img * 3 * v.patch_size**2 * v.width
        flops = 2 * n_img * (_linear_params(model.vision) + _linear_params(model.projector)) + attn + conv
        out["encode"] = StageWork(flops, module_weight_bytes(model.vision) + module_weight_bytes(model.projector))
        prefix_len = views * cfg.vision.tokens_per_view + prompt_tokens
    else:
        enc = model.state_encoder
        out["encode"] = StageWork(2 * batch * _linear_params(enc), module_weight_bytes(enc))
        prefix_len = cfg.state_prefix_tokens + prompt_tokens
    p = cfg.prefix
    layer_weights = sum(module_weight_bytes(layer) for layer in model.prefix.layers)
    attn = 4 * batch * prefix_len**2 * p.num_heads * p.head_dim * p.depth
    out["prefill"] = StageWork(2 * batch * prefix_len * _linear_params(model.prefix.layers) + attn, layer_weights)
    e, h = cfg.expert, cfg.action_horizon
    kv_bytes = 2 * p.depth * batch * (prefix_len + h) * p.num_kv_heads * p.head_dim * act_bytes
    # time conditioning depends on t only: all steps' adaRMS modulations in one pass (stage time_cond)
    norms = model.expert.adaptive_norms()
    cond_mods = [model.time_mlp_in, model.time_mlp_out, *[n.dense for n in norms]]
    out["time_cond"] = StageWork(2 * steps * batch * sum(_linear_params(m) for m in cond_mods),
                                 sum(module_weight_bytes(m) for m in cond_mods))
    per_token = sum(_linear_params(layer.self_attn) + _linear_params(layer.mlp) for layer in model.expert.layers)
    per_token += _linear_params(model.action_in_proj) + _linear_params(model.action_out_proj)
    step_attn = 4 * batch * h * (prefix_len + h) * e.num_heads * e.head_dim * e.depth
    step_mods = [*(layer.self_attn for layer in model.expert.layers), *(layer.mlp for layer in model.expert.layers),
                 model.action_in_proj, model.action_out_proj]
    step_bytes = sum(module_weight_bytes(m) for m in step_mods) + kv_bytes
    out["denoise"] = StageWork(steps * (2 * batch * h * per_token + step_attn), steps * step_bytes)
    return out, prefix_len
