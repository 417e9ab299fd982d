"""Turn episode records into the episode DataFrame, per-task/overall rates and summary.json.

`RunSummary` is a run's summary as typed data, and the one place that names its parts: the keys of
summary.json (`to_dict` writes today's layout key for key; `from_dict` reads it back, and reads files of
older versions, whose missing keys stay None) and the MLflow metrics derived from it (`metrics`).
Results, run tracking, gate, merge, report and nightly read its attributes, never the dict.
The reports of other stages stored in it (fidelity, gate, backend, protocol, versions) keep the layout
their own `to_dict` gives them.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from evalkit.atomic import write_atomic, write_json_atomic
from evalkit.rollout.records import EpisodeRecord
from evalkit.stats import sample_stats, wilson_interval
from evalkit.tracking.names import headline_metrics, with_design_names


# -- the typed summary --------------------------------------------------------------------------
def _key(name: str | None = None, *, always: bool = False, factory: Callable[[], Any] | None = None,
         load: Callable[[Any], Any] | None = None) -> Any:
    """A field stored under JSON key `name` (default: the field's name). `always`: written even when None
    (summary.json always had the key); else None means absent. `load` turns the stored value into the field's
    type (nested dataclasses)."""
    meta = {"key": name, "always": always, "load": load}
    return field(default_factory=factory, metadata=meta) if factory else field(default=None, metadata=meta)


def _plain(v: Any) -> Any:
    """JSON-ready copy: nested dataclasses through their to_dict, containers copied."""
    if hasattr(v, "to_dict"):
        return v.to_dict()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


@dataclass
class Stored:
    """Base of the summary's dataclasses: to/from the summary.json dict, key order and nulls kept.

    A key the dict holds as null stays null (`null_keys`) and an absent one stays absent, so
    to_dict(from_dict(d)) == d for every summary.json; keys this version does not know ride along in `extra`.
    """

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)
    null_keys: frozenset[str] = field(default_factory=frozenset, kw_only=True, repr=False)

    @classmethod
    def _stored_fields(cls):
        return [f for f in fields(cls) if "key" in f.metadata]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None):
        d = dict(d or {})
        kw: dict[str, Any] = {}
        known, nulls = set(), set()
        for f in cls._stored_fields():
            key = f.metadata["key"] or f.name
            known.add(key)
            if key not in d:
                continue
            v = d[key]
            if v is None:
                if f.default_factory is not MISSING:
                    continue  # a container stored as null reads as empty
                if not f.metadata["always"]:
                    nulls.add(key)
                continue
            load = f.metadata["load"]
            kw[f.name] = load(v) if load else v
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known}, null_keys=frozenset(nulls))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in self._stored_fields():
            key, v = f.metadata["key"] or f.name, getattr(self, f.name)
            if v is None and not (f.metadata["always"] or key in self.null_keys):
                continue
            out[key] = _plain(v)
        out.update(_plain(self.extra))
        return out


def _map_of(cls) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    return lambda d: {k: cls.from_dict(v) for k, v in d.items()}


@dataclass
class StageStats(Stored):
    """Milliseconds of one policy stage per call (or per occurrence, `<stage>_step`), warm-up call excluded."""

    p50: float | None = _key()
    p90: float | None = _key()
    p99: float | None = _key()
    mean: float | None = _key()
    std: float | None = _key()
    n: int | None = _key()


@dataclass
class LatencySummary(Stored):
    """summary.json's `latency`: policy calls seen by the rollouts, rebuilt from the journal (evalkit.results.timing);
    `calls` counts the calls in the quantiles, `warmup_calls` the first calls of each session left out of them."""

    stages: dict[str, StageStats] | None = _key(load=_map_of(StageStats))
    p50_ms: float | None = _key("latency_ms_p50")
    p90_ms: float | None = _key("latency_ms_p90")
    p99_ms: float | None = _key("latency_ms_p99")
    mean_ms: float | None = _key("latency_ms_mean")
    std_ms: float | None = _key("latency_ms_std")
    hz: float | None = _key()
    calls: int | None = _key()
    warmup_calls: int | None = _key()
    unrecorded_episodes: int | None = _key()  # episodes journaled without their calls (older journals)
    mean_batch: float | None = _key()
    source: str | None = _key()
    shards: list[dict[str, Any]] | None = _key()  # merged runs: each shard's quantiles
    device_name: str | None = _key()  # written by none of ours; hand-made latency dicts may name the GPU

    def metrics(self) -> dict[str, float]:
        """MLflow names: latency_ms_p50/p90/p99, hz, latency_ms/<stage> (the stage's p50)."""
        m = {name: v for name, v in (("latency_ms_p50", self.p50_ms), ("latency_ms_p90", self.p90_ms),
                                     ("latency_ms_p99", self.p99_ms), ("hz", self.hz)) if v is not None}
        for stage, st in (self.stages or {}).items():
            if st.p50 is not None:
                m[f"latency_ms/{stage}"] = st.p50
        return m


@dataclass
class TaskResult(Stored):
    """One task of summary.json's `per_task` (keyed by task name)."""

    task_id: int | None = _key()
    success_rate: float | None = _key()
    ci_low: float | None = _key()  # Wilson 95%
    ci_high: float | None = _key()
    episodes: int | None = _key()
    successes: int | None = _key()
    failures: dict[str, int] | None = _key()  # failure kind -> count


@dataclass
class RunParams(Stored):
    """summary.json's `params`: the run's identity, also its MLflow params (DESIGN.md names)."""

    policy: str | None = _key()
    backend: str | None = _key()
    suite: str | None = _key()
    denoise_steps: int | None = _key()
    device: str | None = _key()
    git_sha: str | None = _key()
    shard: str | None = _key()  # "K/N" when the run is one shard of a suite


@dataclass
class RolloutStop(Stored):
    """Why the rollouts ended early (the sequential gate decided) and how many episodes were not run."""

    reason: str | None = _key()
    not_run: int | None = _key()


@dataclass
class FidelitySummary:
    """summary.json's `fidelity`: FidelityReport.to_dict() kept verbatim (the fidelity stage owns its
    layout), with typed reads of the parts gate, nightly, report and the metrics use."""

    report: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FidelitySummary":
        return cls(dict(d))

    def to_dict(self) -> dict[str, Any]:
        return _plain(self.report)

    def __bool__(self) -> bool:  # an empty report counts as no fidelity stage
        return bool(self.report)

    @property
    def checks(self) -> list[dict[str, Any]]:
        return list(self.report.get("checks") or [])

    @property
    def failed_checks(self) -> list[str]:
        return [c["name"] for c in self.checks if c.get("passed") is False]

    @property
    def passed(self) -> bool:
        return bool(self.report.get("passed", not self.failed_checks))

    @property
    def precision_class(self) -> str | None:
        return self.report.get("precision_class")

    @property
    def reference_backend(self) -> str | None:
        return self.report.get("reference_backend")

    @property
    def probes(self) -> int | None:
        return self.report.get("probes")

    def metrics(self) -> dict[str, float]:
        """MLflow names: action_cosine_min, layer_cosine_min."""
        return {k: self.report[k] for k in ("action_cosine_min", "layer_cosine_min") if self.report.get(k) is not None}


@dataclass
class RunSummary(Stored):
    """A run's summary.json (a CLI run or a merge of shards). Field = JSON key unless the field says otherwise."""

    # every summary.json holds these (build_summary)
    success_rate: float | None = _key(always=True)
    success_ci_low: float | None = _key(always=True)  # Wilson 95%
    success_ci_high: float | None = _key(always=True)
    episodes: int | None = _key(always=True)
    successes: int | None = _key(always=True)
    failure_reasons: dict[str, int] = _key(always=True, factory=dict)  # failure kind -> count
    per_task: dict[str, TaskResult] = _key(always=True, factory=dict, load=_map_of(TaskResult))
    latency: LatencySummary = _key(always=True, factory=LatencySummary, load=LatencySummary.from_dict)
    episodes_per_min: float | None = _key(always=True)
    wall_time_s: float | None = _key(always=True)
    params: RunParams = _key(always=True, factory=RunParams, load=RunParams.from_dict)
    protocol: dict[str, Any] = _key(always=True, factory=dict)  # SuiteSpec.protocol()
    # provenance (runs and merges)
    git_dirty: bool | None = _key()
    versions: dict[str, str] | None = _key()  # package -> version (evalkit.provenance.package_versions)
    device_name: str | None = _key()
    backend_report: dict[str, Any] | None = _key()  # BackendReport.to_dict() without its modules
    # a CLI run
    backend_provenance: dict[str, Any] | None = _key()
    calibration: dict[str, Any] | None = _key()
    fidelity: FidelitySummary | None = _key(load=FidelitySummary.from_dict)
    skipped_rollouts: bool | None = _key()  # fidelity failed before any episode
    resumed_episodes: int | None = _key()
    policy_timing: dict[str, Any] | None = _key()  # a remote policy's client/server timing
    rollout_stop: RolloutStop | None = _key(load=RolloutStop.from_dict)
    gate: dict[str, Any] | None = _key()  # GateResult.to_dict() (+ passed), or the fidelity verdict
    verdict: str | None = _key()  # pass | regression | inconclusive | unjudged
    baseline: str | None = _key()  # how the baseline was chosen (one line)
    mlflow_run_id: str | None = _key()
    # a merge of shards (evalkit.merge)
    merged_from: list[str] | None = _key()
    shards: list[dict[str, Any]] | None = _key()
    duplicates_dropped: int | None = _key()
    missing_episodes: list[list[int]] | None = _key()
    partial: bool | None = _key()
    suite_episodes: int | None = _key()
    wall_time_note: str | None = _key()
    merge_notes: list[str] | None = _key()

    def metrics(self) -> dict[str, float]:
        """The run's MLflow metrics: first the headline ones (`Headline/success_rate`, `.._ci_low`, `.._ci_high`,
        `Headline/latency_p50_ms`: evalkit.tracking.names), then the DESIGN.md names: success_rate,
        success_ci_low/high, episodes_per_min, success_rate/<task>, the latency ones, action/layer_cosine_min,
        policy_timing_ms/<k>, weight_bytes."""
        m = headline_metrics({"success_rate": self.success_rate, "success_ci_low": self.success_ci_low,
                              "success_ci_high": self.success_ci_high, "latency_ms_p50": self.latency.p50_ms})
        m.update({name: v for name, v in (("success_rate", self.success_rate), ("success_ci_low", self.success_ci_low),
                                          ("success_ci_high", self.success_ci_high),
                                          ("episodes_per_min", self.episodes_per_min)) if v is not None})
        for name, t in self.per_task.items():
            m[f"success_rate/{name}"] = t.success_rate
        m.update(self.latency.metrics())
        if self.fidelity:
            m.update(self.fidelity.metrics())
        for k, v in (self.policy_timing or {}).items():  # a remote policy's client/server timing, kept apart
            if isinstance(v, dict) and v.get("p50") is not None:
                m[f"policy_timing_ms/{k}"] = v["p50"]
        weight_bytes = (self.backend_report or {}).get("weight_bytes_after")
        if weight_bytes:
            m["weight_bytes"] = weight_bytes
        return m

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float], params: Mapping[str, Any]) -> "RunSummary":
        """What an MLflow run without summary.json (an old one) still tells: its metrics (named as in `metrics`)
        at the top, the latency quantiles in `latency`, its params. Headline names count as their DESIGN.md ones."""
        metrics = with_design_names(metrics)
        d: dict[str, Any] = {k: v for k, v in metrics.items() if not k.startswith("latency_ms")}
        d["latency"] = {k: v for k, v in metrics.items() if k.startswith("latency_ms_p")}
        d["params"] = dict(params)
        return cls.from_dict(d)

    def episode_counts(self) -> tuple[int, int] | None:
        """(successes, episodes); successes from the rate when only the rate was stored; None without a count."""
        if self.episodes is None:
            return None
        n = int(self.episodes)
        x = int(self.successes) if self.successes is not None else int(round(float(self.success_rate or 0) * n))
        return x, n


