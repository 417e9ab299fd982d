"""LIBERO environment adapter: openpi's observation processing over LIBERO's `OffScreenRenderEnv`.

- Cameras are rendered only when asked (`render=True`). A state-only env (`render=False`) has no offscreen
  render context at all (LIBERO's `ControlEnv` with `has_offscreen_renderer=False`); its physics equal a
  rendered env's bit for bit, and `render_frame` attaches a context on demand (failure videos by replay)
  without touching the physics.
- A rendered env renders only at the steps whose images are read (`step(observe=True)`, the reset's last settle
  step): robosuite's camera observables keep their sampling clock, but their sensor skips the render between
  (`_LazyCamera`). Rendering never writes the physics, so trajectories and the images read are bit-identical to
  rendering every step (tests/test_lazy_render.py); with 5-step chunks that is 1 render in 5.
- Images: agentview + wrist at `spec.resolution`, rotated 180° (LIBERO renders upside down),
  resized with padding to `spec.image_size` (PIL bilinear; pads with black to keep aspect).
- Proprio state: eef pos (3) + eef axis-angle (3) + gripper qpos (2), as openpi's LIBERO example.
- `reset` restores an official init state (or a seeded random placement) and runs the settle steps.
  Seeding follows `spec.seed_mode` (suites/seeding.py): `openpi` gives episode i exactly the scene of
  episode i in openpi's LIBERO loop; `independent` reseeds every episode from (seed, suite, task, episode).
  The first reset of an env is robosuite's hard reset (recompile); later ones are cheap resets that start from
  its snapshot and give bit-identical results (suites/seeding.py; `last_reset_kind`, `last_reset_s`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from evalkit.suites.seeding import OpenpiResetStream, ResetHook
from evalkit.suites.specs import SuiteSpec

from evalkit.policies.base import CAMERAS, Observation

os.environ.setdefault("MUJOCO_GL", "osmesa")

SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
_IMAGE_KEYS = ("agentview_image", "robot0_eye_in_hand_image")
_CAMERA_NAMES = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}  # each of CAMERAS -> robosuite's camera


def _quiet_import_libero():
    """LIBERO prints robosuite macro warnings on import; harmless (NOTES.md)."""
    import logging
    import warnings

    logging.getLogger("robosuite").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    return benchmark, get_libero_path, OffScreenRenderEnv


def _control_env_class():
    from libero.libero.envs.env_wrapper import ControlEnv  # OffScreenRenderEnv's base: lets the offscreen context go

    return ControlEnv


# (LIBERO suite name, task id) -> why a cheap reset is not bit-identical there; those envs keep robosuite's hard
# reset for every episode. Empty: every task checked so far gives identical results (tests/test_cheap_reset.py,
# scripts/gpu_rollouts/reset_check.py).
HARD_RESET_ONLY: dict[tuple[str, int], str] = {}


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis-angle vector (robosuite convention, as openpi uses)."""
    q = np.asarray(quat, dtype=np.float64).copy()
    q[3] = np.clip(q[3], -1.0, 1.0)
    den = np.sqrt(1.0 - q[3] * q[3])
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return (q[:3] * 2.0 * np.arccos(q[3])) / den


