"""Work of one π0.5 call per stage: matmul FLOPs and the bytes that must cross device memory.

FLOPs count 2*M*N*K for every Linear and the two attention matmuls; bytes count every weight
read once per use (the expert's weights once per denoise step: 0.6 GB does not stay in L2) plus the
KV cache each expert step reads. The token embedding table is not counted (only a few rows are gathered).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.base import module_weight_bytes
from evalkit.policies.pi05.model import Pi05Model


@dataclass
class StageWork:
    flops: float
    bytes: float

    def floor_ms(self, peak_tflops: float, bandwidth_gbs: float) -> float:
        return max(self.flops / (peak_tflops * 1e12), self.bytes / (bandwidth_gbs * 1e9)) * 1e3


def _linear_params(module: torch.nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def pi05_work(model: Pi05Model, batch: int, views: int, prompt_tokens: int, steps: int) -> dict[str, StageWork]:
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
        out["encode"] = StageWork(2 * batch * _linear_params(model.state_encoder), module_weight_bytes(model.state_encoder))
        prefix_len = cfg.state_prefix_tokens + prompt_tokens
    p = cfg.prefix
    layer_weights = sum(module_weight_bytes(layer) for layer in model.prefix.layers)
    attn = 4 * batch * prefix_len**2 * p.num_heads * p.head_dim * p.depth
    out["prefill"] = StageWork(2 * batch * prefix_len * _linear_params(model.prefix.layers) + attn, layer_weights)
    e, h = cfg.expert, cfg.action_horizon
    kv_bytes = 2 * p.depth * batch * prefix_len * p.num_kv_heads * p.head_dim * act_bytes
    step_lin = _linear_params(model.expert) + sum(_linear_params(getattr(model, n)) for n in
                                                  ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"))
    step_attn = 4 * batch * h * (prefix_len + h) * e.num_heads * e.head_dim * e.depth
    step_bytes = module_weight_bytes(model.expert) + sum(
        module_weight_bytes(getattr(model, n)) for n in ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"))
    out["denoise"] = StageWork(steps * (2 * batch * h * step_lin + step_attn), steps * (step_bytes + kv_bytes))
    out["_meta"] = StageWork(float(prefix_len), 0.0)
    return out