# -- building it from the episodes --------------------------------------------------------------
EPISODE_COLUMNS = [
    "suite", "task_id", "task_name", "init_state_id", "seed", "success", "steps", "failure_reason",
    "wall_time_s", "policy_time_s", "policy_calls", "video_path", "instruction", "video_error",
]


def episodes_frame(records: list[EpisodeRecord]) -> pd.DataFrame:
    df = pd.DataFrame([r.to_dict() for r in records], columns=EPISODE_COLUMNS)
    if not df.empty:
        df = df.sort_values(["task_id", "init_state_id"]).reset_index(drop=True)
    return df


def rate(successes: int, n: int) -> dict[str, float]:
    lo, hi = wilson_interval(successes, n)
    return {"success_rate": successes / n if n else 0.0, "ci_low": lo, "ci_high": hi, "episodes": n, "successes": successes}


def per_task(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for (task_id, name), g in df.groupby(["task_id", "task_name"], sort=True):
        key = name or f"task_{task_id}"
        out[key] = {"task_id": int(task_id), **rate(int(g["success"].sum()), len(g))}
        out[key]["failures"] = {str(k): int(v) for k, v in g["failure_reason"].dropna().map(_reason_kind).value_counts().items()}
    return out


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def _percentiles(ms: list[float]) -> dict[str, float]:
    st = sample_stats(ms)
    return {k: st[k] for k in ("p50", "p90", "p99", "mean", "std", "n")}


def stage_summary(stage_ms: list[dict[str, list[float]]], warmup: int = 1) -> dict[str, dict[str, float]]:
    """Per stage: percentiles of the stage's time per call (a stage that occurs N times per call, like
    denoise, is summed per call) and, for repeated stages, of each occurrence (`<stage>_step`). The first
    `warmup` calls are left out (unless nothing would remain)."""
    calls = stage_ms[warmup:] if len(stage_ms) > warmup else stage_ms
    out: dict[str, dict[str, float]] = {}
    names = sorted({n for c in calls for n in c})
    for n in names:
        per_call = [sum(c[n]) for c in calls if n in c]
        out[n] = _percentiles(per_call)
        occurrences = [x for c in calls for x in c.get(n, [])]
        if len(occurrences) > len(per_call):
            out[f"{n}_step"] = _percentiles(occurrences)
    return out


ROLLOUT_SOURCE = "rollout policy calls (wall clock, batched across workers)"


def latency_summary(call_s: list[float], batch_sizes: list[int], stage_ms: list | None = None) -> LatencySummary:
    """Policy-call latency seen by the rollouts (batched calls, wall clock, first call excluded as warm-up)."""
    timed = call_s[1:] if len(call_s) > 1 else call_s
    return calls_latency(timed, batch_sizes, stage_summary(stage_ms) if stage_ms else None)


def calls_latency(timed_s: list[float], batch_sizes: list[int], stages: dict | None, source: str = ROLLOUT_SOURCE,
                  **counts: int | None) -> LatencySummary:
    """The latency summary of the timed calls (seconds; warm-ups already left out); `batch_sizes` of every call;
    `counts`: further integer keys (warmup_calls, unrecorded_episodes), written when not None."""
    calls = np.asarray(timed_s, dtype=float) * 1e3
    if calls.size == 0:
        return LatencySummary()
    st = sample_stats(calls)
    p50 = st["p50"]
    return LatencySummary.from_dict({**({"stages": stages} if stages else {}),
        "latency_ms_p50": p50, "latency_ms_p90": st["p90"], "latency_ms_p99": st["p99"],
        "latency_ms_mean": st["mean"], "latency_ms_std": st["std"],
        "hz": float(1e3 / p50) if p50 > 0 else None,
        "calls": st["n"], **{k: v for k, v in counts.items() if v is not None},
        "mean_batch": float(np.mean(batch_sizes)) if batch_sizes else 0.0,
        "source": source,
    })


def build_summary(df: pd.DataFrame, params: dict, protocol: dict, latency: LatencySummary | dict, wall_s: float,
                  extra: dict | None = None) -> RunSummary:
    """The run's summary; `extra`: further summary.json keys (a key given as None is written as null)."""
    n, k = len(df), int(df["success"].sum()) if len(df) else 0
    overall = rate(k, n)
    reasons = df["failure_reason"].dropna().map(_reason_kind).value_counts() if n else pd.Series(dtype=int)
    summary = {
        "success_rate": overall["success_rate"],
        "success_ci_low": overall["ci_low"],
        "success_ci_high": overall["ci_high"],
        "episodes": n,
        "successes": k,
        "failure_reasons": {str(a): int(b) for a, b in reasons.items()},
        "per_task": per_task(df) if n else {},
        "latency": latency.to_dict() if isinstance(latency, LatencySummary) else latency,
        "episodes_per_min": (n / wall_s * 60.0) if wall_s > 0 else None,
        "wall_time_s": wall_s,
        "params": params,
        "protocol": protocol,
    }
    if extra:
        summary.update(extra)
    return RunSummary.from_dict(summary)


def write_summary(run_dir: Path, summary: RunSummary) -> Path:
    return write_json_atomic(run_dir / "summary.json", summary.to_dict(), indent=2, default=str)


def write_results(run_dir: Path, df: pd.DataFrame, summary: RunSummary) -> dict[str, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "episodes_csv": run_dir / "episodes.csv",
        "episodes_parquet": run_dir / "episodes.parquet",
        "summary": run_dir / "summary.json",
    }
    # each file whole or not at all (evalkit.atomic): an empty table still has its header
    write_atomic(paths["episodes_csv"], lambda tmp: df.to_csv(tmp, index=False))
    write_atomic(paths["episodes_parquet"], lambda tmp: df.to_parquet(tmp, index=False))
    write_summary(run_dir, summary)
    return paths
