"""`python -m evalkit.merge runs=[RUN_DIR,...] [out=DIR] [uri=URI] [allow_partial=true]`: shards -> one result.

Each RUN_DIR is a run directory (holding run_key.json) or a folder above several (a multirun sweep
dir): every run found below it is merged. The merge
- refuses runs of different configs (run_key.json compared without "shard"), naming the keys that differ;
- keeps one record per episode (task, init state): a re-run episode counts once; within one journal the first
  valid record wins (docs/journal.md), across run dirs the journal written last wins; bad journal lines are
  skipped and counted in a note (a merge never changes its inputs);
- checks coverage: every episode of the full suite exactly once, else it lists the missing ones and
  exits 2 (unless allow_partial=true, which marks the result partial);
- pools the journaled policy calls of the kept episodes into one latency summary and latency_calls.json, as one
  run of the whole suite would report (evalkit.results.timing);
- writes a merged run dir (episodes.jsonl/csv/parquet, summary.json with the Wilson interval,
  run_key.json without the shard) and logs ONE MLflow run for the whole (tag evalkit.merged_from).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from evalkit.atomic import write_atomic, write_json_atomic, write_text_atomic
from evalkit.cli_args import opt, parse
from evalkit.errors import EXIT_BAD_INPUT, BadInput
from evalkit.gate.runs import LATENCY_CALLS, write_latency_calls
from evalkit.results.summary import (
    RunSummary,
    build_summary,
    episodes_frame,
    write_results,
)
from evalkit.results.timing import RunTiming, run_timing
from evalkit.rollout.journal import Journal, JournalRead
from evalkit.rollout.records import EpisodeRecord
from evalkit.suites.specs import SuiteSpec, customize, get_suite
from evalkit.tracking.bundle import (
    RunBundle,
    read_bundle,
    sync_state_path,
    write_bundle,
)

MERGE_MARKER = "merge.json"
MAX_LISTED = 20


@dataclass
class ShardRun:
    path: Path
    key: dict
    records: list[EpisodeRecord]  # the journal, deduplicated within the run (first valid record wins)
    summary: RunSummary = field(default_factory=RunSummary)  # empty when the shard wrote no summary.json
    journal_mtime: float = 0.0
    journal: JournalRead = field(default_factory=JournalRead)  # what reading the journal found (bad lines, ...)


# -- finding and reading runs -------------------------------------------------------------------
def find_runs(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for p in paths:
        if not p.exists():
            raise BadInput(f"{p}: no such directory")
        if (p / "run_key.json").exists():
            found.append(p)
            continue
        below = sorted(k.parent for k in p.rglob("run_key.json") if not (k.parent / MERGE_MARKER).exists())
        if not below:
            raise BadInput(f"{p}: no evalkit run here (no run_key.json in it or below it)")
        found.extend(below)
    unique = list(dict.fromkeys(r.resolve() for r in found))
    return unique


def read_run(path: Path) -> ShardRun:
    key = json.loads((path / "run_key.json").read_text())
    journal = path / "episodes.jsonl"
    if not journal.exists():
        raise BadInput(f"{path}: no episodes.jsonl (did this run start any episode?)")
    read = Journal(journal).read()
    records = [r for r in read.records if r.suite == key.get("suite")]
    summary_path = path / "summary.json"
    summary = RunSummary.from_dict(json.loads(summary_path.read_text())) if summary_path.exists() else RunSummary()
    return ShardRun(path, key, records, summary, journal.stat().st_mtime, read)


def config_key(key: dict) -> dict:
    return {k: v for k, v in key.items() if k != "shard"}


def check_same_config(runs: list[ShardRun]) -> dict:
    """The common run key (without shard); BadInput naming the keys that differ."""
    ref = config_key(runs[0].key)
    for r in runs[1:]:
        other = config_key(r.key)
        if other != ref:
            diff = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
            detail = "; ".join(f"{k}: {ref.get(k)!r} vs {other.get(k)!r}" for k in diff)
            raise BadInput(f"cannot merge runs of different configs: {runs[0].path} and {r.path} differ in "
                           f"{', '.join(diff)} ({detail})"[:2000])
    return ref


def full_suite(key: dict) -> SuiteSpec:
    """The whole suite the shards were cut from (shard 0/1), rebuilt from the run key."""
    return customize(get_suite(key["suite"]), tasks=key["tasks"], trials=key["trials"], max_steps=key["max_steps"],
                     num_steps_wait=key["num_steps_wait"], replan_steps=key["replan_steps"], seed=key["seed"])


# -- the merge itself (pure logic) --------------------------------------------------------------
@dataclass
class MergedEpisodes:
    records: list[EpisodeRecord]  # one per episode, in suite order
    duplicates: int  # records dropped because the episode was also recorded elsewhere
    missing: list[tuple[int, int]]
    source: dict[tuple[int, int], Path]  # which run each kept record came from


def merge_records(runs: list[ShardRun], wanted: list[tuple[int, int]]) -> MergedEpisodes:
    """One record per wanted episode; later journals (by mtime) override earlier ones."""
    chosen: dict[tuple[int, int], EpisodeRecord] = {}
    source: dict[tuple[int, int], Path] = {}
    seen = 0
    wanted_set = set(wanted)
    for run in sorted(runs, key=lambda r: r.journal_mtime):
        for rec in run.records:
            if rec.key not in wanted_set:
                continue
            seen += 1
            chosen[rec.key] = rec
            source[rec.key] = run.path
    # A journal can also hold several records of one episode: Journal.read keeps the first.
    dup_lines = sum(r.journal.duplicates for r in runs)
    missing = [k for k in wanted if k not in chosen]
    return MergedEpisodes([chosen[k] for k in wanted if k in chosen], (seen - len(chosen)) + dup_lines, missing, source)


def journal_notes(runs: list[ShardRun]) -> list[str]:
    """One note per run whose journal held bad lines or conflicting records (the merge skips, never moves them)."""
    notes = []
    for r in runs:
        for warning in (r.journal.bad_warning(r.path / "episodes.jsonl", None), r.journal.conflict_warning()):
            if warning:
                notes.append(f"{r.path}: {warning}")
    return notes


def _fmt_missing(missing: list[tuple[int, int]]) -> str:
    shown = ", ".join(f"task {t} init {i}" for t, i in missing[:MAX_LISTED])
    more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
    return shown + more


def _shard_latency(r: ShardRun) -> dict:
    lat = r.summary.latency
    kept = (("latency_ms_p50", lat.p50_ms), ("latency_ms_p90", lat.p90_ms), ("latency_ms_p99", lat.p99_ms),
            ("latency_ms_mean", lat.mean_ms), ("calls", lat.calls), ("mean_batch", lat.mean_batch))
    return {"run_dir": str(r.path), **{k: v for k, v in kept if v is not None}}


def merged_latency(runs: list[ShardRun], records: list[EpisodeRecord],
                   notes: list[str]) -> tuple[dict, RunTiming | None]:
    """The pooled latency of the kept episodes' journaled calls (and the timing behind it). Journals of older
    versions hold no calls: then each shard's quantiles are kept and only the mean is merged (said in a note)."""
    if records and all(r.calls is not None for r in records):
        timing = run_timing(records)
        return timing.latency.to_dict(), timing
    if records:
        notes.append(f"latency: {sum(r.calls is None for r in records)} of {len(records)} episodes were journaled "
                     f"without their policy calls (an older evalkit); percentiles are per shard")
    return _shard_means(runs), None


