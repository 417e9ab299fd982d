"""Skills on LIBERO's articulated fixtures (cabinet drawers, stove knob) and pushing an object.

Geometry (handle and hinge positions in the fixture's own frame) was measured from the fixtures'
collision geoms and joint anchors in the LIBERO scenes; the live state comes from the privileged
observation: the fixture's pose (`<f>_pos`, `<f>_quat`) and its joints (`<f>_joint_pos`), so every
phase ends when the measured joint reached its goal, not after a fixed number of steps.

- Open a drawer: grasp the handle bar from the front with the gripper pointing into the drawer and
  the fingers closing vertically (a top-down grasp of a lower drawer's handle would hit the handle
  above it), pull to the open position, back off and turn the hand down away from the drawer.
- Close a drawer: push its handle bar with the closed fingers pointing down (leaning back so the
  forearm stays clear of the cabinet above).
- Stove knob: grasp its fin from above and turn the gripper about the knob's vertical hinge, the
  grasp point following the knob's measured angle.
- Push: drag an object (a bowl) from inside its cavity until its measured position reaches a goal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from evalkit.errors import BadInput
from evalkit.policies.base import Observation
from evalkit.policies.scripted_objects import category
from evalkit.policies.scripted_skills import (
    FAST,
    Command,
    Skill,
    down,
    eef_yaw,
    near_yaw,
    rot_error,
    vec,
    yaw_of,
)


def fixture_frame(priv: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, float]:
    """(position, yaw) of a fixture."""
    return vec(priv, f"{name}_pos"), yaw_of(priv[f"{name}_quat"])


def to_world(pos: np.ndarray, yaw: float, local: np.ndarray) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return pos + np.array([c * local[0] - s * local[1], s * local[0] + c * local[1], local[2]])


def facing(normal: np.ndarray, fingers_vertical: bool, cur_quat: np.ndarray | None = None) -> Rotation:
    """Gripper pointing horizontally along -normal (into a fixture's front), fingers closing vertically
    or horizontally. Of the two equivalent orientations (a half turn about the approach axis) the one
    closer to the current orientation is returned."""
    a = -np.asarray(normal, np.float64)
    a = a / np.linalg.norm(a)
    side = np.cross([0.0, 0.0, 1.0], a)
    side /= np.linalg.norm(side)
    y = np.array([0.0, 0.0, 1.0]) if fingers_vertical else side  # finger closing axis (eef y)
    x = np.cross(y, a)
    r = Rotation.from_matrix(np.stack([x, y, a], axis=1))
    if cur_quat is None:
        return r
    flipped = r * Rotation.from_euler("z", np.pi)
    cur = Rotation.from_quat(cur_quat)
    return r if (r * cur.inv()).magnitude() <= (flipped * cur.inv()).magnitude() else flipped


# ------------------------------------------------------------------------------------------ drawers


@dataclass(frozen=True)
class CabinetGeometry:
    """Drawer handles in the cabinet's frame at joint position 0. A drawer slides along local +y as its
    joint grows (open is negative); its front faces local -y."""

    handles: dict[str, tuple[float, float, float]]  # level -> handle bar centre
    open_q: float = -0.15  # LIBERO: open below -0.14 (joint range -0.16 .. 0.01)
    closed_q: float = 0.004  # LIBERO: closed above 0.0
    levels: tuple[str, ...] = ("top", "middle", "bottom")  # order of the joints in `<f>_joint_pos`
    face: float = 0.024  # the drawers' front face is this far behind the handle bar
    wall: float = 0.013  # a drawer's inner front wall is this far behind its front face


# Lowest eef height for moving the sideways hand (it reaches 10 cm below the eef) over the table
# next to the cabinet: 7 cm of clearance for the objects standing there.
VIA_CLEAR = 0.17
PRE = 0.07  # pre-grasp distance in front of a handle
CLOSE_TILT = 0.4  # rad: closing a drawer, the gripper leans back from the cabinet
_DRAWERS = {"top": (-0.0035, -0.102, 0.184), "middle": (-0.0035, -0.102, 0.1105), "bottom": (-0.0035, -0.102, 0.041)}
CABINETS: dict[str, CabinetGeometry] = {
    "wooden_cabinet": CabinetGeometry(_DRAWERS),
    "white_cabinet": CabinetGeometry(_DRAWERS),
}


class DrawerSkill(Skill):
    """Shared geometry of the drawer skills: the handle's pose follows the drawer's measured joint."""

    open_it = True

    def __init__(self, cabinet: str, level: str):
        super().__init__()
        self.cabinet, self.level = cabinet, level
        self.obj = self.target_name = cabinet
        self.geo = CABINETS[category(cabinet)]
        self.joint = self.geo.levels.index(level)
        self.retries = 0

    def describe(self) -> str:
        return f"{self.name}({self.cabinet}:{self.level}):{self.phase_name}"

    def q(self, p: dict[str, np.ndarray]) -> float:
        return float(p[f"{self.cabinet}_joint_pos"][self.joint])

    def _handle(self, p: dict[str, np.ndarray], q: float) -> tuple[np.ndarray, np.ndarray]:
        """(handle centre at joint position q, outward front normal), world frame."""
        pos, yaw = fixture_frame(p, self.cabinet)
        hx, hy, hz = self.geo.handles[self.level]
        handle = to_world(pos, yaw, np.array([hx, hy + q, hz]))
        normal = to_world(np.zeros(3), yaw, np.array([0.0, -1.0, 0.0]))
        return handle, normal

    def front(self, p: dict[str, np.ndarray]) -> np.ndarray:
        """Outward normal of the drawer's front (horizontal, world frame)."""
        return self._handle(p, 0.0)[1]

    def clearance_goal(self, p: dict[str, np.ndarray], obj: str, need: float = 0.11) -> np.ndarray | None:
        """Where to push `obj` so that, with this drawer open, a top-down grasp of it keeps the hand clear
        of the drawer's front (None: it already is). `need`: the object's centre in front of the open
        front face (a rim grasp's hand reaches 5 cm past the object's centre)."""
        handle, n = self._handle(p, self.geo.open_q)
        front = handle - self.geo.face * n
        c = vec(p, f"{obj}_pos")
        ahead = float((c - front)[:2] @ n[:2])
        side = np.array([-n[1], n[0]])
        if ahead >= need or abs(float((c - handle)[:2] @ side)) > 0.22:
            return None
        return c[:2] + (need - ahead + 0.01) * n[:2]

    def place_shift(self, p: dict[str, np.ndarray], site: str, radius: float, q: float) -> np.ndarray:
        """xy shift (world) of the drop point from the drawer's region site, for an object of `radius`, the
        drawer open to joint position q. Only the part of the drawer in front of the cabinet's face is open
        from above, and under another drawer its handle bar sticks out over that part: the object goes
        down with its far side just clear of the bar (or of the face), as far out as its lower part still
        lands inside the drawer's front wall. The site (the middle of the whole drawer) is often too far in
        (libero_10: a bowl into the bottom drawer, open 14 cm, caught on the middle drawer's handle)."""
        g = self.geo
        handle, n = self._handle(p, 0.0)
        face = float((handle - g.face * n)[:2] @ n[:2])  # the closed front plane, along the outward normal
        # the site moves with the drawer: where it will be at q, along n, in front of the face
        ahead = float(vec(p, f"{site}_site_pos")[:2] @ n[:2]) + (self.q(p) - q) - face
        over = g.face + 0.008 if self.joint > 0 else 0.0  # the handle bar of the drawer above (1.6 cm deep)
        want = min(over + radius + 0.004, (-q) - g.wall - 0.8 * radius)
        return (want - ahead) * n[:2]

    def _achieved(self, q: float) -> bool:
        return q < self.geo.open_q + 0.008 if self.open_it else q > self.geo.closed_q - 0.003


class OpenDrawer(DrawerSkill):
    """via (above the pre-grasp point) -> pre (in front of the handle, pointing into the drawer, fingers
    vertical) -> reach -> grip -> pull to `open_q` -> back (opening the fingers) -> unwind (point down)."""

    name = "open_drawer"
    phases = ("via", "pre", "reach", "grip", "pull", "back", "unwind", "done")

    def _advance(self, o: Observation) -> None:
        p = o.privileged
        eef = vec(p, "robot0_eef_pos")
        q = self.q(p)
        for _ in range(len(self.phases)):
            name, el = self.phase_name, self.elapsed(o)
            cmd = self._target(o)
            err = np.linalg.norm(cmd.pos - eef)
            rerr = rot_error(cmd.rot, p["robot0_eef_quat"])
            done = False
            if name == "via":
                if self._achieved(q) and not self.extra.get("touched"):
                    self.enter("done", o.step)  # already there (e.g. the init state satisfies it)
                    continue
                done = (err < 0.04 and rerr < 0.3) or el > 80
            elif name == "pre":
                done = (err < 0.02 and rerr < 0.15) or el > 60
            elif name == "reach":
                done = err < 0.01 or el > 40
            elif name == "grip":
                done = el >= 10
            elif name == "pull":
                done = self._achieved(q) or el > 80
                if done and not self._achieved(q) and self.retries < 2:  # slipped off the handle: grasp again
                    self.retries += 1
                    self.extra.pop("back_from", None)
                    self.extra["retry"] = True
                    self.enter("back", o.step)
                    return
            elif name == "back":
                done = err < 0.04 or el > 30
                if done and self.extra.pop("retry", False):
                    self.extra.pop("back_from", None)
                    self.enter("via", o.step)
                    continue
            elif name == "unwind":
                done = rerr < 0.35 or el > 40
            if name == "done":
                self.done = True
                return
            if not done:
                return
            if name in ("reach",):
                self.extra["reach_at"] = eef.copy()
            self.enter(self.phase + 1, o.step)

    def _target(self, o: Observation) -> Command:
        p = o.privileged
        q = self.q(p)
        name = self.phase_name
        handle, n = self._handle(p, q)
        if "rot" not in self.extra or name == "via":
            self.extra["rot"] = facing(n, fingers_vertical=True, cur_quat=p["robot0_eef_quat"])
        rot = self.extra["rot"]
        if name == "via":  # above the pre-grasp point first: the sideways hand reaches 10 cm down
            pre = handle + PRE * n
            base_z = vec(p, f"{self.cabinet}_pos")[2]  # the cabinet stands on the table
            return Command(np.array([pre[0], pre[1], max(pre[2], base_z + VIA_CLEAR)]), rot, -1.0, FAST)
        if name == "pre":
            return Command(handle + PRE * n, rot, -1.0)
        if name == "reach":
            return Command(handle + 0.003 * n, rot, -1.0, 0.8)
        if name == "grip":
            return Command(self.extra["reach_at"], rot, 1.0)
        if name == "pull":
            goal, _ = self._handle(p, self.geo.open_q - 0.01)
            return Command(goal, rot, 1.0)
        # back (opening the gripper on the way: the fingers slide off the handle, pulling it a bit further):
        # straight out along the normal; unwind: turn to pointing down away from the drawer
        # (the sideways hand reaches 10 cm along its fingers' axis: turning it next to the drawer pushes it)
        if "back_from" not in self.extra:
            self.extra["back_from"] = vec(p, "robot0_eef_pos")
        back = self.extra["back_from"] + 0.12 * n  # not higher: far out, the arm is close to full reach
        if name == "back":
            return Command(back, rot, -1.0)
        heading = float(np.arctan2(n[1], n[0]))
        # turn while moving halfway back towards where the episode started: turning the hand far out
        # straightens the elbow into its limit
        mid = back + 0.5 * np.array([*(self.home[:2] - back[:2]), 0.0]) if self.home is not None else back
        if "unwind_yaw" not in self.extra:
            self.extra["unwind_yaw"] = near_yaw(heading - np.pi / 2, 0.0)
        return Command(mid, down(self.extra["unwind_yaw"]), -1.0, FAST)


class CloseDrawer(DrawerSkill):
    """above (the handle's outer side) -> down (closed fingertips level with the handle bar, pointing
    down, the hand's narrow side towards the drawer) -> push the bar to `closed_q` -> up. Pushing the
    bar rather than the front keeps the hand in front of the drawer above it when it is shut."""

    name = "close_drawer"
    phases = ("above", "down", "push", "up", "done")
    open_it = False

    def _advance(self, o: Observation) -> None:
        p = o.privileged
        eef = vec(p, "robot0_eef_pos")
        q = self.q(p)
        for _ in range(len(self.phases)):
            name, el = self.phase_name, self.elapsed(o)
            cmd = self._target(o)
            err = np.linalg.norm(cmd.pos - eef)
            done = False
            if name == "above":
                if self._achieved(q) and not self.extra.get("touched"):
                    self.enter("done", o.step)
                    continue
                done = (err < 0.02 and rot_error(cmd.rot, p["robot0_eef_quat"]) < 0.15) or el > 80
            elif name == "down":
                done = err < 0.01 or el > 30
            elif name == "push":
                self.extra["touched"] = True
                done = self._achieved(q) or el > 60
                if done and not self._achieved(q) and self.retries < 2:
                    self.retries += 1
                    self.enter("above", o.step)
                    return
            elif name == "up":
                done = err < 0.03 or el > 20
            if name == "done":
                self.done = True
                return
            if not done:
                return
            self.enter(self.phase + 1, o.step)

    def _target(self, o: Observation) -> Command:
        p = o.privileged
        handle, n = self._handle(p, self.q(p))
        if "yaw" not in self.extra:  # fingers along the drawer's width
            self.extra["yaw"] = near_yaw(float(np.arctan2(n[1], n[0])), eef_yaw(p))
        # tilted so the fingertips lead into the push: the wrist and forearm stay back from the cabinet
        rot = Rotation.from_rotvec(CLOSE_TILT * np.array([-n[1], n[0], 0.0])) * down(self.extra["yaw"])
        # the closed finger pair is ~2.4 cm thick: its centre stands 2 cm out from the bar's centre
        outside = handle + 0.045 * n + np.array([0.0, 0.0, 0.003])
        name = self.phase_name
        if name == "above":
            return Command(outside + np.array([0.0, 0.0, 0.08]), rot, 1.0, FAST)
        if name == "down":
            return Command(outside, rot, 1.0)
        if name == "push":
            goal, _ = self._handle(p, self.geo.closed_q + 0.004)
            return Command(goal + 0.016 * n + np.array([0.0, 0.0, 0.003]), rot, 1.0, 0.6)
        if "up_from" not in self.extra:
            self.extra["up_from"] = vec(p, "robot0_eef_pos")
        return Command(self.extra["up_from"] + np.array([0.0, 0.0, 0.08]), rot, 1.0)


def fixture_obstacles(priv: dict[str, np.ndarray]) -> tuple[tuple[float, float, float, float], ...]:
    """The drawer handle bars of every cabinet, where they are now, as obstacle discs (x, y, radius, top z)
    for choosing a grasp that keeps the fingers off them."""
    out = []
    for name in (k[: -len("_joint_pos")] for k in priv if k.endswith("_joint_pos")):
        if category(name) not in CABINETS:
            continue
        geo = CABINETS[category(name)]
        pos, yaw = fixture_frame(priv, name)
        joints = priv[f"{name}_joint_pos"]
        for level, (hx, hy, hz) in geo.handles.items():
            q = float(joints[geo.levels.index(level)])
            for t in (-0.035, 0.0, 0.035):  # along the 9 cm bar
                w = to_world(pos, yaw, np.array([hx + t, hy + q, hz]))
                out.append((float(w[0]), float(w[1]), 0.015, float(w[2]) + 0.008))
    return tuple(out)


def drawer(region: str, priv: dict[str, np.ndarray], open_it: bool) -> DrawerSkill:
    """'wooden_cabinet_1_top_region' -> Drawer(wooden_cabinet_1, top)."""
    for cab in sorted((k[: -len("_joint_pos")] for k in priv if k.endswith("_joint_pos")), key=len, reverse=True):
        if region.startswith(cab + "_") and category(cab) in CABINETS:
            level = region[len(cab) + 1:].removesuffix("_region")
            if level in CABINETS[category(cab)].levels:
                return OpenDrawer(cab, level) if open_it else CloseDrawer(cab, level)
    raise BadInput(f"scripted expert knows no drawer '{region}' (cabinets: {', '.join(sorted(CABINETS))})")


# ------------------------------------------------------------------------------------------ knobs


@dataclass(frozen=True)
class KnobGeometry:
    hinge: tuple[float, float]  # hinge axis (vertical) in the fixture's frame
    grasp_z: float  # eef height above the fixture's position when holding the fin
    fin_yaw: float  # the fin's direction in the fixture frame at joint position 0
    on_q: float = 0.5  # LIBERO: on at or above 0.5 rad (joint range -0.005 .. 2.1)
    turn_to: float = 0.8


KNOBS: dict[str, KnobGeometry] = {"flat_stove": KnobGeometry(hinge=(-0.011, 0.002), grasp_z=0.031, fin_yaw=0.0)}


class TurnKnob(Skill):
    """approach (above the hinge, fingers across the fin) -> descend -> close -> turn -> open -> retreat."""

    name = "turn_on"
    phases = ("approach", "descend", "close", "turn", "open", "retreat", "done")

    def __init__(self, fixture: str):
        super().__init__()
        if category(fixture) not in KNOBS:
            raise BadInput(f"scripted expert knows no knob on '{fixture}' (known: {', '.join(sorted(KNOBS))})")
        self.fixture = fixture
        self.obj = self.target_name = fixture
        self.geo = KNOBS[category(fixture)]
        self.retries = 0

    def describe(self) -> str:
        return f"{self.name}({self.fixture}):{self.phase_name}"

    def q(self, p: dict[str, np.ndarray]) -> float:
        return float(p[f"{self.fixture}_joint_pos"][0])

    def _hinge(self, p: dict[str, np.ndarray]) -> np.ndarray:
        pos, yaw = fixture_frame(p, self.fixture)
        return to_world(pos, yaw, np.array([*self.geo.hinge, self.geo.grasp_z]))

    def _fin_yaw(self, p: dict[str, np.ndarray]) -> float:
        _, yaw = fixture_frame(p, self.fixture)
        return yaw + self.geo.fin_yaw + self.q(p)

    def _advance(self, o: Observation) -> None:
        p = o.privileged
        eef = vec(p, "robot0_eef_pos")
        q = self.q(p)
        for _ in range(len(self.phases)):
            name, el = self.phase_name, self.elapsed(o)
            cmd = self._target(o)
            err = cmd.pos - eef
            done = False
            if name == "approach":
                if q >= self.geo.on_q + 0.1 and not self.extra.get("touched"):
                    self.enter("done", o.step)
                    continue
                done = (np.linalg.norm(err[:2]) < 0.008 and abs(err[2]) < 0.02
                        and rot_error(cmd.rot, p["robot0_eef_quat"]) < 0.08) or el > 80
            elif name == "descend":
                done = np.linalg.norm(err) < 0.006 or el > 30
            elif name == "close":
                self.extra["touched"] = True
                done = el >= 10
                if done:
                    self.extra["q0"], self.extra["yaw0"] = q, self.extra["yaw"]
                    self.extra["arm"] = eef - self._hinge(p)  # grasp point relative to the hinge axis
            elif name == "turn":
                done = q >= self.geo.turn_to - 0.1 or el > 100
            elif name == "open":
                done = el >= 8
            elif name == "retreat":
                done = abs(err[2]) < 0.02 or el > 30
                if done and q < self.geo.on_q + 0.05 and self.retries < 2:  # slipped: grasp again
                    self.retries += 1
                    self.extra.pop("yaw", None)
                    self.enter("approach", o.step)
                    return
            if name == "done":
                self.done = True
                return
            if not done:
                return
            self.enter(self.phase + 1, o.step)

    def _target(self, o: Observation) -> Command:
        p = o.privileged
        hinge = self._hinge(p)
        name = self.phase_name
        if name == "approach" or "yaw" not in self.extra:
            # the fin is symmetric: pick the grasp yaw closest to the gripper's current yaw
            fin = self._fin_yaw(p)
            cur = yaw_of(Rotation.from_quat(p["robot0_eef_quat"]).as_quat())
            self.extra["yaw"] = fin + np.pi * np.round((cur - fin) / np.pi)
        yaw_g = self.extra["yaw"]
        if name == "approach":
            return Command(hinge + np.array([0, 0, 0.08]), down(yaw_g), -1.0, FAST)
        if name == "descend":
            return Command(hinge, down(yaw_g), -1.0, 0.5)
        if name == "close":
            return Command(hinge, down(yaw_g), 1.0)
        if name == "turn":
            goal = self.extra["yaw0"] + (self.geo.turn_to - self.extra["q0"])
            # lead the measured knob angle by a bounded step so the turn follows the knob, not a clock
            turn = min(goal, yaw_g + (self.q(p) - self.extra["q0"]) + 0.5) - self.extra["yaw0"]
            c, s = np.cos(turn), np.sin(turn)
            arm = self.extra["arm"]  # the grasp point moves on a circle about the hinge
            pos = hinge + np.array([c * arm[0] - s * arm[1], s * arm[0] + c * arm[1], arm[2]])
            return Command(pos, down(self.extra["yaw0"] + turn), 1.0)
        if name == "open":
            return Command(hinge, Rotation.from_quat(p["robot0_eef_quat"]), -1.0)
        return Command(hinge + np.array([0, 0, 0.10]), Rotation.from_quat(p["robot0_eef_quat"]), -1.0)


# ------------------------------------------------------------------------------------------ pushing


@dataclass(frozen=True)
class PushShape:
    """Where the closed fingers drag an object from inside its cavity: `lead` ahead of its centre along
    the motion (pressing the inner wall, which cups the fingers), the eef `dz` above its position."""

    lead: float
    dz: float


# Measured from the collision geoms: the bowl's inner wall is at r ~4 cm two centimetres above its floor.
PUSH_SHAPES: dict[str, PushShape] = {"akita_black_bowl": PushShape(lead=0.015, dz=0.029)}


class Push(Skill):
    """approach (above the object) -> descend (closed fingers into its cavity) -> push (until the object's
    measured position reaches the goal) -> lift."""

    name = "push"
    phases = ("approach", "descend", "push", "lift", "done")

    def __init__(self, obj: str, goal_xy: np.ndarray, tol: float = 0.012):
        super().__init__()
        if category(obj) not in PUSH_SHAPES:
            raise BadInput(f"scripted expert cannot push '{obj}' (pushable: {', '.join(sorted(PUSH_SHAPES))})")
        self.obj = self.target_name = obj
        self.goal = np.asarray(goal_xy, np.float64)[:2]  # where the object's position should end up
        self.shape = PUSH_SHAPES[category(obj)]
        self.tol = tol

    def describe(self) -> str:
        return f"{self.name}({self.obj}):{self.phase_name}"

    def start(self, o: Observation) -> None:
        super().start(o)
        c = vec(o.privileged, f"{self.obj}_pos")
        d = self.goal - c[:2]
        self.dir = d / max(np.linalg.norm(d), 1e-9)
        # fingers' closing axis along the motion
        self.yaw = near_yaw(float(np.arctan2(self.dir[1], self.dir[0])) - np.pi / 2, eef_yaw(o.privileged))

    def _err(self, p: dict[str, np.ndarray]) -> np.ndarray:
        return self.goal - vec(p, f"{self.obj}_pos")[:2]

    def _advance(self, o: Observation) -> None:
        p = o.privileged
        eef = vec(p, "robot0_eef_pos")
        for _ in range(len(self.phases)):
            name, el = self.phase_name, self.elapsed(o)
            cmd = self._target(o)
            err = cmd.pos - eef
            done = False
            if name == "approach":
                if np.linalg.norm(self._err(p)) < self.tol:
                    self.enter("done", o.step)
                    continue
                done = (np.linalg.norm(err[:2]) < 0.01 and abs(err[2]) < 0.02
                        and rot_error(cmd.rot, p["robot0_eef_quat"]) < 0.1) or el > 80
            elif name == "descend":
                done = np.linalg.norm(err) < 0.012 or el > 30
            elif name == "push":
                done = np.linalg.norm(self._err(p)) < self.tol or el > 120
            elif name == "lift":
                done = abs(err[2]) < 0.02 or el > 20
            if name == "done":
                self.done = True
                return
            if not done:
                return
            self.enter(self.phase + 1, o.step)

    def _target(self, o: Observation) -> Command:
        p = o.privileged
        c = vec(p, f"{self.obj}_pos")
        sh = self.shape
        start = np.array([*(c[:2] + sh.lead * self.dir), c[2] + sh.dz])
        rot = down(self.yaw)
        name = self.phase_name
        if name == "approach":
            return Command(start + np.array([0, 0, 0.08]), rot, 1.0, FAST)
        if name == "descend":
            return Command(start, rot, 1.0)
        if name == "push":
            # the contact point for the object's current position and direction to the goal, moved ahead by
            # the remaining distance (between 3 and 5 cm, so the fingers keep pressing the wall): the push
            # ends when the object (not the hand) reaches the goal, and it steers the object back onto the
            # line when it drifts sideways
            e = self._err(p)
            dist = float(np.linalg.norm(e))
            d = e / max(dist, 1e-9)
            pos = c[:2] + (sh.lead + float(np.clip(dist, 0.03, 0.05))) * d
            return Command(np.array([pos[0], pos[1], start[2]]), rot, 1.0)
        if "lift_from" not in self.extra:
            self.extra["lift_from"] = vec(p, "robot0_eef_pos")
        return Command(self.extra["lift_from"] + np.array([0, 0, 0.06]), rot, 1.0)
