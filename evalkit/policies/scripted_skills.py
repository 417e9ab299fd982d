"""Skills of the scripted expert: small phase machines that turn privileged observations into pose targets.

A skill's `command(obs)` returns a `Command` (eef target position, target orientation, gripper,
speed cap); `ScriptedPolicy` turns it into an action chunk with a P-controller. Every phase ends on
a measured condition (eef reached its target, an object lifted, a joint moved) with a step budget as
a fallback, so skills follow the simulated state rather than open-loop timing. A skill sets `done`
when its last phase is reached (skills retry a missed grasp or placement a bounded number of times).

This module holds the shared pieces and pick-and-place; articulated fixtures (drawers, the stove knob)
and pushing live in `scripted_fixtures.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from evalkit.policies.base import Observation
from evalkit.policies.scripted_objects import (
    GRASPS,
    Grasp,
    PlaceTarget,
    category,
    hand_overlap,
)

DOWN = Rotation.from_quat([1.0, 0.0, 0.0, 0.0])  # gripper pointing down, fingers closing along world y
# Speed cap (x the policy's max_speed) for moves through free space: the norm of the xyz action may exceed 1
# on diagonals (each component stays within [-1, 1]).
FAST = 1.5
HELD_TOL = 0.04  # m: a held object's offset from the hand within this of the planned one is trusted


def down(yaw: float = 0.0) -> Rotation:
    """Gripper pointing down, turned by `yaw` about world z."""
    return Rotation.from_euler("z", yaw) * DOWN


def yaw_of(quat_xyzw: np.ndarray) -> float:
    x_axis = Rotation.from_quat(quat_xyzw).as_matrix()[:, 0]
    return float(np.arctan2(x_axis[1], x_axis[0]))


def near_yaw(yaw: float, ref: float) -> float:
    """`yaw` plus a multiple of pi, closest to `ref`: the parallel gripper is symmetric under a half turn,
    so the hand never turns more than a quarter turn to reach a yaw."""
    return float(yaw + np.pi * np.round((ref - yaw) / np.pi))


def eef_yaw(priv: dict[str, np.ndarray]) -> float:
    """Yaw of the eef's x axis about world z (for a gripper pointing down)."""
    return yaw_of(priv["robot0_eef_quat"])


def rot_error(desired: Rotation, quat_xyzw: np.ndarray) -> float:
    return float(np.linalg.norm((desired * Rotation.from_quat(quat_xyzw).inv()).as_rotvec()))


def vec(priv: dict[str, np.ndarray], key: str) -> np.ndarray:
    return np.asarray(priv[key], np.float64)


@dataclass
class Command:
    pos: np.ndarray  # eef target (world, m)
    rot: Rotation  # eef target orientation (world)
    grip: float  # -1 open .. +1 closed
    speed: float = 1.0  # cap on |action xyz| as a fraction of the policy's max_speed


class Skill:
    """Base: a phase machine over observations. Subclasses implement `_advance` and `_target`."""

    name = "skill"
    phases: tuple[str, ...] = ()
    obj = ""  # the object (or fixture) the skill handles ...
    target_name = ""  # ... and what locates its goal: both have `<name>_pos` in the observation

    def __init__(self) -> None:
        self.phase = 0
        self.phase_start = 0
        self.started = False
        self.done = False
        self.extra: dict[str, Any] = {}
        self.home: np.ndarray | None = None  # eef position at the start of the episode (a comfortable pose)

    def start(self, o: Observation) -> None:
        self.started = True
        self.phase_start = o.step

    def enter(self, phase: int | str, step: int) -> None:
        self.phase = self.phases.index(phase) if isinstance(phase, str) else phase
        self.phase_start = step

    @property
    def phase_name(self) -> str:
        return self.phases[self.phase]

    def elapsed(self, o: Observation) -> int:
        return o.step - self.phase_start

    def command(self, o: Observation) -> Command:
        if not self.started:
            self.start(o)
        self._advance(o)
        return self._target(o)

    def describe(self) -> str:
        return f"{self.name}:{self.phase_name}"

    # -- subclass API --------------------------------------------------------------------------
    def _advance(self, o: Observation) -> None:
        raise NotImplementedError

    def _target(self, o: Observation) -> Command:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ pick & place


@dataclass
class PickPlaceParams:
    hover: float = 0.12  # approach height above the grasp point
    carry: float = 0.12  # lift height above the grasp point
    close_steps: int = 12
    open_steps: int = 8


