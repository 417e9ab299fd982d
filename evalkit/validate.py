"""The pre-run validation stage: everything a run can check before it builds a model or runs an episode.

evalkit/config.py checks the composed config itself (types, ranges, unknown keys, a run of 0 episodes);
`validate_run` then checks what the config points at, cheapest first, each failure one line (BadInput or
CapabilityError, exit 2):
- the gate thresholds (types and ranges);
- the run directory can be written;
- the tracking store: the URI parses, a sqlite store's folder can be written (nothing is created to find out), a
  server answers; a server that does not answer is announced up front (the run is kept offline, synced later);
- the baseline resolves (run id, run dir, `latest`, reference key) and can be compared with this run (same suite,
  same simulator versions; another policy or denoise steps is announced);
- the backend: its class (a custom `backend.target` must name a Backend subclass), options, engine, targets and
  what this machine lacks for it (with the exact command of its accuracy-only engine where it has one);
- the calibration source (`backend.calib`: probes, demos:N, a path; evalkit/fidelity/calib_sources.py);
- the policy's cheap checks (evalkit.policies.registry.precheck_policy: checkpoint files, config, tokenizer, ...).
A run that fails here has written nothing; `discard_unused_run_dir` removes the folder Hydra made for it.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from evalkit.config import RunSettings
from evalkit.errors import BadInput, CapabilityError
from evalkit.gate.config import GateConfig

# Schemes MLflow stores by (the file store is refused by MLflow 3.13+ unless MLFLOW_ALLOW_FILE_STORE=true).
DB_SCHEMES = ("postgresql", "mysql", "mssql")
TRACKING_HINT = ("use sqlite:///PATH (default sqlite:///mlruns/mlflow.db), http://HOST:PORT of an mlflow server, "
                 "or tracking=offline")
# What a run dir holds before its first episode: Hydra's own files and evalkit's pre-run files.
PRE_RUN_FILES = {".hydra", "run_key.json", "resolved_config.yaml", "backend_report.json"}


@dataclass
class TrackingCheck:
    uri: str  # the store's URI, a sqlite path made absolute (nothing created)
    online: bool  # False: offline mode, or a server that does not answer (the run is kept offline)
    notes: list[str] = field(default_factory=list)


@dataclass
class PreRun:
    """What validation found, handed to the stages (nothing here is rebuilt later)."""

    gate: GateConfig
    baseline: Any  # evalkit.gate.baseline.BaselineChoice
    calib: Any  # evalkit.fidelity.calib_sources.CalibSource
    tracking: TrackingCheck
    notes: list[str] = field(default_factory=list)  # one-line announcements for the terminal


# -- gate ---------------------------------------------------------------------------------------------------------
def _type_ok(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def check_gate(gate: dict) -> GateConfig:
    """The `gate` group as a GateConfig: known keys (evalkit/config.py), values of the right type and range."""
    from evalkit.fidelity.config import FidelityConfig

    for cls, prefix, values in ((GateConfig, "gate", gate or {}), (FidelityConfig, "gate.fidelity",
                                                                    (gate or {}).get("fidelity") or {})):
        for f in fields(cls):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            kind = kind.replace("Optional[", "").rstrip("]")
            v = values.get(f.name)
            if v is not None and kind in ("bool", "int", "float") and not _type_ok(v, kind):
                raise BadInput(f"{prefix}.{f.name}={v!r}: expected {'true/false' if kind == 'bool' else f'a number ({kind})'}")
    cfg = GateConfig.from_dict(gate).validate()
    if cfg.max_latency_ratio <= 0 or cfg.latency_min_delta_ms < 0:
        raise BadInput(f"gate.max_latency_ratio={cfg.max_latency_ratio} must be > 0 and "
                       f"gate.latency_min_delta_ms={cfg.latency_min_delta_ms} >= 0")
    from evalkit.backends.registry import BACKENDS

    if cfg.fidelity.reference_backend not in BACKENDS:
        from evalkit.config import unknown_choice

        raise BadInput(unknown_choice("gate.fidelity.reference_backend", cfg.fidelity.reference_backend, BACKENDS))
    return cfg


# -- folders and stores -------------------------------------------------------------------------------------------
def _probe_write(folder: Path) -> str | None:
    """None when a file can be created in `folder` (tried for real: permissions, read-only mounts, root), else why."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".evalkit_write_check_"):
            pass
        return None
    except OSError as e:
        return e.strerror or type(e).__name__


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_dir(path: Path, what: str, hint: str) -> None:
    """`path` (or, when it does not exist yet, the folder it would be made in) accepts new files."""
    base = _existing_ancestor(Path(path).resolve())
    if not base.is_dir():
        raise BadInput(f"{what} {path}: {base} is a file, not a folder; {hint}")
    why = _probe_write(base)
    if why:
        raise BadInput(f"{what} {path}: cannot write in {base} ({why}); {hint}")


