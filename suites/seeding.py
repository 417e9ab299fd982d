"""LIBERO resets: openpi's seeding reproduced exactly, and cheap resets that equal robosuite's hard reset bit for bit.

**openpi's stream.** openpi's `examples/libero/main.py` builds one env per task, calls `env.seed(7)` once (LIBERO's
`seed` is `np.random.seed`), and then for episode i runs `env.reset()` and `env.set_init_state(init_states[i])`.
The reset is the only consumer of the global `np.random` stream in that loop (measured on every phase:
`set_init_state`, settle steps, policy steps and `check_success` draw nothing): robosuite's hard reset
recompiles the model (seconds) and then calls `_reset_internal()`, which samples the robot's init noise,
the object placements and the *fixture* placements. Fixtures are model constants (`body_pos`), so
`set_init_state` does not restore them: the scene of episode i is fixed by the stream after i resets.
`OpenpiResetStream` keeps the stream state before every episode's reset; `ResetHook` fast-forwards it to
episode i by replaying only `_reset_internal` for the episodes before it, on the freshly compiled model
(milliseconds each instead of a recompile), and every real reset checks that it leaves the stream exactly
where the replay predicted. The states computed are kept, so a worker that runs a task's episodes in order
replays one `_reset_internal` per episode.

**The fresh model.** `ResetHook` replaces the env's `_reset_internal` (an instance attribute shadowing the
method) because the model is fresh only inside a hard reset, between the compile and `_reset_internal`. There
it snapshots everything an episode can change (`_FreshModel`): the model arrays (LIBERO writes fixture
placements into `body_pos`/`body_quat`, and toggles `site_rgba` alphas for its visualization sites), the whole
mjData (solver warm start included), and the Python state that a hard reset rebuilds with new objects and an
episode mutates (the gripper models' `current_action`, which the gripper action integrates, and the objects'
`vis_site_names` flags). Each `_reset_internal` then starts from a restored copy.

**Cheap resets.** After the first (hard) reset, a reset does not recompile: robosuite's `hard_reset=False` path
calls `_reset_internal` on the same simulator, and the hook makes that call start from exactly the state a hard
reset's call would start from: the snapshot restored, what the skipped `_load_model` would have changed
reproduced (LIBERO appends its open/close and on/off joint samplers to `object_property_initializers` on every
model load and never clears the list, so a hard reset of the k-th load draws those joints k times), and the
`sim.forward()` that the offscreen render context's constructor runs where a hard reset recreates the context
(mj_forward sets the warm start). A state-only env has no render context at all and runs that forward
explicitly, so its physics equal a rendered env's. tests/test_cheap_reset.py checks cheap against hard resets
bit for bit; tests/test_openpi_parity.py checks both against openpi's own loop.

Written here because no library models LIBERO's reset; robosuite's own API has no seedable or snapshot reset.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

SEED_MODES = {
    "openpi": (
        "openpi examples/libero/main.py: np.random seeded with the suite seed once per task (env.seed), "
        "episode i starts from the stream left by the resets of episodes 0..i-1 (fast-forwarded exactly, "
        "independent of workers, shards, resume and task subsets)"
    ),
    "independent": (
        "every episode reseeds np.random with crc32('<seed>/<suite>/<task>/<episode>') before its reset "
        "(evalkit <= 0.1 behaviour; scenes differ from openpi's)"
    ),
}

# Compiled asset data (meshes, textures, their collision trees: ~250 MB for a LIBERO scene): nothing in robosuite
# or LIBERO writes it after the compile, so it is not copied per reset (tests/test_cheap_reset.py compares every
# model array, these included, with a hard reset's).
_ASSET_ARRAYS = ("mesh_", "bvh_", "skin_", "flex_", "oct_", "tex_data", "hfield_data")


def _same_state(a: tuple, b: tuple) -> bool:
    """np.random.get_state() tuples: ('MT19937', key[624], pos, has_gauss, cached_gaussian)."""
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


def model_arrays(model, assets: bool = True) -> dict[str, np.ndarray]:
    """Every array of a `mujoco.MjModel` by name (views into the model); `assets=False` leaves out compiled asset data."""
    out = {}
    for name in dir(model):
        if name.startswith("_") or (not assets and name.startswith(_ASSET_ARRAYS)):
            continue
        value = getattr(model, name, None)
        if isinstance(value, np.ndarray):
            out[name] = value
    return out


def _grippers(robot) -> list:
    g = getattr(robot, "gripper", None)
    return list(g.values()) if isinstance(g, dict) else [g] if g is not None else []


def _acting_grippers(inner) -> list:
    """The gripper models that integrate their commands in `current_action` (state an episode changes)."""
    return [g for r in inner.robots for g in _grippers(r) if hasattr(g, "current_action")]


def _libero_objects(inner) -> list:
    return [*getattr(inner, "objects_dict", {}).values(), *getattr(inner, "fixtures_dict", {}).values()]


class _FreshModel:
    """The freshly compiled model and data (and the Python state a hard reset rebuilds), to start `_reset_internal`
    from as a hard reset would, any number of times."""

    def __init__(self, inner, property_samplers: list):
        self.inner = inner
        self.sim = inner.sim
        self.arrays = {k: v.copy() for k, v in model_arrays(self.sim.model._model, assets=False).items()}
        self.data = copy.copy(self.sim.data._data)  # MuJoCo copies all of mjData, solver warm start included
        self.property_samplers = property_samplers  # this load's joint samplers (stateless)
        # Python state that lives in objects a hard reset re-creates, and that an episode changes:
        # the gripper integrates its actions in `current_action`; stoves flip their `vis_site_names` flags.
        self.gripper_actions = [np.array(g.current_action, copy=True) for g in _acting_grippers(inner)]
        self.vis_sites = [(o, copy.deepcopy(o.object_properties["vis_site_names"])) for o in _libero_objects(inner)
                          if "vis_site_names" in getattr(o, "object_properties", {})]

    def restore(self) -> None:
        """Fresh model arrays, a fresh copy of the compiled data (robosuite's MjData wrapper reads `_data` at every
        access, so swapping the object is seen by the whole env), fresh gripper actions and object flags."""
        model = self.sim.model._model
        for name, fresh in self.arrays.items():
            np.copyto(getattr(model, name), fresh)
        self.sim.data._data = copy.copy(self.data)
        for g, a in zip(_acting_grippers(self.inner), self.gripper_actions, strict=True):
            g.current_action = a.copy()
        for obj, flags in self.vis_sites:
            obj.object_properties["vis_site_names"] = copy.deepcopy(flags)


class OpenpiResetStream:
    """openpi's per-task `np.random` stream: the state before each episode's reset (`states[i]`) and how many model
    loads openpi's env had done at that reset (`loads[i]`). `arm(i)` before `env.reset()` asks the hook for episode i."""

    def __init__(self, seed: int):
        self.states: list[tuple] = [np.random.RandomState(int(seed)).get_state()]  # states[i]: before reset i
        # LIBERO's joint sampler list grows by one load's samplers on every model load (construction, every hard
        # reset), so openpi's reset of episode i draws those joints (i + 2) times over: the history of the env
        # object, not only the stream, decides the draws. loads[i]: loads done when episode i's reset ran (+1 per
        # retry).
        self.loads: list[int] = [2]
        self._armed: int | None = None
        self.replays = 0  # _reset_internal calls spent on fast-forwarding (for tests and logs)

    def arm(self, episode: int) -> None:
        if episode < 0:
            raise ValueError(f"episode index {episode} < 0")
        self._armed = int(episode)

    def take(self) -> int | None:
        episode, self._armed = self._armed, None
        return episode


