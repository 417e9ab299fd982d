"""One evaluation run, stage by stage (the data flow of docs/architecture.md). Each stage is a plain function;
this module only wires them and owns the run directory.

config -> policy -> backend.apply -> fidelity -> rollouts -> results -> tracking -> gate -> exit code
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from evalkit.atomic import write_json_atomic, write_text_atomic
from evalkit.config import RunSettings
from evalkit.errors import EXIT_PASS, EXIT_REGRESSION, BadInput, Interrupted
from evalkit.progress import RUN_LOG, RunProgress
from evalkit.provenance import device_name, git_sha, package_versions
from evalkit.results.summary import (
    RolloutStop,
    RunSummary,
    build_summary,
    episodes_frame,
    write_results,
    write_summary,
)
from evalkit.results.table import print_summary, print_where
from evalkit.results.timing import run_timing
from evalkit.rollout.engine import RolloutOptions, run_rollouts
from evalkit.rollout.records import episode_costs
from evalkit.rollout.journal import Journal
from evalkit.tracking.bundle import RunBundle, write_bundle
from evalkit.validate import validate_run

# soft_wrap: log lines (commands to copy, paths) are never broken at 80 columns in CI logs.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


# -- run directory ------------------------------------------------------------------------------
def run_key(s: RunSettings, code: str) -> dict[str, Any]:
    """What makes two runs the same run: resuming into a dir with another key is refused. Besides the config: the
    code (`code`: the git sha) and the checkpoint files the policy reads, so episodes of other code or other weights
    never count as this run's (a checkpoint's config.json edited in place changes actions as surely as its weights)."""
    from evalkit.policies.registry import checkpoint_identity

    spec = s.suite
    return {
        "policy": {k: v for k, v in s.policy.items() if k != "denoise_steps"}, "backend": s.backend, "suite": spec.name, "libero_name": spec.libero_name,
        "tasks": list(spec.task_ids), "trials": spec.trials, "max_steps": spec.max_steps,
        "num_steps_wait": spec.num_steps_wait, "replan_steps": spec.replan_steps, "seed": spec.seed,
        "denoise_steps": s.denoise_steps, "device": s.device, "shard": [spec.shard_index, spec.num_shards],
        "code": code, "checkpoint": checkpoint_identity(s.policy),
    }


def check_run_key(run_dir: Path, key: dict) -> None:
    path = run_dir / "run_key.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != key:
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            raise BadInput(f"run dir {run_dir} holds a different run (differs in: {', '.join(diff)}); "
                           f"pick another hydra.run.dir or rerun with the same config, code and checkpoint")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, key, indent=2)


def find_resume_dir(resume: str | None, fresh_dir: Path, key: dict, outputs_root: Path) -> Path:
    """`resume=latest`: newest run dir under outputs/ with the same run key; `resume=PATH`: that dir."""
    if resume is None or str(resume).lower() in ("false", "none", ""):
        return fresh_dir
    if str(resume).lower() not in ("latest", "true"):
        p = Path(resume)
        if not (p / "run_key.json").exists():
            raise BadInput(f"resume={resume}: no evalkit run there (missing run_key.json)")
        return p
    candidates = sorted(outputs_root.glob("**/run_key.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for c in candidates:
        if c.parent != fresh_dir and json.loads(c.read_text()) == key:
            return c.parent
    console.print(f"[yellow]resume=latest: no earlier run with this config under {outputs_root}; starting fresh[/]")
    return fresh_dir


# -- stages -------------------------------------------------------------------------------------
def build_policy_and_backend(s: RunSettings):
    import torch

    from evalkit.backends.registry import backend_from_config
    from evalkit.policies.registry import build_policy

    device = torch.device(s.device)
    if device.type == "cpu":
        # The env workers need the cores too: torch's default pool (one thread per core) in the main
        # process oversubscribes them and made a 0.1 s predict take seconds (measured on 2 cores).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - s.workers))
    # engine/inner reach only backends that have them; a value a backend cannot honour is bad input.
    backend = backend_from_config(s.backend)
    backend.check_requirements(device)
    policy = build_policy(s.policy, device)
    return policy, backend, device


class LazyCalibration:
    """The run's calibration data (`backend.calib`), loaded only when a backend iterates it (most never do)."""

    def __init__(self, policy, s: RunSettings, fidelity_cfg) -> None:
        self.policy, self.s, self.cfg = policy, s, fidelity_cfg
        self.loaded = None

    def __iter__(self):
        from evalkit.fidelity.stage import calibration_set

        if self.loaded is None:
            self.loaded = calibration_set(self.policy, self.s.suite, self.cfg, source=self.s.backend.get("calib") or "probes")
            console.print(f"calibration: {self.loaded.observations} observations ({self.loaded.source})")
        return iter(self.loaded.items)

    def record(self) -> dict | None:
        """What the backend was calibrated on (None when it never asked)."""
        c = self.loaded
        return None if c is None else {"source": c.source, "observations": c.observations, "digest": c.digest}


