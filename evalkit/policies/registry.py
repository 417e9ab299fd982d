"""Policy name -> builder, and `precheck_policy`: the cheap checks a run makes before building anything.

Builders are imported lazily so `noop` never imports torch-heavy code. Each builder is
`build(cfg: dict, device: torch.device) -> Policy`, where cfg is the resolved `policy` config group as a plain dict.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from evalkit.errors import BadInput, CapabilityError
from evalkit.imports import import_object

BUILDERS: dict[str, str] = {
    "noop": "evalkit.policies.noop:build",
    "random": "evalkit.policies.random_policy:build",
    "pi05": "evalkit.policies.pi05.policy:build",
    "scripted": "evalkit.policies.scripted:build",
    "reference": "evalkit.policies.reference:build",
    "reference_vision": "evalkit.policies.reference_vision:build",
    "remote": "evalkit.policies.remote:build",
}


def build_policy(cfg: dict[str, Any], device: torch.device):
    kind = cfg.get("kind") or cfg.get("name")
    if kind not in BUILDERS:
        raise BadInput(f"unknown policy kind '{kind}'; valid: {', '.join(sorted(BUILDERS))}")
    return import_object(BUILDERS[kind])(cfg, device)


# The checkpoint folder a policy kind reads when `checkpoint` is null (the references ship in the repo).
DEFAULT_CHECKPOINTS: dict[str, str] = {
    "reference": "evalkit.policies.reference:DEFAULT_DIR",
    "reference_vision": "evalkit.policies.reference_vision:DEFAULT_DIR",
}
# What in a checkpoint folder changes the actions (a model card or training log does not)
CHECKPOINT_FILES = ("model.safetensors", "config.json", "assets/**/norm_stats.json", "*.model")
HASHED_UP_TO = 64 << 20  # larger files (true-size weights): size and three 1 MiB samples, the same on every machine


def checkpoint_dir(cfg: dict[str, Any]) -> Path | None:
    """The checkpoint folder the policy of `cfg` reads, or None (random init, scripted, remote)."""
    kind = cfg.get("kind") or cfg.get("name")
    if kind == "pi05" and cfg.get("init", "random") != "checkpoint":
        return None
    if cfg.get("checkpoint"):
        return Path(str(cfg["checkpoint"])).expanduser()
    return Path(import_object(DEFAULT_CHECKPOINTS[kind])) if kind in DEFAULT_CHECKPOINTS else None


def checkpoint_identity(cfg: dict[str, Any]) -> dict[str, str] | None:
    """The files of the policy's checkpoint that decide its actions, each by content (sha1; a large file by its size
    and its first, middle and last MiB): part of a run's key, so a run never resumes onto weights or settings changed
    under it, and shards on other machines (copies of the files) still merge."""
    folder = checkpoint_dir(cfg)
    if folder is None:
        return None
    out: dict[str, str] = {}
    for pattern in CHECKPOINT_FILES:
        for f in sorted(folder.glob(pattern)):
            if not f.is_file():
                continue
            out[str(f.relative_to(folder))] = _file_digest(f)
    return out


def _file_digest(f: Path) -> str:
    size = f.stat().st_size
    if size <= HASHED_UP_TO:
        return hashlib.sha1(f.read_bytes()).hexdigest()[:16]
    h, mib = hashlib.sha1(str(size).encode()), 1 << 20
    with f.open("rb") as fh:
        for at in (0, size // 2, size - mib):
            fh.seek(at)
            h.update(fh.read(mib))
    return f"sampled:{h.hexdigest()[:16]}"


# Policies with a heavy build check their files and settings without building (pi05: checkpoint files, config.json,
# tokenizer, norm stats, weight keys and shapes); light ones are built once and dropped (milliseconds, and every
# check their builder makes runs); remote checks its settings without connecting (its server may start later).
PRECHECKS: dict[str, str] = {
    "pi05": "evalkit.policies.pi05.policy:precheck",
    "reference": "evalkit.policies.reference:precheck",
    "reference_vision": "evalkit.policies.reference_vision:precheck",
    "remote": "evalkit.policies.registry:precheck_remote",
}
LIGHT = {"noop", "random", "scripted"}
# Fields of the builders that do not list their own (a typo there would otherwise be ignored without a word).
KNOWN_FIELDS: dict[str, set[str]] = {
    "noop": {"kind", "name", "denoise_steps", "action_horizon", "needs_images"},
    "random": {"kind", "name", "denoise_steps", "action_horizon", "scale"},
    "remote": {"kind", "name", "denoise_steps", "host", "port", "api_key", "needs_images", "action_horizon",
               "connect_timeout_s", "evalkit_extras"},
}


def _number(cfg: dict[str, Any], kind: str, key: str, integer: bool, low: float, high: float | None = None) -> None:
    v = cfg.get(key)
    if v is None:
        return
    ok = isinstance(v, int if integer else (int, float)) and not isinstance(v, bool) and v >= low
    if not ok or (high is not None and v > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise BadInput(f"policy {kind}: {key} must be {'an integer' if integer else 'a number'} {span}, got {v!r}")


def precheck_remote(cfg: dict[str, Any]) -> None:
    host = cfg.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise BadInput(f"policy remote: host must be a host name or address, got {host!r}")
    _number(cfg, "remote", "port", True, 1, 65535)
    _number(cfg, "remote", "connect_timeout_s", False, 0)
    try:
        import openpi_client  # noqa: F401
    except ImportError as e:
        raise CapabilityError(f"policy=remote needs openpi-client: pip install 'evalkit[remote]' ({e})") from None


def precheck_policy(policy_cfg: dict[str, Any]) -> None:
    """Raise BadInput (or CapabilityError) for what is wrong with `policy_cfg`, without building a heavy policy."""
    kind = policy_cfg.get("kind") or policy_cfg.get("name")
    if kind not in BUILDERS:
        raise BadInput(f"unknown policy kind '{kind}'; valid: {', '.join(sorted(BUILDERS))}")
    known = KNOWN_FIELDS.get(kind)
    unknown = sorted(set(policy_cfg) - known) if known else []
    if unknown:
        raise BadInput(f"unknown {kind} policy fields {unknown}; valid: {sorted(known - {'kind', 'name'})}")
    if kind in KNOWN_FIELDS:
        _number(policy_cfg, kind, "action_horizon", True, 1)
    if kind in PRECHECKS:
        import_object(PRECHECKS[kind])(policy_cfg)
    elif kind in LIGHT:
        try:
            import_object(BUILDERS[kind])(policy_cfg, torch.device("cpu"))
        except (BadInput, CapabilityError):
            raise
        except (TypeError, ValueError) as e:  # a value of the wrong type that the builder converts with int()/float()
            raise BadInput(f"policy {kind}: bad setting ({e})") from None
