"""`torch_trt_fp8`: ModelOpt FP8 post-training quantization (per-tensor e4m3 weights and activations,
activation scales calibrated with max on probe observations), then Torch-TensorRT: one engine per
decoder layer's MLP (each with its own weights).

`engine=native` needs a CUDA GPU (sm_89+), nvidia-modelopt, torch_tensorrt and tensorrt (extra
`evalkit[trt]`); without them it fails up front with one line per missing piece.
`engine=fake_quant` runs ModelOpt's simulated quantization (weights stay bf16 in memory and are
quantize-dequantized in every forward, activations likewise with the calibrated scales): accuracy
only, `latency_representative=false`.

Calibration data (`calib` of `apply`): an iterable whose items are zero-argument callables that run the
policy on one probe batch (or model inputs: a tuple of args / a dict of kwargs). Required: fp8 activation
scales without calibration would be made up.
"""

from __future__ import annotations

import types
from typing import Any, Iterable

import torch
from evalkit.backends.quant import QuantBackend, capability_line, run_calibration
from evalkit.backends.targets import replace_module
from torch import nn

from evalkit.errors import BadInput, CapabilityError

FP8_CFG = {"num_bits": (4, 3), "axis": None}


def _import_modelopt():
    try:
        import modelopt.torch.quantization as mtq

        return mtq
    except ImportError as e:
        raise CapabilityError(f"backend 'torch_trt_fp8' needs nvidia-modelopt (pip install nvidia-modelopt): {e}") from None


def _fake_quant_weight(mod: nn.Module) -> torch.Tensor:
    """Effective weight of a ModelOpt QuantLinear: its weight after its weight quantizer (quantize-dequantize)."""
    with torch.no_grad():
        return mod.weight_quantizer(mod.weight).float()


class TorchTRTFP8Backend(QuantBackend):
    name = "torch_trt_fp8"
    precision_class = "8-bit"
    engines = ("native", "fake_quant")
    known_options = ("max_tokens",)

    def check_engine(self, device: torch.device) -> None:
        mtq = _import_modelopt()
        import modelopt

        self.capability_notes.append(capability_line(True, f"nvidia-modelopt {modelopt.__version__}"))
        if self.engine == "fake_quant":
            self.capability_notes.append(capability_line(True, "fake_quant: ModelOpt simulated fp8 quantization (accuracy only)"))
            return
        self.require_cuda_cc(device, (8, 9), "TensorRT fp8 kernels")
        for pkg in ("tensorrt", "torch_tensorrt"):
            try:
                m = __import__(pkg)
            except ImportError as e:
                raise CapabilityError(
                    f"backend 'torch_trt_fp8' (engine=native) needs '{pkg}' (pip install evalkit[trt]): {e}; "
                    "backend.engine=fake_quant runs ModelOpt's simulated fp8 for accuracy only"
                ) from None
            self.capability_notes.append(capability_line(True, f"{pkg} {getattr(m, '__version__', '?')}"))
        del mtq

    def prepare(self, model: nn.Module, targets: list[tuple[str, nn.Linear]], calib: Iterable[Any] | None) -> None:
        # Runs after the capability checks, so a machine without TensorRT hears that first.
        if calib is None:
            raise BadInput("backend 'torch_trt_fp8' needs calibration data (probe observations) to set fp8 activation scales")
        mtq = _import_modelopt()
        quant_cfg: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
        for name, _ in targets:
            quant_cfg.append({"quantizer_name": f"{name}.weight_quantizer", "cfg": dict(FP8_CFG)})
            quant_cfg.append({"quantizer_name": f"{name}.input_quantizer", "cfg": dict(FP8_CFG)})
        cfg = {"quant_cfg": quant_cfg, "algorithm": "max"}
        counted = {"n": 0}

        def forward_loop(m: nn.Module) -> None:
            counted["n"] = run_calibration(m, calib)

        mtq.quantize(model, cfg, forward_loop=forward_loop)
        if counted["n"] == 0:
            raise BadInput("backend 'torch_trt_fp8': the calibration data was empty")
        self._calib_items = counted["n"]
        for name, _ in targets:
            mod = model.get_submodule(name)
            amax = getattr(mod.input_quantizer, "amax", None)
            if amax is None or not torch.isfinite(amax).all():
                raise CapabilityError(f"torch_trt_fp8: {name} saw no calibration activations (is it on the probe's path?)")
            mod.dequantized_weight = types.MethodType(_fake_quant_weight, mod)
            mod._evalkit_desc = {
                "weight_store": "weight",
                "weight_format": "ModelOpt fake-quant to e4m3 per-tensor in every forward",
                "activation_precision": "fp8_e4m3 fake-quant (static per-tensor, calibrated max)",
                "kernel": "modelopt TensorQuantizer QDQ + torch F.linear (bf16)",
            }
        if self.engine == "native":
            self._compile_trt(model, targets)

    def _compile_trt(self, model: nn.Module, targets: list[tuple[str, nn.Linear]]) -> None:
        """One Torch-TensorRT engine per MLP that holds a target (never run on this project's machines: no TensorRT)."""
        import torch_tensorrt
        from modelopt.torch.quantization.utils import export_torch_mode

        mlps = sorted({n.rsplit(".", 1)[0] for n, _ in targets})
        max_tokens = int(self.options.get("max_tokens", 4096))
        for mlp_name in mlps:
            mlp = model.get_submodule(mlp_name)
            width = next(m for n, m in targets if n.startswith(mlp_name + ".")).in_features
            example = torch.randn(1, 16, width, device=next(mlp.parameters()).device, dtype=torch.bfloat16)
            tokens = torch.export.Dim("tokens", min=1, max=max_tokens)
            with torch.no_grad(), export_torch_mode():
                ep = torch.export.export(mlp, (example,), dynamic_shapes=({1: tokens},))
                trt = torch_tensorrt.dynamo.compile(
                    ep, inputs=[example], enabled_precisions={torch.float8_e4m3fn, torch.bfloat16}, min_block_size=1
                )
            trt._evalkit_desc = {
                "weight_store": "_evalkit_anchor",
                "weight_format": "TensorRT engine, fp8 e4m3 per-tensor",
                "activation_precision": "fp8_e4m3 (static per-tensor, calibrated)",
                "kernel": f"Torch-TensorRT {torch_tensorrt.__version__} engine (one per layer MLP)",
            }
            trt.register_buffer("_evalkit_anchor", torch.empty(0, dtype=torch.float8_e4m3fn), persistent=False)
            replace_module(model, mlp_name, trt)
        self.capability_notes.append(f"compiled {len(mlps)} Torch-TensorRT engines (one per MLP)")

    replaces_targets = False

    def extra_notes(self) -> list[str]:
        return [f"calibrated on {self._calib_items} probe items (ModelOpt max calibration)"]