def apply_backend(policy, backend, device, calib=None):
    from evalkit.backends.base import BackendReport

    model = getattr(policy, "model", None)
    if model is None:
        return BackendReport(backend=backend.name, device=str(device),
                             notes=[f"policy '{policy.name}' has no nn.Module: backend '{backend.name}' transforms nothing"])
    return backend.apply(model, calib)


def print_backend_report(report) -> None:
    console.print(f"[bold]backend[/] {report.backend} on {report.device}: "
                  f"{len(report.modules)} modules, weights {report.weight_bytes_before/2**20:.1f} MiB -> "
                  f"{report.weight_bytes_after/2**20:.1f} MiB"
                  + ("" if report.latency_representative else " [yellow](not latency-representative)[/]"))
    for k, v in report.summary_by_precision().items():
        console.print(f"  {v:4d} × {k}")
    for n in report.notes:
        console.print(f"  note: {n}")


def track(s: RunSettings, run_dir: Path, summary: RunSummary, versions: dict, sweep_key: str | None,
          started_ms: int | None = None) -> str | None:
    """Write the run's bundle, upload it unless offline, and end with where the results are (run dir, MLflow URL,
    the command that opens it)."""
    from evalkit.tracking.callbacks import PARENT_ENV
    from evalkit.tracking.store import (
        experiment_of,
        now_ms,
        reachable,
        resolve_uri,
        sync_bundle,
    )

    params = {**summary.params.to_dict(), "workers": s.workers, "seed": s.seed, "suite.tasks": list(s.suite.task_ids),
              "suite.trials": s.suite.trials}
    # provenance: a custom backend's run must not look like plain bf16 (its class path, engine, options, class)
    params.update({f"backend.{k}": v for k, v in (summary.backend_provenance or {}).items() if k != "name"})
    if summary.calibration:
        params.update({f"calibration.{k}": v for k, v in summary.calibration.items()})
    params.update({f"protocol.{k}": v for k, v in summary.protocol.items()})
    params.update({f"version.{k}": v for k, v in versions.items()})
    tags = {"evalkit.run_dir": str(run_dir), "evalkit.git_dirty": str(summary.git_dirty).lower(),
            "evalkit.verdict": str(summary.verdict or "unjudged"),
            "evalkit.device_name": summary.device_name}
    if s.tracking.get("tag_baseline"):
        tags["evalkit.baseline"] = "true"
    artifacts = ["summary.json", "episodes.csv", "episodes.parquet", "resolved_config.yaml", "backend_report.json",
                 "latency_calls.json"]
    if s.tracking.get("log_videos", True) and (run_dir / "videos").is_dir():
        artifacts.append("videos")
    bundle = RunBundle(
        experiment=s.tracking.get("experiment", "evalkit"),
        run_name=run_dir.name, params=params, metrics=summary.metrics(), tags=tags,
        artifacts=artifacts, table="episodes.parquet", sweep_key=sweep_key,
        parent_run_id=os.environ.get(PARENT_ENV) if sweep_key else None,
        start_time_ms=started_ms, end_time_ms=now_ms(),
    )
    write_bundle(run_dir, bundle)
    if s.tracking.get("mode") == "offline":
        console.print(f"tracking offline: bundle written; upload with [bold]python -m evalkit.sync runs={run_dir}[/]")
        print_where(run_dir, console=console)
        return None
    uri = resolve_uri(s.tracking.get("uri"))
    ok, why = reachable(uri)
    if not ok:
        console.print(f"[yellow]tracking store {uri} unreachable ({why}); run kept offline. "
                      f"Upload later: python -m evalkit.sync runs={run_dir} uri={s.tracking.get('uri')}[/]")
        print_where(run_dir, console=console)
        return None
    try:
        run_id = sync_bundle(run_dir, uri)
        experiment_id = experiment_of(uri, run_id)
    except Exception as e:  # the results are safe on disk; say how to finish the upload
        console.print(f"[yellow]MLflow upload failed ({type(e).__name__}: {e}); "
                      f"retry: python -m evalkit.sync runs={run_dir} uri={s.tracking.get('uri')}[/]")
        print_where(run_dir, console=console)
        return None
    console.print(f"MLflow run {run_id} in {uri}")
    print_where(run_dir, uri, experiment_id, run_id, console=console)
    return run_id