def _shard_means(runs: list[ShardRun]) -> dict:
    """Percentiles cannot be merged without the raw call times: keep each shard's, merge only the mean."""
    shards = [_shard_latency(r) for r in runs]
    with_calls = [s for s in shards if s.get("calls") and s.get("latency_ms_mean") is not None]
    if not with_calls:
        return {}
    calls = sum(s["calls"] for s in with_calls)
    return {"latency_ms_mean": sum(s["latency_ms_mean"] * s["calls"] for s in with_calls) / calls, "calls": calls,
            "source": "calls-weighted mean over shards; percentiles are per shard (raw call times are not kept)",
            "shards": shards}


def wall_span(runs: list[ShardRun]) -> float:
    """First shard start to last shard end (each ends when its summary.json was written)."""
    ends, starts = [], []
    for r in runs:
        p = r.path / "summary.json"
        if p.exists() and r.summary.wall_time_s is not None:
            end = p.stat().st_mtime
            ends.append(end)
            starts.append(end - float(r.summary.wall_time_s))
    return (max(ends) - min(starts)) if ends else 0.0


def _common(values: list, what: str, notes: list[str]):
    """The shards' shared value; if they differ, say so (a note) and record every value."""
    uniq = list(dict.fromkeys(json.dumps(v, sort_keys=True, default=str) for v in values if v is not None))
    if len(uniq) > 1:
        notes.append(f"shards differ in {what}: {' | '.join(uniq)}")
        return "mixed: " + " | ".join(uniq)
    return json.loads(uniq[0]) if uniq else None


