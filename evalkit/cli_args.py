"""One argument grammar for every evalkit command: Hydra-style `key=value` overrides into an options dataclass.

    python -m evalkit.bench backend=int8 denoise_steps=[1,3,10] device=cpu
    python -m evalkit.gate candidate=RUN baseline=RUN gate.max_drop=0.1

A tool describes its options as a dataclass (nested dataclasses give dotted keys, a `dict` field takes any
key below it); `parse` merges the overrides into it with OmegaConf, so values read as in the main command
(ints, floats, true/false, null, lists `[a,b]`) and are checked against the field types. A list option also
takes a single value (`runs=DIR` is `runs=[DIR]`). `--help` lists every option with its type, default and
help (the field's `metadata["help"]`, else the comment on its line). Everything wrong is BadInput (exit 2
through each tool's runner): an argument that is not key=value, an unknown key (the valid ones listed),
a value of the wrong type (key and expected type named), a required option left out.

Our own code around OmegaConf: the key check and the help text, which OmegaConf has no notion of; and text
options take the argument as written (YAML would read `run_id=0123` as the octal number 83).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from evalkit.errors import BadInput

T = TypeVar("T")
HELP_FLAGS = ("-h", "--help")


def opt(default: Any = MISSING, help: str = "") -> Any:
    """A dataclass field with its --help text; list/dict defaults are copied per instance. No default: required."""
    meta = {"help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Option:
    key: str  # dotted
    type: Any  # the annotation; dict for an open node (any key below it)
    help: str

    @property
    def open(self) -> bool:
        return _base(self.type) is dict

    @property
    def is_list(self) -> bool:
        return _base(self.type) in (list, tuple)

    @property
    def text(self) -> bool:
        """A text option (or a list of text): takes the argument as written."""
        t = _item(self.type) if self.is_list else _strip_optional(self.type)
        return t is str

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.type)

    def type_name(self) -> str:
        return _type_name(self.type)


def _strip_optional(t: Any) -> Any:
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return t


def _base(t: Any) -> Any:
    t = _strip_optional(t)
    return typing.get_origin(t) or t


def _item(t: Any) -> Any:
    args = typing.get_args(_strip_optional(t))
    return args[0] if args else Any


def _type_name(t: Any) -> str:
    inner = _strip_optional(t)
    if _base(t) in (list, tuple):
        name = f"list[{getattr(_item(t), '__name__', 'any')}]"
    elif _base(t) is dict:
        name = "dict"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if inner is not t else name


def _comments(cls: type) -> dict[str, str]:
    """`name: type = default  # comment` lines of a dataclass's source: the help of fields without metadata."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m[1]: m[2].strip() for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", src, flags=re.M)}


def options(schema: type, prefix: str = "") -> list[Option]:
    """Every option of a dataclass schema, nested dataclasses flattened into dotted keys."""
    hints = typing.get_type_hints(schema)
    comments = _comments(schema)
    out: list[Option] = []
    for f in dataclasses.fields(schema):
        t = hints[f.name]
        inner = _strip_optional(t)
        if dataclasses.is_dataclass(inner):
            out += options(inner, f"{prefix}{f.name}.")
        else:
            out.append(Option(prefix + f.name, t, f.metadata.get("help") or comments.get(f.name, "")))
    return out


def _find(opts: list[Option], key: str) -> Option | None:
    for o in opts:
        if key == o.key or (o.open and key.startswith(o.key + ".")):
            return o
    return None


def _value(o: Option, key: str, raw: str) -> Any:
    if o.text and not (o.is_list and raw.startswith("[")) and key == o.key:
        if raw == "null":
            return None  # refused by OmegaConf unless the option is optional
        return [raw] if o.is_list else raw
    value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]  # YAML, as OmegaConf reads it
    if o.is_list and key == o.key and value is not None and not isinstance(value, list):
        value = [value]
    return value


def _show(v: Any) -> str:
    if v == MISSING:
        return "(required)"
    if v is None:
        return "null"
    if v == "":
        return '""'
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_show(x)}" for k, x in v.items()) + "}" if v else "{}"
    return str(v)


def usage(prog: str, cfg: Any) -> str:
    """The usage line; its required keys are those still missing in cfg (a config file may fill them)."""
    missing = OmegaConf.missing_keys(cfg)
    required = [f"{o.key}=..." for o in options(OmegaConf.get_type(cfg)) if o.key in missing]
    return " ".join(["usage:", prog, *required, "[key=value ...]"])