# -- the run ------------------------------------------------------------------------------------
def _reset_foreign_start_method() -> None:
    """Inside a joblib (loky) launcher job the global start method is 'loky': spawned env workers
    would try to restore it and die ("cannot find context for 'loky'"). Use plain spawn instead."""
    import multiprocessing as mp

    if mp.get_start_method(allow_none=True) not in (None, "spawn", "fork", "forkserver"):
        mp.set_start_method("spawn", force=True)


# -- interruption (SIGINT/SIGTERM) ---------------------------------------------------------------
_run_dirs: list[Path] = []  # the run dir of the run in progress, once known (for the resume command)
CONFIG_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def resume_command(run_dir: Path, argv: list[str] | None = None) -> str:
    """The one command that continues the run in `run_dir`: the job's own overrides (a multirun job's, not the
    sweep's), the config-dir/name flags of the command line, and resume=<run dir>."""
    import shlex

    argv = list(sys.argv[1:] if argv is None else argv)
    flags: list[str] = []
    given: list[str] = []  # the overrides as typed
    i = 0
    while i < len(argv):
        if argv[i].split("=", 1)[0] in CONFIG_FLAGS:
            taken = argv[i:i + 1] if "=" in argv[i] else argv[i:i + 2]
            flags += taken
            i += len(taken)
            continue
        if not argv[i].startswith("-"):
            given.append(argv[i])
        i += 1
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job (called from Python): the command line as given
        overrides = given
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "resume"]
    return shlex.join(["python", "-m", "evalkit", *flags, *keep, f"resume={Path(run_dir).absolute()}"])


def execute(s: RunSettings, fresh_dir: Path, resolved_yaml: str, outputs_root: Path, sweep_key: str | None) -> int:
    """One run, stage by stage. Stopped by SIGINT/SIGTERM (evalkit.errors.Interrupted, raised by the handlers the
    CLI installs): the env workers are closed, every finished episode is already in the journal, and the exception
    leaves carrying the command that resumes the run."""
    _run_dirs.clear()
    try:
        return _execute(s, fresh_dir, resolved_yaml, outputs_root, sweep_key)
    except Interrupted as e:
        if _run_dirs:
            e.resume = resume_command(_run_dirs[-1])
        raise