# -- writing the merged run ---------------------------------------------------------------------
def prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MERGE_MARKER).exists():
            raise BadInput(f"out={out} exists and is not an earlier merge output; pick an empty or new folder")
        # Re-merging replaces the result: its MLflow state belongs to the old content.
        state = sync_state_path(out)
        if state.exists():
            state.unlink()
    out.mkdir(parents=True, exist_ok=True)


def merge(paths: list[Path], out: Path | None, allow_partial: bool = False) -> tuple[Path, RunSummary]:
    run_dirs = find_runs(paths)
    runs = [read_run(p) for p in run_dirs]
    key = check_same_config(runs)
    spec = full_suite(key)
    wanted = spec.all_episodes()
    m = merge_records(runs, wanted)
    if m.missing and not allow_partial:
        raise BadInput(f"merged runs miss {len(m.missing)} of {len(wanted)} episodes ({_fmt_missing(m.missing)}); "
                       f"run the missing shard(s) or pass allow_partial=true")
    out = Path(out) if out else run_dirs[0].parent / "merged"
    if out.resolve() in run_dirs:
        raise BadInput(f"out={out} is one of the runs being merged")
    prepare_out(out)

    notes: list[str] = journal_notes(runs)
    summaries = [r.summary for r in runs]
    params = summaries[0].params.to_dict() or {"policy": key["policy"].get("name"), "suite": key["suite"]}
    params.pop("shard", None)
    params["git_sha"] = _common([s.params.git_sha for s in summaries], "git_sha", notes)
    versions = _common([s.versions for s in summaries], "package versions", notes)
    device = _common([s.device_name for s in summaries], "device", notes)
    df = episodes_frame(m.records)
    span = wall_span(runs)
    latency, timing = merged_latency(runs, m.records, notes)
    summary = build_summary(
        df, params, spec.protocol(), latency, span,
        extra={
            "git_dirty": any(bool(s.git_dirty) for s in summaries),
            "versions": versions, "device_name": device,
            "backend_report": summaries[0].backend_report,
            "merged_from": [str(r.path) for r in runs],
            "shards": [{"run_dir": str(r.path), "shard": "/".join(map(str, r.key.get("shard", [0, 1]))),
                        "episodes": len(r.records), "wall_time_s": r.summary.wall_time_s,
                        "episodes_per_min": r.summary.episodes_per_min} for r in runs],
            "duplicates_dropped": m.duplicates,
            "missing_episodes": [list(k) for k in m.missing],
            "partial": bool(m.missing),
            "suite_episodes": len(wanted),
            "wall_time_note": "first shard start to last shard end",
            "merge_notes": notes,
        },
    )
    write_results(out, df, summary)
    write_json_atomic(out / "run_key.json", {**key, "shard": [0, 1]}, indent=2)
    # the kept records with their calls: the merged dir's own journal gives the same summary again
    write_text_atomic(out / "episodes.jsonl", "".join(json.dumps(rec.to_dict()) + "\n" for rec in m.records),
                      allow_empty=True)
    if timing is not None:
        write_latency_calls(out, timing.call_s, timing.batch_sizes, warmup_calls=timing.warmup_calls)
    elif (out / LATENCY_CALLS).exists():
        (out / LATENCY_CALLS).unlink()  # an earlier merge's calls do not describe this one
    for name in ("resolved_config.yaml", "backend_report.json"):
        if (runs[0].path / name).exists():
            write_atomic(out / name, lambda tmp, src=runs[0].path / name: shutil.copyfile(src, tmp))
    write_json_atomic(out / MERGE_MARKER, {
        "merged_from": [str(r.path) for r in runs], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": {f"{t}/{i}": str(p) for (t, i), p in m.source.items()}}, indent=2)
    write_merged_bundle(out, runs, summary)
    return out, summary


def write_merged_bundle(out: Path, runs: list[ShardRun], summary: RunSummary) -> RunBundle:
    try:
        first = read_bundle(runs[0].path)
        params, experiment, tags = dict(first.params), first.experiment, dict(first.tags)
    except BadInput:  # a shard that never wrote its bundle: params from the summary alone
        params, experiment, tags = summary.params.to_dict(), "evalkit", {}
    params.pop("shard", None)
    params["git_sha"] = summary.params.git_sha
    params["merged_shards"] = len(runs)
    tags.update({
        "evalkit.run_dir": str(out), "evalkit.role": "merged",
        "evalkit.merged_from": ",".join(str(r.path) for r in runs)[:5000],
        "evalkit.partial": str(summary.partial).lower(),
        "evalkit.git_dirty": str(summary.git_dirty).lower(),
    })
    artifacts = [a for a in ("summary.json", "episodes.csv", "episodes.parquet", "resolved_config.yaml",
                             "backend_report.json", LATENCY_CALLS, MERGE_MARKER) if (out / a).exists()]
    bundle = RunBundle(experiment=experiment, run_name=f"merged {out.name}", params=params,
                       metrics=summary.metrics(), tags=tags, artifacts=artifacts,
                       table="episodes.parquet")
    write_bundle(out, bundle)
    return bundle


def tracking_target(run_dir: Path, uri: str | None) -> tuple[str | None, str]:
    """(uri, why): uri= wins; else the shards' own tracking config; None when they ran offline."""
    if uri:
        return uri, "uri="
    cfg_path = run_dir / "resolved_config.yaml"
    if cfg_path.exists():
        tracking = (yaml.safe_load(cfg_path.read_text()) or {}).get("tracking") or {}
        if str(tracking.get("mode", "online")) == "offline":
            return None, "the shards ran with tracking offline"
        return tracking.get("uri"), "the shards' tracking.uri"
    return None, "no tracking config found"


@dataclass
class MergeOptions:
    runs: list[str] = opt(help="run dirs (or folders above them, e.g. a multirun sweep dir): runs=DIR or runs=[A,B]")
    out: Optional[str] = opt(None, "merged run dir (default: <first run's parent>/merged)")
    uri: Optional[str] = opt(None, "MLflow tracking URI (default: the shards' tracking.uri)")
    allow_partial: bool = opt(False, "merge even if episodes are missing (marked partial)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(MergeOptions, sys.argv[1:] if argv is None else argv, prog="python -m evalkit.merge",
                     about=__doc__.splitlines()[0].split(": ", 1)[1])
        if not args.runs:
            raise BadInput("runs=[...] needs at least one run dir")
        out, summary = merge([Path(r) for r in args.runs], Path(args.out) if args.out else None, args.allow_partial)
    except BadInput as e:
        print(f"evalkit.merge: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    n, k = summary.episodes, summary.successes
    print(f"merged {len(summary.merged_from)} runs -> {out}: {n} of {summary.suite_episodes} episodes, "
          f"success {k}/{n} = {summary.success_rate:.3f} "
          f"[{summary.success_ci_low:.3f}, {summary.success_ci_high:.3f}] (Wilson 95%), "
          f"{summary.duplicates_dropped} duplicate records dropped" + (" (PARTIAL)" if summary.partial else ""))
    for note in summary.merge_notes:
        print(f"note: {note}")
    sync_merged(out, args.uri)
    return 0


def sync_merged(out: Path, uri: str | None) -> str | None:
    from evalkit.tracking.store import reachable, resolve_uri, sync_bundle

    target, why = tracking_target(out, uri)
    if target is None:
        print(f"tracking: {why}; bundle written. Upload with: python -m evalkit.sync runs={out} uri=URI")
        return None
    resolved = resolve_uri(target)
    ok, reason = reachable(resolved)
    if not ok:
        print(f"tracking store {resolved} unreachable ({reason}); upload later: python -m evalkit.sync runs={out} uri={target}")
        return None
    run_id = sync_bundle(out, resolved)
    print(f"MLflow run {run_id} in {resolved}")
    return run_id


if __name__ == "__main__":
    sys.exit(main())
