"""Structured config schema (dataclasses in Hydra's ConfigStore) and its validation.

Hydra validates types at compose time (a non-numeric `workers` is refused); `validate()` checks
the values Hydra cannot (ranges, suite tasks, keys no schema knows, a run of 0 episodes) and raises BadInput
with the valid choices, and a "did you mean" (difflib) where a close one exists. This is the config half of the
pre-run validation stage; evalkit/validate.py checks what lies outside the config (files, stores, baselines).
Every suite in suites/specs.py is registered as an option of the `suite` group.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from evalkit.errors import BadInput
from evalkit.policies.base import DEFAULT_DENOISE_STEPS, check_denoise_steps
from evalkit.suites.specs import SUITES, SuiteSpec, customize
from evalkit.tracking.store import DEFAULT_URI

# conf/ at the checkout's root; an installed wheel carries it as evalkit/conf (pyproject's package-dir).
_CHECKOUT_CONF = Path(__file__).resolve().parent.parent / "conf"
CONF_DIR = _CHECKOUT_CONF if _CHECKOUT_CONF.is_dir() else Path(__file__).resolve().parent / "conf"
GROUPS = ("policy", "backend", "suite", "gate", "tracking", "experiment")


class VideoMode(str, Enum):
    none = "none"
    failures = "failures"
    all = "all"


class TrackingMode(str, Enum):
    online = "online"
    offline = "offline"


@dataclass
class BackendConfig:
    name: str = MISSING
    targets: str = "prefix_mlp"  # prefix_mlp | expert_mlp | attn | vision | all
    engine: str = "native"  # native | emulated | fake_quant
    inner: Optional[str] = None  # fault backends: the real backend they wrap
    target: Optional[str] = None  # import path of a custom backend class (pkg.module.Class)
    calib: str = "probes"  # calibration data for backends that calibrate: probes (the suite's calibration probes)
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SuiteConfig:
    name: str = MISSING
    libero_name: str = MISSING
    tasks: Optional[List[int]] = None  # null: the suite's own task list
    trials: Optional[int] = None  # null: the suite's own trial count
    max_steps: Optional[int] = None
    num_steps_wait: int = 10
    replan_steps: int = 5
    seed: int = 7
    seed_mode: str = "openpi"  # openpi | independent (suites/seeding.py)


@dataclass
class TrackingConfig:
    mode: TrackingMode = TrackingMode.online
    uri: str = DEFAULT_URI
    experiment: str = "evalkit"
    log_videos: bool = True
    tag_baseline: bool = False  # tag the run evalkit.baseline=true (what `baseline=latest` looks for)


@dataclass
class RunConfig:
    policy: Any = MISSING
    backend: BackendConfig = MISSING
    suite: SuiteConfig = MISSING
    gate: Any = MISSING
    tracking: TrackingConfig = MISSING
    denoise_steps: int = DEFAULT_DENOISE_STEPS
    seed: int = 7
    device: str = "auto"  # auto: cuda if present, else cpu
    workers: int = 2  # env worker processes; 0 runs envs in the main process
    # longest a worker waiting for actions waits for stepping workers to join its batch, and never longer than a
    # policy call takes (evalkit/rollout/engine.py)
    batch_window_ms: float = 50.0
    video: VideoMode = VideoMode.failures
    videos_per_task: int = 5
    resume: Optional[str] = None  # null: continue only if this run dir already holds a journal; "latest" or a run dir
    quiet: bool = False  # plain log lines instead of a live progress bar (CI logs)
    # auto: newest run tagged evalkit.baseline=true with this policy/suite/denoise_steps (none: verdict unjudged);
    # none; or an MLflow run id, "latest", a run dir, a reference key: judged by the gate after rollouts
    baseline: Optional[str] = "auto"
    shard: Optional[str] = None  # "K/N": run the K-th (0-based) of N slices of the suite; merge with evalkit.merge


def _registered_backends() -> list[str]:
    from evalkit.backends.registry import (
        BACKENDS,  # a name table only: imports no backend module
    )

    return sorted(BACKENDS)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="evalkit_schema", node=RunConfig)
    for name, spec in SUITES.items():
        cs.store(group="suite", name=name,
                 node=SuiteConfig(name=name, libero_name=spec.libero_name, max_steps=spec.max_steps))
    # every registered backend is an option; conf/backend/<name>.yaml only where it differs from the schema
    for name in _registered_backends():
        if not (CONF_DIR / "backend" / f"{name}.yaml").exists():
            cs.store(group="backend", name=name, node=BackendConfig(name=name))


def group_options(group: str, config_dirs: "list[Path] | tuple[Path, ...]" = ()) -> list[str]:
    """Every option of a config group: YAML files under <dir>/<group>/ of conf/ and of every extra config dir on
    the search path (`--config-dir`, `--config-path`), plus ConfigStore entries."""
    names: set[str] = set()
    for d in (CONF_DIR, *config_dirs):
        if (Path(d) / group).is_dir():
            names |= {p.stem for p in (Path(d) / group).glob("*.yaml")}
    if group == "suite":
        names |= set(SUITES)
    if group == "backend":
        names |= set(_registered_backends())
    return sorted(names)


def load_policy_file(name: str, overrides: list[str]) -> dict[str, Any]:
    """conf/policy/<name>.yaml with `key=value` overrides, as a plain dict (the tools that build a policy without
    the whole run config: serve, bench); its `name` defaults to the file's."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "policy" / f"{name}.yaml"
    if not path.is_file():
        raise BadInput(unknown_choice("policy", name, group_options("policy")))
    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    out: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    out.setdefault("name", name)
    return out


