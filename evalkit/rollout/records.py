"""The episode record (docs/architecture.md): one row per finished episode, and its schema check.

A record also carries the policy calls that served the episode (`calls`) and the rollout session that ran it,
so the latency and throughput of a run can be rebuilt from the journal alone (docs/journal.md): resumed,
re-run and merged runs then report what one uninterrupted run would.

`RecordError`/`record_from_json` check a journal line against the dataclass fields' own type hints. Written
here rather than with a validation library: the schema is this one flat dataclass (plus `PolicyCall`), and
evalkit declares no such dependency.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass
from typing import Any

TIMEOUT = "timeout"
NAN_ACTION = "nan_action"
EXCEPTION = "exception"


@dataclass
class PolicyCall:
    """One batched `policy.predict` that served the episode. A call that served several episodes at once is
    stored in each of their records and counted once: its id is (the record's session, `n`)."""

    n: int  # index of the call in its session (0: the session's first call, its warm-up)
    s: float  # wall seconds of the whole batched call
    batch: int  # observations it served
    stage_ms: dict[str, list[float]] | None = None  # per stage, ms of each occurrence (policies with a timer)


@dataclass
class EpisodeRecord:
    suite: str
    task_id: int
    task_name: str
    init_state_id: int
    seed: int
    success: bool
    steps: int  # policy-driven env steps (settle steps excluded)
    failure_reason: str | None  # None | "timeout" | "nan_action" | "exception: <message>"
    wall_time_s: float
    policy_time_s: float  # time spent in the policy calls this episode waited for
    policy_calls: int
    video_path: str | None = None
    instruction: str = ""
    video_error: str | None = None  # why a wanted video is missing (video_path is then None)
    session: str | None = None  # the rollout session (one engine run in one process) that ran the episode
    session_s: float | None = None  # seconds from its session's start until the episode was journaled
    calls: list[PolicyCall] | None = None  # the policy calls that served it (None: journals of older versions)
    env_built: bool | None = None  # its worker built a new env for it (None: journals of older versions)
    setup_s: float | None = None  # seconds from its start to its first observation: env build, reset, settle steps
    reset_kind: str | None = None  # "hard" (model recompiled) or "cheap" (suites/env.py `LiberoEnv.reset`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EpisodeRecord":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("calls") is not None:
            kw["calls"] = [c if isinstance(c, PolicyCall) else PolicyCall(**c) for c in kw["calls"]]
        return cls(**kw)

    @property
    def key(self) -> tuple[int, int]:
        return (self.task_id, self.init_state_id)

    def outcome(self) -> tuple:
        """What two records of one episode must agree on to be the same result."""
        return (self.success, self.steps, self.failure_reason)


def episode_costs(records: list[EpisodeRecord]) -> dict[str, Any]:
    """What the episodes cost their workers, from the records alone (so a resumed, re-run or merged run reports what
    one uninterrupted run would): env builds, resets by kind, set-up seconds, and ms per env step outside the
    policy calls and set-up. Records of older journals (no set-up fields) count as unknown, not as zero."""
    known = [r for r in records if r.setup_s is not None]
    n, steps = max(1, len(known)), sum(r.steps for r in known)
    resets: dict[str, int] = {}
    for r in known:
        if r.reset_kind:
            resets[r.reset_kind] = resets.get(r.reset_kind, 0) + 1
    builds = sum(bool(r.env_built) for r in known)
    return {
        "episodes_with_costs": len(known),
        "env_builds": builds,
        "env_builds_per_episode": round(builds / n, 3),
        "resets": dict(sorted(resets.items())),
        "setup_s_mean": round(sum(r.setup_s for r in known) / n, 3),
        "ms_per_step": round(sum(r.wall_time_s - r.policy_time_s - r.setup_s for r in known) / max(1, steps) * 1e3, 2),
    }


# -- schema check -------------------------------------------------------------------------------
class RecordError(ValueError):
    """A journal line that is not an episode record; the message says why (one line)."""


def _type_name(v: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "bool", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def _check(value: Any, hint: Any, where: str) -> None:
    """Raise RecordError unless `value` (parsed JSON) fits the type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: say what X wanted
            return _check(value, options[0], where)
        for option in options:
            try:
                return _check(value, option, where)
            except RecordError:
                pass
        raise RecordError(f"{where}: unexpected {_type_name(value)}")
    if hint is type(None):
        if value is not None:
            raise RecordError(f"{where}: expected null, got {_type_name(value)}")
        return
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is list:
        if not isinstance(value, list):
            raise RecordError(f"{where}: expected a list, got {_type_name(value)}")
        (item,) = typing.get_args(hint)
        for i, v in enumerate(value):
            _check(v, item, f"{where}[{i}]")
        return
    elif origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {_type_name(value)}")
        _, item = typing.get_args(hint)
        for k, v in value.items():
            _check(v, item, f"{where}.{k}")
        return
    elif is_dataclass(hint):
        _check_fields(value, hint, where)
        return
    else:  # a hint this checker does not know: a bug here, not bad input
        raise TypeError(f"records schema: unsupported type hint {hint!r} at {where}")
    if not ok:
        raise RecordError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {_type_name(value)} {value!r:.40}")


def _check_fields(obj: Any, cls: type, where: str = "") -> None:
    if not isinstance(obj, dict):
        raise RecordError(f"{where + ': ' if where else ''}JSON {_type_name(obj)}, not an object")
    hints = typing.get_type_hints(cls)
    missing = [f.name for f in fields(cls)
               if f.name not in obj and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise RecordError(f"{where + ': ' if where else ''}missing field(s) {', '.join(missing)}")
    for f in fields(cls):
        if f.name in obj:
            _check(obj[f.name], hints[f.name], f"{where + '.' if where else ''}{f.name}")


def record_from_json(obj: Any) -> EpisodeRecord:
    """The record a parsed journal line holds; RecordError (one line) when it is not one. Keys this version does
    not know are ignored (a newer writer's)."""
    _check_fields(obj, EpisodeRecord)
    return EpisodeRecord.from_dict(obj)