def _execute(s: RunSettings, fresh_dir: Path, resolved_yaml: str, outputs_root: Path, sweep_key: str | None) -> int:
    started_ms = int(time.time() * 1000)  # the MLflow run's start (it is created at the end, from the bundle)
    _reset_foreign_start_method()
    sha, dirty = git_sha()
    key = run_key(s, sha)
    run_dir = find_resume_dir(s.resume, fresh_dir, key, outputs_root)
    # Everything checkable before a model is built or the run dir written (baseline, tracking store, backend,
    # calibration source, policy files): a mistake costs seconds and leaves no run folder (evalkit/validate.py).
    pre = validate_run(s, run_dir)
    check_run_key(run_dir, key)
    _run_dirs.append(run_dir)
    write_text_atomic(run_dir / "resolved_config.yaml", resolved_yaml)
    versions = package_versions()
    spec = s.suite
    console.print(f"[bold]evalkit[/] {s.policy['name']} · {s.backend['name']} · {spec.name} "
                  f"({len(spec.task_ids)} tasks × {spec.trials} trials, max {spec.max_steps} steps) · "
                  f"denoise_steps={s.denoise_steps} · {s.device} · run dir {run_dir}")

    gate_cfg, baseline = pre.gate, pre.baseline
    console.print(baseline.how)
    for note in pre.notes:
        console.print(f"[yellow]{escape(note)}[/]")

    policy, backend, device = build_policy_and_backend(s)
    calib = LazyCalibration(policy, s, gate_cfg.fidelity)
    report = apply_backend(policy, backend, device, calib)
    print_backend_report(report)
    write_json_atomic(run_dir / "backend_report.json", report.to_dict(), indent=2)
    # a custom backend (backend.target=pkg.mod.Class) is named by its own class, never by the group default
    params = {"policy": s.policy["name"], "backend": backend.name if s.backend.get("target") else s.backend["name"],
              "suite": spec.name,
              "denoise_steps": s.denoise_steps, "device": s.device, "git_sha": sha}
    if spec.num_shards > 1:
        params["shard"] = f"{spec.shard_index}/{spec.num_shards}"
    extra = {"git_dirty": dirty, "versions": versions, "device_name": device_name(s.device),
             "backend_report": {k: v for k, v in report.to_dict().items() if k != "modules"},
             "backend_provenance": backend_provenance(s, backend), "calibration": calib.record()}

    # Fidelity: seconds, before any simulation. A broken backend stops the run here (exit 1).
    fidelity = run_fidelity_stage(s, policy, backend, report, device, gate_cfg)
    extra["fidelity"] = fidelity.to_dict() if fidelity else None
    if fidelity is not None and not fidelity.passed and not gate_cfg.always_rollout:
        df = episodes_frame([])
        summary = build_summary(df, params, spec.protocol(), {}, 0.0, extra={**extra, "skipped_rollouts": True})
        summary.gate = fidelity_verdict(fidelity)
        summary.verdict, summary.baseline = "regression", baseline.how
        write_results(run_dir, df, summary)
        finish_tracking(s, run_dir, summary, versions, sweep_key, started_ms)
        console.print("[bold red]REGRESSION[/] caught by fidelity before rollouts: "
                      + ", ".join(c.name for c in fidelity.failed()) + " (gate.always_rollout=true runs episodes anyway)")
        return EXIT_REGRESSION

    journal = Journal(run_dir / "episodes.jsonl")
    read = journal.recover()  # bad lines moved to episodes.rejected.jsonl: their episodes run again
    for warning in (read.bad_warning(journal.path, journal.rejected_path), read.conflict_warning()):
        if warning:
            console.print(f"[yellow]{escape(warning)}[/]")
    previous = [r for r in read.records if r.suite == spec.name and r.key in set(spec.episodes())]
    if previous:
        console.print(f"resuming: {len(previous)} of {len(spec.episodes())} episodes already in {journal.path}")
    # gate.sequential: a group-sequential test on the paired outcomes can end the rollouts once it has decided
    stop_rule = None
    if baseline.run is not None and gate_cfg.sequential:
        from evalkit.gate.sequential import sequential_stop_rule

        stop_rule = sequential_stop_rule(baseline.run, gate_cfg, spec)
    options = RolloutOptions(workers=s.workers, video_mode=s.video, videos_per_task=s.videos_per_task,
                             video_dir=str(run_dir / "videos"), stage_timer=stage_timer_for(policy, device),
                             stop_rule=stop_rule, order="interleave" if stop_rule else "task",
                             batch_window_ms=s.batch_window_ms)
    # library output (robosuite, LIBERO, warnings) of the rollouts, workers included, goes to run.log, not over the bar
    with RunProgress(len(spec.episodes()), previous, s.quiet, f"{spec.name}", log_path=run_dir / RUN_LOG,
                     workers=s.workers) as prog:
        result = run_rollouts(policy, spec, journal, options, on_record=prog.update)

    df = episodes_frame(result.records)
    # latency and throughput of every episode that counts, from the journal: a resumed or re-run run reports
    # what one uninterrupted run would (evalkit.results.timing)
    timing = run_timing(result.records)
    from evalkit.gate.runs import (
        write_latency_calls,  # raw call times: the gate bootstraps the p50 ratio from them
    )

    write_latency_calls(run_dir, timing.call_s, timing.batch_sizes, warmup_calls=timing.warmup_calls)
    extra.update({"resumed_episodes": result.resumed,
                  # a remote policy's client round trip and server timing, kept apart (evalkit/policies/remote.py)
                  "policy_timing": policy.timing_summary() if hasattr(policy, "timing_summary") else None,
                  "episodes_per_min": timing.episodes_per_min,
                  "rollout": episode_costs(result.records)})  # env builds, resets, set-up, ms per step
    summary = build_summary(df, params, spec.protocol(), timing.latency, timing.wall_s, extra=extra)
    if result.stop_reason:  # recorded for people; the judge re-derives the decision from the episodes
        summary.rollout_stop = RolloutStop(result.stop_reason, result.not_run)
        console.print(f"sequential gate stopped the rollouts: {result.stop_reason} ({result.not_run} episodes not run)")
    print_summary(summary, console)

    # Gate against the baseline; fidelity failures under always_rollout count too. No baseline: `unjudged`.
    code = EXIT_PASS
    if fidelity is not None and not fidelity.passed:
        code = EXIT_REGRESSION
        summary.gate = fidelity_verdict(fidelity)
    verdict = "regression" if code else "unjudged"
    if baseline.run is not None:
        from evalkit.gate import gate_run
        from evalkit.gate.render import print_gate

        gate = gate_run(summary, df, baseline.run, gate_cfg, run_dir=run_dir)
        summary.gate = {**gate.to_dict(), "passed": gate.passed and code == EXIT_PASS}
        print_gate(gate, console)
        code = max(code, gate.exit_code)
        verdict = "regression" if code else str(gate.verdict or "pass")
    summary.verdict, summary.baseline = verdict, baseline.how
    print_verdict(verdict, baseline.how)
    write_results(run_dir, df, summary)
    finish_tracking(s, run_dir, summary, versions, sweep_key, started_ms)
    return code


