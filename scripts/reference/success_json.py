"""The reference policies' success rates as one result file and the Markdown table the docs paste.

    python scripts/reference/success_json.py out=bench/results/reference_success.json \
        runs=[/tmp/fresh_runs/libero_spatial,...] command="python -m evalkit ..." machine="2-core CPU ..."

Each run directory is a finished `python -m evalkit` run (its summary.json): totals, Wilson interval, per-task
successes, device, versions, commit. The table is printed from the file written, so the two cannot drift.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from evalkit.atomic import write_json_atomic  # noqa: E402
from evalkit.cli_args import parse  # noqa: E402


@dataclass
class Options:
    runs: list[str] = field(default_factory=list)  # run directories, one per suite
    out: str = "bench/results/reference_success.json"
    command: str = ""  # the command the runs were made with (<suite> for the suite)
    machine: str = ""  # where they ran, in words


def row(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    per_task = sorted(s["per_task"].values(), key=lambda t: t["task_id"])
    return {
        "suite": s["params"]["suite"], "policy": s["params"]["policy"], "backend": s["params"]["backend"],
        "successes": s["successes"], "episodes": s["episodes"], "rate": s["success_rate"],
        "wilson95": [s["success_ci_low"], s["success_ci_high"]],
        "per_task": {t["task_id"]: [t["successes"], t["episodes"]] for t in per_task},
        "denoise_steps": s["params"].get("denoise_steps"),
        "latency_ms_p50": (s.get("latency") or {}).get("latency_ms_p50"),
        "latency_ms_p90": (s.get("latency") or {}).get("latency_ms_p90"),
        "mean_batch": (s.get("latency") or {}).get("mean_batch"),
        "failure_reasons": s.get("failure_reasons"), "wall_time_s": s.get("wall_time_s"),
        "device": s.get("device_name"), "git_sha": s["params"].get("git_sha"), "git_dirty": s.get("git_dirty"),
        "versions": s.get("versions"),
    }


def table(doc: dict) -> str:
    lines = ["| suite | success | 95% Wilson | per task (successes, tasks 0–9) |", "| --- | --- | --- | --- |"]
    for r in doc["suites"]:
        lo, hi = r["wilson95"]
        tasks = ", ".join(str(v[0]) for v in r["per_task"].values())
        lines.append(f"| {r['suite']} | **{100 * r['rate']:.1f} %** ({r['successes']}/{r['episodes']}) "
                     f"| [{100 * lo:.1f}, {100 * hi:.1f}] | {tasks} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    opts = parse(Options, argv, prog="python scripts/reference/success_json.py",
                 about="success rates of finished runs -> one JSON + a Markdown table")
    doc = {"command": opts.command, "machine": opts.machine, "suites": [row(Path(r)) for r in opts.runs]}
    write_json_atomic(Path(opts.out), doc, indent=1)
    print(table(json.loads(Path(opts.out).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
