"""Skills on fixtures with a hinged door (LIBERO's microwave): put an object in through the front, swing the door.

The microwave's opening is 14.4 cm high and its top slab reaches the front plane, so a hand pointing
down (its body from 2.6 to 12.4 cm above the eef, the eef 1.6 cm below the rim it grasps) cannot follow
a mug held by its rim inside. The mug goes in held by its handle instead, the gripper horizontal and pointing into the
opening, fingers closing across the handle's width: the hand stays outside the front plane while the
mug's body is inside. This needs the handle to face the front, as LIBERO's scene places it.

A horizontal hand has the wrist and forearm behind it, low over the table, so before the carry:
- the door is swung wider open when its free edge leans into the corridor the hand travels along;
- other objects standing in that corridor (the second mug) are parked at the robot's side.

Swinging the door: the closed fingers, pointing down beside the door's face (the hand above its top
edge), push it about its hinge; the push target leads the measured door angle by a bounded step, so
the hand follows the door rather than a clock. Closing pushes the outer face, opening the inner one.

Geometry (hinge, door length and faces, the opening, the mug's handle) was measured from the fixture's
and the mug's collision geoms in the LIBERO assets and is expressed in each one's own frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from evalkit.errors import BadInput
from evalkit.policies.base import Observation
from evalkit.policies.scripted_objects import category, movable_names
from evalkit.policies.scripted_skills import (
    FAST,
    Command,
    Skill,
    down,
    eef_yaw,
    rot_error,
    vec,
    yaw_of,
)


@dataclass(frozen=True)
class DoorGeometry:
    """A front-opening fixture with a door hinged about a vertical axis, in the fixture's frame (front faces -y).
    The door lies along local +x from the hinge when shut; opening turns it to negative joint angles."""

    hinge: tuple[float, float, float]
    length: float  # hinge to the door's free edge
    outer: float  # door-frame y of the door's outer face (the side with the handle)
    inner: float  # door-frame y of its inner face
    top: float  # fixture-frame z of the door's top edge
    front: float  # fixture-frame y of the front plane
    floor: float  # fixture-frame z of the floor inside
    slot_x: float  # fixture-frame x where an object goes in (the opening's middle, clear of door and panel)
    closed_q: float  # shut above this joint position (LIBERO's close range)


# LIBERO's microwave: cavity x -0.1435..0.0635, y -0.088..0.0805, z 0.024..0.168; door 25.9 cm long and
# 2.4 cm thick, hinged at its left front corner, shut above -0.005 rad (joint range -2.094..0).
DOORS: dict[str, DoorGeometry] = {
    "microwave": DoorGeometry(hinge=(-0.1725, -0.088, 0.096), length=0.259, outer=-0.025, inner=-0.001,
                              top=0.1885, front=-0.088, floor=0.024, slot_x=-0.035, closed_q=-0.005),
}


@dataclass(frozen=True)
class HandleShape:
    """An object carried by its handle, in its own frame: the handle's outer bar (the grasp point, fingers
    closing across the handle's width), the body's centre and radius, the handle's outer extent."""

    grasp: tuple[float, float, float]
    centre: tuple[float, float]
    radius: float
    handle_end: float  # local x of the handle's outermost point
    height: float  # top of the body above the object's position


# The white and yellow mug: its handle's outer bar (0.8 x 1.75 cm, 5.8 cm tall) at local x 6.4 cm, the
# body a 4.6-5 cm radius cylinder centred 1.8 cm the other way, 10.3 cm tall.
HANDLES: dict[str, HandleShape] = {
    "white_yellow_mug": HandleShape(grasp=(0.064, 0.0, 0.056), centre=(-0.018, 0.0), radius=0.05, handle_end=0.068,
                                    height=0.103),
}

