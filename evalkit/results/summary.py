"""Turn episode records into the episode DataFrame, per-task/overall rates and summary.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evalkit.rollout.records import EpisodeRecord
from evalkit.stats import wilson_interval

EPISODE_COLUMNS = [
    "suite", "task_id", "task_name", "init_state_id", "seed", "success", "steps", "failure_reason",
    "wall_time_s", "policy_time_s", "policy_calls", "video_path", "instruction",
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
    a = np.asarray(ms, dtype=float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()), "std": float(a.std()), "n": int(a.size)}


def stage_summary(stage_ms: list[dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Per stage: percentiles of the stage's time per call (a stage that occurs N times per call, like
    denoise, is summed per call) and, for repeated stages, of each occurrence (`<stage>_step`)."""
    calls = stage_ms[1:] if len(stage_ms) > 1 else stage_ms  # first call = warm-up
    out: dict[str, dict[str, float]] = {}
    names = sorted({n for c in calls for n in c})
    for n in names:
        per_call = [sum(c[n]) for c in calls if n in c]
        out[n] = _percentiles(per_call)
        occurrences = [x for c in calls for x in c.get(n, [])]
        if len(occurrences) > len(per_call):
            out[f"{n}_step"] = _percentiles(occurrences)
    return out


def latency_summary(call_s: list[float], batch_sizes: list[int], stage_ms: list | None = None) -> dict[str, Any]:
    """Policy-call latency seen by the rollouts (batched calls, wall clock, first call excluded as warm-up)."""
    calls = np.asarray(call_s[1:] if len(call_s) > 1 else call_s, dtype=float) * 1e3
    if calls.size == 0:
        return {}
    p50, p90, p99 = np.percentile(calls, [50, 90, 99])
    stages = {"stages": stage_summary(stage_ms)} if stage_ms else {}
    return {**stages,
        "latency_ms_p50": float(p50), "latency_ms_p90": float(p90), "latency_ms_p99": float(p99),
        "latency_ms_mean": float(calls.mean()), "latency_ms_std": float(calls.std()),
        "hz": float(1e3 / p50) if p50 > 0 else None,
        "calls": int(calls.size), "mean_batch": float(np.mean(batch_sizes)) if batch_sizes else 0.0,
        "source": "rollout policy calls (wall clock, batched across workers)",
    }


def build_summary(df: pd.DataFrame, params: dict, protocol: dict, latency: dict, wall_s: float,
                  extra: dict | None = None) -> dict[str, Any]:
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
        "latency": latency,
        "episodes_per_min": (n / wall_s * 60.0) if wall_s > 0 else None,
        "wall_time_s": wall_s,
        "params": params,
        "protocol": protocol,
    }
    if extra:
        summary.update(extra)
    return summary


def write_results(run_dir: Path, df: pd.DataFrame, summary: dict) -> dict[str, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "episodes_csv": run_dir / "episodes.csv",
        "episodes_parquet": run_dir / "episodes.parquet",
        "summary": run_dir / "summary.json",
    }
    df.to_csv(paths["episodes_csv"], index=False)
    df.to_parquet(paths["episodes_parquet"], index=False)
    paths["summary"].write_text(json.dumps(summary, indent=2, default=str))
    return paths
