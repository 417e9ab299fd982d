"""openpi's LIBERO seeding, reproduced exactly for any episode without running the episodes before it.

openpi's `examples/libero/main.py` builds one env per task, calls `env.seed(7)` once (LIBERO's `seed` is
`np.random.seed`), and then for episode i runs `env.reset()` and `env.set_init_state(init_states[i])`.
The reset is the only consumer of the global `np.random` stream in that loop (measured on every phase:
`set_init_state`, settle steps, policy steps and `check_success` draw nothing): robosuite's hard reset
recompiles the model (seconds) and then calls `_reset_internal()`, which samples the robot's init noise,
the object placements and the *fixture* placements. Fixtures are model constants (`body_pos`), so
`set_init_state` does not restore them: the scene of episode i is fixed by the stream after i resets.

`OpenpiResetStream` fast-forwards that stream to episode i by replaying only `_reset_internal` for the
episodes before it, on the freshly compiled model (milliseconds each instead of a recompile). It hooks
the env's `_reset_internal` (an instance attribute shadowing the method) because the model is fresh only
inside a hard reset, between the compile and `_reset_internal`: there it snapshots what `_reset_internal`
changes (fixture `body_pos`/`body_quat` in the model, and the whole mjData), replays the missing episodes
on copies, restores the snapshot, and runs the real `_reset_internal` from episode i's stream state.
The result is bit-identical to openpi's episode i (tests/test_openpi_parity.py), which needs the real
call to be the one that creates the offscreen render context, as in openpi's loop: that constructor runs
mj_forward, which sets the solver's warm start. A second piece of history matters: LIBERO appends its
open/close and on/off joint samplers to a list on every model load and never clears it, so openpi's
reset of episode i draws those joints i + 2 times; each replay and the real call are given that list.
The states computed are kept, so a worker that runs a task's episodes in order replays one
`_reset_internal` per episode. Every real reset checks that it leaves the stream exactly where the
replay predicted.

Written here because no library models LIBERO's reset; robosuite's own API has no seedable reset.
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


def _same_state(a: tuple, b: tuple) -> bool:
    """np.random.get_state() tuples: ('MT19937', key[624], pos, has_gauss, cached_gaussian)."""
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


class _FreshModel:
    """The freshly compiled model and data, to run `_reset_internal` on as a hard reset would, any number of times."""

    def __init__(self, sim):
        self.sim = sim
        model = sim.model._model
        # LIBERO's _reset_internal writes fixture placements into these two model arrays and nothing else
        # (checked: every model array equals the fresh one after restore).
        self.body_pos = model.body_pos.copy()
        self.body_quat = model.body_quat.copy()
        self.data = copy.copy(sim.data._data)  # MuJoCo copies all of mjData, solver warm start included
        self.property_samplers: list = []

    def restore(self) -> None:
        """Fresh model arrays and a fresh copy of the compiled data (robosuite's MjData wrapper reads `_data`
        at every access, so swapping the object is seen by the whole env)."""
        model = self.sim.model._model
        model.body_pos[:] = self.body_pos
        model.body_quat[:] = self.body_quat
        self.sim.data._data = copy.copy(self.data)


class OpenpiResetStream:
    """Hooks one LIBERO env (the robosuite env inside `OffScreenRenderEnv`) so its next hard reset starts
    from openpi's stream state for a given episode index (`arm(i)` before `env.reset()`)."""

    def __init__(self, inner_env: Any, seed: int):
        self.inner = inner_env
        self._original = inner_env._reset_internal  # the bound method of the class
        inner_env._reset_internal = self._hooked
        self.states: list[tuple] = [np.random.RandomState(int(seed)).get_state()]  # states[i]: before reset i
        # LIBERO appends the open/close and on/off joint samplers to `object_property_initializers` on every
        # model load (construction, every hard reset) and never clears the list, so openpi's reset of episode i
        # draws those joints (i + 2) times over: the history of the env object, not only the stream, decides
        # the draws. loads[i]: how many loads that env had done when episode i's reset ran (+1 per retry).
        self.per_load = len(getattr(inner_env, "object_property_initializers", []))  # construction = 1 load
        self.loads: list[int] = [2]
        self._armed: int | None = None
        self.error: str | None = None
        self.replays = 0  # _reset_internal calls spent on fast-forwarding (for tests and logs)

    def arm(self, episode: int) -> None:
        if episode < 0:
            raise ValueError(f"episode index {episode} < 0")
        self._armed, self.error = int(episode), None

    def check(self) -> None:
        """Raise what went wrong inside the last reset (LIBERO's ControlEnv.reset swallows every exception)."""
        if self.error:
            msg, self.error = self.error, None
            raise RuntimeError(msg)

    # -- inside robosuite's hard reset ----------------------------------------------------------
    def _run_original(self, fresh: _FreshModel, load: int) -> tuple[Any, int]:
        """Run `_reset_internal` as the `load`-th model load of openpi's env; returns (result, next load)."""
        from robosuite.utils.errors import RandomizationError

        # As LIBERO's ControlEnv.reset: a failed placement is retried (a new load), the stream goes on. (openpi's
        # retry also recompiles and so recreates the render context; ours does not: a retried real reset may
        # differ from openpi's in the last bits. RandomizationError needs 5000 failed draws for one object.)
        while True:
            fresh.restore()
            if self.per_load:
                self.inner.object_property_initializers = fresh.property_samplers * load
            try:
                return self._original(), load + 1
            except RandomizationError:
                load += 1

    def _hooked(self):
        episode, self._armed = self._armed, None
        if episode is None:  # a reset not asked for through arm(): plain LIBERO behaviour
            return self._original()
        try:
            fresh = _FreshModel(self.inner.sim)
            # this load's samplers (stateless: older entries of the list behave exactly like these)
            fresh.property_samplers = list(self.inner.object_property_initializers[-self.per_load:]) if self.per_load else []
            # Replays must not create the offscreen render context: its constructor runs mj_forward on the
            # current data, which sets the solver's warm start, so the real reset (which creates it, as in
            # openpi's loop) would otherwise start from a different warm start (qpos off in the last bits).
            offscreen, self.inner.has_offscreen_renderer = self.inner.has_offscreen_renderer, False
            try:
                while len(self.states) <= episode + 1:  # +1: the state the real reset must end in
                    np.random.set_state(self.states[-1])
                    _, next_load = self._run_original(fresh, self.loads[-1])
                    self.replays += 1
                    self.states.append(np.random.get_state())
                    self.loads.append(next_load)
            finally:
                self.inner.has_offscreen_renderer = offscreen
            np.random.set_state(self.states[episode])
            result, next_load = self._run_original(fresh, self.loads[episode])
            if not _same_state(np.random.get_state(), self.states[episode + 1]) or next_load != self.loads[episode + 1]:
                self.error = (f"openpi seed stream: the reset of episode {episode} drew a different number of "
                              "random numbers than its replay; the scene cannot be trusted")
            return result
        except Exception as e:  # raised by LiberoEnv.reset after the reset returns (see check())
            self.error = f"openpi seed stream: reset of episode {episode} failed: {type(e).__name__}: {e}"
            return None
