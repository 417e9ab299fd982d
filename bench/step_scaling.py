"""How an env step's cost grows with the number of processes stepping at once: the machine's ceiling for rollouts.

    python bench/step_scaling.py                                   # 1 and 2 processes, state-only
    python bench/step_scaling.py procs=[1,4,8,12,16] steps=200 out=$OUT/step_scaling.json

For each N in `procs`, N processes each build a state-only env of one task (task i mod 10 of the suite), reset it,
wait at a barrier, then all take `steps` still steps at once (`observe=False`, as inside a chunk). Per N: the
median of the processes' ms per step, and the aggregate steps per second (N / that). No policy, no engine: the
episodes/min any policy can reach with N workers is bounded by steps/s over its mean steps per episode. The CPU
topology (`lscpu`: threads per core) goes into the JSON, since 16 logical CPUs may be 8 cores.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

os.environ.setdefault("MUJOCO_GL", "osmesa")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evalkit.cli_args import opt, parse  # noqa: E402

@dataclass
class Options:
    suite: str = opt("libero_spatial", "LIBERO suite")
    procs: list[int] = opt([1, 2], "process counts, one measurement each")
    steps: int = opt(100, "timed steps per process")
    render: bool = opt(False, "rendered envs (both cameras, every step observed) instead of state-only")
    out: Optional[str] = opt(None, "JSON path (default bench/results/step_scaling_<cpu|gpu>.json)")


def _stepper(args) -> float:
    suite, task, steps, render, barrier = args
    from evalkit.suites.env import SETTLE_ACTION, LiberoEnv
    from evalkit.suites.specs import get_suite

    env = LiberoEnv(get_suite(suite), task, render=render, privileged=False)
    try:
        env.reset(0)
        barrier.wait()
        t = time.perf_counter()
        for _ in range(steps):
            env.step(SETTLE_ACTION, observe=render)  # the still robot of the settle steps
        return (time.perf_counter() - t) * 1000 / steps
    finally:
        env.close()


def measure(o: Options, n: int) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ctx.Pool(n) as pool:
            ms = pool.map(_stepper, [(o.suite, i % 10, o.steps, o.render, barrier) for i in range(n)])
    med = statistics.median(ms)
    return {"procs": n, "ms_per_step_median": round(med, 2), "ms_per_step_min": round(min(ms), 2),
            "ms_per_step_max": round(max(ms), 2), "steps_per_s": round(n * 1000 / med, 1)}


def _lscpu() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "NUMA node(s)")
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)
            if k.strip() in keep}


def main(argv: list[str] | None = None) -> None:
    o = parse(Options, sys.argv[1:] if argv is None else argv, prog="python bench/step_scaling.py",
              about=__doc__.splitlines()[0])
    from evalkit.config import resolve_device
    from evalkit.provenance import device_name, package_versions

    rows = []
    for n in o.procs:
        rows.append(measure(o, n))
        r = rows[-1]
        print(f"{n:3d} procs: {r['ms_per_step_median']:6.1f} ms/step (min {r['ms_per_step_min']}, "
              f"max {r['ms_per_step_max']}), {r['steps_per_s']:7.1f} steps/s", flush=True)
    device = resolve_device("auto")  # names the machine (and the default file) as bench/throughput.py does
    kind = "gpu" if device.startswith("cuda") else "cpu"
    out = Path(o.out or REPO / "bench" / "results" / f"step_scaling_{kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "step_scaling",
        "command": " ".join(["python", "bench/step_scaling.py", *(argv or sys.argv[1:])]),
        "device": device_name(device), "host": platform.node(), "cpu_count": os.cpu_count(), "lscpu": _lscpu(),
        "versions": package_versions(),
        "env": {"MUJOCO_GL": os.environ.get("MUJOCO_GL")}, "options": asdict(o), "rows": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
