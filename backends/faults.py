"""Fault backends: each wraps a real backend (`inner`, bf16 by default) and plants one known bug, so the
gate and the fidelity checks can prove they catch it. Every fault writes a `FAULT:` note in the report;
`fault_silent_fallback` additionally makes the module rows lie (that lie is the fault).

- fault_shared_layer_weights: every layer of the targeted stacks runs layer 0's MLP module.
- fault_drop_mlp_residual: each targeted layer's `mlp` is wrapped so that it still computes but returns
  zeros: the layer forward `out = h + mlp(norm2(h))` then adds the attention branch and not the MLP.
- fault_ignored_scale: the inner backend's quantized weights are used as if every scale were 1
  (and every zero point 0); default inner int8_weight_only.
- fault_silent_fallback: the report claims fp8 weights and activations on the targets; the model runs bf16.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from backends.base import Backend, BackendReport, ModuleReport, module_weight_bytes
from backends.quant import QuantLinear, describe_model
from backends.targets import decoder_layers, select_linears
from evalkit.errors import BadInput


class FaultBackend(Backend):
    default_inner = "bf16"
    known_options = ("inner_options",)  # the inner backend's own options go there (checked by the inner backend)

    def __init__(self, targets: str = "prefix_mlp", inner: str | None = None, engine: str = "native", **options: Any) -> None:
        super().__init__(targets=targets, **options)
        from backends.registry import get_backend  # late: the registry imports this module's names by path

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
