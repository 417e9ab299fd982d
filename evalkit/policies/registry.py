"""Policy name -> builder. Builders are imported lazily so `noop` never imports torch-heavy code.

Each builder is `build(cfg: dict, device: torch.device) -> Policy`, where cfg is the resolved
`policy` config group as a plain dict.
"""

from __future__ import annotations

from typing import Any

import torch

from evalkit.errors import BadInput
from evalkit.imports import import_object

BUILDERS: dict[str, str] = {
    "noop": "evalkit.policies.noop:build",
    "random": "evalkit.policies.random_policy:build",
    "pi05": "evalkit.policies.pi05.policy:build",
    "scripted": "evalkit.policies.scripted:build",
    "reference": "evalkit.policies.reference:build",
    "remote": "evalkit.policies.remote:build",
}


def build_policy(cfg: dict[str, Any], device: torch.device):
    kind = cfg.get("kind") or cfg.get("name")
    if kind not in BUILDERS:
        raise BadInput(f"unknown policy kind '{kind}'; valid: {', '.join(sorted(BUILDERS))}")
    return import_object(BUILDERS[kind])(cfg, device)
