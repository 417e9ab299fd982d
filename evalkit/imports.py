"""Resolve "package.module:attr" / "package.module.attr" strings (registries and custom backends)."""

from __future__ import annotations

import importlib
from typing import Any

from evalkit.errors import BadInput


def import_object(path: str) -> Any:
    if ":" in path:
        mod_name, attr = path.split(":", 1)
    else:
        mod_name, _, attr = path.rpartition(".")
    if not mod_name:
        raise BadInput(f"'{path}' is not an import path (expected package.module.Name)")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise BadInput(f"cannot import '{mod_name}' for '{path}': {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise BadInput(f"module '{mod_name}' has no attribute '{attr}' (from '{path}')") from None
