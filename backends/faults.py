"""Fault backends: each wraps a real backend (`inner`, bf16 by default) and plants one known bug, so the
gate and the fidelity checks can prove they catch it. Every fault writes a `FAULT:` note in the report;
`fault_silent_fallback` additionally makes the module rows lie (that lie is the fault).

- fault_shared_layer_weights: every layer of the targeted stacks runs layer 0's MLP module.
- fault_drop_mlp_residual: each targeted layer's `mlp` is wrapped so that it still computes but returns
  zeros: the layer forward `out = h + mlp(norm2(h))` then adds the attention branch and not the MLP.
- fault_ignored_scale: the inner backend's quantized weights are used as if every scale were 1
  (and every zero point 0); default inner int8_weight_only.
- fault_silent_fallback: the report claims fp8 weights and activations on the targets; the model runs bf16.
- fault_state_across_calls: the prefix embedding is memoized per input shape (a CUDA graph captured once whose
  static input buffer is never refreshed): later observations get an earlier call's prefix.
- fault_calibration_ranges: static per-tensor fp8 activation scales from the calibration batches, no saturation:
  an activation beyond the calibrated range overflows to NaN (e4m3fn has no inf).
- fault_layer_order: the prefix runs layers 1 and 2 in swapped order (each layer still computes correctly).
- fault_uncounted_denoise: the denoise loop runs one Euler step of size 1 while the step counter advances by the
  configured number.
- fault_scale_axis: int8 weight-only whose kernel applies the per-output-channel scales along the input axis.
- fault_rope_offset: the expert's positions start one past the prefix (RoPE offset by one).
- fault_drop_attn_residual: each targeted layer's forward drops the residual around attention (h = attn(x)).
Every fault writes a `FAULT:` note; the fidelity gate must not need it (it measures, it does not read notes).
"""

from __future__ import annotations

import types
from typing import Any, Iterable

import torch
from evalkit.backends.base import (
    Backend,
    BackendReport,
    ModuleReport,
    module_weight_bytes,
)
from evalkit.backends.quant import QuantLinear, describe_model
from evalkit.backends.targets import decoder_layers, select_linears
from torch import nn

from evalkit.errors import BadInput


