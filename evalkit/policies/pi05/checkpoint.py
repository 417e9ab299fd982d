"""openpi / LeRobot PyTorch π0.5 checkpoints: the one reader of their files, and our module names <-> theirs.

Every file of a checkpoint is read here: model.safetensors (header first, tensors at load), config.json,
norm_stats.json and the SentencePiece tokenizer. Whatever is wrong with one (missing, truncated, a pickle or random
bytes, not JSON, the wrong JSON structure, NaN, wrong dims, keys or shapes that do not fit the model) becomes a
BadInput naming the file and, where there is one, the key: one line and exit 2, never a parser's traceback.

Layout of a checkpoint directory (openpi `examples/convert_jax_model_to_pytorch.py`):
  model.safetensors   written with safetensors' save_model, which keeps one name of a tied pair: PaliGemma's
                      lm_head.weight holds the token embedding. A file holding both names is accepted when the
                      two tensors are equal (checked).
  config.json         action_dim, action_horizon, paligemma_variant, action_expert_variant, precision
  assets/<id>/norm_stats.json
  no tokenizer: openpi downloads PaliGemma's SentencePiece model separately (policy.tokenizer=<path>)
LeRobot's checkpoints use the same names under an extra leading "model.".
Only safetensors is read (never pickle). The JSON checks are our own code: a schema library would add a dependency
for a dozen fields and say less precisely which key of which file is wrong.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from evalkit.errors import BadInput
from evalkit.policies.pi05 import processing as proc
from evalkit.policies.pi05.config import Pi05Config
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
EMBEDDING = PG + "model.language_model.embed_tokens.weight"
TIED_EMBEDDING = PG + "lm_head.weight"  # the name save_model keeps for the tied embedding
# Present in openpi's files, never used by the policy: the expert's LM head (its embedding was removed).
UNUSED_REAL_KEYS = {EXPERT + "lm_head.weight"}
MAX_LISTED = 25
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # safetensors header dtypes a weight may have
TOKENIZER_NAMES = ("paligemma_tokenizer.model", "tokenizer.model")
OPENPI_TOKENIZER_URL = "gs://big_vision/paligemma_tokenizer.model"


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


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    kind = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return f"a JSON {kind.get(type(value), type(value).__name__)}"


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---------------------------------------------------------------------------------------------- JSON files
def read_json(path: Path, role: str) -> Any:
    """Parse the JSON file at `path` (`role` says what it is for, in messages). Any failure is a BadInput naming it."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: not found ({role})")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise BadInput(f"{path}: cannot read it ({e.strerror or _one_line(e)})") from None
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text (byte {e.start}); expected JSON ({role})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {role}") from None
    except RecursionError:
        raise BadInput(f"{path}: JSON nested too deeply to be a {role}") from None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_checkpoint_config(ckpt_dir: Path) -> dict[str, Any]:
    """config.json of a checkpoint: a JSON object whose known keys have the right types."""
    path = Path(ckpt_dir) / "config.json"
    meta = read_json(path, "openpi checkpoints carry config.json")
    if not isinstance(meta, dict):
        raise BadInput(f"{path}: expected a JSON object (action_dim, action_horizon, precision, ...), "
                       f"got {_json_type(meta)}")
    for key in ("action_dim", "action_horizon"):
        if key in meta and not _positive_int(meta[key]):
            raise BadInput(f"{path}: key '{key}' must be a positive integer, got {_short(meta[key])}")
    if "precision" in meta and meta["precision"] not in PRECISIONS:
        raise BadInput(f"{path}: key 'precision' must be one of {sorted(PRECISIONS)}, got {_short(meta['precision'])}")
    if "evalkit_pi05" in meta and not isinstance(meta["evalkit_pi05"], dict):
        raise BadInput(f"{path}: key 'evalkit_pi05' must be an object of model sizes, got {_json_type(meta['evalkit_pi05'])}")
    return meta


def checkpoint_precision(meta: dict[str, Any]) -> torch.dtype | None:
    """The dtype config.json's `precision` names (validated by read_checkpoint_config), None when absent."""
    return PRECISIONS.get(meta.get("precision")) if meta.get("precision") is not None else None


# ---------------------------------------------------------------------------------------------- norm stats
def find_norm_stats(ckpt_dir: Path) -> Path:
    found = sorted(Path(ckpt_dir).rglob("norm_stats.json"))
    if len(found) != 1:
        raise BadInput(
            f"{ckpt_dir}: expected exactly one norm_stats.json (openpi layout assets/<asset_id>/norm_stats.json), "
            f"found {[str(f) for f in found]}; set policy.norm_stats to the file"
        )
    return found[0]


