"""`policy=scripted`: a privileged pick-and-place expert for LIBERO.

It reads object/fixture poses from `Observation.privileged` (raw LIBERO observation keys) and the
goal from the task's BDDL file (`(On obj target)` / `(In obj target_region)`), then follows
waypoints in LIBERO's OSC delta-pose action space with a P-controller:

    approach (above grasp) -> descend -> close -> lift -> transport (above target) -> lower -> open -> retreat

Action chunks: every `predict` plans H actions from the current observation, predicting the
end-effector's motion within the chunk (OSC deltas move the goal by action * 5 cm / 0.5 rad), so
replanning every 5 actions does not overshoot. Phase state lives per `episode_key`.
Per-object grasp heights (`GRASPS`) were measured by ray-casting the objects' collision geometry
in the LIBERO scenes (NOTES.md has the method); objects lie in LIBERO's own frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from evalkit.errors import BadInput, CapabilityError
from evalkit.policies.base import ObsBatch, Observation
from evalkit.policies.scripted_goal import Predicate, parse_goal, parse_init

POS_SCALE = 0.05  # metres of OSC goal motion per unit of action (robosuite OSC_POSE output_max)
ROT_SCALE = 0.5  # radians per unit of action
DOWN = Rotation.from_quat([1.0, 0.0, 0.0, 0.0])  # gripper pointing down, fingers closing along world y


@dataclass(frozen=True)
class Grasp:
    dz: float  # eef z above the object's reported position when grasping
    offset: tuple[float, float] = (0.0, 0.0)  # xy offset of the grasp point (world frame)
    bottom: float = 0.0  # object's lowest point relative to its reported position (negative: below)
    align_yaw: bool = False  # rotate the gripper to close across the object's local y (boxes)
    place_clear: float = 0.015  # gap between object bottom and the target surface at release
    # When the BDDL init puts the object *inside* something (a drawer), grasp from this side instead,
    # with the gripper turned by `inside_yaw` (the default side touches the drawer's front panel).
    inside_offset: tuple[float, float] | None = None
    inside_yaw: float = 0.0


# Measured in the LIBERO scenes (ray casts from above: top of object relative to its position).
GRASPS: dict[str, Grasp] = {
    "akita_black_bowl": Grasp(dz=0.02, offset=(0.0, 0.05), bottom=0.0, place_clear=0.02,
                              inside_offset=(-0.05, 0.0), inside_yaw=np.pi / 2),
    "alphabet_soup": Grasp(dz=0.015, bottom=-0.038),
    "tomato_sauce": Grasp(dz=0.015, bottom=-0.038),
    "salad_dressing": Grasp(dz=0.05, bottom=-0.073),
    "ketchup": Grasp(dz=0.05, bottom=-0.072),
    "bbq_sauce": Grasp(dz=0.035, bottom=-0.055),
    "milk": Grasp(dz=0.045, bottom=-0.07),
    "orange_juice": Grasp(dz=0.045, bottom=-0.07),
    "cream_cheese": Grasp(dz=0.0, bottom=-0.009, align_yaw=True),
    "butter": Grasp(dz=0.0, bottom=-0.009, align_yaw=True),
    "chocolate_pudding": Grasp(dz=0.002, bottom=-0.013, align_yaw=True),
}
# Height of the surface an object is put on/in, above the target's reported position.
SURFACE: dict[str, float] = {"plate": 0.01, "basket": 0.15}

PHASES = ("approach", "descend", "close", "lift", "transport", "lower", "open", "retreat", "done")


def category(name: str) -> str:
    """'akita_black_bowl_1' -> 'akita_black_bowl'."""
    head, _, tail = name.rpartition("_")
    return head if tail.isdigit() else name


@dataclass
class Plan:
    obj: str
    target: str  # object whose pose locates the goal (region names resolved to their owner)
    phase: int = 0
    phase_start: int = 0
    obj_z0: float = 0.0
    retries: int = 0
    yaw: float = 0.0  # gripper yaw (about world z) used for this grasp
    offset: tuple[float, float] = (0.0, 0.0)  # grasp point's xy offset from the object's position
    base_yaw: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_target(region: str, priv: dict[str, np.ndarray]) -> str:
    """'basket_1_contain_region' -> 'basket_1' (longest object name that prefixes the region)."""
    names = sorted((k[:-4] for k in priv if k.endswith("_pos") and not k.startswith("robot0")), key=len, reverse=True)
    for n in names:
        if region == n or region.startswith(n + "_"):
            return n
    raise BadInput(f"goal target '{region}' matches no object in the observation")


def pick_place_goal(preds: tuple[Predicate, ...], priv: dict[str, np.ndarray]) -> tuple[str, str]:
    for p in preds:
        if p.name in ("on", "in") and len(p.args) == 2:
            return p.args[0], resolve_target(p.args[1], priv)
    raise CapabilityError(f"scripted expert handles (On a b)/(In a b) goals only; got {[(p.name, *p.args) for p in preds]}")


def _yaw_of(quat_xyzw: np.ndarray) -> float:
    x_axis = Rotation.from_quat(quat_xyzw).as_matrix()[:, 0]
    return float(np.arctan2(x_axis[1], x_axis[0]))


class ScriptedPolicy:
    name = "scripted"
    needs_images = False
    needs_privileged = True

    def __init__(self, action_horizon: int = 10, max_speed: float = 1.0, kp: float = 2.5, track: float = 0.35,
                 hover: float = 0.12, carry: float = 0.12, close_steps: int = 12, open_steps: int = 8):
        self.action_horizon = action_horizon
        self.max_speed = max_speed  # cap on |action xyz| (unit = 5 cm per step)
        self.kp = kp
        self.track = track  # measured: the eef moves ~35% of the commanded OSC delta per step
        self.hover = hover  # approach height above the grasp point
        self.carry = carry  # clearance above the higher of object and target while carrying
        self.close_steps = close_steps
        self.open_steps = open_steps
        self.plans: dict[str, Plan] = {}

    # -- Policy API -------------------------------------------------------------------------
    def reset(self, episode_key: str) -> None:
        self.plans.pop(episode_key, None)

    def predict(self, batch: ObsBatch, noise_seed: int | None = None) -> np.ndarray:
        return np.stack([self.act(o) for o in batch.observations]).astype(np.float32)

    # -- one episode -----------------------------------------------------------------------
    def _plan(self, o: Observation) -> Plan:
        plan = self.plans.get(o.episode_key)
        if plan is None:
            if not o.privileged:
                raise BadInput("scripted policy needs privileged observations (object poses)")
            bddl = o.task.get("bddl_file")
            if not bddl:
                raise BadInput("scripted policy needs Observation.task['bddl_file']")
            obj, target = pick_place_goal(parse_goal(bddl), o.privileged)
            if category(obj) not in GRASPS:
                raise CapabilityError(f"scripted expert has no grasp for object '{obj}'")
            plan = Plan(obj=obj, target=target, phase_start=o.step, obj_z0=float(o.privileged[f"{obj}_pos"][2]))
            g = GRASPS[category(obj)]
            inside = any(p.name == "in" and p.args and p.args[0] == obj for p in parse_init(bddl))
            plan.offset = g.inside_offset if inside and g.inside_offset is not None else g.offset
            plan.base_yaw = g.inside_yaw if inside and g.inside_offset is not None else 0.0
            self.plans[o.episode_key] = plan
        return plan

    def _waypoint(self, plan: Plan, p: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, float]:
        """(eef target position, gripper command) for the phase `name`."""
        g = GRASPS[category(plan.obj)]
        obj = p[f"{plan.obj}_pos"]
        tgt = p[f"{plan.target}_pos"]
        off = np.array([*plan.offset, 0.0])
        grasp = obj + off + np.array([0.0, 0.0, g.dz])
        surface = tgt[2] + SURFACE.get(category(plan.target), 0.02)
        place_z = surface + (g.dz - g.bottom) + g.place_clear
        place = np.array([tgt[0] + off[0], tgt[1] + off[1], place_z])
        grasp_z = plan.extra["grasp_at"][2] if "grasp_at" in plan.extra else grasp[2]
        carry_z = max(plan.extra.get("lift_z", grasp_z + self.carry), place_z + 0.05)
        if name == "approach":
            return np.array([grasp[0], grasp[1], grasp[2] + self.hover]), -1.0
        if name == "descend":
            return grasp, -1.0
        if name == "close":
            return plan.extra["grasp_at"], 1.0
        if name == "lift":
            return np.array([*plan.extra["grasp_at"][:2], carry_z]), 1.0
        if name == "transport":
            return np.array([place[0], place[1], carry_z]), 1.0
        if name == "lower":
            return place, 1.0
        if name == "open":
            return plan.extra["release_at"], -1.0
        if name in ("retreat", "done"):
            r = plan.extra["release_at"]
            return np.array([r[0], r[1], r[2] + 0.1]), -1.0
        raise AssertionError(name)

    def _advance(self, plan: Plan, o: Observation) -> None:
        """Move through phases whose exit condition the current observation meets."""
        p = o.privileged
        eef = p["robot0_eef_pos"]
        for _ in range(len(PHASES)):
            name = PHASES[plan.phase]
            elapsed = o.step - plan.phase_start
            target, _ = self._waypoint(plan, p, name)
            err = target - eef
            rot_err = np.linalg.norm(self._rot_error(plan, p))
            done = False
            if name == "approach":
                plan.yaw = self._grasp_yaw(plan, p)
                done = (np.linalg.norm(err[:2]) < 0.01 and abs(err[2]) < 0.02 and rot_err < 0.08) or elapsed > 80
            elif name == "descend":
                done = np.linalg.norm(err) < 0.01 or elapsed > 30
                if done:
                    plan.extra["grasp_at"] = eef.copy()
            elif name == "close":
                done = elapsed >= self.close_steps
            elif name == "lift":
                done = abs(err[2]) < 0.02 or elapsed > 40
                if done and p[f"{plan.obj}_pos"][2] < plan.obj_z0 + 0.02:  # missed: try again
                    if plan.retries < 2:
                        plan.retries += 1
                        plan.extra.pop("lift_z", None)
                        self._enter(plan, 0, o.step)
                        continue
            elif name == "transport":
                done = np.linalg.norm(err[:2]) < 0.01 or elapsed > 80
            elif name == "lower":
                done = np.linalg.norm(err) < 0.01 or elapsed > 40
                if done:
                    plan.extra["release_at"] = eef.copy()
            elif name == "open":
                done = elapsed >= self.open_steps
            elif name == "retreat":
                done = abs(err[2]) < 0.02 or elapsed > 30
            if not done or name == "done":
                return
            if name == "lift":
                plan.extra["lift_z"] = float(eef[2])
            self._enter(plan, plan.phase + 1, o.step)

    @staticmethod
    def _enter(plan: Plan, phase: int, step: int) -> None:
        plan.phase = phase
        plan.phase_start = step

    def _grasp_yaw(self, plan: Plan, p: dict[str, np.ndarray]) -> float:
        g = GRASPS[category(plan.obj)]
        if not g.align_yaw:
            return plan.base_yaw
        yaw = _yaw_of(p[f"{plan.obj}_quat"])  # fingers close along the gripper's y: align with box's short side
        return float((yaw + np.pi / 2) % np.pi - np.pi / 2)  # the gripper is symmetric: keep |yaw| <= 90°

    def _desired_rot(self, plan: Plan) -> Rotation:
        return Rotation.from_euler("z", plan.yaw) * DOWN

    def _rot_error(self, plan: Plan, p: dict[str, np.ndarray], cur: Rotation | None = None) -> np.ndarray:
        cur = cur if cur is not None else Rotation.from_quat(p["robot0_eef_quat"])
        return (self._desired_rot(plan) * cur.inv()).as_rotvec()

    def act(self, o: Observation) -> np.ndarray:
        plan = self._plan(o)
        self._advance(plan, o)
        p = o.privileged
        target, grip = self._waypoint(plan, p, PHASES[plan.phase])
        pos = p["robot0_eef_pos"].astype(np.float64).copy()
        rot = Rotation.from_quat(p["robot0_eef_quat"])
        slow = PHASES[plan.phase] in ("descend", "lower") and np.linalg.norm(target - pos) < 0.04
        speed = self.max_speed * (0.6 if slow else 1.0)
        chunk = np.zeros((self.action_horizon, 7), dtype=np.float64)
        for k in range(self.action_horizon):
            a = np.clip(self.kp * (target - pos) / POS_SCALE, -1, 1)
            n = np.linalg.norm(a)
            if n > speed:
                a *= speed / n
            r = np.clip(self._rot_error(plan, p, rot) / ROT_SCALE, -1, 1)
            chunk[k, :3] = a
            chunk[k, 3:6] = r
            chunk[k, 6] = grip
            pos = pos + a * POS_SCALE * self.track  # predicted motion within the chunk
            rot = Rotation.from_rotvec(r * ROT_SCALE) * rot
        return chunk


def build(cfg: dict, device) -> ScriptedPolicy:
    keys = ("action_horizon", "max_speed", "kp", "track", "hover", "carry", "close_steps", "open_steps")
    unknown = sorted(set(cfg) - set(keys) - {"kind", "name", "denoise_steps"})
    if unknown:
        raise BadInput(f"unknown scripted policy fields {unknown}; valid: {sorted(keys)}")
    return ScriptedPolicy(**{k: cfg[k] for k in keys if k in cfg and cfg[k] is not None})