def help_text(prog: str, about: str, schema: type, cfg: Any, extra: Sequence[tuple[str, str]] = (),
              notes: Sequence[str] = ()) -> str:
    opts = options(schema)
    rows = [(o.key, o.type_name(), _show(_select(cfg, o.key)), o.help) for o in opts]
    rows += [(k, "", "", h) for k, h in extra]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    w[2] = min(w[2], 24)  # a longer default gets its help on the next line
    lines = [f"{prog}: {about}", "", usage(prog, cfg), "",
             "options (key=value; lists [a,b]; true/false; null):"]
    for k, t, d, h in rows:
        head = f"  {k:<{w[0]}}  {t:<{w[1]}}  {d:<{w[2]}}"
        lines += [head.rstrip(), " " * (w[0] + w[1] + w[2] + 8) + h] if len(d) > w[2] and h else [f"{head}  {h}".rstrip()]
    if notes:
        lines += ["", *notes]
    lines += ["", "exit codes: 0 pass, 1 regression, 2 bad input (docs/cli.md)"]
    return "\n".join(lines)


def _select(cfg: Any, key: str) -> Any:
    parent, _, last = key.rpartition(".")
    if OmegaConf.is_missing(OmegaConf.select(cfg, parent) if parent else cfg, last):
        return MISSING
    v = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(v) if OmegaConf.is_config(v) else v


def parse(schema: type[T], argv: Sequence[str], *, prog: str, about: str, config: Path | None = None,
          extra: Sequence[tuple[str, str]] = (), notes: Sequence[str] = ()) -> T:
    """`key=value` arguments -> an instance of `schema`; `--help` prints the options and exits 0.

    config: a YAML file merged over the schema's defaults before the overrides (`config=PATH` picks another).
    extra: (key, help) rows for --help of keys the tool takes itself (split off before parse, e.g. policy.KEY).
    """
    argv = list(argv)
    if config is not None:
        extra = [("config", f"YAML file of defaults (default {config})"), *extra]
    opts = options(schema)
    cfg = OmegaConf.structured(schema)
    pairs: list[tuple[str, str]] = []
    for a in argv:
        if a in HELP_FLAGS:
            continue
        key, sep, raw = a.partition("=")
        if not sep or not key or a.startswith("-"):
            raise BadInput(f"argument '{a}' is not key=value; {usage(prog, cfg)} (--help lists the options)")
        pairs.append((key, raw))
    if config is not None:
        path = Path(next((raw for k, raw in pairs if k == "config"), config))
        pairs = [(k, raw) for k, raw in pairs if k != "config"]
        if not path.is_file():
            raise BadInput(f"config={path}: no such file")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as e:
            raise BadInput(f"config {path}: {str(e).splitlines()[0]}") from None
    for key, raw in pairs:
        o = _find(opts, key)
        if o is None:
            valid = [o.key + (".KEY" if o.open else "") for o in opts] + [k for k, _ in extra]
            raise BadInput(f"unknown option '{key}'; valid: {', '.join(valid)}")
        try:
            OmegaConf.update(cfg, key, _value(o, key, raw), merge=True)
        except (OmegaConfBaseException, yaml.YAMLError):
            raise BadInput(f"{key}={raw}: expected {o.type_name() if key == o.key else 'a value'}"
                           + (", e.g. [1,2]" if o.is_list else "")) from None
    if any(a in HELP_FLAGS for a in argv):
        print(help_text(prog, about, schema, cfg, extra, notes))
        sys.exit(0)
    try:
        missing = OmegaConf.missing_keys(cfg)
        if missing:
            keys = [f"{o.key}=..." for o in opts if o.key in missing]
            raise BadInput(f"{', '.join(keys)} required; {usage(prog, cfg)}")
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:  # e.g. an ${interpolation} that names nothing
        raise BadInput(str(e).splitlines()[0]) from None


def split_group(argv: Sequence[str], group: str) -> tuple[list[str], list[str]]:
    """Split `group.KEY=VALUE` overrides of a config-group choice (`policy=NAME policy.KEY=VALUE`, as in the
    main command) off argv: (the rest, ["KEY=VALUE", ...])."""
    rest = [a for a in argv if not a.startswith(group + ".")]
    over = [a[len(group) + 1:] for a in argv if a.startswith(group + ".")]
    return rest, over