def resize_with_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an HxWx3 uint8 image to size x size keeping aspect ratio, padding with zeros."""
    from PIL import Image

    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out


def process_image(raw: np.ndarray, size: int) -> np.ndarray:
    return resize_with_pad(np.ascontiguousarray(raw[::-1, ::-1]), size)


@dataclass
class TaskInfo:
    suite: str
    task_id: int
    name: str
    language: str
    bddl_file: str


def load_task(spec: SuiteSpec, task_id: int) -> tuple[TaskInfo, np.ndarray]:
    benchmark, get_libero_path, _ = _quiet_import_libero()
    suite = benchmark.get_benchmark_dict()[spec.libero_name](task_order_index=0)
    task = suite.get_task(task_id)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    init_states = suite.get_task_init_states(task_id)
    return TaskInfo(spec.name, task_id, task.name, task.language, bddl), init_states


class LiberoEnv:
    """One LIBERO task's environment, reusable across episodes of that task."""

    def __init__(self, spec: SuiteSpec, task_id: int, render: bool, privileged: bool = True, cheap_resets: bool = True,
                 cameras: tuple[str, ...] = CAMERAS, lazy_render: bool = True):
        _, _, OffScreenRenderEnv = _quiet_import_libero()
        self.spec = spec
        self.task_id = task_id
        self.render = render
        self.privileged = privileged
        # only the views the policy reads are rendered: on a GPU box under contention a camera costs ~15 ms a step
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown or (render and not cameras):
            raise ValueError(f"cameras={cameras}: valid: {', '.join(CAMERAS)} (at least one when render=True)")
        self.cameras = tuple(cameras) if render else ()
        self.info, self.init_states = load_task(spec, task_id)
        self.language = self.info.language
        self.bddl_path = self.info.bddl_file
        # A state-only env gets no offscreen render context (OffScreenRenderEnv forces one on): no GL context per env
        # and none recreated per hard reset. The context constructor's mj_forward is run explicitly instead
        # (ResetHook), so the physics are those of a rendered env.
        env_class = OffScreenRenderEnv if render else _control_env_class()
        self.raw = env_class(
            bddl_file_name=self.bddl_path,
            use_camera_obs=render,
            has_offscreen_renderer=render,
            camera_names=[_CAMERA_NAMES[c] for c in (self.cameras or CAMERAS)],  # state-only: LIBERO's own list
            camera_heights=spec.resolution,
            camera_widths=spec.resolution,
        )
        # openpi's loop seeds once per task env; our stream replays its resets (None: independent seeding)
        self.stream = OpenpiResetStream(spec.seed) if spec.seed_mode == "openpi" else None
        self.resets = ResetHook(self.raw.env, self.stream)
        why = HARD_RESET_ONLY.get((spec.libero_name, task_id))
        self.cheap_resets = cheap_resets and why is None
        self.hard_reset_reason = why if why else (None if cheap_resets else "cheap resets turned off")
        self.last_reset_kind: str | None = None  # "hard" | "cheap": what the last reset() did
        self.last_reset_s: float | None = None  # seconds of the last reset(), settle steps included
        self.episode_key = ""
        self.steps = 0
        self.lazy_render = lazy_render  # False: render at every camera sample, as robosuite does (tests compare)
        self._render_now = True  # read by _LazyCamera: does this step's camera sample need the pixels?
        self.renders = 0  # camera renders done (each camera counts): tests check which ones were skipped

    # -- episodes -----------------------------------------------------------------------------
    def reset(self, init_state_id: int | None, seed: int | None = None) -> Observation:
        """Start an episode from official init state `init_state_id` (None: seeded random placement).

        seed_mode=openpi: episode `init_state_id` starts from openpi's per-task stream; `seed` is not used.
        seed_mode=independent (and random placements): np.random is reseeded with `seed` (default: the
        episode's own seed from the spec).
        """
        t0 = time.perf_counter()
        if init_state_id is not None and not (0 <= init_state_id < len(self.init_states)):
            raise IndexError(f"init state {init_state_id} out of range (task has {len(self.init_states)})")
        # the first reset recompiles (and snapshots the fresh model); later ones start from that snapshot
        kind = "cheap" if self.cheap_resets and self.resets.fresh is not None else "hard"
        if self.stream is not None and init_state_id is not None:
            self.stream.arm(init_state_id)  # openpi: episode i uses init state i and the stream after i resets
        else:
            if seed is None:
                seed = self.spec.episode_seed(self.task_id, init_state_id if init_state_id is not None else -1)
            self.raw.seed(int(seed))
        wait = self.spec.num_steps_wait
        self._render_now = wait == 0  # with settle steps, only the last one's images are read
        try:
            raw_obs = self.resets.reset(self.raw, cheap=kind == "cheap")
            self.resets.check()
            if init_state_id is not None:
                raw_obs = self.raw.set_init_state(self.init_states[init_state_id])
            self._wrap_cameras()  # a hard reset installs new sensors
            for i in range(wait):
                self._render_now = i == wait - 1
                raw_obs, _, _, _ = self.raw.step(SETTLE_ACTION)
        finally:
            self._render_now = True
        self.episode_key = f"{self.spec.libero_name}/{self.task_id}/{init_state_id if init_state_id is not None else f's{seed}'}"
        self.steps = 0
        self.last_reset_kind, self.last_reset_s = kind, time.perf_counter() - t0
        return self._observation(raw_obs)

    def step(self, action: np.ndarray, observe: bool = True) -> tuple[Observation, bool]:
        """One env step. observe=False: the observation holds the proprio state only (no images, no privileged
        scene state): within an action chunk nobody reads the rest, and gathering the scene state costs more
        than the physics on some tasks. The simulation is the same either way."""
        self._render_now = observe
        try:
            # LIBERO's step returns done = _check_success() after the step: the check is not run a second time
            raw_obs, _, done, _ = self.raw.step(np.asarray(action, dtype=np.float64))
        finally:
            self._render_now = True
        self.steps += 1
        return self._observation(raw_obs, full=observe), bool(done)

    def render_frame(self, size: int | None = None) -> np.ndarray:
        """Agentview frame (rotated upright) rendered on demand, for videos of state-only runs (the first call
        attaches a render context to a state-only env, without changing its physics)."""
        if self.raw.sim._render_context_offscreen is None:
            self._attach_render_context()
        res = self.spec.resolution
        raw = self.raw.sim.render(camera_name="agentview", width=res, height=res)
        return process_image(raw, size or self.spec.image_size)

    def _attach_render_context(self) -> None:
        """robosuite's MjRenderContextOffscreen runs sim.forward() in its constructor, which would change the
        solver's warm start mid-episode; it is skipped here (frames show the data as the last reset or step left
        it, as a rendered env's own context does). The context lives until the next hard reset; cheap resets keep
        it, and nothing in the physics depends on it."""
        from robosuite.utils.binding_utils import MjRenderContextOffscreen

        sim, inner = self.raw.sim, self.raw.env
        sim.forward = lambda: None  # an instance attribute shadows the method during construction only
        try:
            MjRenderContextOffscreen(sim, device_id=inner.render_gpu_device_id)
        finally:
            del sim.forward
        ctx = sim._render_context_offscreen
        ctx.vopt.geomgroup[0] = 1 if inner.render_collision_mesh else 0  # as robosuite's _reset_internal sets them
        ctx.vopt.geomgroup[1] = 1 if inner.render_visual_mesh else 0

    def _wrap_cameras(self) -> None:
        """Put a _LazyCamera around each camera observable's sensor that is not wrapped yet."""
        if not self.render:
            return
        observables = self.raw.env._observables
        for cam in self.cameras:
            obs = observables[f"{_CAMERA_NAMES[cam]}_image"]
            if not isinstance(obs._sensor, _LazyCamera):
                obs._sensor = _LazyCamera(obs._sensor, self)

    def close(self) -> None:
        try:
            self.raw.close()
        except Exception:  # closing a crashed env must not hide the original error
            pass

    # -- observation processing ---------------------------------------------------------------
    def _observation(self, raw: dict, full: bool = True) -> Observation:
        state = np.concatenate(
            [raw["robot0_eef_pos"], quat2axisangle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]
        ).astype(np.float32)
        obs = Observation(
            state=state,
            instruction=self.language,
            episode_key=self.episode_key,
            step=self.steps,
            task={"suite": self.spec.name, "task_id": self.task_id, "bddl_file": self.bddl_path,
                  "language": self.language, "task_name": self.info.name},
        )
        if not full:
            return obs
        if self.render:
            size = self.spec.image_size
            if "agentview" in self.cameras:
                obs.agentview = process_image(raw["agentview_image"], size)
            if "wrist" in self.cameras:
                obs.wrist = process_image(raw["robot0_eye_in_hand_image"], size)
        if self.privileged:
            obs.privileged = {
                k: np.asarray(v, dtype=np.float32)
                for k, v in raw.items()
                if k not in _IMAGE_KEYS and isinstance(v, np.ndarray)
            }
            obs.privileged.update(_scene_state(self.raw.env, obs.privileged))
        return obs