class FaultBackend(Backend):
    default_inner = "bf16"
    known_options = ("inner_options",)  # the inner backend's own options go there (checked by the inner backend)

    def __init__(self, targets: str = "prefix_mlp", inner: str | None = None, engine: str = "native", **options: Any) -> None:
        super().__init__(targets=targets, **options)
        from evalkit.backends.registry import (
            get_backend,  # late: the registry imports this module's names by path
        )

        self.inner_name = inner or self.default_inner
        if self.inner_name.startswith("fault_"):
            raise BadInput("a fault backend's inner backend must be a real backend, not another fault")
        inner_opts = dict(options.get("inner_options", {}))
        if engine != "native":
            inner_opts["engine"] = engine
        self.inner = get_backend(self.inner_name, targets=targets, **inner_opts)

    def apply(self, model: nn.Module, calib: Iterable[Any] | None = None) -> BackendReport:
        report = self.inner.apply(model, calib)
        note = self.inject(model, report)
        report.backend = f"{self.name}({self.inner_name})"
        report.weight_bytes_after = module_weight_bytes(model)
        report.modules = self.rows(model, report)
        report.notes.append(f"FAULT: {note}")
        return report

    @property
    def precision_class(self) -> str | None:  # a fault is judged as the backend it wraps
        return getattr(self.inner, "precision_class", None)

    def inject(self, model: nn.Module, report: BackendReport) -> str:
        raise NotImplementedError

    def rows(self, model: nn.Module, report: BackendReport) -> list[ModuleReport]:
        return describe_model(model)

    def stacks(self) -> tuple[str, ...]:
        t = str(self.targets)
        names = tuple(s for s in ("prefix", "expert") if f"{s}_mlp" in t or t == "all")
        return names or ("prefix",)

    def layers(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        found = decoder_layers(model, self.stacks())
        if not found:
            raise BadInput(f"backend '{self.name}': no decoder layers named {'/'.join(self.stacks())}.layers.<i> in the model")
        return found


class SharedLayerWeightsFault(FaultBackend):
    name = "fault_shared_layer_weights"

    def inject(self, model: nn.Module, report: BackendReport) -> str:
        done = []
        for stack, layers in self.layers(model).items():
            for layer in layers[1:]:
                layer.mlp = layers[0].mlp
            done.append(f"{stack}: layers 1..{len(layers) - 1} run layer 0's mlp")
        return "shared layer weights; " + "; ".join(done)


class ZeroedMLP(nn.Module):
    """Keeps the real MLP (weights, cost) but returns zeros, so the residual gains nothing from it."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.inner = mlp

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.inner(x, *args, **kwargs)
        return torch.zeros_like(y)


class DropMLPResidualFault(FaultBackend):
    name = "fault_drop_mlp_residual"

    def inject(self, model: nn.Module, report: BackendReport) -> str:
        done = []
        for stack, layers in self.layers(model).items():
            for layer in layers:
                layer.mlp = ZeroedMLP(layer.mlp)
            done.append(f"{stack}: {len(layers)} layers")
        return "MLP branch dropped from the residual (layer.mlp wrapped to compute and return zeros; out = h + 0); " + "; ".join(done)


class IgnoredScaleFault(FaultBackend):
    name = "fault_ignored_scale"
    default_inner = "int8_weight_only"

    def inject(self, model: nn.Module, report: BackendReport) -> str:
        mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
        if not mods:
            raise BadInput(f"backend '{self.name}' needs a quantized inner backend (int8_weight_only, int4, fp8, ...), got '{self.inner_name}'")
        for m in mods:
            m.ignore_scales()
        return f"{len(mods)} quantized modules run their quantized weights as if every scale were 1 (zeros 0)"


class SilentFallbackFault(FaultBackend):
    name = "fault_silent_fallback"
    precision_class = "8-bit"  # the lie: it claims fp8 (the gate must measure that nothing changed)

    def apply(self, model: nn.Module, calib: Iterable[Any] | None = None) -> BackendReport:
        self._claimed = {n for n, _ in select_linears(model, self.targets)}
        return super().apply(model, calib)

    def inject(self, model: nn.Module, report: BackendReport) -> str:
        return "report claims fp8 e4m3 weights/activations on the targets; the model runs the inner backend unchanged"

    def rows(self, model: nn.Module, report: BackendReport) -> list[ModuleReport]:
        rows = describe_model(model)
        lie = 0
        for r in rows:
            if r.name in self._claimed:
                lin = model.get_submodule(r.name)
                fake_bytes = lin.weight.numel() + 4 * lin.out_features
                lie += r.weight_bytes - fake_bytes
                r.weight_dtype = "torch.float8_e4m3fn (e4m3, per-channel fp32 scales)"
                r.weight_bytes = fake_bytes
                r.activation_precision = "fp8_e4m3 (dynamic per-token)"
                r.kernel = "triton:rowwise_quant_fp8 + torch._scaled_mm(rowwise, fast_accum)"
        report.weight_bytes_after -= lie
        return rows


# --------------------------------------------------------------------------------------------- faults of issue 18
class StateAcrossCallsFault(FaultBackend):
    name = "fault_state_across_calls"

    def inject(self, model: nn.Module, report: BackendReport) -> str:
        plain = getattr(model, "embed_prefix", None)
        if plain is None:
            raise BadInput(f"backend '{self.name}' needs a model with embed_prefix (pi05 models)")
        memo: dict[tuple, Any] = {}

        def embed_prefix(tokens, *args, **kwargs):
            key = tuple(tokens.shape)
            if key not in memo:
                memo[key] = plain(tokens, *args, **kwargs)
            return memo[key]

        model.embed_prefix = embed_prefix
        return "the prefix embedding is computed once per input shape and reused for every later observation"


class CalibrationRangesFault(FaultBackend):
    name = "fault_calibration_ranges"
    precision_class = "8-bit"

    def apply(self, model: nn.Module, calib: Iterable[Any] | None = None) -> BackendReport:
        self._calib = calib
        return super().apply(model, calib)

    def inject(self, model: nn.Module, report: BackendReport) -> str:
        from evalkit.backends.quant import run_calibration

        if self._calib is None:
            raise BadInput(f"backend '{self.name}' calibrates: it needs calibration data")
        targets = select_linears(model, self.targets)
        amax: dict[str, torch.Tensor] = {}
        hooks = []
        for name, lin in targets:
            def seen(mod, args, name=name):
                a = args[0].detach().abs().amax().float()
                amax[name] = torch.maximum(amax.get(name, a), a)
            hooks.append(lin.register_forward_pre_hook(seen))
        try:
            run_calibration(model, self._calib)
        finally:
            for h in hooks:
                h.remove()
        for name, lin in targets:
            scale = (amax[name] / 448.0).clamp(min=1e-12)

            def forward(mod, x, scale=scale):
                q = x.float() / scale
                q = torch.where(q.abs() > 448.0, torch.full_like(q, float("nan")), q).to(torch.float8_e4m3fn)
                return torch.nn.functional.linear(q.float() * scale, mod.weight.float(),
                                                  None if mod.bias is None else mod.bias.float()).to(x.dtype)

            lin.forward = types.MethodType(forward, lin)
        return f"{len(targets)} Linear inputs quantized to fp8 with static scales from the calibration data, no saturation"


class _SwappedOrder(nn.ModuleList):
    """Iterates its layers with two of them swapped (names and modules unchanged)."""

    swap: tuple[int, int] = (1, 2)

    def __iter__(self):
        order = list(range(len(self)))
        i, j = self.swap
        order[i], order[j] = order[j], order[i]
        return iter([self[k] for k in order])


class LayerOrderFault(FaultBackend):
    name = "fault_layer_order"

    def inject(self, model: nn.Module, report: BackendReport) -> str:
        stack = self.stacks()[0]
        layers = model.get_submodule(f"{stack}.layers") if hasattr(model, stack) else None
        if not isinstance(layers, nn.ModuleList) or len(layers) < 3:
            raise BadInput(f"backend '{self.name}' needs a {stack}.layers ModuleList of >= 3 layers")
        layers.__class__ = _SwappedOrder
        return f"{stack} runs layers 1 and 2 in swapped order"


class UncountedDenoiseFault(FaultBackend):
    name = "fault_uncounted_denoise"

    def inject(self, model: nn.Module, report: BackendReport) -> str:
        plain = getattr(model, "denoise", None)
        if plain is None:
            raise BadInput(f"backend '{self.name}' needs a model with a denoise(cache, noise, steps) loop")

        def denoise(cache, noise, steps, timer=None):
            out = plain(cache, noise, 1, timer=timer)
            model.expert_calls += steps - 1  # the counter says every configured step ran
            return out

        model.denoise = denoise
        return "the denoise loop runs 1 Euler step whatever denoise_steps says; the step counter still counts them all"


class ScaleAxisFault(FaultBackend):
    name = "fault_scale_axis"
    default_inner = "int8_weight_only"

    def inject(self, model: nn.Module, report: BackendReport) -> str:
        mods = [m for m in model.modules() if isinstance(m, QuantLinear) and hasattr(m, "wscale")]
        if not mods:
            raise BadInput(f"backend '{self.name}' needs an inner backend with per-channel scales (int8_weight_only, int8)")
        for m in mods:
            def forward(mod, x):
                s = mod.wscale.reshape(-1).float()
                k = torch.arange(mod.in_features, device=s.device) % s.numel()
                w = mod.qweight.float() * s[k][None, :]  # scale indexed by input channel: the wrong axis
                y = torch.nn.functional.linear(x.reshape(-1, mod.in_features).float(), w)
                return mod._finish(y, x.shape)

            m.forward = types.MethodType(forward, m)
        return f"{len(mods)} quantized modules apply their per-output-channel scales along the input axis"


class RopeOffsetFault(FaultBackend):
    name = "fault_rope_offset"

    def inject(self, model: nn.Module, report: BackendReport) -> str:
        plain = getattr(model, "expert_forward", None)
        if plain is None:
            raise BadInput(f"backend '{self.name}' needs a model with expert_forward(kv, mask, valid_len, x_t, mods)")

        def expert_forward(kv, prefix_mask, valid_len, x_t, mods):
            return plain(kv, prefix_mask, valid_len + 1, x_t, mods)

        model.expert_forward = expert_forward
        return "the expert's token positions start one past the prefix (RoPE offset by one)"


class DropAttnResidualFault(FaultBackend):
    name = "fault_drop_attn_residual"

    def inject(self, model: nn.Module, report: BackendReport) -> str:
        done = []
        for stack, layers in self.layers(model).items():
            for layer in layers:
                if not hasattr(layer, "plain_forward"):
                    raise BadInput(f"backend '{self.name}' needs decoder layers with a plain_forward (pi05 layers)")

                def plain_forward(lay, x, ctx):
                    i = lay.self_attn.layer_idx
                    a, gate = lay.input_layernorm(x, ctx.cond, ctx.mod(2 * i))
                    attn = lay.self_attn(a, ctx)
                    h = attn if gate is None else attn * gate  # the residual x is dropped
                    m, gate = lay.post_attention_layernorm(h, ctx.cond, ctx.mod(2 * i + 1))
                    mlp = lay.mlp(m)
                    return h + (mlp if gate is None else mlp * gate)

                layer.plain_forward = types.MethodType(plain_forward, layer)
            done.append(f"{stack}: {len(layers)} layers")
        return "attention residual dropped (h = attn(norm(x)), no + x); " + "; ".join(done)
