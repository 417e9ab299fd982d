"""How long the fidelity gate takes to stop a broken backend, and what it says: every fault backend (and a few
healthy ones) through the real CLI, `python -m evalkit policy=reference backend=<b>`, on a warm probe cache.

Prints a table (backend, exit code, wall seconds, checks that failed, first divergent layer) and writes
bench/results/fidelity_gate.json with the machine, versions and command. Wall time includes the interpreter start,
imports and MLflow-free bookkeeping (tracking=offline): what a user waits for.

    python bench/fidelity_gate.py [--backends fault_layer_order,int8] [--out bench/results/fidelity_gate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evalkit.backends.registry import BACKENDS  # noqa: E402

from evalkit.provenance import git_sha, package_versions  # noqa: E402

HEALTHY = ["bf16", "int8", "int4"]


def run_one(backend: str, workdir: Path) -> dict:
    run_dir = workdir / backend
    cmd = [sys.executable, "-m", "evalkit", "policy=reference", f"backend={backend}", "suite=libero_spatial_quick",
           "tracking=offline", "quiet=true", "video=none", "suite.max_steps=1", "suite.trials=1", "suite.tasks=[0]",
           "workers=0", f"hydra.run.dir={run_dir}"]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "MUJOCO_GL": "osmesa"})
    wall = time.perf_counter() - t
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    fid = summary.get("fidelity") or {}
    return {"backend": backend, "exit_code": p.returncode, "wall_s": round(wall, 1),
            "failed_checks": fid.get("failed", []), "first_divergent_layer": fid.get("first_divergent_layer"),
            "precision_class": fid.get("precision_class"), "episodes": summary.get("episodes")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    faults = sorted(b for b in BACKENDS if b.startswith("fault_"))
    ap.add_argument("--backends", default=",".join(HEALTHY + faults))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "fidelity_gate.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_one("bf16", Path(tmp))  # warms the probe cache: the timings below are with a warm cache
        for b in args.backends.split(","):
            rows.append(run_one(b, Path(tmp)))
            r = rows[-1]
            print(f"{r['backend']:28s} exit {r['exit_code']}  {r['wall_s']:6.1f} s  "
                  f"{','.join(r['failed_checks']) or '-':60s} {r['first_divergent_layer'] or ''}", flush=True)
    sha, dirty = git_sha()
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.node(),
           "cpu_count": os.cpu_count(), "device": "cpu", "code_commit": sha, "dirty": dirty,
           "versions": package_versions(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