class _LazyCamera:
    """A robosuite camera sensor that renders only when its env is about to be observed.

    robosuite samples every observable once per control step, at a fixed substep of that step (its sampling clock
    runs in whole periods of 25 substeps from the reset), and a camera sample is a render. Between observed steps the
    sample keeps the clock and returns the last frame; nothing reads it (the env's observation then holds the state
    only). Our own code, no library hook: robosuite has none for skipping a sensor but keeping its clock."""

    def __init__(self, sensor, env: LiberoEnv) -> None:
        self.sensor = sensor
        self.env = env
        self.last = None
        self.__modality__ = sensor.__modality__  # robosuite's @sensor decorator tags the function

    def __call__(self, obs_cache: dict):
        if self.env._render_now or not self.env.lazy_render or self.last is None:
            self.last = self.sensor(obs_cache)
            self.env.renders += 1
        return self.last


def _scene_state(env, have: dict) -> dict[str, np.ndarray]:
    """What LIBERO's observation leaves out but scripted experts need: fixture poses (`<f>_pos`,
    `<f>_quat` xyzw), articulation joints (`<f>_joint_pos`: drawers, knob, door) and BDDL region
    sites (`<site>_site_pos`, `<site>_site_quat`)."""
    out: dict[str, np.ndarray] = {}
    for name, st in env.object_states_dict.items():
        site = st.object_state_type == "site"
        key = f"{name}_site" if site else name
        if f"{key}_pos" in have:
            continue
        g = st.get_geom_state()  # body quat is MuJoCo's wxyz, a site's is already xyzw
        quat = np.asarray(g["quat"], dtype=np.float32)
        out[f"{key}_pos"] = np.asarray(g["pos"], dtype=np.float32)
        out[f"{key}_quat"] = quat if site else quat[[1, 2, 3, 0]]
        if not site and name in env.fixtures_dict:
            out[f"{name}_joint_pos"] = np.asarray(st.get_joint_state(), dtype=np.float32)
    return out