def read_norm_stats_json(path: Path) -> tuple[dict[str, Any], str]:
    """The statistics object of a norm_stats.json ({"norm_stats": {...}} or the bare object) and its key prefix."""
    raw = read_json(path, "normalization statistics, openpi's norm_stats.json")
    wrapped = isinstance(raw, dict) and "norm_stats" in raw
    stats = raw["norm_stats"] if wrapped else raw
    if not isinstance(stats, dict):
        raise BadInput(f'{path}: expected a JSON object {{"norm_stats": {{"state": ..., "actions": ...}}}}, '
                       f"got {_json_type(stats)}" + (" under 'norm_stats'" if wrapped else ""))
    return stats, "norm_stats." if wrapped else ""


def read_vector(path: Path, key: str, value: Any) -> np.ndarray:
    """`value` (found at `key` of the file at `path`) as a float32 vector: a non-empty list of finite numbers."""
    if not isinstance(value, list) or not value:
        what = "an empty list" if value == [] else _json_type(value)
        raise BadInput(f"{path}: {key} must be a non-empty list of numbers, got {what}")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadInput(f"{path}: {key}[{i}] is {_json_type(v)}, not a number")
    arr = np.asarray(value, np.float64).astype(np.float32)  # a huge finite float64 becomes inf here: caught below
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise BadInput(f"{path}: {key} holds NaN or infinite values at dims {bad[:8].tolist()}")
    return arr


def read_quantiles(path: Path, stats: dict[str, Any], prefix: str, entry: str,
                   dims: tuple[int, int] | None) -> proc.QuantileStats:
    """`stats[entry]`'s q01/q99: equal lengths, q01 <= q99, and (when given) between dims[0] and dims[1] long."""
    if entry not in stats:
        raise BadInput(f"{path}: no '{prefix}{entry}' entry in the normalization stats (keys: {sorted(stats)})")
    s = stats[entry]
    if not isinstance(s, dict):
        raise BadInput(f"{path}: {prefix}{entry} must be an object with q01 and q99, got {_json_type(s)}")
    for q in ("q01", "q99"):
        if s.get(q) is None:
            raise BadInput(f"{path}: {prefix}{entry} has no {q} (pi05 uses quantile normalization)")
    lo = read_vector(path, f"{prefix}{entry}.q01", s["q01"])
    hi = read_vector(path, f"{prefix}{entry}.q99", s["q99"])
    if lo.shape != hi.shape:
        raise BadInput(f"{path}: {prefix}{entry}.q01 has {lo.size} dims but q99 has {hi.size}")
    below = np.flatnonzero(hi < lo)
    if below.size:
        raise BadInput(f"{path}: {prefix}{entry}.q99 < q01 at dims {below[:8].tolist()}")
    if dims is not None and not dims[0] <= lo.size <= dims[1]:
        want = f"{dims[0]}" if dims[0] == dims[1] else f"{dims[0]} to {dims[1]}"
        raise BadInput(f"{path}: {prefix}{entry} has {lo.size} dims; the model needs {want}")
    return proc.QuantileStats(lo, hi)


def read_norm_stats(path: Path, action_dims: tuple[int, int] | None = None,
                    state_dims: tuple[int, int] | None = None) -> proc.NormStats:
    """openpi's norm_stats.json ({"norm_stats": {"state": {"q01", "q99", ...}, "actions": {...}}}), checked.

    action_dims / state_dims: the (min, max) vector lengths the model can use; None: any length."""
    stats, prefix = read_norm_stats_json(path)
    state = read_quantiles(path, stats, prefix, "state", state_dims)
    actions = read_quantiles(path, stats, prefix, "actions", action_dims)
    return proc.NormStats(state=state, actions=actions, source=str(path))


# ---------------------------------------------------------------------------------------------- tokenizer
def openpi_tokenizer_cache() -> Path:
    """Where openpi's downloader keeps PaliGemma's tokenizer ($OPENPI_DATA_HOME, default ~/.cache/openpi)."""
    return Path(os.environ.get("OPENPI_DATA_HOME", "~/.cache/openpi")).expanduser() / "big_vision" / \
        "paligemma_tokenizer.model"


