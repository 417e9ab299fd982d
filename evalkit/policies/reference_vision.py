"""`policy=reference_vision`: the small π0.5 that sees, trained here on rendered scripted demonstrations.

It is `evalkit.policies.pi05.policy.Pi05Policy` itself with openpi's inputs: both camera views (rotated, resized
with padding to 224, [-1, 1]) through a small SigLIP-style tower, the instruction and the quantile-binned
proprio state in the prompt (openpi's π0.5 prompt). No privileged state: what it does, it does from pixels, so
a backend that breaks the vision tower or an image-processing bug shows up as lost successes. Built from
`references/reference_vision/` (safetensors + config.json with the sizes + assets/*/norm_stats.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evalkit.errors import BadInput

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "references" / "reference_vision"
_KEYS = {"kind", "name", "checkpoint", "denoise_steps", "dtype", "seed", "compile", "cuda_graph"}


def _pi05_config(cfg: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise BadInput(f"unknown reference_vision policy fields {unknown}; valid: {sorted(_KEYS - {'kind', 'name'})}")
    ckpt = Path(str(cfg.get("checkpoint") or DEFAULT_DIR)).expanduser()
    if not (ckpt / "model.safetensors").is_file():
        raise BadInput(f"reference_vision checkpoint not found: {ckpt}/model.safetensors (train it: "
                       "python -m evalkit.train config=conf/train/reference_vision.yaml)")
    return {
        "kind": "pi05", "variant": "checkpoint", "init": "checkpoint", "checkpoint": str(ckpt),
        "tokenizer": "bytes", "denoise_steps": cfg.get("denoise_steps"), "dtype": cfg.get("dtype") or "float32",
        "seed": int(cfg.get("seed") or 0), "compile": bool(cfg.get("compile", False)),
        "cuda_graph": bool(cfg.get("cuda_graph", False)),
    }


def precheck(cfg: dict[str, Any]) -> None:
    from evalkit.policies.pi05.policy import plan_build

    plan = plan_build(_pi05_config(cfg))
    if plan.mcfg.prefix_inputs != "images":
        raise BadInput(f"{plan.ckpt}: not an image checkpoint (config.json evalkit_pi05.prefix_inputs)")


def build(cfg: dict[str, Any], device) -> Any:
    import torch

    from evalkit.policies.pi05.policy import build as build_pi05

    pi_cfg = _pi05_config(cfg)
    precheck(cfg)
    policy = build_pi05(pi_cfg, torch.device(device))
    policy.name = "reference_vision"
    policy.checkpoint_dir = pi_cfg["checkpoint"]
    return policy
