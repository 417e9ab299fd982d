"""Demonstrations from the scripted expert: `python -m evalkit.demos suite=libero_spatial episodes_per_task=N workers=W out=DIR`.

- Random placements: each attempt resets with `init_state_id=None` and a seed derived from
  (seed, suite, task, attempt), so the demonstrations never use the official evaluation init states.
- Keeps successful episodes only; a failed attempt leaves an empty `*.fail` marker so a resumed run
  neither repeats it nor counts it.
- Resumable: an episode file that exists is skipped (writes are atomic: temp file + rename).
- Parallel: one worker process per task at a time (an env is built once per task), `workers` at once.
- `round_size=K`: fill all tasks to K episodes, then 2K, ... so a run stopped early stays balanced.

Dataset format (one `.npz` per episode, `DIR/task{TT}_ep{AAAA}.npz`, AAAA = attempt index):
    features   float32 [T, D]   reference-policy state features when recorded (evalkit/policies/reference.py;
                                `python -m evalkit.train` recomputes them from p:* and stage:*)
    state      float32 [T, 8]   openpi proprio: eef pos, eef axis-angle, gripper qpos
    actions    float32 [T, 7]   the action executed after observing step t (OSC delta pose + gripper)
    instruction, suite, task_id, seed, obj, target (0-d string/int arrays)
    p:<key>    float32 [T, ...] every raw privileged LIBERO observation array (to re-featurize later)
    agentview, wrist  uint8 [T, S, S, 3]  (images=true only) the views as the policy sees them (rotated,
                                resized with padding to the suite's image_size); such files are stored uncompressed
    stage:<k>  [T, ...]         the expert's stage when it planned the step's chunk: skill, skill_index, phase,
                                phase_index, obj, target (strings/ints) and command (pose target xyz, quat xyzw, grip)
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from evalkit.cli_args import parse
from evalkit.errors import BadInput


@dataclass
class DemoConfig:
    suite: str = "libero_spatial"  # a suite name (suites/specs.py)
    episodes_per_task: int = 20  # successful episodes to keep per task
    workers: int = 1  # worker processes (one task each at a time)
    out: str = ""  # output folder (default data/demos/<suite>)
    tasks: tuple[int, ...] | None = None  # task ids, e.g. [1,3] (null: all of the suite's tasks)
    seed: int = 100_000  # demo seed namespace (evaluation uses the official init states)
    max_attempts_factor: float = 2.0  # give up on a task after this many attempts per wanted episode
    round_size: int = 0  # >0: fill every task up to k*round_size episodes, round by round (a run stopped early stays balanced)
    images: bool = False  # also record both camera views (policy=reference_vision's data; an EGL GPU box renders fast)


def demo_seed(base: int, libero_name: str, task_id: int, attempt: int) -> int:
    return zlib.crc32(f"demos/{base}/{libero_name}/{task_id}/{attempt}".encode()) & 0x7FFFFFFF


def episode_path(out: Path, task_id: int, attempt: int, failed: bool = False) -> Path:
    return out / f"task{task_id:02d}_ep{attempt:04d}.{'fail' if failed else 'npz'}"


def scan(out: Path, task_id: int) -> tuple[set[int], set[int]]:
    """(successful attempts, failed attempts) already on disk for a task."""
    ok, bad = set(), set()
    for p in out.glob(f"task{task_id:02d}_ep*.*"):
        try:
            a = int(p.stem.split("_ep")[1])
        except (IndexError, ValueError):
            continue
        if p.suffix == ".npz":
            ok.add(a)
        elif p.suffix == ".fail":
            bad.add(a)
    return ok, bad


def attempts_to_run(out: Path, task_id: int, wanted: int, max_attempts: int) -> list[int]:
    """Attempt indices still needed to reach `wanted` successes (in order), given what is on disk."""
    ok, bad = scan(out, task_id)
    need = wanted - len(ok)
    todo, a = [], 0
    while need > 0 and a < max_attempts:
        if a not in ok and a not in bad:
            todo.append(a)
            need -= 1  # optimistic: a failure is topped up by the next call's loop
        a += 1
    return todo


def write_episode(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    # camera frames barely compress and zlib would cost more than rendering them: such episodes are stored plain
    (np.savez if "agentview" in arrays else np.savez_compressed)(tmp, **arrays)
    os.replace(tmp, path)


def record_episode(env, policy, seed: int) -> tuple[bool, dict[str, np.ndarray]]:
    """One scripted episode under the evaluation protocol (replan every `replan_steps` actions)."""
    from evalkit.policies.base import ObsBatch
    from evalkit.policies.reference import planner_features, stage_of

    spec = env.spec
    obs = env.reset(None, seed=seed)
    policy.reset(obs.episode_key)
    feats, states, acts, privs, stages = [], [], [], [], []
    views: dict[str, list[np.ndarray]] = {c: [] for c in env.cameras}
    ok = False
    steps = 0
    obj = target = ""
    while steps < spec.max_steps and not ok:
        chunk = policy.predict(ObsBatch([obs]))[0]
        plan = policy.plans[obs.episode_key]
        obj, target = plan.obj, plan.target
        stage = stage_of(plan, plan.last_command)
        for a in chunk[: spec.replan_steps]:
            feats.append(planner_features(obs.privileged, stage))
            stages.append(stage_arrays(plan, stage))
            for c, frames in views.items():
                frames.append(getattr(obs, c))
            states.append(obs.state)
            privs.append(obs.privileged)
            acts.append(a)
            obs, ok = env.step(a)
            steps += 1
            if ok or steps >= spec.max_steps:
                break
    arrays = {
        "features": np.stack(feats).astype(np.float32),
        "state": np.stack(states).astype(np.float32),
        "actions": np.stack(acts).astype(np.float32),
        "instruction": np.array(env.language),
        "suite": np.array(spec.libero_name),
        "task_id": np.array(env.task_id),
        "seed": np.array(seed),
        "obj": np.array(obj),
        "target": np.array(target),
    }
    for k in privs[0]:
        arrays[f"p:{k}"] = np.stack([p[k] for p in privs]).astype(np.float32)
    for c, frames in views.items():
        arrays[c] = np.stack(frames).astype(np.uint8)
    for k in stages[0]:
        arrays[f"stage:{k}"] = np.stack([np.asarray(st[k]) for st in stages])
    return ok, arrays


def stage_arrays(plan, stage) -> dict[str, np.ndarray]:
    """Where the scripted expert is when it plans a chunk: its skill (kind, index, phase) and what the skill
    handles (per step, since a multi-skill task changes object), plus the pose target it steers to."""
    from evalkit.policies.reference import stage_context

    named = {k.removeprefix("stage:"): v for k, v in stage_context(stage).items()}  # what the reference reads back
    return {**named, "skill_index": np.array(plan.index, np.int16), "phase": np.array(plan.current.phase_name)}


def run_task(args: tuple[DemoConfig, int, int]) -> dict:
    cfg, task_id, wanted = args
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    from evalkit.policies.scripted import ScriptedPolicy
    from evalkit.suites.env import LiberoEnv
    from evalkit.suites.specs import get_suite

    spec = get_suite(cfg.suite)
    out = Path(cfg.out)
    max_attempts = int(np.ceil(wanted * cfg.max_attempts_factor))
    policy = ScriptedPolicy()
    env = None
    t0 = time.time()
    while True:
        todo = attempts_to_run(out, task_id, wanted, max_attempts)
        if not todo:
            break
        if env is None:
            env = LiberoEnv(spec, task_id, render=cfg.images, privileged=True)
        for a in todo:
            seed = demo_seed(cfg.seed, spec.libero_name, task_id, a)
            ok, arrays = record_episode(env, policy, seed)
            if ok:
                write_episode(episode_path(out, task_id, a), arrays)
            else:
                episode_path(out, task_id, a, failed=True).touch()
    if env is not None:
        env.close()
    ok, bad = scan(out, task_id)
    return {"task": task_id, "ok": len(ok), "failed": len(bad), "seconds": round(time.time() - t0, 1)}


def parse_args(argv: list[str]) -> DemoConfig:
    cfg = parse(DemoConfig, argv, prog="python -m evalkit.demos",
                about="demonstrations from the scripted expert (successful episodes, random placements)")
    if cfg.tasks is not None:
        cfg.tasks = tuple(cfg.tasks)  # OmegaConf gives a list
    if cfg.episodes_per_task < 1 or cfg.workers < 1:
        raise BadInput("episodes_per_task and workers must be >= 1")
    if not cfg.out:
        cfg.out = f"data/demos/{cfg.suite}"
    return cfg


def main(argv: list[str] | None = None) -> int:
    from evalkit.suites.specs import get_suite

    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    spec = get_suite(cfg.suite)
    tasks = cfg.tasks if cfg.tasks is not None else spec.task_ids
    bad = [t for t in tasks if not 0 <= t < spec.num_tasks]
    if bad:
        raise BadInput(f"tasks {bad} out of range for {spec.libero_name} (0..{spec.num_tasks - 1})")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    step = cfg.round_size if cfg.round_size > 0 else cfg.episodes_per_task
    targets = list(range(step, cfg.episodes_per_task, step)) + [cfg.episodes_per_task]
    pool = get_context("spawn").Pool(cfg.workers) if cfg.workers > 1 else None
    try:
        for wanted in targets:
            jobs = [(cfg, t, wanted) for t in tasks]
            results = pool.imap_unordered(run_task, jobs) if pool else map(run_task, jobs)
            total = 0
            for r in results:
                total += r["ok"]
                print(f"{cfg.suite} task {r['task']}: {r['ok']}/{wanted} episodes kept, {r['failed']} failed attempts, "
                      f"{r['seconds']} s", flush=True)
            print(f"{total} episodes in {cfg.out}", flush=True)
    finally:
        if pool:
            pool.close()
    return 0


if __name__ == "__main__":
    from evalkit.errors import exit_with

    exit_with(main)