# -- typos: "did you mean" and the keys the schema knows -----------------------------------------
def did_you_mean(word: str, choices) -> str:
    """" did you mean 'x'?" for the closest of `choices` (difflib), or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" did you mean '{close[0]}'?" if close else ""


def unknown_choice(what: str, value: str, valid) -> str:
    """One line for a value that is not among `valid`: the value, a did-you-mean, then every valid choice."""
    valid = sorted(str(v) for v in valid)
    return f"unknown {what} '{value}';{did_you_mean(value, valid)} valid: {', '.join(valid)}"


# Sections whose keys a schema fixes (nested keys of the run); `policy`, `backend.options` and the gate's
# per-statistic dicts are free-form here: their owners check them (policy prechecks, Backend.known_options,
# FidelityConfig.from_dict).
SCHEMAS: dict[str, Any] = {"": RunConfig, "suite": SuiteConfig, "tracking": TrackingConfig,
                           "backend": BackendConfig, "gate": "evalkit.gate.config:GateConfig",
                           "gate.fidelity": "evalkit.fidelity.config:FidelityConfig"}  # imported when asked (scipy)
FREE_FORM = ("policy", "backend.options", "gate.fidelity.allowance_db", "gate.fidelity.max_db", "hydra")


def schema_keys(section: str) -> list[str]:
    schema = SCHEMAS[section]
    if isinstance(schema, str):
        from evalkit.imports import import_object

        schema = SCHEMAS[section] = import_object(schema)
    return [f.name for f in fields(schema)] if is_dataclass(schema) else []


def unknown_key(dotted: str) -> str | None:
    """The one-line problem with a dotted config key no schema knows (None when it is known or free-form)."""
    parts = dotted.split(".")
    for i in range(len(parts)):
        section, key = ".".join(parts[:i]), parts[i]
        if section in FREE_FORM or any(section.startswith(f + ".") for f in FREE_FORM):
            return None
        if section not in SCHEMAS:
            return None  # below a known key that is not a section (e.g. suite.tasks): OmegaConf types it
        valid = schema_keys(section)
        if key not in valid:
            where = f"'{dotted}'" if not section else f"'{key}' in {section}"
            return f"unknown key {where};{did_you_mean(key, valid)} valid: {', '.join(sorted(valid))}"
    return None


def _check_keys(c: dict, section: str = "") -> None:
    """Every key of the composed config must be one a schema knows (a `+key=` or a YAML file can add any), and
    every key of the schema must be there (`~key` deletes one)."""
    if section in ("", "suite", "tracking", "backend"):
        missing = [k for k in schema_keys(section) if k not in c]
        if missing:
            where = f"{section}." if section else ""
            raise BadInput(f"{where}{missing[0]} is required (set it, e.g. {where}{missing[0]}=VALUE, instead of "
                           f"deleting it with ~)")
    for k, v in c.items():
        dotted = f"{section}.{k}" if section else str(k)
        problem = unknown_key(dotted)
        if problem:
            raise BadInput(problem)
        if isinstance(v, dict) and dotted in SCHEMAS:
            _check_keys(v, dotted)


# ---------------------------------------------------------------------------------------------
@dataclass
class RunSettings:
    """The validated, plain-Python view of a composed config that the stages use."""

    policy: dict
    backend: dict
    suite: SuiteSpec
    gate: dict
    tracking: dict
    denoise_steps: int
    seed: int
    device: str
    workers: int
    video: str
    videos_per_task: int
    batch_window_ms: float
    resume: Optional[str]
    quiet: bool
    baseline: Optional[str]


def _cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch (seconds) on a Linux machine with no NVIDIA driver: the
    validation stage resolves the device before anything is built, and a CPU machine should hear of a typo fast."""
    import sys

    if sys.platform.startswith("linux") and not Path("/proc/driver/nvidia/version").exists():
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if _cuda_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not _cuda_available():
            raise BadInput(f"device={device} but no CUDA GPU is visible; use device=cpu or device=auto")
        return device
    raise BadInput(f"device={device}: valid: auto, cpu, cuda, cuda:N")


