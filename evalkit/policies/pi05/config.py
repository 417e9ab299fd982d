"""Sizes and switches of the π0.5 model, one dataclass so `pi05` and `pi05_tiny` share every line of code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from evalkit.errors import BadInput


@dataclass
class GemmaSize:
    """One Gemma decoder stack (prefix LM or action expert)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass
class VisionSize:
    """SigLIP vision tower (ViT with learned position embeddings, no pooling head)."""

    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224

    @property
    def tokens_per_view(self) -> int:
        return (self.image_size // self.patch_size) ** 2


GEMMA_2B = GemmaSize(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256)
GEMMA_300M = GemmaSize(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)
SIGLIP_SO400M = VisionSize()


@dataclass
class Pi05Config:
    prefix: GemmaSize = field(default_factory=lambda: GemmaSize(**asdict(GEMMA_2B)))
    expert: GemmaSize = field(default_factory=lambda: GemmaSize(**asdict(GEMMA_300M)))
    vision: VisionSize = field(default_factory=lambda: VisionSize(**asdict(SIGLIP_SO400M)))
    vocab_size: int = 257152  # PaliGemma's SentencePiece vocabulary
    action_dim: int = 32  # model-side action width; LIBERO's 7 dims are the first 7
    action_horizon: int = 10  # pi05_libero
    env_action_dim: int = 7
    rms_eps: float = 1e-6
    layernorm_eps: float = 1e-6  # SigLIP LayerNorm
    rope_theta: float = 10000.0
    # "images": SigLIP views + instruction tokens (π0.5).  "state_tokens": no vision tower; a float feature
    # vector is projected into `state_prefix_tokens` prefix tokens (module `state_encoder`), then instruction.
    prefix_inputs: str = "images"
    state_feature_dim: int = 0  # required > 0 for prefix_inputs=state_tokens
    state_prefix_tokens: int = 4
    # openpi's pi05_libero config trains with discrete_state_input=False: the state is NOT in its prompt.
    # True renders the quantile-normalized state as 256-bin integers in the prompt (openpi's π0.5 default).
    state_in_prompt: bool = False
    state_dim: int = 8  # LIBERO proprio: eef pos 3 + axis-angle 3 + gripper 2
    max_token_len: int = 200  # openpi pi05; prompts are padded to the batch's longest unless pad_to_max_len
    pad_to_max_len: bool = False
    num_views: int = 2

    def __post_init__(self) -> None:
        if self.prefix_inputs not in ("images", "state_tokens"):
            raise BadInput(f"pi05 prefix_inputs must be 'images' or 'state_tokens', got '{self.prefix_inputs}'")
        if self.prefix_inputs == "state_tokens" and self.state_feature_dim <= 0:
            raise BadInput("pi05 prefix_inputs=state_tokens needs state_feature_dim > 0")
        if self.prefix.depth != self.expert.depth:
            raise BadInput("pi05 prefix and expert need the same depth (expert layer i reads prefix layer i's K/V)")
        if (self.prefix.num_kv_heads, self.prefix.head_dim) != (self.expert.num_kv_heads, self.expert.head_dim):
            raise BadInput("pi05 prefix and expert need the same KV head layout (shared attention)")
        if self.expert.width % 2:
            raise BadInput("pi05 expert width must be even (sinusoidal time embedding)")


def tiny_config(**overrides: Any) -> Pi05Config:
    """Same architecture, tiny widths, three layers (with two, the only MLP that could be swapped, the last
    prefix layer's, never reaches the actions). Runs in milliseconds on a CPU."""
    cfg = Pi05Config(
        prefix=GemmaSize(width=64, depth=3, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
        expert=GemmaSize(width=32, depth=3, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16),
        vision=VisionSize(width=48, depth=2, mlp_dim=96, num_heads=4, patch_size=56, image_size=224),
        vocab_size=512,
    )
    return replace_fields(cfg, overrides)


def full_config(**overrides: Any) -> Pi05Config:
    return replace_fields(Pi05Config(), overrides)


def replace_fields(cfg: Pi05Config, overrides: dict[str, Any]) -> Pi05Config:
    """Apply flat overrides (unknown names are a BadInput, never ignored)."""
    known = {f.name for f in fields(Pi05Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise BadInput(f"unknown pi05 model fields {unknown}; valid: {sorted(known)}")
    d = asdict(cfg)
    for k, v in overrides.items():
        d[k] = {**d[k], **v} if k in ("prefix", "expert", "vision") and isinstance(v, dict) else v
    sizes = {"prefix": GemmaSize(**d["prefix"]), "expert": GemmaSize(**d["expert"]),
             "vision": VisionSize(**d["vision"])}
    return Pi05Config(**{**d, **sizes})
