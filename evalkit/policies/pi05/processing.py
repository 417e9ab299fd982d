"""Pre/post-processing as openpi's pi05 LIBERO pipeline does it.

Images arrive from the env adapter as 224x224 uint8 (already rotated and resized with padding);
here they become float in [-1, 1]. State and actions use quantile normalization (openpi normalizes
with q01/q99 for every non-π0 model). With `state_in_prompt` the normalized state is discretized
into 256 bins and written into the prompt as integers ("Task: ..., State: 12 200 ...;\\nAction: ").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from evalkit.errors import BadInput

PALIGEMMA_BOS = 2


# ----------------------------------------------------------------------------------------------- images
def stack_views(views: list[np.ndarray]) -> np.ndarray:
    """Views, each uint8 [B, H, W, 3] -> uint8 [B, V, H, W, 3]."""
    arr = np.stack(views, axis=1)
    if arr.dtype != np.uint8:
        raise BadInput(f"pi05 expects uint8 images, got {arr.dtype}")
    return arr


def images_to_model(images):
    """uint8 [B, V, H, W, 3] (torch tensor, any device) -> float32 [B, V, 3, H, W] in [-1, 1]."""
    return (images.float() / 127.5 - 1.0).permute(0, 1, 4, 2, 3)


# ----------------------------------------------------------------------------------------------- normalization
@dataclass
class QuantileStats:
    q01: np.ndarray
    q99: np.ndarray

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """(x - q01) / (q99 - q01) * 2 - 1 over the dims the stats cover; extra dims pass through."""
        n = min(x.shape[-1], self.q01.shape[-1])
        out = x.astype(np.float32).copy()
        out[..., :n] = (x[..., :n] - self.q01[:n]) / (self.q99[:n] - self.q01[:n] + 1e-6) * 2.0 - 1.0
        return out

    def unnormalize(self, x: np.ndarray) -> np.ndarray:
        n = min(x.shape[-1], self.q01.shape[-1])
        out = x.astype(np.float32).copy()
        out[..., :n] = (x[..., :n] + 1.0) / 2.0 * (self.q99[:n] - self.q01[:n] + 1e-6) + self.q01[:n]
        return out


@dataclass
class NormStats:
    state: QuantileStats | None
    actions: QuantileStats | None
    source: str

    @staticmethod
    def identity() -> "NormStats":
        return NormStats(state=None, actions=None, source="identity (no normalization stats)")


# ----------------------------------------------------------------------------------------------- prompt
def discretize_state(normalized_state: np.ndarray, bins: int = 256) -> np.ndarray:
    """openpi: np.digitize(state, linspace(-1, 1, bins + 1)[:-1]) - 1 -> ints in [0, bins-1] for state >= -1.

    Like openpi, a value below -1 gives -1 (rendered as "-1") and one above 1 gives bins-1.
    """
    return np.digitize(normalized_state, bins=np.linspace(-1, 1, bins + 1)[:-1]) - 1


def build_prompt(instruction: str, normalized_state: np.ndarray | None) -> tuple[str, str | None]:
    """(text, suffix) for the tokenizer. π0.5 format with the state; π0 format (text, then "\\n") without."""
    clean = instruction.strip().replace("_", " ").replace("\n", " ")
    if normalized_state is None:
        return clean, "\n"
    state_str = " ".join(str(int(v)) for v in discretize_state(normalized_state))
    return f"Task: {clean}, State: {state_str};\nAction: ", None


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str, add_bos: bool) -> list[int]: ...


class SentencePieceTokenizer:
    """PaliGemma's SentencePiece model (the checkpoint's `paligemma_tokenizer.model`)."""

    def __init__(self, path: Path) -> None:
        try:
            import sentencepiece
        except ImportError as e:
            raise BadInput(f"tokenizer '{path}' needs the 'sentencepiece' package ({e})") from None
        if not Path(path).is_file():
            raise BadInput(f"{path}: SentencePiece model not found (policy.tokenizer)")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=Path(path).read_bytes())
            if self._sp.get_piece_size() == 0:  # an empty file loads as an uninitialized model, without an error
                raise RuntimeError("empty model")
        except (OSError, RuntimeError) as e:  # sentencepiece reports a bad model as RuntimeError("INTERNAL: ...")
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BadInput(f"{path}: not a SentencePiece model ({reason}); policy.tokenizer needs PaliGemma's "
                           "paligemma_tokenizer.model") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.name = f"sentencepiece:{Path(path).name}"

    def encode(self, text: str, add_bos: bool) -> list[int]:
        return list(self._sp.encode(text, add_bos=add_bos))


class ByteTokenizer:
    """Deterministic UTF-8 byte tokenizer for tiny models and tests only (id = byte + 3, BOS = 2).

    Used only when the config says `tokenizer: bytes`; a real checkpoint never falls back to it.
    """

    name = "bytes"
    offset = 3

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256 + self.offset:
            raise BadInput(f"tokenizer=bytes needs vocab_size >= {256 + self.offset}, model has {vocab_size}")

    def encode(self, text: str, add_bos: bool) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return ([PALIGEMMA_BOS] if add_bos else []) + ids


def tokenize_batch(
    tokenizer: Tokenizer,
    instructions: list[str],
    normalized_states: np.ndarray | None,
    max_len: int,
    pad_to_max_len: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int64 [B, L] and validity mask bool [B, L]; L = batch's longest (or max_len), truncated at max_len."""
    rows = []
    for i, instr in enumerate(instructions):
        text, suffix = build_prompt(instr, None if normalized_states is None else normalized_states[i])
        ids = tokenizer.encode(text, add_bos=True)
        if suffix is not None:
            ids = ids + tokenizer.encode(suffix, add_bos=False)
        rows.append(ids[:max_len])
    length = max_len if pad_to_max_len else max(len(r) for r in rows)
    tokens = np.zeros((len(rows), length), dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        mask[i, : len(r)] = True
    return tokens, mask


# ----------------------------------------------------------------------------------------------- actions
def actions_to_env(model_actions: np.ndarray, stats: NormStats, env_dim: int) -> np.ndarray:
    """[B, H, action_dim] normalized model actions -> float32 [B, H, env_dim] in LIBERO's action space."""
    a = model_actions if stats.actions is None else stats.actions.unnormalize(model_actions)
    return np.ascontiguousarray(a[..., :env_dim], dtype=np.float32)