def validate(cfg) -> RunSettings:
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    _check_keys(c)
    check_denoise_steps(c["denoise_steps"])
    if c["workers"] < 0:
        raise BadInput(f"workers={c['workers']}: must be >= 0 (0 runs envs in the main process)")
    if c["batch_window_ms"] < 0:
        raise BadInput(f"batch_window_ms={c['batch_window_ms']}: must be >= 0 (0: serve waiting workers at once)")
    if c["videos_per_task"] < 0:
        raise BadInput(f"videos_per_task={c['videos_per_task']}: must be >= 0")
    s = c["suite"]
    if s["libero_name"] not in {sp.libero_name for sp in SUITES.values()} and s["name"] not in SUITES:
        raise BadInput(f"suite '{s['name']}' names unknown LIBERO benchmark '{s['libero_name']}'")
    base = SUITES.get(s["name"]) or next(sp for sp in SUITES.values() if sp.libero_name == s["libero_name"])
    spec = customize(base, tasks=s["tasks"], trials=s["trials"], max_steps=s["max_steps"], shard=c["shard"],
                     num_steps_wait=s["num_steps_wait"], replan_steps=s["replan_steps"], seed=s["seed"],
                     seed_mode=s.get("seed_mode", "openpi"))
    if not spec.episodes():  # a run of 0 episodes must never exit 0 as if it had passed
        why = ("suite.tasks is empty" if not spec.task_ids else
               f"shard={c['shard']} holds none of the suite's {len(spec.all_episodes())} episodes")
        raise BadInput(f"this run has no episodes: {why}; name at least one task (e.g. suite.tasks=[0]) "
                       f"or fewer shards")
    pol = c["policy"]
    if not isinstance(pol, dict) or "kind" not in pol:
        raise BadInput("the policy config must be a mapping with a 'kind' (see conf/policy/)")
    pol.setdefault("name", pol["kind"])
    pol["denoise_steps"] = c["denoise_steps"]
    return RunSettings(
        policy=pol, backend=c["backend"], suite=spec, gate=c["gate"] or {}, tracking=c["tracking"],
        denoise_steps=c["denoise_steps"], seed=c["seed"], device=resolve_device(c["device"]), workers=c["workers"],
        video=c["video"], videos_per_task=c["videos_per_task"], batch_window_ms=c["batch_window_ms"], resume=c["resume"], quiet=c["quiet"],
        baseline=c["baseline"],
    )