INSERT_CLEAR = 0.013  # m: the handle's outer end this far inside the front plane (the door shuts in front of it)
CARRY_ABOVE_FLOOR = 0.016  # m: the object's base above the fixture's floor while it goes in
LIFT = 0.12  # m: the hand rises this far above the handle grasp before carrying
HAND_HALF_WIDTH = 0.106  # m: the hand's half width along the fingers' axis (its collision mesh)
# The corridor (fixture frame, beyond the slot's x either side and in front of the front plane) where the
# horizontal hand, wrist and forearm pass while carrying by the handle: objects there are parked.
CORRIDOR = (0.2, 0.75)
PARK = (-0.3, -0.55)  # fixture-frame xy (from the slot, from the front plane) of the parking spot: the robot's side
# The door is swung wider when its free edge reaches within this of the corridor's left edge (the hand's
# width either side of the slot), to OPEN_WIDE.
DOOR_CLEAR = 0.03
OPEN_WIDE = -1.8
PUSH_R = {"close": 0.12, "open": 0.2}  # m from the hinge: closing short of the handle (at 23.75 cm)
PUSH_Z = 0.175  # m: eef height (fixture frame) when pushing: the hand (2.6 cm above the eef) clears the door's top
FINGER_HALF = 0.015  # m: half extent of the closed finger pair (1.1 cm across its axis, up to 2 cm along it)
TURN_STEP = 0.4  # rad: the hand turns towards a new orientation at most this far ahead of where it is


def door_of(name: str) -> DoorGeometry:
    if category(name) not in DOORS:
        raise BadInput(f"scripted expert knows no door on '{name}' (known: {', '.join(sorted(DOORS))})")
    return DOORS[category(name)]


def fixture_frame(priv: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, Rotation]:
    """(position, yaw rotation) of a fixture: LIBERO's fixtures stand upright."""
    return vec(priv, f"{name}_pos"), Rotation.from_euler("z", yaw_of(priv[f"{name}_quat"]))


def horizontal(direction: np.ndarray, cur_quat: np.ndarray | None = None) -> Rotation:
    """Gripper pointing horizontally along `direction`, fingers closing horizontally (across it). Of the two
    orientations (a half turn about the pointing axis) the one nearer `cur_quat`."""
    a = np.array([direction[0], direction[1], 0.0])
    a /= np.linalg.norm(a)
    y = np.cross([0.0, 0.0, 1.0], a)  # closing axis, horizontal
    x = np.cross(y, a)
    r = Rotation.from_matrix(np.stack([x, y, a], axis=1))
    if cur_quat is None:
        return r
    flipped = r * Rotation.from_euler("z", np.pi)
    cur = Rotation.from_quat(cur_quat)
    return r if (r * cur.inv()).magnitude() <= (flipped * cur.inv()).magnitude() else flipped


def toward(goal: Rotation, quat: np.ndarray, step: float = TURN_STEP) -> Rotation:
    """An orientation at most `step` from the current one on the way to `goal`. It slows a large turn to
    about `step` per replanning: turned at full rate the wrist swings the arm off its position target by
    up to 20 cm (into the open door, say)."""
    cur = Rotation.from_quat(quat)
    delta = (goal * cur.inv()).as_rotvec()
    angle = float(np.linalg.norm(delta))
    if angle <= step:
        return goal
    return Rotation.from_rotvec(delta * (step / angle)) * cur


def door_in_the_way(fixture: str, priv: dict[str, np.ndarray]) -> bool:
    """Whether the open door's free edge leans into the corridor of a carry through the slot."""
    g = door_of(fixture)
    q = float(priv[f"{fixture}_joint_pos"][0])
    edge_x = g.hinge[0] + g.length * np.cos(q)
    return bool(edge_x > g.slot_x - HAND_HALF_WIDTH - DOOR_CLEAR)


def corridor_objects(obj: str, fixture: str, priv: dict[str, np.ndarray]) -> list[str]:
    """Movable objects (other than `obj`) standing in the corridor of the carry, nearest the fixture first."""
    g = door_of(fixture)
    pos, rot = fixture_frame(priv, fixture)
    out = []
    for n in movable_names(priv):
        if n in (obj, fixture) or f"{n}_joint_pos" in priv:
            continue
        local = rot.inv().apply(vec(priv, f"{n}_pos") - pos)
        if abs(local[0] - g.slot_x) < CORRIDOR[0] and g.front - CORRIDOR[1] < local[1] < g.front:
            out.append((float(-local[1]), n))
    return [n for _, n in sorted(out)]


def parking_point(name: str, fixture: str, priv: dict[str, np.ndarray], index: int = 0) -> np.ndarray:
    """Where to park an object out of the corridor (world; on the table where it stands now)."""
    g = door_of(fixture)
    pos, rot = fixture_frame(priv, fixture)
    out = pos + rot.apply([g.slot_x + PARK[0], g.front + PARK[1] - 0.12 * index, 0.0])
    out[2] = float(priv[f"{name}_pos"][2])
    return out


