"""Model-specific fusions that a policy registers for a backend, so backends stay model-agnostic.

A policy package calls `register("fp8", "its.module:install")` when it is imported; after the backend has
quantized a model it calls `apply("fp8", model)`, which runs every registered installer on the model. An
installer returns how many modules it fused (0 for models it does not recognise). Registered by import path
so that registering costs nothing until a backend asks.
"""

from __future__ import annotations

from torch import nn

from evalkit.imports import import_object

_FUSIONS: dict[str, list[str]] = {}


def register(backend: str, installer: str) -> None:
    """installer: "package.module:function" taking the model and returning the number of modules fused."""
    paths = _FUSIONS.setdefault(backend, [])
    if installer not in paths:
        paths.append(installer)


def apply(backend: str, model: nn.Module) -> int:
    return sum(int(import_object(path)(model)) for path in _FUSIONS.get(backend, []))
