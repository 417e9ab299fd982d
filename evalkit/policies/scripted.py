"""`policy=scripted`: a privileged scripted expert for LIBERO (spatial, object, goal, libero_10).

It reads object/fixture poses and articulation joints from `Observation.privileged` (raw LIBERO
observation keys plus the fixture/site state the env adapter adds) and the goal from the task's BDDL
file, plans a sequence of skills (`scripted_plan.py`: pick-and-place, push, open/close a drawer, turn a
knob, carry a mug into the microwave by its handle, swing its door) and runs them one after the other.
Each skill is a small phase machine whose phases end on measured conditions (`scripted_skills.py`,
`scripted_fixtures.py`, `scripted_doors.py`).

Action chunks: every `predict` asks the current skill for a pose target and plans H actions toward it
in LIBERO's OSC delta-pose space with a P-controller, predicting the end-effector's motion within the
chunk (OSC deltas move the goal by action * 5 cm / 0.5 rad), so replanning every 5 actions does not
overshoot. Per-episode state (the skill list and the current skill's phase) lives per `episode_key`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from evalkit.errors import BadInput
from evalkit.policies.base import ObsBatch, Observation
from evalkit.policies.scripted_goal import parse_goal, parse_init
from evalkit.policies.scripted_objects import GRASPS, SURFACE, Grasp, category, owner  # noqa: F401  (re-exported)
from evalkit.policies.scripted_plan import bind, plan_steps
from evalkit.policies.scripted_skills import (
    Command,
    Hold,
    PickPlace,
    PickPlaceParams,
    Skill,
)

POS_SCALE = 0.05  # metres of OSC goal motion per unit of action (robosuite OSC_POSE output_max)
ROT_SCALE = 0.5  # radians per unit of action


@dataclass
class EpisodePlan:
    skills: list[Skill]
    index: int = 0
    hold: Hold = field(default_factory=Hold)
    last_command: Command | None = None  # the pose target of the last chunk (demos record it)

    @property
    def current(self) -> Skill:
        return self.skills[self.index] if self.index < len(self.skills) else self.hold

    # What demonstrations record as the episode's (object, target): names whose `<name>_pos` is in the
    # observation, from the current skill (the object handled and where it goes; a fixture for its skills).
    @property
    def obj(self) -> str:
        return self._named().obj

    @property
    def target(self) -> str:
        return self._named().target_name

    def _named(self) -> Skill:
        order = self.skills[self.index:] + self.skills[: self.index][::-1]
        return next((s for s in order if s.obj), self.current)


class ScriptedPolicy:
    name = "scripted"
    needs_images = False
    needs_privileged = True

    def __init__(self, action_horizon: int = 10, max_speed: float = 1.0, kp: float = 2.5, track: float = 0.35,
                 hover: float = 0.12, carry: float = 0.12, close_steps: int = 12, open_steps: int = 8,
                 rot_track: float = 0.13, kr: float = 4.0):
        self.action_horizon = action_horizon
        self.max_speed = max_speed  # cap on |action xyz| (unit = 5 cm per step)
        self.kp = kp
        self.track = track  # measured: the eef moves ~35% of the commanded OSC delta per step
        self.rot_track = rot_track  # measured: it turns ~13% of the commanded rotation per step
        self.kr = kr  # P gain on the orientation error
        self.pick = PickPlaceParams(hover=hover, carry=carry, close_steps=close_steps, open_steps=open_steps)
        self.plans: dict[str, EpisodePlan] = {}

    # -- Policy API -------------------------------------------------------------------------
    def reset(self, episode_key: str) -> None:
        self.plans.pop(episode_key, None)

    def predict(self, batch: ObsBatch, noise_seed: int | None = None) -> np.ndarray:
        return np.stack([self.act(o) for o in batch.observations]).astype(np.float32)

    def describe(self, episode_key: str) -> str:
        plan = self.plans.get(episode_key)
        if plan is None:
            return ""
        return f"[{plan.index + 1}/{len(plan.skills)}] {plan.current.describe()}"

    # -- one episode -----------------------------------------------------------------------
    def _plan(self, o: Observation) -> EpisodePlan:
        plan = self.plans.get(o.episode_key)
        if plan is None:
            if not o.privileged:
                raise BadInput("scripted policy needs privileged observations (object poses)")
            bddl = o.task.get("bddl_file")
            if not bddl:
                raise BadInput("scripted policy needs Observation.task['bddl_file']")
            init = parse_init(bddl)
            skills = bind(plan_steps(parse_goal(bddl), init), init, o.privileged)
            for s in skills:
                s.home = np.asarray(o.privileged["robot0_eef_pos"], np.float64).copy()
                if isinstance(s, PickPlace):
                    s.params = self.pick
            plan = self.plans[o.episode_key] = EpisodePlan(skills)
        return plan

    def _command(self, plan: EpisodePlan, o: Observation) -> Command:
        while True:
            skill = plan.current
            cmd = skill.command(o)
            if skill.done and plan.index < len(plan.skills) - 1:
                plan.index += 1
                continue
            return cmd

    def act(self, o: Observation) -> np.ndarray:
        plan = self._plan(o)
        cmd = plan.last_command = self._command(plan, o)
        p = o.privileged
        pos = p["robot0_eef_pos"].astype(np.float64).copy()
        rot = Rotation.from_quat(p["robot0_eef_quat"])
        speed = self.max_speed * cmd.speed
        chunk = np.zeros((self.action_horizon, 7), dtype=np.float64)
        for k in range(self.action_horizon):
            a = np.clip(self.kp * (cmd.pos - pos) / POS_SCALE, -1, 1)
            n = np.linalg.norm(a)
            if n > speed:
                a *= speed / n
            r = np.clip(self.kr * (cmd.rot * rot.inv()).as_rotvec() / ROT_SCALE, -1, 1)
            chunk[k, :3] = a
            chunk[k, 3:6] = r
            chunk[k, 6] = cmd.grip
            pos = pos + a * POS_SCALE * self.track  # predicted motion within the chunk
            rot = Rotation.from_rotvec(r * ROT_SCALE * self.rot_track) * rot
        return chunk


def build(cfg: dict, device) -> ScriptedPolicy:
    keys = ("action_horizon", "max_speed", "kp", "kr", "track", "rot_track", "hover", "carry", "close_steps",
            "open_steps")
    unknown = sorted(set(cfg) - set(keys) - {"kind", "name", "denoise_steps"})
    if unknown:
        raise BadInput(f"unknown scripted policy fields {unknown}; valid: {sorted(keys)}")
    return ScriptedPolicy(**{k: cfg[k] for k in keys if k in cfg and cfg[k] is not None})