class PickPlace(Skill):
    """approach (above grasp) -> descend -> close -> lift -> transport (above target) -> lower -> open -> retreat."""

    name = "pick_place"
    phases = ("approach", "descend", "close", "lift", "transport", "lower", "open", "retreat", "done")

    def __init__(self, obj: str, target: PlaceTarget, target_name: str, inside: bool = False,
                 params: PickPlaceParams | None = None, place_turn: float = 0.0,
                 offset: tuple[float, float] | None = None, yaw: float | None = None, lift: float | None = None):
        super().__init__()
        self.obj = obj
        # `lift` (m above the grasp) replaces the carry height: a plate held by its rim is slid over
        # the table, not carried over the other objects
        self.lift = lift
        # Gripper yaw change between grasp and release: the object turns with the hand, so a bowl held
        # by its near rim can be released with the fingers across a drawer (clear of its front panel).
        self.place_turn = place_turn
        # or the absolute yaw (mod pi) the hand must have at release (fingers across a drawer): the turn is
        # then fixed when the object is grasped, whichever rim point the grasp chose
        self.place_yaw: float | None = None
        self.target = target
        self.target_name = target_name  # the BDDL target's owner object (what demos record)
        self.params = params or PickPlaceParams()
        self.grasp: Grasp = GRASPS[category(obj)]
        g = self.grasp
        use_inside = inside and g.inside_offset is not None
        self.offset = offset if offset is not None else g.inside_offset if use_inside else g.offset
        self.base_yaw = yaw if yaw is not None else g.inside_yaw if use_inside else g.yaw
        self.yaw = self.base_yaw
        self.retries = 0
        self.obj_z0 = 0.0
        self.place_shift = np.zeros(2)  # xy offset of the release point from the target's reference point
        self.miss_tol = 0.06  # after release, farther than this (xy) from where it should be: place again
        # Dropped into a container (a basket): anywhere in it will do (miss_tol from its middle, not from the
        # slot), but not resting on what is already in it (its bottom above `stack_z` below the drop point).
        self.container = False
        self.stack_z = 0.1
        self.obstacles: tuple[tuple[float, float, float, float], ...] = ()  # fixture parts near grasps
        self.obstacle_fn = None  # priv -> obstacles, evaluated when the skill starts (fixtures move)
        self.place_retries = 0

    def start(self, o: Observation) -> None:
        super().start(o)
        if self.obstacle_fn is not None:
            self.obstacles = self.obstacle_fn(o.privileged)
        self.obj_z0 = float(o.privileged[f"{self.obj}_pos"][2])

    def describe(self) -> str:
        return f"{self.name}({self.obj}):{self.phase_name}"

    def _grasp_yaw(self, p: dict[str, np.ndarray]) -> float:
        g = self.grasp
        if "yaw_ref" not in self.extra:  # the gripper's yaw when this skill started
            self.extra["yaw_ref"] = eef_yaw(p)
        if g.local_offset is not None:  # fingers along the object's own axis: gripper y = that axis
            yaw = near_yaw(yaw_of(p[f"{self.obj}_quat"]) + g.local_axis + np.pi / 2, self.extra["yaw_ref"])
        elif g.align_yaw:  # fingers close along the gripper's y: align with the box's short side
            yaw = near_yaw(yaw_of(p[f"{self.obj}_quat"]), self.extra["yaw_ref"])
        else:
            yaw = near_yaw(self.base_yaw, self.extra["yaw_ref"])
        if "yaw_shift" not in self.extra:  # chosen once, so the approach does not flip between choices
            self.extra["yaw_shift"], self.extra["slide"] = self._clearance(p, yaw)
        return yaw + self.extra["yaw_shift"]

    def _clearance(self, p: dict[str, np.ndarray], yaw: float) -> tuple[float, float]:
        """(yaw turn, slide along the object's long side) of the grasp that keeps the hand and fingers
        clear of the objects around it, within the object's `yaw_free` / `slide`; (0, 0) when the
        default grasp is clear or nothing is."""
        g = self.grasp
        if g.yaw_free <= 0.0 and g.slide <= 0.0:
            return 0.0, 0.0
        self.extra["slide"], self.extra["yaw_shift"] = 0.0, 0.0
        centre = vec(p, f"{self.obj}_pos")[:2]
        off = self._offset(p)[:2]
        axis = np.array([np.cos(self.extra["local_yaw"]), np.sin(self.extra["local_yaw"])])
        z = float(p[f"{self.obj}_pos"][2]) + g.dz
        tried = self.extra.setdefault("tried", [])  # grasps that missed: try the next best one
        best, best_cost = None, np.inf
        for shift in [k * g.yaw_free / 6 for k in range(-6, 7)]:
            c, s = np.cos(shift), np.sin(shift)
            turned = np.array([c * off[0] - s * off[1], s * off[0] + c * off[1]]) if g.rim else off
            for slide in [k * g.slide / 2 for k in range(-2, 3)]:
                if (shift, slide) in tried:
                    continue
                # prefer the smallest change among equally clear grasps
                cost = (hand_overlap(centre + turned + slide * axis, z, yaw + shift, p, self.obj, self.obstacles)
                        + 1e-3 * (abs(shift) + 10 * abs(slide)))
                if cost < best_cost - 1e-4:
                    best, best_cost = (shift, slide), cost
        best = best or (0.0, 0.0)
        tried.append(best)
        return best

    def _offset(self, p: dict[str, np.ndarray]) -> np.ndarray:
        """Grasp point relative to the object's position (world xy), fixed once the object is held."""
        g = self.grasp
        if "local_yaw" not in self.extra or self.phase_name == "approach":
            self.extra["local_yaw"] = yaw_of(p[f"{self.obj}_quat"])
        c, s = np.cos(self.extra["local_yaw"]), np.sin(self.extra["local_yaw"])
        lx, ly = g.local_offset if g.local_offset is not None else (0.0, 0.0)
        lx += self.extra.get("slide", 0.0)  # along the object's own x (a box's long side)
        off = np.array([c * lx - s * ly, s * lx + c * ly, 0.0])
        if g.local_offset is None:
            world = np.asarray(self.offset, np.float64)
            if g.rim:  # the rim point turns with the grasp yaw
                t = self.extra.get("yaw_shift", 0.0)
                world = np.array([np.cos(t) * world[0] - np.sin(t) * world[1], np.sin(t) * world[0] + np.cos(t) * world[1]])
            off[:2] += world
        return off

    def _waypoint(self, p: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, float]:
        """(eef target position, gripper command) for the phase `name`."""
        g, prm = self.grasp, self.params
        obj = vec(p, f"{self.obj}_pos")
        off = self._offset(p)
        grasp = obj + off + np.array([0.0, 0.0, g.dz])
        tgt = self.target.point(p)
        tgt[:2] += self.place_shift
        place_z = tgt[2] + (g.dz - g.bottom) + g.place_clear - self.target.press
        c, s = np.cos(self.place_turn), np.sin(self.place_turn)
        place_off = np.array([c * off[0] - s * off[1], s * off[0] + c * off[1]])
        place = np.array([tgt[0] + place_off[0], tgt[1] + place_off[1], place_z])
        grasp_z = self.extra["grasp_at"][2] if "grasp_at" in self.extra else grasp[2]
        if self.lift is not None:
            carry_z = max(grasp_z, place_z) + self.lift
        else:
            # over the target's walls with the object as it hangs: one held off-centre (a bowl by its rim) may
            # tilt and hang lower than planned, and its low side would catch a drawer's front
            clear = max(0.05, self.target.rim + 0.02) + self.extra.get("sag", 0.0)
            carry_z = max(self.extra.get("lift_z", grasp_z + prm.carry), place_z + clear)
        if name == "approach":
            return np.array([grasp[0], grasp[1], grasp[2] + prm.hover]), -1.0
        if name == "descend":
            return grasp, -1.0
        if name == "close":
            return self.extra["grasp_at"], 1.0
        if name == "lift":
            return np.array([*self.extra["grasp_at"][:2], carry_z]), 1.0
        if name == "transport":
            # put the object, not the hand, over the target: a held object pivots a little about the grasp
            # (more under MuJoCo 3), so use the measured hand-object offset while it is plausible; it is
            # latched when lowering starts (in contact, a blocked object would drag the hand along)
            held = vec(p, "robot0_eef_pos")[:2] - obj[:2]
            turned = self.place_turn == 0.0 or rot_error(self._rot(name), p["robot0_eef_quat"]) < 0.1
            if turned and np.linalg.norm(held - place_off) < HELD_TOL:
                place[:2] = tgt[:2] + held
            self.extra["place_xy"] = place[:2].copy()
            return np.array([place[0], place[1], carry_z]), 1.0
        if name == "lower":
            if "place_xy" in self.extra:
                place[:2] = self.extra["place_xy"]
            return place, 1.0
        if name == "open":
            return self.extra["release_at"], -1.0
        if name in ("retreat", "done"):
            r = self.extra["release_at"]
            return np.array([r[0], r[1], r[2] + 0.1]), -1.0
        raise AssertionError(name)

    def _advance(self, o: Observation) -> None:
        """Move through phases whose exit condition the current observation meets."""
        p = o.privileged
        eef = vec(p, "robot0_eef_pos")
        for _ in range(len(self.phases)):
            name = self.phase_name
            elapsed = self.elapsed(o)
            target, _ = self._waypoint(p, name)
            err = target - eef
            rot_err = rot_error(self._rot("approach"), p["robot0_eef_quat"])
            done = False
            if name == "approach":
                self.yaw = self._grasp_yaw(p)
                done = (np.linalg.norm(err[:2]) < 0.01 and abs(err[2]) < 0.02 and rot_err < 0.08) or elapsed > 80
            elif name == "descend":
                done = np.linalg.norm(err) < 0.01 or elapsed > 30
                if done:
                    self.extra["grasp_at"] = eef.copy()
                    if self.place_yaw is not None:
                        self.place_turn = near_yaw(self.place_yaw - self.yaw, 0.0)
            elif name == "close":
                done = elapsed >= self.params.close_steps
            elif name == "lift":
                done = abs(err[2]) < 0.04 or elapsed > 40
                rise = 0.02 if self.lift is None else 0.5 * self.lift
                if done and rise > 0 and p[f"{self.obj}_pos"][2] < self.obj_z0 + rise:  # missed: try again
                    if self.retries < 2:
                        self.retries += 1
                        for k in ("lift_z", "yaw_shift", "slide"):  # the next best grasp, if it has a choice
                            self.extra.pop(k, None)
                        self.enter(0, o.step)
                        continue
            elif name == "transport":
                turned = self.place_turn == 0.0 or rot_error(self._rot(name), p["robot0_eef_quat"]) < 0.1
                # lower only once the held object stopped swinging about the grasp (its offset from the
                # hand steady between two looks)
                held = eef[:2] - vec(p, f"{self.obj}_pos")[:2]
                steady = np.linalg.norm(held - self.extra.get("held", held + 1.0)) < 0.004
                self.extra["held"] = held
                done = (np.linalg.norm(err[:2]) < 0.01 and turned and steady) or elapsed > 80
            elif name == "lower":
                done = np.linalg.norm(err) < 0.01 or elapsed > 40
                if done:
                    self.extra["release_at"] = eef.copy()
            elif name == "open":
                done = elapsed >= self.params.open_steps
            elif name == "retreat":
                done = abs(err[2]) < 0.02 or elapsed > 30
                if done and self._missed(p) and self.place_retries < 2:  # dropped or slid off: again
                    self.place_retries += 1
                    self.retries = 0
                    for k in ("grasp_at", "release_at", "lift_z", "sag", "yaw_shift", "yaw_ref", "local_yaw",
                              "place_xy", "held"):
                        self.extra.pop(k, None)
                    self.enter(0, o.step)
                    continue
            if name == "done":
                self.done = True
            if not done or name == "done":
                return
            if name == "lift":
                self.extra["lift_z"] = float(eef[2])
                self.extra["sag"] = max(0.0, float(eef[2] - p[f"{self.obj}_pos"][2]) - self.grasp.dz)
            self.enter(self.phase + 1, o.step)

    def _target(self, o: Observation) -> Command:
        p = o.privileged
        name = self.phase_name
        target, grip = self._waypoint(p, name)
        slow = name in ("descend", "lower") and np.linalg.norm(target - vec(p, "robot0_eef_pos")) < 0.04
        speed = 0.6 if slow else FAST if name in ("approach", "lift", "retreat") else 1.0
        return Command(target, self._rot(name, float(p["robot0_eef_pos"][2])), grip, speed)

    def _missed(self, p: dict[str, np.ndarray]) -> bool:
        """The released object is not where it was put (xy of its position vs the release point)."""
        tgt, obj = self.target.point(p), vec(p, f"{self.obj}_pos")
        if self.container:
            return (float(np.linalg.norm(obj[:2] - tgt[:2])) > self.miss_tol
                    or obj[2] + self.grasp.bottom > tgt[2] - self.stack_z)
        return float(np.linalg.norm(obj[:2] - tgt[:2] - self.place_shift)) > self.miss_tol

    def _rot(self, name: str, eef_z: float | None = None) -> Rotation:
        # the turn starts once the lifted object is clear of the table
        lifted = name == "lift" and eef_z is not None and eef_z > self.extra["grasp_at"][2] + 0.06
        turned = lifted or name in ("transport", "lower", "open", "retreat", "done")
        return down(self.yaw + (self.place_turn if turned else 0.0))


class Hold(Skill):
    """Stay where the eef is, gripper open (the end of a plan, or after a skill gave up)."""

    name = "hold"
    phases = ("hold",)

    def _advance(self, o: Observation) -> None:
        if "at" not in self.extra:
            self.extra["at"] = vec(o.privileged, "robot0_eef_pos")
            self.extra["rot"] = Rotation.from_quat(o.privileged["robot0_eef_quat"])

    def _target(self, o: Observation) -> Command:
        return Command(self.extra["at"], self.extra["rot"], -1.0)
