"""The worker side of a rollout: owns one LIBERO env at a time and runs episodes on command.

Protocol (messages are tuples; replies too):
  ("start", EpisodeSpec)            -> ("obs", Observation) | ("done", EpisodeRecord)
  ("act", actions[H,7], policy_s)   -> ("obs", Observation) | ("done", EpisodeRecord)
  ("abort", reason)                 -> ("done", EpisodeRecord)   (the policy crashed on this episode)
  ("close",)                        -> process exits
`EpisodeRunner.handle` is the whole logic; `worker_main` wraps it in a process loop, and the
engine can also call it in-process (workers=0) for debugging and tests.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evalkit.atomic import write_atomic
from evalkit.policies.base import CAMERAS
from evalkit.rollout.records import EXCEPTION, NAN_ACTION, TIMEOUT, EpisodeRecord
from evalkit.suites.specs import SuiteSpec


@dataclass
class EpisodeSpec:
    task_id: int
    init_state_id: int
    seed: int
    render: bool  # the policy needs camera images
    privileged: bool  # the policy needs simulator object poses
    video_mode: str  # "none" | "failures" | "all"
    video_allowed: bool  # the per-task video budget is not spent yet
    video_dir: str | None
    cameras: tuple[str, ...] = CAMERAS  # the views rendered when `render` (policy_cameras)


def _short_error(e: BaseException) -> str:
    return f"{EXCEPTION}: {type(e).__name__}: {e}"[:500]


class EpisodeRunner:
    def __init__(self, spec: SuiteSpec):
        self.spec = spec
        self.env = None
        self.env_key: tuple | None = None
        self.ep: EpisodeSpec | None = None
        self.builds = 0  # envs built by this runner (a new task, or a rebuild after a crash)
        # the current episode's set-up, for its record
        self.env_built: bool | None = None
        self.setup_s: float | None = None
        self.reset_kind: str | None = None

    # -- message handling -------------------------------------------------------------------
    def handle(self, msg: tuple):
        kind = msg[0]
        if kind == "start":
            return self._start(msg[1])
        if kind == "act":
            return self._act(msg[1], msg[2])
        if kind == "abort":  # the policy failed on this episode's observation
            return ("done", self._record(False, f"{EXCEPTION}: {msg[1]}"))
        raise ValueError(f"unknown worker message {kind!r}")

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    # -- episode lifecycle ------------------------------------------------------------------
    def _env_for(self, task_id: int, render: bool, cameras: tuple[str, ...], privileged: bool):
        from evalkit.suites.env import LiberoEnv

        # privileged only for policies that read it: gathering the scene state costs ~10 ms per step
        key = (task_id, render, cameras, privileged)
        if self.env is None or self.env_key != key:
            self.close()
            self.env = LiberoEnv(self.spec, task_id, render=render, privileged=privileged, cameras=cameras)
            self.env_key = key
            self.builds += 1
        return self.env

    def _start(self, ep: EpisodeSpec):
        self.ep = ep
        self.t0 = time.perf_counter()
        self.policy_s = 0.0
        self.policy_calls = 0
        self.actions: list[np.ndarray] = []
        self.frames: list[np.ndarray] = []
        self.task_name, self.instruction = "", ""
        self.env_built, self.setup_s, self.reset_kind = False, None, None
        builds = self.builds
        try:
            env = self._env_for(ep.task_id, ep.render, ep.cameras, ep.privileged)
            self.env_built = self.builds > builds
            self.task_name, self.instruction = env.info.name, env.language
            obs = env.reset(ep.init_state_id, ep.seed)
        except Exception as e:
            return self._crashed(e)
        self.setup_s = time.perf_counter() - self.t0
        self.reset_kind = env.last_reset_kind
        self._keep_frame(obs)
        return self._reply(obs)

    def _act(self, actions: np.ndarray, policy_s: float):
        env = self.env
        self.policy_s += policy_s
        self.policy_calls += 1
        actions = np.asarray(actions)
        if len(actions) == 0:
            return ("done", self._record(False, f"{EXCEPTION}: policy returned an empty action chunk"))
        try:
            chunk = actions[: self.spec.replan_steps]
            # the full observation (images, scene state) only where it is read: the chunk's last step, or every
            # step whose frame goes into a video
            filming = self.ep.render and self.ep.video_mode != "none"
            for k, a in enumerate(chunk):
                if not np.all(np.isfinite(a)):
                    return ("done", self._finish(False, NAN_ACTION))
                self.actions.append(np.asarray(a, dtype=np.float64))
                obs, success = env.step(a, observe=filming or k == len(chunk) - 1)
                self.last_state = obs.state
                self._keep_frame(obs)
                if success:
                    return ("done", self._finish(True, None))
                if env.steps >= self.spec.max_steps:
                    return ("done", self._finish(False, TIMEOUT))
        except Exception as e:
            return self._crashed(e)
        return self._reply(obs)

    def _reply(self, obs):
        if not self.ep.privileged:
            obs.privileged = {}  # keep the pipe light for policies that do not read object poses
        return ("obs", obs)

    def _crashed(self, e: Exception):
        """The env raised: record the episode as failed and rebuild the env for the next one."""
        rec = self._record(False, _short_error(e))
        self._drop_env()
        return ("done", rec)

    # -- results ----------------------------------------------------------------------------
    def _keep_frame(self, obs) -> None:
        if self.ep.render and self.ep.video_mode != "none" and obs.agentview is not None:
            self.frames.append(obs.agentview)

    def _finish(self, success: bool, reason: str | None) -> EpisodeRecord:
        rec = self._record(success, reason)
        ep = self.ep
        wanted = ep.video_mode == "all" or (ep.video_mode == "failures" and not success)
        if wanted and ep.video_allowed and ep.video_dir:
            try:
                rec.video_path = self._write_video(success)
            except Exception as e:  # a video must never cost the episode's result; it is recorded as missing
                rec.video_path, rec.video_error = None, f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(f"[evalkit] video for {self.env.episode_key} failed: {rec.video_error}", flush=True)
        return rec

    def _record(self, success: bool, reason: str | None) -> EpisodeRecord:
        ep = self.ep
        return EpisodeRecord(
            suite=self.spec.name,
            task_id=ep.task_id,
            task_name=self.task_name,
            init_state_id=ep.init_state_id,
            seed=ep.seed,
            success=success,
            steps=len(self.actions),
            failure_reason=reason,
            wall_time_s=time.perf_counter() - self.t0,
            policy_time_s=self.policy_s,
            policy_calls=self.policy_calls,
            instruction=self.instruction,
            env_built=self.env_built,
            setup_s=self.setup_s,
            reset_kind=self.reset_kind,
        )

    def _write_video(self, success: bool) -> str:
        """Write the episode's frames; a state-only run re-renders them by replaying its actions.

        MuJoCo is deterministic for the same initial state and action sequence, so the replay
        shows exactly the episode that was scored (checked in tests).
        """
        ep = self.ep
        frames = self.frames
        if not frames:  # a state-only run (or one whose policy reads no agentview): replayed and rendered
            env = self.env
            scored_state = self.last_state
            env.reset(ep.init_state_id, ep.seed)
            frames, obs = [env.render_frame()], None
            for a in self.actions:
                obs, _ = env.step(a)
                frames.append(env.render_frame())
            if obs is not None and not np.allclose(obs.state, scored_state, atol=1e-6):
                print(f"[evalkit] warning: replayed video of {env.episode_key} diverged from the scored episode", flush=True)
        tag = "success" if success else "failure"
        path = Path(ep.video_dir) / f"{self.spec.libero_name}_t{ep.task_id}_i{ep.init_state_id}_{tag}.mp4"
        write_video(path, frames)
        return str(path)

    def _drop_env(self) -> None:
        """After an exception the env's state is unknown: rebuild it for the next episode."""
        self.close()
        self.env_key = None


def write_video(path: Path, frames: list[np.ndarray], fps: int = 20) -> None:
    """Encode `frames` as an MP4 at `path`, atomically: a temp file that ffmpeg decodes back to every frame, then
    renamed. A full disk or an encoder error raises and leaves no file under `path` (never a truncated video)."""
    import imageio
    import imageio_ffmpeg

    def encode(tmp: Path) -> None:
        imageio.mimwrite(tmp, frames, fps=fps, macro_block_size=1)
        try:  # a cut-off MP4 (no moov box) fails to decode; a short one decodes fewer frames
            n, _ = imageio_ffmpeg.count_frames_and_secs(str(tmp))
        except RuntimeError as e:
            raise OSError(f"the encoded video does not decode ({str(e).splitlines()[0][:120]})") from None
        if n != len(frames):
            raise OSError(f"the encoded video holds {n} of {len(frames)} frames")

    write_atomic(path, encode)


def worker_main(conn, spec: SuiteSpec) -> None:
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and closes us
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    runner = EpisodeRunner(spec)
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg[0] == "close":
                break
            try:
                reply = runner.handle(msg)
            except Exception:
                reply = ("error", traceback.format_exc())
            conn.send(reply)
    finally:
        runner.close()