def check_tracking(tracking: dict, base_dir: Path | None = None) -> TrackingCheck:
    """Raises BadInput for a URI no store answers to, or an online sqlite store whose folder cannot be written."""
    import os

    uri = str(tracking.get("uri") or "")
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    online = tracking.get("mode") != "offline"
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or len(uri) <= len("sqlite:///"):
            raise BadInput(f"tracking.uri={uri!r}: a sqlite store is sqlite:///relative/path.db or "
                           f"sqlite:////absolute/path.db")
        rel = Path(uri[len("sqlite:///"):])
        db = (rel if rel.is_absolute() else Path(base_dir or os.getcwd()) / rel).resolve()
        if db.is_dir():
            raise BadInput(f"tracking.uri={uri}: {db} is a folder; name the database file (e.g. {db}/mlflow.db)")
        if online:
            hint = ("make it writable, choose another store (tracking.uri=sqlite:///PATH), or run offline "
                    "(tracking=offline; upload later with python -m evalkit.sync)")
            check_writable_dir(db.parent, "tracking store", hint)
            if db.exists():
                try:
                    with open(db, "r+b"):
                        pass
                except OSError as e:
                    raise BadInput(f"tracking store {db}: cannot write ({e.strerror}); {hint}") from None
        return TrackingCheck(f"sqlite:///{db}", online)
    if scheme in ("http", "https"):
        try:
            ok_host = bool(parts.hostname) and (parts.port is None or parts.port > 0)
        except ValueError:  # a port that is not a number
            ok_host = False
        if not ok_host:
            raise BadInput(f"tracking.uri={uri!r}: not a server address; {TRACKING_HINT}")
        if not online:
            return TrackingCheck(uri, False)
        from evalkit.tracking.store import reachable

        ok, why = reachable(uri)
        if ok:
            return TrackingCheck(uri, True)
        return TrackingCheck(uri, False, [f"tracking server {uri} does not answer ({why}): the run goes ahead and is "
                                          f"kept offline; upload it later with python -m evalkit.sync "
                                          f"runs=<run dir> uri={uri}"])
    if scheme in DB_SCHEMES or scheme == "databricks" or (
            scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() == "true"):
        return TrackingCheck(uri, online)  # no cheap check: MLflow reports its own errors at upload
    raise BadInput(f"tracking.uri={uri!r} is not a tracking store evalkit can write; {TRACKING_HINT}")


# -- baseline -------------------------------------------------------------------------------------------------------
def resolve_run_baseline(s: RunSettings, gate_cfg: GateConfig, tracking: TrackingCheck):
    """`baseline=` (default auto), or `gate.baseline` when the run leaves it at auto; see evalkit.gate.baseline."""
    from evalkit.gate.baseline import AUTO, resolve_baseline
    from evalkit.gate.runs import _RUN_ID

    ref = s.baseline if s.baseline is not None else "none"
    if str(ref).lower() == AUTO and gate_cfg.baseline:
        ref = gate_cfg.baseline
    like = {"policy": s.policy["name"], "suite": s.suite.name, "denoise_steps": s.denoise_steps, "device": s.device}
    offline = s.tracking.get("mode") == "offline"
    if not offline and not tracking.online:  # a server that does not answer: never wait on it
        if str(ref) == "latest" or _RUN_ID.match(str(ref)):
            raise BadInput(f"baseline={ref} lives in the tracking store {tracking.uri}, which does not answer; "
                           "start it, or name a run directory (baseline=outputs/...)")
        offline = True
    db = tracking.uri[len("sqlite:///"):] if tracking.uri.startswith("sqlite:///") else None
    if db and not Path(db).exists() and (str(ref) == "latest" or _RUN_ID.match(str(ref))):
        raise BadInput(f"baseline={ref}: there is no tracking store at {db} yet (no run was ever recorded there); "
                       "check tracking.uri or name a run directory (baseline=outputs/...)")
    return resolve_baseline(ref, tracking.uri, like, offline=offline)


