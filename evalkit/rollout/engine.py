"""Rollout engine: N worker processes step LIBERO envs; the main process batches policy calls.

Written here rather than with a library: the policy must stay in the main process (one model,
one GPU) while envs run in parallel, and each episode must be journaled the moment it ends.

Loop: workers that wait for actions are served by ONE `policy.predict` call at once, unless a worker
still stepping an action chunk is due (by the running average of a chunk's time) before the oldest
waiter has waited `batch_window_ms` or one policy call's time, whichever is shorter: a bounded
batching window, no lock-step barrier, and a worker building or resetting its env never holds the
others back. Episodes are handed out so that envs live long (evalkit/rollout/schedule.py). Finished
episodes go to the journal; a worker that dies is replaced and its episode recorded as failed with
the reason (unless SIGTERM/SIGINT ended it: that stops the run, evalkit.errors.Interrupted, and the
episode runs again on resume).

Each engine run is one session (an id that sorts by start time). Every record is journaled with its session,
the time since the session started, and the policy calls that served it (`PolicyCall`, numbered within the
session); a batched call that served several episodes is stored in each of their records and counted once by
its (session, number) when the latency is summarized (evalkit.results.timing). `RolloutResult.stats()` says
where the workers' time went (batch sizes, waiting, idle share, env builds and resets).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import uuid
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_connections
from typing import Callable

import numpy as np

from evalkit.errors import Interrupted
from evalkit.policies.base import ObsBatch, Observation, policy_cameras
from evalkit.rollout.journal import Journal
from evalkit.rollout.records import EXCEPTION, EpisodeRecord, PolicyCall, episode_costs
from evalkit.rollout.schedule import EpisodeQueue
from evalkit.rollout.worker import EpisodeRunner, EpisodeSpec, worker_main
from evalkit.suites.specs import SuiteSpec


@dataclass
class RolloutOptions:
    workers: int = 2  # 0: run envs in this process (debugging, tests)
    video_mode: str = "failures"  # none | failures | all
    videos_per_task: int = 5
    video_dir: str | None = None
    # Optional per-stage timer (evalkit.latency.timer.StageTimer): passed to `policy.predict(batch, timer=...)`
    stage_timer: object | None = None
    # Optional stop rule (e.g. evalkit.gate.sequential.sequential_stop_rule): called with every finished record
    # once before scheduling (resumed ones) and after each episode; once it returns a reason, no new episode
    # starts, the ones in flight finish and are kept.
    stop_rule: Callable[[list[EpisodeRecord]], str | None] | None = None
    # "task": each task's episodes together (env reuse). "interleave": round by round, every task's init state 0,
    # then 1, ... (a worker still prefers its current task within the oldest round): what a sequential stop rule
    # needs for early rounds to stand for the whole suite.
    order: str = "task"
    # Longest a waiting worker waits for stepping workers to join its batch (ms). The wait is also capped by how
    # long a policy call takes (running average): waiting longer than a call would save costs more than it
    # saves, so a cheap policy is served at once. 0: serve whoever waits at once (batches still form while a
    # call runs).
    batch_window_ms: float = 50.0


@dataclass
class RolloutResult:
    records: list[EpisodeRecord]
    policy_call_s: list[float] = field(default_factory=list)  # wall time of each batched predict
    policy_batch_sizes: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    resumed: int = 0  # episodes taken from the journal
    stage_ms: list[dict[str, list[float]]] = field(default_factory=list)  # per call: stage -> ms of each occurrence
    stop_reason: str | None = None  # why the stop rule ended the run early (None: every episode ran)
    not_run: int = 0  # episodes never started because of the stop rule
    session: str = ""  # this engine run's id, stored in the records it journaled
    batch_wait_ms: list[float] = field(default_factory=list)  # per call: how long its first observation waited
    workers: int = 0
    busy_s: float = 0.0  # worker-seconds spent building, resetting and stepping (the rest waited or had no work)

    def stats(self) -> dict:
        """Where the workers' time went in this session (episodes journaled here, not resumed ones)."""
        new = [r for r in self.records if r.session == self.session]
        sizes, waits = np.asarray(self.policy_batch_sizes or [0]), np.asarray(self.batch_wait_ms or [0.0])
        capacity = self.workers * self.wall_s
        return {
            "episodes": len(new), "workers": self.workers, "wall_s": round(self.wall_s, 3),
            "episodes_per_min": round(len(new) / self.wall_s * 60.0, 2) if self.wall_s > 0 else None,
            "policy_calls": len(self.policy_call_s),
            "batch_mean": round(float(sizes.mean()), 2), "batch_max": int(sizes.max()),
            "batch_wait_ms_p50": round(float(np.median(waits)), 2),
            "batch_wait_ms_p95": round(float(np.percentile(waits, 95)), 2),
            "policy_share": round(sum(self.policy_call_s) / self.wall_s, 4) if self.wall_s > 0 else None,
            "idle_share": round(1.0 - self.busy_s / capacity, 4) if capacity > 0 else None,
            **episode_costs(new),
        }