@dataclass(frozen=True)
class FixedTarget:
    """A place target at a fixed world point (a parking spot), with `PlaceTarget`'s interface."""

    xyz: tuple[float, float, float]
    ref: str = ""
    is_site: bool = False
    surface: float = 0.0
    rim: float = 0.0
    press: float = 0.0

    def point(self, priv: dict[str, np.ndarray]) -> np.ndarray:
        return np.array(self.xyz, np.float64)


class PutThrough(Skill):
    """Carry an object by its handle into a fixture through its front opening:
    up (above everything) -> over (above the handle, turning horizontal) -> down (the open fingers either
    side of the handle's outer bar) -> grip -> lift -> align (above the point in front of the slot, turning
    to point in) -> drop (to the opening's height) -> insert -> lower -> release -> back (out along the
    approach) -> rise (turning back to pointing down)."""

    name = "put_through"
    phases = ("up", "over", "down", "grip", "lift", "align", "drop", "insert", "lower", "release", "back", "rise",
              "done")

    def __init__(self, obj: str, fixture: str):
        super().__init__()
        if category(obj) not in HANDLES:
            raise BadInput(f"scripted expert puts only objects with a known handle through a door "
                           f"(known: {', '.join(sorted(HANDLES))}); got '{obj}'")
        self.obj, self.fixture = obj, fixture
        self.target_name = fixture
        self.geo, self.shape = door_of(fixture), HANDLES[category(obj)]
        self.retries = 0

    def describe(self) -> str:
        return f"{self.name}({self.obj}->{self.fixture}):{self.phase_name}"

    # -- geometry -------------------------------------------------------------------------------
    def _handle(self, p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(handle grasp point, approach direction: from the handle towards the body), world."""
        m = Rotation.from_euler("z", yaw_of(p[f"{self.obj}_quat"]))
        grasp = vec(p, f"{self.obj}_pos") + m.apply(self.shape.grasp)
        return grasp, m.apply([-1.0, 0.0, 0.0])

    def _goal(self, p: dict[str, np.ndarray], depth: float, above_floor: float) -> np.ndarray:
        """Eef position that puts the handle's outer end `depth` inside the front plane (negative: outside)
        and the object's base `above_floor` over the fixture's floor, at the slot's x."""
        pos, rot = fixture_frame(p, self.fixture)
        sh = self.shape
        y = self.geo.front + depth + (sh.handle_end - sh.grasp[0])  # the grasp is inside the handle's end
        z = self.geo.floor + above_floor + sh.grasp[2]
        return pos + rot.apply([self.geo.slot_x, y, z])

    def _inward(self, p: dict[str, np.ndarray]) -> np.ndarray:
        _, rot = fixture_frame(p, self.fixture)
        return rot.apply([0.0, 1.0, 0.0])

    # -- phases ---------------------------------------------------------------------------------
    def _advance(self, o: Observation) -> None:
        p = o.privileged
        eef = vec(p, "robot0_eef_pos")
        for _ in range(len(self.phases)):
            name, el = self.phase_name, self.elapsed(o)
            cmd = self._target(o)
            err = cmd.pos - eef
            rerr = rot_error(self.extra.get("goal_rot", cmd.rot), p["robot0_eef_quat"])
            done = False
            if name == "up":
                done = abs(err[2]) < 0.03 or el > 40
            elif name == "over":
                done = (np.linalg.norm(err) < 0.015 and rerr < 0.06) or el > 100
            elif name == "down":
                done = np.linalg.norm(err) < 0.008 or el > 40
            elif name == "grip":
                done = el >= 12
            elif name == "lift":
                done = abs(err[2]) < 0.015 or el > 40
                if done and p[f"{self.obj}_pos"][2] < self.extra["z0"] + 0.02:  # slipped off the handle
                    if self.retries < 2:
                        self.retries += 1
                        for k in ("grasp_at", "up_at", "up_rot"):
                            self.extra.pop(k, None)
                        self.enter("up", o.step)
                        return
            elif name == "align":
                done = (np.linalg.norm(err) < 0.02 and rerr < 0.05) or el > 100
            elif name == "drop":
                done = np.linalg.norm(err) < 0.01 or el > 40
            elif name == "insert":
                done = np.linalg.norm(err) < 0.008 or el > 60
            elif name == "lower":
                done = np.linalg.norm(err) < 0.006 or el > 30
            elif name == "release":
                done = el >= 8
            elif name == "back":
                done = np.linalg.norm(err) < 0.02 or el > 40
            elif name == "rise":
                done = (np.linalg.norm(err) < 0.03 and rerr < 0.1) or el > 60
            if name == "done":
                self.done = True
                return
            if not done:
                return
            if name == "down":
                self.extra["grasp_at"] = eef.copy()
                self.extra["z0"] = float(p[f"{self.obj}_pos"][2])
            if name == "release":
                self.extra["release_at"] = eef.copy()
            self.enter(self.phase + 1, o.step)

    def _target(self, o: Observation) -> Command:
        p = o.privileged
        name = self.phase_name
        quat = p["robot0_eef_quat"]
        if name in ("up", "over", "down", "grip"):
            grasp, a = self._handle(p)
            # travel above the object's top: the horizontal hand reaches 3.2 cm below the eef
            safe = float(p[f"{self.obj}_pos"][2]) + self.shape.height + 0.07
            if name == "up":  # as it is: turning where the last skill ended may swing the arm into things
                if "up_at" not in self.extra:
                    self.extra["up_at"] = vec(p, "robot0_eef_pos")
                    self.extra["up_rot"] = Rotation.from_quat(quat)
                u = self.extra["up_at"]
                return Command(np.array([u[0], u[1], max(u[2], safe)]), self.extra["up_rot"], -1.0)
            if "grasp_rot" not in self.extra or name == "over":
                self.extra["grasp_rot"] = horizontal(a, quat)
            goal = self.extra["goal_rot"] = self.extra["grasp_rot"]
            if name == "over":
                return Command(np.array([grasp[0], grasp[1], safe]), toward(goal, quat), -1.0, FAST)
            if name == "down":  # straight down: the open fingers pass either side of the handle
                return Command(grasp, goal, -1.0, 0.6)
            return Command(self.extra["grasp_at"], goal, 1.0)
        inward = self._inward(p)
        if "carry_rot" not in self.extra:
            self.extra["carry_rot"] = horizontal(inward, quat)
        goal = self.extra["goal_rot"] = self.extra["carry_rot"]
        sh = self.shape
        outside = -(sh.handle_end - sh.centre[0] + sh.radius) - 0.02  # the body's far side clear of the front
        # carried high: low and far from the robot, a horizontal hand stretches the arm to its shoulder's limit
        high = self.extra["grasp_at"][2] + LIFT
        if name == "lift":
            g = self.extra["grasp_at"]
            return Command(np.array([g[0], g[1], high]), self.extra["grasp_rot"], 1.0)
        if name == "align":
            front = self._goal(p, outside, CARRY_ABOVE_FLOOR)
            return Command(np.array([front[0], front[1], max(front[2], high)]), toward(goal, quat), 1.0)
        if name == "drop":
            return Command(self._goal(p, outside, CARRY_ABOVE_FLOOR), goal, 1.0)
        if name == "insert":
            return Command(self._goal(p, INSERT_CLEAR, CARRY_ABOVE_FLOOR), goal, 1.0, 0.6)
        if name == "lower":
            return Command(self._goal(p, INSERT_CLEAR, 0.002), goal, 1.0, 0.5)
        if name == "release":
            return Command(self.extra.get("release_at", self._goal(p, INSERT_CLEAR, 0.002)), goal, -1.0)
        r = self.extra["release_at"]
        back = r - 0.13 * inward
        if name == "back":
            return Command(back, goal, -1.0)
        # rise and turn back to the orientation the skill started from (pointing down): the way back of the
        # first turn; another way to point down (e.g. a pure pitch) drives the wrist into its joint limits
        goal = self.extra["goal_rot"] = self.extra["up_rot"]
        return Command(back + np.array([0.0, 0.0, 0.12]), toward(goal, quat), -1.0)


class SwingDoor(Skill):
    """Swing a hinged door to `goal` (its joint position): over (above the door's pushing side, pointing
    down) -> down (closed fingers beside the door's face, the hand above its top edge) -> push (about the
    hinge until the door passes the goal) -> up. Closing pushes the outer face, opening the inner face."""

    phases = ("over", "down", "push", "up", "done")

    def __init__(self, fixture: str, goal: float | None = None):
        super().__init__()
        self.fixture = fixture
        self.obj = self.target_name = fixture
        self.geo = door_of(fixture)
        self.goal = self.geo.closed_q + 0.003 if goal is None else goal  # None: shut
        self.closing = goal is None
        self.name = "close_door" if self.closing else "open_door"
        self.retries = 0

    def describe(self) -> str:
        return f"{self.name}({self.fixture}):{self.phase_name}"

    def q(self, p: dict[str, np.ndarray]) -> float:
        return float(p[f"{self.fixture}_joint_pos"][0])

    def _reached(self, p: dict[str, np.ndarray]) -> bool:
        return self.q(p) > self.goal - 0.001 if self.closing else self.q(p) < self.goal + 0.05

    def _contact(self, p: dict[str, np.ndarray], q: float, gap: float) -> np.ndarray:
        """Eef position with the closed fingers `gap` off the door's pushed face (negative: pressed in), along
        the door turned to joint position q, at the pushing height."""
        pos, rot = fixture_frame(p, self.fixture)
        g = self.geo
        off = g.outer - FINGER_HALF - gap if self.closing else g.inner + FINGER_HALF + gap
        r = PUSH_R["close" if self.closing else "open"]
        local = np.array(g.hinge) + Rotation.from_euler("z", q).apply([r, off, 0.0])
        local[2] = PUSH_Z
        return pos + rot.apply(local)

    def _advance(self, o: Observation) -> None:
        p = o.privileged
        eef = vec(p, "robot0_eef_pos")
        for _ in range(len(self.phases)):
            name, el = self.phase_name, self.elapsed(o)
            cmd = self._target(o)
            err = np.linalg.norm(cmd.pos - eef)
            done = False
            if name == "over":
                if self._reached(p) and not self.extra.get("touched"):
                    self.enter("done", o.step)
                    continue
                done = (err < 0.02 and rot_error(cmd.rot, p["robot0_eef_quat"]) < 0.1) or el > 80
            elif name == "down":
                done = err < 0.01 or el > 30
            elif name == "push":
                self.extra["touched"] = True
                done = self._reached(p) or el > 100
                if done and not self._reached(p) and self.retries < 2:  # slipped past the door: again
                    self.retries += 1
                    self.extra["again"] = True
                    self.enter("up", o.step)
                    return
            elif name == "up":
                done = err < 0.02 or el > 20
                if done and self.extra.pop("again", False):
                    self.extra.pop("up_from", None)
                    self.enter("over", o.step)
                    return
            if name == "done":
                self.done = True
                return
            if not done:
                return
            self.enter(self.phase + 1, o.step)

    def _target(self, o: Observation) -> Command:
        p = o.privileged
        q = self.q(p)
        name = self.phase_name
        # the push target leads the measured door angle by a bounded step: the hand follows the door, and
        # (closing) ends pressing it against its stop
        if name == "push":
            at = min(q + 0.35, 0.08) if self.closing else max(q - 0.35, self.goal - 0.05)
        else:
            at = q
        # pointing down at the yaw the hand has (the hand is above the door's top, only the closed fingers
        # meet it, whichever way they turn): turning the wrist too drives it into its joint limits
        if "yaw" not in self.extra:
            self.extra["yaw"] = eef_yaw(p)
        rot = down(self.extra["yaw"])
        if name == "over":
            start = self._contact(p, q, 0.015)
            pos, frot = fixture_frame(p, self.fixture)
            top = (pos + frot.apply([0.0, 0.0, self.geo.top]))[2]
            return Command(np.array([start[0], start[1], top + 0.05]), toward(rot, p["robot0_eef_quat"]), 1.0, FAST)
        if name == "down":
            return Command(self._contact(p, q, 0.015), rot, 1.0)
        if name == "push":
            return Command(self._contact(p, at, -0.01), rot, 1.0, 0.8)
        if "up_from" not in self.extra:
            self.extra["up_from"] = vec(p, "robot0_eef_pos")
        return Command(self.extra["up_from"] + np.array([0.0, 0.0, 0.08]), rot, 1.0)