def check_baseline(s: RunSettings, baseline, gate_cfg: GateConfig) -> list[str]:
    from evalkit.gate.compat import check_baseline_compatible
    from evalkit.provenance import package_versions

    if baseline.run is None:
        return []
    run = baseline.run
    cand = {"policy": s.policy["name"], "suite": s.suite.name, "denoise_steps": s.denoise_steps}
    return check_baseline_compatible(cand, run.params or {}, run.summary, package_versions(), gate_cfg.allow_sim_mismatch)


# -- backend, calibration, policy -----------------------------------------------------------------------------------
def rerun_command(**changes: str) -> str:
    """This run's command line with `changes` applied (for messages that say what to run instead)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        args = list(HydraConfig.get().overrides.task)
    except Exception:  # not under Hydra (a test or a library call): the process's own arguments
        args = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    keep = [a for a in args if a.split("=", 1)[0].lstrip("+~") not in changes]
    return "python -m evalkit " + " ".join(shlex.quote(a) for a in [*keep, *(f"{k}={v}" for k, v in changes.items())])


def check_backend(b: dict, device: str) -> None:
    """Build the backend object (no model) and ask it what this machine lacks; nothing is applied."""
    import torch

    from evalkit.backends.registry import backend_from_config

    backend = backend_from_config(b)  # name or custom target (a Backend subclass), options, engine, inner
    if not b.get("target"):
        from evalkit.backends.targets import target_regex

        target_regex(b.get("targets") or "prefix_mlp")
    dev = torch.device(device)
    try:
        # Packages it imports to look (nvidia-modelopt) warn about versions on import: library chatter that would
        # break the one-line error; the import is cached, so nothing warns later either.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backend.check_requirements(dev)
            if hasattr(backend, "check_engine"):
                backend.check_engine(dev)
    except CapabilityError as e:
        engine = getattr(backend, "engine", None)
        alt = next((x for x in ("fake_quant", "emulated") if x in getattr(backend, "engines", ()) and x != engine), None)
        if alt is None:
            raise
        raise CapabilityError(f"{e}; the accuracy-only {alt} engine runs here: "
                              f"{rerun_command(**{'backend.engine': alt})}") from None


def check_calibration(b: dict, spec):
    from evalkit.fidelity.calib_sources import parse_calib

    return parse_calib(b.get("calib"), spec)


def check_policy(policy_cfg: dict) -> None:
    from evalkit.policies.registry import precheck_policy

    precheck_policy(policy_cfg)


# -- the stage ------------------------------------------------------------------------------------------------------
def validate_run(s: RunSettings, run_dir: Path) -> PreRun:
    """Every check of the module docstring, cheapest first; raises BadInput/CapabilityError (exit 2) on the first
    problem. Writes nothing."""
    gate = check_gate(s.gate)
    check_writable_dir(run_dir, "run dir", "pick another hydra.run.dir=DIR or make it writable")
    tracking = check_tracking(s.tracking)
    baseline = resolve_run_baseline(s, gate, tracking)
    notes = tracking.notes + check_baseline(s, baseline, gate)
    check_backend(s.backend, s.device)
    calib = check_calibration(s.backend, s.suite)
    check_policy(s.policy)
    return PreRun(gate=gate, baseline=baseline, calib=calib, tracking=tracking, notes=notes)


def discard_unused_run_dir(run_dir: Path | None, stop_at: Path | None = None) -> bool:
    """Remove a run dir that holds nothing but what a run writes before its first episode (a run that failed
    validation: Hydra's .hydra/ and log, the pre-run files), then its parents up to `stop_at` while they are empty.
    True when removed. A folder holding anything else (episodes, results, a user's own files) is never touched."""
    if run_dir is None or not Path(run_dir).is_dir():
        return False
    run_dir = Path(run_dir)
    if any(p.name not in PRE_RUN_FILES and p.suffix != ".log" for p in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    if stop_at is not None:
        stop = Path(stop_at).resolve()
        p = run_dir.resolve().parent
        while p != stop and stop in p.parents and p.is_dir() and not any(p.iterdir()):
            p.rmdir()
            p = p.parent
    return not run_dir.exists()