def load_tokenizer(setting: str | None, ckpt_dir: Path | None, vocab_size: int) -> proc.Tokenizer:
    """policy.tokenizer -> a loaded tokenizer: `bytes`, `checkpoint` (a SentencePiece model inside the checkpoint
    directory) or a path to a SentencePiece model. Its vocabulary must fit the model's embedding."""
    if setting == "bytes":
        return proc.ByteTokenizer(vocab_size)
    if setting in (None, "checkpoint"):
        if ckpt_dir is None:
            raise BadInput("pi05 tokenizer=checkpoint needs a checkpoint; set policy.tokenizer=bytes (tiny/latency) "
                           "or policy.tokenizer=/path/to/paligemma_tokenizer.model")
        found = [p for n in TOKENIZER_NAMES for p in sorted(Path(ckpt_dir).rglob(n))]
        if not found:
            cached = openpi_tokenizer_cache()
            where = f"openpi's cached copy is {cached}" if cached.is_file() else f"openpi downloads it from {OPENPI_TOKENIZER_URL}"
            raise BadInput(f"{ckpt_dir}: no SentencePiece tokenizer in the checkpoint (openpi ships none; {where}); "
                           "set policy.tokenizer=/path/to/paligemma_tokenizer.model")
        if len(found) > 1:
            raise BadInput(f"{ckpt_dir}: several tokenizers {[str(p) for p in found]}; set policy.tokenizer to one")
        path = found[0]
    elif isinstance(setting, str):
        path = Path(setting).expanduser()
    else:
        raise BadInput(f"pi05 tokenizer must be 'checkpoint', 'bytes' or a path, got {_short(setting)}")
    tok = proc.SentencePieceTokenizer(path)
    if tok.vocab_size > vocab_size:
        raise BadInput(f"{path}: the tokenizer has {tok.vocab_size} pieces but the model embeds {vocab_size} "
                       "(not PaliGemma's tokenizer?)")
    return tok


# ---------------------------------------------------------------------------------------------- safetensors
@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """safe_open(path) whose failures (not safetensors, truncated, unreadable) are a BadInput naming the file."""
    path = Path(path)
    if not path.is_file():
        other = sorted(p.name for p in path.parent.glob("*")) if path.parent.is_dir() else "no such directory"
        raise BadInput(f"{path}: not found (pi05 loads safetensors only; directory holds: {other})")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise BadInput(f"{path}: not a readable safetensors file ({_one_line(e)}); pi05 reads safetensors only, "
                       "never pickle") from None
    with handle as f:
        try:
            yield f
        except SafetensorError as e:
            raise BadInput(f"{path}: reading tensors failed ({_one_line(e)})") from None


@dataclass
class FileMatch:
    """How a safetensors file's keys map onto a model's parameters (header only: no tensor read)."""

    path: Path
    sources: dict[str, str]  # our parameter name -> key in the file
    key_prefix: str  # "model." (LeRobot) or ""
    tied: str  # which name held the token embedding: "embed_tokens", "lm_head" or "both (equal)" after the check
    twin: str | None = None  # with both names present: the lm_head key, compared at load
    ignored: list[str] = field(default_factory=list)
    file_dtypes: list[str] = field(default_factory=list)


def match_file(f: Any, path: Path, expected: dict[str, tuple[int, ...]]) -> FileMatch:
    """Every expected parameter found with its exact shape, every key of the file used (but the known-unused
    expert lm_head), floating-point dtypes only; anything else a BadInput naming the file and the keys."""
    file_keys = list(f.keys())
    outer = _strip_outer(file_keys)
    by_real = {k[len(outer):]: k for k in file_keys}
    wanted = {o: real_name(o) for o in expected}
    tied, twin = "embed_tokens", None
    if wanted.get("prefix.embed_tokens.weight") == EMBEDDING and TIED_EMBEDDING in by_real:
        if EMBEDDING in by_real:
            tied, twin = "both", TIED_EMBEDDING
        else:
            tied, wanted["prefix.embed_tokens.weight"] = "lm_head", TIED_EMBEDDING
    missing = [r + (f" (or its tied twin {TIED_EMBEDDING})" if r == EMBEDDING else "")
               for r in wanted.values() if r not in by_real]
    used = set(wanted.values()) | {twin}
    unexpected = [r for r in by_real if r not in used and r not in UNUSED_REAL_KEYS]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys [{_listing(missing)}]")
        if unexpected:
            parts.append(f"unexpected keys [{_listing(unexpected)}]")
        raise BadInput(f"{path}: does not match the pi05 model: " + "; ".join(parts))
    checks = [(o, r, "") for o, r in wanted.items()]
    if twin:
        checks.append(("prefix.embed_tokens.weight", twin, f" (the tied twin of {EMBEDDING})"))
    bad_shape, bad_dtype, dtypes = [], [], set()
    for o, r, note in checks:
        sl = f.get_slice(by_real[r])
        shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
        dtypes.add(dtype)
        if shape != tuple(expected[o]):
            bad_shape.append(f"{r}{note} {shape} != expected {tuple(expected[o])}")
        if dtype not in FLOAT_DTYPES:
            bad_dtype.append(f"{r} {dtype}")
    if bad_shape:
        raise BadInput(f"{path}: mis-shaped keys [{_listing(bad_shape)}]")
    if bad_dtype:
        raise BadInput(f"{path}: keys of a non-floating-point dtype [{_listing(bad_dtype)}]")
    return FileMatch(path=path, sources={o: by_real[r] for o, r in wanted.items()}, key_prefix=outer, tied=tied,
                     twin=by_real[twin] if twin else None, ignored=sorted(r for r in by_real if r in UNUSED_REAL_KEYS),
                     file_dtypes=sorted(dtypes))


