"""`backend.targets` -> the Linear modules a backend transforms, by stable dotted names.

Names follow the π0.5 contract (relative to `policy.model`, an optional leading path is allowed):
prefix.layers.<i>.mlp.{gate,up,down}_proj, prefix.layers.<i>.self_attn.{q,k,v,o}_proj,
expert.layers.<i>... (same), vision.layers.<i>.mlp.{fc1,fc2}, vision.layers.<i>.self_attn.{q,k,v,out}_proj.
Several target sets combine with commas: "prefix_mlp,expert_mlp".
"""

from __future__ import annotations

import re

import torch
from torch import nn

from evalkit.errors import BadInput

_LEAD = r"(?:^|.*\.)"
TARGET_PATTERNS: dict[str, str] = {
    "prefix_mlp": _LEAD + r"prefix\.layers\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj)$",
    "expert_mlp": _LEAD + r"expert\.layers\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj)$",
    "attn": _LEAD + r"(?:prefix|expert)\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)$",
    "vision": _LEAD + r"vision\.layers\.\d+\.(?:mlp\.(?:fc1|fc2)|self_attn\.(?:q_proj|k_proj|v_proj|out_proj))$",
}
TARGET_PATTERNS["all"] = "|".join(f"(?:{p})" for p in TARGET_PATTERNS.values())
# Finer sets: one stack's attention projections, and the whole action expert (the denoise loop's M = 10 GEMMs).
TARGET_PATTERNS["prefix_attn"] = _LEAD + r"prefix\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)$"
TARGET_PATTERNS["expert_attn"] = _LEAD + r"expert\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)$"
TARGET_PATTERNS["expert"] = f"(?:{TARGET_PATTERNS['expert_mlp']})|(?:{TARGET_PATTERNS['expert_attn']})"
TARGET_NAMES = tuple(TARGET_PATTERNS)

# Decoder layers whose `.mlp` the fault backends rewire.
LAYER_PATTERN = re.compile(_LEAD + r"(prefix|expert|vision)\.layers\.(\d+)$")


def target_regex(targets: str) -> re.Pattern[str]:
    parts = [t.strip() for t in str(targets).split(",") if t.strip()]
    bad = [t for t in parts if t not in TARGET_PATTERNS]
    if not parts or bad:
        raise BadInput(f"unknown backend.targets '{targets}'; valid: {', '.join(TARGET_NAMES)} (comma-separated to combine)")
    return re.compile("|".join(f"(?:{TARGET_PATTERNS[t]})" for t in parts))


def select_linears(model: nn.Module, targets: str) -> list[tuple[str, nn.Linear]]:
    """Every plain nn.Linear whose dotted name matches `targets`; BadInput when nothing matches."""
    rx = target_regex(targets)
    found = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and rx.match(n)]
    if not found:
        raise BadInput(f"backend.targets '{targets}' matched no torch.nn.Linear in {type(model).__name__}")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def decoder_layers(model: nn.Module, stacks: tuple[str, ...] = ("prefix", "expert")) -> dict[str, list[nn.Module]]:
    """{stack: [layer0, layer1, ...]} for the decoder stacks named, in index order."""
    out: dict[str, list[tuple[int, nn.Module]]] = {}
    for n, m in model.named_modules():
        mt = LAYER_PATTERN.match(n)
        if mt and mt.group(1) in stacks:
            out.setdefault(mt.group(1), []).append((int(mt.group(2)), m))
    return {k: [m for _, m in sorted(v, key=lambda t: t[0])] for k, v in out.items()}


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def is_geglu_mlp(mod: nn.Module) -> bool:
    """A module computing down(gelu_tanh(gate_proj(x)) * up_proj(x)), as it declares with mlp_kind = "geglu_tanh"
    (the policies' contract, evalkit/policies/base.py); backends may fuse its three projections."""
    return getattr(mod, "mlp_kind", None) == "geglu_tanh"
