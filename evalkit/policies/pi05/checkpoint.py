"""openpi / LeRobot PyTorch π0.5 checkpoints <-> our module names.

Layout of a checkpoint directory (openpi `examples/convert_jax_model_to_pytorch.py`):
  model.safetensors   written with safetensors' save_model: tied weights appear once
                      (PaliGemma's lm_head.weight holds the token embedding)
  config.json         action_dim, action_horizon, paligemma_variant, action_expert_variant, precision
  assets/<id>/norm_stats.json
  a SentencePiece model (paligemma_tokenizer.model / tokenizer.model), or policy.tokenizer points to one
LeRobot's checkpoints use the same names under an extra leading "model.".
Only safetensors is read (never pickle).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evalkit.errors import BadInput
from evalkit.policies.pi05.model import Pi05Model

PG = "paligemma_with_expert.paligemma."
EXPERT = "paligemma_with_expert.gemma_expert."
# our module prefix -> real (openpi) prefix; longest match wins
_PREFIXES: list[tuple[str, str]] = [
    ("vision.embeddings.", PG + "model.vision_tower.vision_model.embeddings."),
    ("vision.layers.", PG + "model.vision_tower.vision_model.encoder.layers."),
    ("vision.post_layernorm.", PG + "model.vision_tower.vision_model.post_layernorm."),
    ("projector.", PG + "model.multi_modal_projector.linear."),
    ("prefix.embed_tokens.", PG + "model.language_model.embed_tokens."),
    ("prefix.", PG + "model.language_model."),
    ("expert.", EXPERT + "model."),
]
TIED_EMBEDDING = PG + "lm_head.weight"  # the name save_model keeps for the tied embedding
# Present in openpi's files, never used by the policy: the expert's LM head (its embedding was removed).
UNUSED_REAL_KEYS = {EXPERT + "lm_head.weight"}
MAX_LISTED = 25


def real_name(ours: str) -> str:
    for mine, real in _PREFIXES:
        if ours.startswith(mine):
            return real + ours[len(mine):]
    return ours  # action_in_proj, action_out_proj, time_mlp_in, time_mlp_out, state_encoder


def _listing(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


def _strip_outer(keys: list[str]) -> str:
    """LeRobot nests everything under 'model.'; openpi does not."""
    return "model." if keys and all(k.startswith("model.") for k in keys) else ""


def load_state_dict_into(model: Pi05Model, ckpt_dir: Path) -> dict[str, object]:
    """Load `ckpt_dir/model.safetensors` into `model` (any dtype; values are cast). Returns a load report.

    Every parameter of `model` must be found with its exact shape; every key in the file must be used
    (except the known-unused expert lm_head). Anything else is a BadInput naming the file and the keys.
    """
    path = Path(ckpt_dir) / "model.safetensors"
    if not path.is_file():
        other = sorted(p.name for p in Path(ckpt_dir).glob("*")) if Path(ckpt_dir).is_dir() else "no such directory"
        raise BadInput(f"{path}: not found (pi05 loads safetensors only; directory holds: {other})")
    ours = model.state_dict()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        file_keys = list(f.keys())
        outer = _strip_outer(file_keys)
        by_real = {k[len(outer):]: k for k in file_keys}
        wanted = {o: real_name(o) for o in ours}
        if wanted.get("prefix.embed_tokens.weight") not in by_real and TIED_EMBEDDING in by_real:
            wanted["prefix.embed_tokens.weight"] = TIED_EMBEDDING
        missing = [r for o, r in wanted.items() if r not in by_real]
        used = set(wanted.values())
        unexpected = [r for r in by_real if r not in used and r not in UNUSED_REAL_KEYS]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys [{_listing(missing)}]")
            if unexpected:
                parts.append(f"unexpected keys [{_listing(unexpected)}]")
            raise BadInput(f"{path}: does not match the pi05 model: " + "; ".join(parts))
        bad_shape = []
        for o, r in wanted.items():
            shape = tuple(f.get_slice(by_real[r]).get_shape())
            if shape != tuple(ours[o].shape):
                bad_shape.append(f"{r} {shape} != expected {tuple(ours[o].shape)}")
        if bad_shape:
            raise BadInput(f"{path}: mis-shaped keys [{_listing(bad_shape)}]")
        with torch.no_grad():
            for o, r in wanted.items():
                ours[o].copy_(f.get_tensor(by_real[r]))
        ignored = sorted(r for r in by_real if r in UNUSED_REAL_KEYS)
    return {"file": str(path), "loaded": len(wanted), "ignored_unused": ignored, "key_prefix": outer or None}


def read_checkpoint_config(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise BadInput(f"{path}: not found (openpi checkpoints carry config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: not JSON ({e})") from None


def save_checkpoint(model: Pi05Model, out_dir: Path, norm_stats: dict | None = None, asset_id: str = "libero") -> Path:
    """Write `model` in the openpi layout with real key names (tied embedding once, as lm_head.weight).

    norm_stats: {"state": {"q01": [...], "q99": [...]}, "actions": {...}} written to assets/<asset_id>/.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for o, t in model.state_dict().items():
        name = TIED_EMBEDDING if o == "prefix.embed_tokens.weight" else real_name(o)
        tensors[name] = t.detach().to("cpu").contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    cfg = model.cfg
    config = {
        "action_dim": cfg.action_dim,
        "action_horizon": cfg.action_horizon,
        "paligemma_variant": "gemma_2b" if cfg.prefix.width == 2048 else "custom",
        "action_expert_variant": "gemma_300m" if cfg.expert.width == 1024 else "custom",
        "precision": str(next(model.parameters()).dtype).replace("torch.", ""),
        "evalkit_pi05": asdict(cfg),  # exact sizes, so custom/tiny shapes can be rebuilt
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if norm_stats is not None:
        assets = out / "assets" / asset_id
        assets.mkdir(parents=True, exist_ok=True)
        (assets / "norm_stats.json").write_text(json.dumps({"norm_stats": norm_stats}, indent=2))
    return out