class _LocalWorker:
    """Same interface as a process worker, runs in this process (workers=0)."""

    def __init__(self, spec: SuiteSpec):
        self.runner = EpisodeRunner(spec)
        self._reply = None
        self.conn = None

    def send(self, msg):
        self._reply = self.runner.handle(msg)

    def ready(self) -> bool:
        return self._reply is not None

    def recv(self):
        r, self._reply = self._reply, None
        return r

    def alive(self) -> bool:
        return True

    def exitcode(self):
        return None

    def close(self):
        self.runner.close()

    terminate = close


# MuJoCo steps on one thread; math-library pools sized to every core in every worker only fight
# each other (16 workers x 16 BLAS threads on the GPU machine). Workers get one thread each.
WORKER_THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                      "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}


@contextmanager
def worker_environment():
    """Environment a spawned worker starts with (a child copies os.environ when it starts)."""
    saved = {k: os.environ.get(k) for k in WORKER_THREAD_ENV}
    os.environ.update({k: os.environ.get(k, v) for k, v in WORKER_THREAD_ENV.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _ProcessWorker:
    def __init__(self, spec: SuiteSpec, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
        with worker_environment():
            self.proc.start()
        child.close()

    def send(self, msg):
        try:
            self.conn.send(msg)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker died: the loop's liveness check records it (or stops the run if it was signalled)

    def ready(self) -> bool:
        return self.conn.poll()

    def recv(self):
        return self.conn.recv()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def exitcode(self):
        return self.proc.exitcode

    def close(self):
        try:
            self.conn.send(("close",))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()

    def terminate(self):
        """Stop now, abandoning the episode in flight (an interrupted run resumes it)."""
        self.proc.terminate()
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)


@dataclass
class _Slot:
    """One worker and the episode it is running."""

    worker: object
    ep: EpisodeSpec | None = None
    state: str = "idle"  # idle | setup (building/resetting its env) | stepping (an action chunk) | waiting
    obs: Observation | None = None
    env_task: int | None = None  # the task whose env the worker holds (after its first episode of it)
    since: float = 0.0  # when the current state began (busy time and batch waits are measured from it)
    calls: int = 0
    policy_s: float = 0.0
    t_start: float = 0.0
    served: list[PolicyCall] = field(default_factory=list)  # the policy calls of the current episode


def _new_session_id() -> str:
    """Unique, and sorting by it sorts sessions by start time."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def run_rollouts(
    policy,
    spec: SuiteSpec,
    journal: Journal,
    options: RolloutOptions,
    on_record: Callable[[EpisodeRecord], None] | None = None,
) -> RolloutResult:
    """Run every episode of `spec` not already in `journal`; return all records (old + new)."""
    t0 = time.perf_counter()
    done = {r.key: r for r in journal.recover().records if r.suite == spec.name}
    wanted = spec.episodes()
    done = {k: r for k, r in done.items() if k in set(wanted)}
    resumed = len(done)
    queue = EpisodeQueue([k for k in wanted if k not in done], options.order)
    videos_used: dict[int, int] = {}
    for r in done.values():
        if r.video_path:
            videos_used[r.task_id] = videos_used.get(r.task_id, 0) + 1

    result = RolloutResult(records=[], resumed=resumed, session=_new_session_id())
    if options.stop_rule is not None and done:
        result.stop_reason = options.stop_rule(list(done.values()))
    if result.stop_reason:
        result.not_run = len(queue)
        queue.clear()
    n_workers = min(options.workers, len(queue)) if options.workers > 0 else 1
    ctx = mp.get_context("spawn")  # fork + an initialised torch/OpenGL parent is not safe
    make = (lambda: _LocalWorker(spec)) if options.workers == 0 else (lambda: _ProcessWorker(spec, ctx))
    slots = [_Slot(make()) for _ in range(n_workers)] if len(queue) else []
    result.workers = len(slots)
    cameras = policy_cameras(policy)
    cap_s = max(0.0, options.batch_window_ms) / 1e3
    call_s: list[float | None] = [None]  # running average of a policy call's wall time (the window never exceeds it)
    chunk_s: list[float | None] = [None]  # running average of a worker's action chunk (when the next one is due)

    def enter(slot: _Slot, state: str) -> None:
        """Change state; the time spent setting up or stepping counts as the worker's busy time."""
        now = time.perf_counter()
        if slot.state in ("setup", "stepping"):
            result.busy_s += now - slot.since
        if slot.state == "stepping" and state == "waiting":  # a whole action chunk: how long one takes
            chunk_s[0] = now - slot.since if chunk_s[0] is None else chunk_s[0] + 0.2 * (now - slot.since - chunk_s[0])
        slot.state, slot.since = state, now

    def start(slot: _Slot) -> None:
        holders = Counter(s.env_task for s in slots if s is not slot and s.env_task is not None)
        item = None if result.stop_reason else queue.pop_for(slot.env_task, holders)
        if item is None:
            slot.ep = None
            enter(slot, "idle")
            return
        task_id, init_id = item
        allowed = videos_used.get(task_id, 0) < options.videos_per_task
        slot.ep = EpisodeSpec(
            task_id=task_id,
            init_state_id=init_id,
            seed=spec.episode_seed(task_id, init_id),
            render=bool(cameras),
            cameras=cameras,
            privileged=bool(getattr(policy, "needs_privileged", False)),
            video_mode=options.video_mode,
            video_allowed=allowed,
            video_dir=options.video_dir,
        )
        slot.calls, slot.policy_s, slot.t_start, slot.served = 0, 0.0, time.perf_counter(), []
        slot.env_task = task_id
        enter(slot, "setup")
        slot.worker.send(("start", slot.ep))

    def finish(slot: _Slot, rec: EpisodeRecord) -> None:
        if rec.video_path:
            videos_used[rec.task_id] = videos_used.get(rec.task_id, 0) + 1
        rec.session, rec.calls = result.session, list(slot.served)
        rec.session_s = time.perf_counter() - t0
        journal.append(rec)
        done[rec.key] = rec
        if on_record:
            on_record(rec)
        if options.stop_rule is not None and not result.stop_reason:
            result.stop_reason = options.stop_rule(list(done.values()))
            if result.stop_reason:
                result.not_run = len(queue)
        start(slot)

    def crash_record(slot: _Slot, reason: str) -> EpisodeRecord:
        ep = slot.ep
        return EpisodeRecord(
            suite=spec.name, task_id=ep.task_id, task_name="", init_state_id=ep.init_state_id, seed=ep.seed,
            success=False, steps=0, failure_reason=f"{EXCEPTION}: {reason}"[:500],
            wall_time_s=time.perf_counter() - slot.t_start, policy_time_s=slot.policy_s, policy_calls=slot.calls,
        )

    def handle_reply(slot: _Slot, reply) -> None:
        kind = reply[0]
        if kind == "obs":
            obs: Observation = reply[1]
            if slot.calls == 0:
                policy.reset(obs.episode_key)
            obs.noise_seed = (slot.ep.seed * 1_000_003 + slot.calls) & 0x7FFFFFFF
            slot.obs = obs
            enter(slot, "waiting")
        elif kind == "done":
            enter(slot, "idle")
            finish(slot, reply[1])
        else:  # "error": a bug in the worker itself, not in the env
            enter(slot, "idle")
            finish(slot, crash_record(slot, f"worker error: {reply[1].strip().splitlines()[-1]}"))

    try:
        for s in slots:
            start(s)
        while any(s.state != "idle" for s in slots):
            busy = [s for s in slots if s.state in ("setup", "stepping")]
            waiting = [s for s in slots if s.state == "waiting"]
            timeout = 1.0
            if waiting:
                # Serve now unless a worker mid-chunk is due to join before the window closes (a worker in set-up
                # may take seconds: it never holds others back); the window is the oldest waiter's.
                now = time.perf_counter()
                waited = now - min(s.since for s in waiting)
                window_s = min(cap_s, call_s[0] or 0.0)  # before the first call: no window
                stepping = [s for s in slots if s.state == "stepping"]
                due = min((s.since + chunk_s[0] - now for s in stepping), default=None) if chunk_s[0] else 0.0
                if not stepping or waited >= window_s or (due is not None and due > window_s - waited):
                    _serve_policy(policy, waiting, result, options.stage_timer, waited)
                    last = result.policy_call_s[-1]
                    call_s[0] = last if call_s[0] is None else call_s[0] + 0.2 * (last - call_s[0])
                    for s in waiting:
                        enter(s, "stepping")
                    continue
                timeout = window_s - waited
            # Wait for any busy worker to answer (or die), at most until the window closes.
            conns = [s.worker.conn for s in busy if s.worker.conn is not None]
            if conns:
                wait_connections(conns, timeout=timeout)
            for s in busy:
                if s.worker.ready():
                    try:
                        reply = s.worker.recv()
                    except (EOFError, OSError):
                        reply = None
                    if reply is not None:
                        handle_reply(s, reply)
                        continue
                if not s.worker.alive():
                    code = s.worker.exitcode()
                    if code in (-signal.SIGTERM, -signal.SIGINT):  # stopped, not crashed: no result to record
                        raise Interrupted(-code)
                    rec = crash_record(s, f"worker process died (exit code {code})")
                    s.worker, s.env_task = make(), None
                    enter(s, "idle")
                    finish(s, rec)
    except BaseException:  # interrupted (or a bug): abandon the episodes in flight, stop the workers now
        for s in slots:
            s.worker.terminate()
        raise
    for s in slots:
        s.worker.close()

    result.records = [done[k] for k in wanted if k in done]
    result.wall_s = time.perf_counter() - t0
    return result


def _serve_policy(policy, waiting: list[_Slot], result: RolloutResult, timer=None, waited_s: float = 0.0) -> None:
    batch = ObsBatch([s.obs for s in waiting])
    t = time.perf_counter()
    try:
        if timer is not None:
            timer.begin_call()
            actions = np.asarray(policy.predict(batch, timer=timer))
            result.stage_ms.append(timer.end_call())
        else:
            actions = np.asarray(policy.predict(batch))
        if actions.ndim != 3 or actions.shape[0] != len(waiting) or actions.shape[2] != 7:
            raise ValueError(f"policy returned actions of shape {actions.shape}, expected [{len(waiting)}, H, 7]")
        error = None
    except Exception as e:  # a policy crash fails these episodes, not the run
        actions, error = None, f"policy error: {type(e).__name__}: {e}"
    dt = time.perf_counter() - t
    call = PolicyCall(n=len(result.policy_call_s), s=dt, batch=len(waiting),
                      stage_ms=result.stage_ms[-1] if timer is not None and error is None else None)
    result.policy_call_s.append(dt)
    result.policy_batch_sizes.append(len(waiting))
    result.batch_wait_ms.append(waited_s * 1e3)
    for i, s in enumerate(waiting):
        s.served.append(call)
        s.calls += 1
        s.policy_s += dt
        s.obs = None
        if error is None:
            s.worker.send(("act", actions[i], dt))
        else:
            s.worker.send(("abort", error[:500]))