def print_verdict(verdict: str, how: str) -> None:
    color = {"pass": "green", "regression": "bold red", "unjudged": "yellow", "inconclusive": "yellow"}.get(verdict, "white")
    why = {"unjudged": " (no baseline to judge against; success and latency are recorded, not judged)"}.get(verdict, "")
    console.print(f"verdict: [{color}]{verdict.upper()}[/]{why} · {how}")


def fidelity_verdict(fidelity) -> dict:
    """The gate entry of a run whose fidelity failed (with or without rollouts)."""
    return {"passed": False, "exit_code": EXIT_REGRESSION, "failed": [f"fidelity:{c.name}" for c in fidelity.failed()]}


def stage_timer_for(policy, device):
    """Per-stage timing (device events on GPU) for policies whose predict takes a `timer`."""
    import inspect

    if "timer" not in inspect.signature(policy.predict).parameters:
        return None
    from evalkit.latency.timer import StageTimer

    return StageTimer(device)


def backend_provenance(s: RunSettings, backend) -> dict:
    """What really made the candidate: a custom backend's import path, engine, targets, options, precision class."""
    from evalkit.fidelity.budgets import class_of_backend

    cls, source = class_of_backend(backend)
    b = s.backend
    return {"name": b.get("name"), "target": b.get("target") or f"{type(backend).__module__}.{type(backend).__qualname__}",
            "engine": b.get("engine"), "targets": b.get("targets"), "inner": b.get("inner"),
            "options": json.dumps(b.get("options") or {}, sort_keys=True), "precision_class": cls,
            "precision_class_source": source, "calib": b.get("calib") or "probes"}


def run_fidelity_stage(s: RunSettings, policy, backend, report, device, gate_cfg):
    from evalkit.fidelity import fidelity_for_run

    t = time.perf_counter()
    fid = fidelity_for_run(s.policy, device, policy, backend, report, s.suite, gate_cfg.fidelity,
                           denoise_steps=s.denoise_steps)
    if fid is None:
        console.print(f"fidelity: skipped (policy '{s.policy['name']}' has no transformer layers to compare)")
        return None
    verdict = "[green]pass[/]" if fid.passed else "[bold red]FAIL[/]"
    console.print(f"fidelity vs {fid.reference_backend} ({fid.precision_class} budgets, {fid.class_source}): "
                  f"{verdict} in {time.perf_counter() - t:.1f} s")
    for c in fid.checks:
        mark = "ok " if c.passed else ("-- " if c.status == "skip" else "[bold red]BAD[/]")
        console.print(f"  {mark} {c.name}: {c.detail}")
    return fid


def finish_tracking(s: RunSettings, run_dir: Path, summary: RunSummary, versions: dict, sweep_key: str | None,
                    started_ms: int | None = None) -> None:
    run_id = track(s, run_dir, summary, versions, sweep_key, started_ms)
    if run_id:  # local copy only: lets the nightly and `evalkit.gate` find this run in MLflow
        summary.mlflow_run_id = run_id
        write_summary(run_dir, summary)
