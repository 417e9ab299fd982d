"""Plain dtype-cast backends: fp32 (reference), bf16, fp16. Every floating module runs in that dtype."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from evalkit.backends.base import (
    Backend,
    BackendReport,
    ModuleReport,
    module_weight_bytes,
)

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def describe_leaf_modules(model: torch.nn.Module, activation: str, kernel_of=None) -> list[ModuleReport]:
    """Report every leaf module that holds weights, reading the dtype off the module itself."""
    rows = []
    for name, mod in model.named_modules():
        if any(True for _ in mod.children()):
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        kernel = kernel_of(mod) if kernel_of else f"torch:{type(mod).__name__}"
        rows.append(
            ModuleReport(
                name=name,
                kind=type(mod).__name__,
                weight_dtype=str(w.dtype),
                weight_bytes=module_weight_bytes(mod),
                activation_precision=activation,
                kernel=kernel,
            )
        )
    return rows


class CastBackend(Backend):
    dtype: torch.dtype = torch.float32
    precision_class = "16-bit"
    known_options = ()

    def apply(self, model: torch.nn.Module, calib: Iterable[Any] | None = None) -> BackendReport:
        before = module_weight_bytes(model)
        model.to(self.dtype)
        dev = next(model.parameters()).device
        return BackendReport(
            backend=self.name,
            device=str(dev),
            modules=describe_leaf_modules(model, _DTYPE_NAMES[self.dtype]),
            weight_bytes_before=before,
            weight_bytes_after=module_weight_bytes(model),
            notes=[f"whole model cast to {self.dtype} (targets ignored: a cast applies to every module)"],
        )


class FP32Backend(CastBackend):
    name = "fp32"
    dtype = torch.float32


class BF16Backend(CastBackend):
    name = "bf16"
    dtype = torch.bfloat16


class FP16Backend(CastBackend):
    name = "fp16"
    dtype = torch.float16