class _SkipInit(TorchFunctionMode):
    """Initializers become no-ops. Used only on the meta device, where there are no values to initialize: torch
    runs a meta tensor's normal_ through Python reference kernels whose first use imports torch._dynamo (seconds).
    A TorchFunctionMode is per thread, so no other thread's model is affected."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.normal_, torch.Tensor.uniform_) or getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


def meta_model(cfg: Pi05Config) -> Pi05Model:
    """Pi05Model(cfg) on the meta device, without running initializers: shapes and dtypes, no memory."""
    try:
        with torch.device("meta"), _SkipInit():
            return Pi05Model(cfg)
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. a size that is not a positive integer
        raise BadInput(f"pi05 model sizes do not make a model ({_one_line(e)}): {asdict(cfg)}") from None


def allocate(model: Pi05Model, device: torch.device) -> Pi05Model:
    """Give a meta-device model uninitialized storage on `device`, in place (every value is then loaded). Module
    .to_empty() would do it through Python reference kernels whose first use imports sympy (over a second)."""
    new: dict[int, torch.Tensor] = {}  # a tensor shared by two modules stays shared
    for mod in model.modules():
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is None:
                continue
            if id(t) not in new:
                fresh = torch.empty(t.shape, dtype=t.dtype, device=device)
                new[id(t)] = torch.nn.Parameter(fresh, t.requires_grad) if isinstance(t, torch.nn.Parameter) else fresh
            (mod._parameters if name in mod._parameters else mod._buffers)[name] = new[id(t)]
    return model


_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def expected_shapes(cfg: Pi05Config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of Pi05Model(cfg), from a meta-device model (a fraction of a second at true size);
    cached per config, since a run prechecks and then builds."""
    key = json.dumps(asdict(cfg), sort_keys=True)
    if key not in _SHAPES:
        _SHAPES[key] = {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()}
    return _SHAPES[key]


def check_checkpoint_file(ckpt_dir: Path, expected: dict[str, tuple[int, ...]]) -> FileMatch:
    """Header-only check of `ckpt_dir/model.safetensors` against a model's expected shapes (before building it)."""
    path = Path(ckpt_dir) / "model.safetensors"
    with open_safetensors(path) as f:
        return match_file(f, path, expected)


def _check_twins_equal(f: Any, path: Path, first: str, twin: str) -> None:
    """Tied pair stored under both names: equal tensors or a BadInput (compared in row blocks: bounded memory)."""
    a, b = f.get_slice(first), f.get_slice(twin)
    shape = a.get_shape()
    step = max(1, (1 << 25) // max(1, math.prod(shape[1:])))
    for i in range(0, shape[0], step):
        x, y = a[i:i + step], b[i:i + step]
        if x.dtype != y.dtype:
            x, y = x.float(), y.float()
        if not torch.equal(x, y):
            diff = (x.float() - y.float()).abs().flatten(1).amax(dim=1)
            row = i + int(torch.nonzero(diff != 0)[0, 0]) if bool((diff != 0).any()) else i
            raise BadInput(f"{path}: {twin} is the tied twin of {first} (π0.5 ties the LM head to the token "
                           f"embedding) but the two differ (first at row {row}, max |diff| {float(diff.max()):.3g}); "
                           "keep one of them, or make them equal")


def load_state_dict_into(model: Pi05Model, ckpt_dir: Path) -> dict[str, object]:
    """Load `ckpt_dir/model.safetensors` into `model` (any dtype; values are cast). Returns a load report.

    Every parameter of `model` must be found with its exact shape; every key in the file must be used
    (except the known-unused expert lm_head); a tied embedding stored twice must be stored equal; loaded
    values must be finite. Anything else is a BadInput naming the file and the keys.
    """
    path = Path(ckpt_dir) / "model.safetensors"
    ours = model.state_dict()
    with open_safetensors(path) as f:
        m = match_file(f, path, {k: tuple(v.shape) for k, v in ours.items()})
        if m.twin:
            _check_twins_equal(f, path, m.sources["prefix.embed_tokens.weight"], m.twin)
            m.tied = "both (equal)"
        with torch.no_grad():
            for o, key in m.sources.items():
                ours[o].copy_(f.get_tensor(key))
    nonfinite = [m.sources[o] for o, t in ours.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if nonfinite:
        raise BadInput(f"{path}: NaN or infinite values in [{_listing(nonfinite)}]")
    return {"file": str(path), "loaded": len(m.sources), "ignored_unused": m.ignored, "key_prefix": m.key_prefix or None,
            "tied_embedding": m.tied, "file_dtypes": m.file_dtypes}


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