class ResetHook:
    """Owns one LIBERO env's resets (the robosuite env inside LIBERO's ControlEnv): hard or cheap, each starting
    `_reset_internal` from the fresh model, with openpi's stream when one is given."""

    def __init__(self, inner_env: Any, stream: OpenpiResetStream | None = None):
        self.inner = inner_env
        self._original = inner_env._reset_internal  # the bound method of the class
        inner_env._reset_internal = self._hooked
        self.stream = stream
        self.per_load = len(getattr(inner_env, "object_property_initializers", []))  # construction = 1 load
        self.fresh: _FreshModel | None = None
        self.cheap = False
        self.error: str | None = None

    def reset(self, control_env: Any, cheap: bool) -> dict:
        """One `ControlEnv.reset()` (its RandomizationError retry loop included): robosuite's hard reset, or, once a
        hard reset has snapshotted the fresh model, its `hard_reset=False` path started from that snapshot."""
        if cheap and self.fresh is None:
            raise RuntimeError("a cheap reset needs the fresh model of a hard reset first")
        self.cheap, self.error = cheap, None
        self.inner.hard_reset = not cheap
        try:
            return control_env.reset()
        finally:
            self.inner.hard_reset, self.cheap = True, False

    def check(self) -> None:
        """Raise what went wrong inside the last reset (LIBERO's ControlEnv.reset swallows every exception)."""
        if self.error:
            msg, self.error = self.error, None
            raise RuntimeError(msg)

    # -- inside robosuite's reset -----------------------------------------------------------------
    def _start(self, fresh: _FreshModel) -> None:
        """Put the env where a hard reset's `_reset_internal` starts: the fresh snapshot, then the mj_forward that
        MjRenderContextOffscreen's constructor runs first thing in that call (explicitly wherever the call will not
        create the context: the context already exists, a state-only env has none, or this is a replay)."""
        fresh.restore()
        inner = self.inner
        if not (inner.has_offscreen_renderer and inner.sim._render_context_offscreen is None):
            inner.sim.forward()

    def _run(self, fresh: _FreshModel, load: int) -> tuple[Any, int]:
        """Run `_reset_internal` as the `load`-th model load of the env; returns (result, next load)."""
        from robosuite.utils.errors import RandomizationError

        # As LIBERO's ControlEnv.reset: a failed placement is retried with a new load (a recompile, hence the
        # restore and the render context's forward again); the stream goes on.
        while True:
            self._start(fresh)
            if self.per_load:
                self.inner.object_property_initializers = fresh.property_samplers * load
            try:
                return self._original(), load + 1
            except RandomizationError:
                load += 1

    def _hooked(self):
        from robosuite.utils.errors import RandomizationError

        episode = self.stream.take() if self.stream is not None else None
        try:
            inner = self.inner
            if self.cheap:
                fresh = self.fresh
                assert fresh is not None and fresh.sim is inner.sim
                if self.per_load:  # what the skipped _load_model does: append this load's joint samplers
                    inner.object_property_initializers = inner.object_property_initializers + fresh.property_samplers
            else:
                samplers = list(inner.object_property_initializers[-self.per_load:]) if self.per_load else []
                fresh = self.fresh = _FreshModel(inner, samplers)
            if episode is None:  # plain LIBERO semantics (independent seeding, random placements)
                self._start(fresh)
                if self.per_load:
                    # LIBERO's joint-sampler list grows with every load, so the draws would depend on how many
                    # episodes this env ran before (hence on workers and scheduling): every episode draws as a
                    # fresh env's first reset does (construction + this reset: 2 loads).
                    inner.object_property_initializers = fresh.property_samplers * 2
                return self._original()
            return self._openpi(fresh, episode)
        except RandomizationError:  # (unarmed only) ControlEnv.reset retries: a new load, as in plain LIBERO
            raise
        except Exception as e:  # noqa: BLE001 (raised by LiberoEnv.reset after the reset returns: see check())
            what = f"reset of episode {episode}" if episode is not None else "reset"
            self.error = f"{'openpi seed stream: ' if episode is not None else ''}{what} failed: {type(e).__name__}: {e}"
            return None

    def _openpi(self, fresh: _FreshModel, episode: int):
        s = self.stream
        # Replays must not create the offscreen render context (the real call does, as in openpi's loop); they
        # run the context constructor's forward explicitly instead, exactly as the real call's start.
        offscreen, self.inner.has_offscreen_renderer = self.inner.has_offscreen_renderer, False
        try:
            while len(s.states) <= episode + 1:  # +1: the state the real reset must end in
                np.random.set_state(s.states[-1])
                _, next_load = self._run(fresh, s.loads[-1])
                s.replays += 1
                s.states.append(np.random.get_state())
                s.loads.append(next_load)
        finally:
            self.inner.has_offscreen_renderer = offscreen
        np.random.set_state(s.states[episode])
        result, next_load = self._run(fresh, s.loads[episode])
        if not _same_state(np.random.get_state(), s.states[episode + 1]) or next_load != s.loads[episode + 1]:
            self.error = (f"openpi seed stream: the reset of episode {episode} drew a different number of "
                          "random numbers than its replay; the scene cannot be trusted")
        return result
