"""Planner of the scripted expert: a BDDL goal (one to three predicates) -> an ordered list of skills.

Two stages, so the symbolic part can be checked on every BDDL file without a simulator:
- `plan_steps(goal, init)`: pure. Orders the goal's predicates into `Step`s, skipping those the init
  already satisfies; turning a knob goes first (nothing is in the robot's way yet), a drawer to be
  put into is opened first (after pushing the object clear of where the open drawer will overhang),
  an object put into a fixture behind a door (the microwave, open in the init) goes in by its handle,
  and drawers and doors to be shut are closed last.
- `bind(steps, init, priv)`: the first observation resolves names to poses and builds the skill objects
  (`scripted_skills.py`, `scripted_fixtures.py`, `scripted_doors.py`), adding what the scene needs
  first (swinging a door wider, parking an object that stands where the arm must pass).
Anything the expert cannot do raises `BadInput` naming the predicate (e.g. turning a stove off, putting
a plate into something, or putting into a fixture whose door is shut).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from evalkit.errors import BadInput
from evalkit.policies.scripted_goal import Predicate
from evalkit.policies.scripted_objects import (
    FOOTPRINTS,
    GRASPS,
    THIN,
    category,
    movable_names,
    owner,
    place_target,
)
from evalkit.policies.scripted_skills import vec, yaw_of

# Categories the expert pushes along the table instead of grasping (flat, wide objects).
PUSHED = ("plate",)
PUSH_AIM = 0.012  # m: a pushed object may stop this far from its goal region's centre (regions are 8 cm squares)
PUSH_TOL = 0.02  # m: farther than this from its aim after the push: push again
PUSH_RADIUS = 0.12  # m: centre distance below which a pushed object (plate) touches another one
RIM_PINCH = 0.052  # m: a plate's rim is pinched this far from its centre
SLOT_SPREAD = 0.045  # m: two objects sharing a region stand this far either side of its centre
# m: the same in a container, near its middle (a can may roll after the drop; LIBERO's basket counts
# within 6.1 cm of its middle), and how far from its middle a dropped object still counts as placed
CONTAINER_SLOTS = {"basket": 0.025}
CONTAINER_TOL = {"basket": 0.055}
# Articulated fixtures by category: what their regions/joints mean to the expert.
DRAWER_CABINETS = ("wooden_cabinet", "white_cabinet")
DOORS = ("microwave",)
KNOBS = ("flat_stove",)


@dataclass(frozen=True)
class Step:
    kind: str  # "pick_place" | "push" | "clear" | "open" | "close" | "turn_on" | "insert" | "close_door"
    args: tuple[str, ...]


def _fixture_kind(name: str) -> str | None:
    """'wooden_cabinet_1_top_region' -> 'drawer'; 'microwave_1' -> 'door'; 'flat_stove_1' -> 'knob'."""
    for c in DRAWER_CABINETS:
        if name.startswith(c + "_") and name.endswith("_region"):
            return "drawer"
    for c in DOORS:
        if name.startswith(c + "_"):
            return "door"
    for c in KNOBS:
        if name.startswith(c + "_") and category(name) == c:
            return "knob"
    return None


def _fixture_name(region: str) -> str:
    """'microwave_1_heating_region' -> 'microwave_1' (up to the instance number)."""
    parts = region.split("_")
    for k in range(len(parts) - 1, 0, -1):
        if parts[k].isdigit():
            return "_".join(parts[: k + 1])
    return region


def _desc(p: Predicate) -> str:
    return f"({p.name.capitalize()} {' '.join(p.args)})"


def plan_steps(goal: tuple[Predicate, ...] | list[Predicate], init: tuple[Predicate, ...] | list[Predicate]) -> list[Step]:
    init_set = {(p.name, p.args) for p in init}
    first: list[Step] = []
    middle: list[Step] = []
    last: list[Step] = []
    opened: set[str] = {p.args[0] for p in init if p.name == "open" and p.args}
    for p in goal:
        if (p.name, p.args) in init_set:  # already true at the start
            continue
        if p.name == "turnon" and len(p.args) == 1 and _fixture_kind(p.args[0]) == "knob":
            first.append(Step("turn_on", p.args))
        elif p.name == "open" and len(p.args) == 1 and _fixture_kind(p.args[0]) == "drawer":
            middle.append(Step("open", p.args))
            opened.add(p.args[0])
        elif p.name == "close" and len(p.args) == 1 and _fixture_kind(p.args[0]) == "drawer":
            last.append(Step("close", p.args))
        elif p.name == "close" and len(p.args) == 1 and _fixture_kind(p.args[0]) == "door":
            last.append(Step("close_door", p.args))
        elif p.name in ("on", "in") and len(p.args) == 2:
            obj, target = p.args
            cat = category(obj)
            if cat in PUSHED:
                if p.name != "on":
                    raise BadInput(f"scripted expert cannot put a {cat} in something: {_desc(p)}")
                middle.append(Step("push", p.args))
                continue
            if cat not in GRASPS:
                raise BadInput(f"scripted expert has no grasp for '{obj}' in {_desc(p)}; "
                               f"known objects: {', '.join(sorted(GRASPS))}")
            kind = _fixture_kind(target)
            if kind == "drawer" and target not in opened:
                # the object may stand where the open drawer would overhang it: push it clear first
                middle.append(Step("clear", (obj, target)))
                middle.append(Step("open", (target,)))
                opened.add(target)
            elif kind == "door" and p.name == "in":
                fixture = _fixture_name(target)
                if fixture not in opened:
                    raise BadInput(f"scripted expert does not open doors ({fixture} is shut in the init): {_desc(p)}")
                middle.append(Step("insert", (obj, fixture)))  # carried in by its handle
                continue
            middle.append(Step("pick_place", p.args))
        else:
            raise BadInput(f"scripted expert cannot do goal predicate {_desc(p)}; it handles On/In (pick-and-place, "
                           "push a plate, in through an open door), Open/Close (cabinet drawers), Close (doors), "
                           "Turnon (stove knob)")
    return first + middle + last


def bind(steps: list[Step], init: tuple[Predicate, ...], priv: dict[str, np.ndarray]):
    """Build the skill objects for `steps`, resolving names against the first observation."""
    from evalkit.policies import scripted_doors as doors
    from evalkit.policies import scripted_fixtures as fx
    from evalkit.policies.scripted_skills import PickPlace

    skills = []
    for s in steps:
        if s.kind == "pick_place":
            obj, target = s.args
            if f"{obj}_pos" not in priv:
                raise BadInput(f"goal object '{obj}' is not in the observation")
            # out of a drawer: grasp from the side whose fingers clear the drawer's walls; into a drawer:
            # turn the held object so the fingers end up along the drawer's width (clear of its front)
            inside = any(p.name == "in" and p.args and p.args[0] == obj for p in init)
            turn = 0.0
            tgt = place_target(target, priv)
            if category(obj) in THIN and tgt.is_site:  # a book: its thin side across the compartment
                site_x = Rotation.from_quat(priv[f"{tgt.ref}_site_quat"]).apply([1.0, 0.0, 0.0])
                turn = float((np.arctan2(site_x[1], site_x[0]) - yaw_of(priv[f"{obj}_quat"]) + np.pi / 2)
                             % np.pi - np.pi / 2)
            pp = PickPlace(obj, tgt, _owner_or_region(target, priv), inside=inside, place_turn=turn)
            if not tgt.is_site and category(tgt.ref) in CONTAINER_TOL:
                pp.container, pp.miss_tol = True, CONTAINER_TOL[category(tgt.ref)]
            centre = GRASPS[category(obj)].centre
            if tgt.is_site and any(centre):  # the body's middle, not its position, on the site (turned as released)
                released = Rotation.from_euler("z", yaw_of(priv[f"{obj}_quat"]) + turn)
                pp.place_shift = -released.apply([*centre, 0.0])[:2]
            if _fixture_kind(target) == "drawer":  # released with the fingers along the drawer's width
                d = fx.drawer(target, priv, open_it=True)
                front = d.front(priv)
                pp.place_yaw = float(np.arctan2(front[1], front[0]))
                # dropped in front of the cabinet's face: the drawer is open now, or the plan opens it (to open_q)
                radius = FOOTPRINTS.get(category(obj), (0.05, 0.0))[0]
                q = d.q(priv) if d.q(priv) < d.geo.open_q / 2 else d.geo.open_q
                pp.place_shift = d.place_shift(priv, target, radius, q)
            skills.append(pp)
        elif s.kind == "push":
            # A plate is pushed by pinching its rim on the side it moves towards and sliding it over the
            # table: its rim is a shallow cone (20 degrees, 1.6 cm high), so fingers pushing it from
            # inside ride over it, and from behind the hand would meet the cabinet's handles. The pinch
            # holds well enough to drag the plate (11 g), not to lift it.
            obj, target = s.args
            tgt = place_target(target, priv)
            aim = push_aim(obj, tgt.point(priv)[:2], priv)
            start = vec(priv, f"{obj}_pos")[:2]
            d = (aim - start) / max(float(np.linalg.norm(aim - start)), 1e-9)
            off = RIM_PINCH * d
            yaw = float(np.arctan2(d[1], d[0]) - np.pi / 2)  # fingers close along the motion (radially)
            slide = PickPlace(obj, tgt, _owner_or_region(target, priv), offset=(float(off[0]), float(off[1])),
                              yaw=yaw, lift=0.0)
            slide.place_shift = aim - tgt.point(priv)[:2]
            slide.miss_tol = PUSH_TOL
            skills.append(slide)
        elif s.kind == "clear":
            d = fx.drawer(s.args[1], priv, open_it=True)
            goal = d.clearance_goal(priv, s.args[0])
            if goal is not None:
                skills.append(fx.Push(s.args[0], goal))
        elif s.kind == "open":
            skills.append(fx.drawer(s.args[0], priv, open_it=True))
        elif s.kind == "close":
            skills.append(fx.drawer(s.args[0], priv, open_it=False))
        elif s.kind == "turn_on":
            skills.append(fx.TurnKnob(s.args[0]))
        elif s.kind == "insert":
            # in by its handle; first the door swung wider and other objects parked if they are in the way
            obj, fixture = s.args
            if f"{fixture}_joint_pos" not in priv:
                raise BadInput(f"fixture '{fixture}' has no joint state in the observation")
            skills.append(doors.PutThrough(obj, fixture))  # checks the object and the door first
            before = []
            if doors.door_in_the_way(fixture, priv):
                before.append(doors.SwingDoor(fixture, doors.OPEN_WIDE))
            for k, other in enumerate(doors.corridor_objects(obj, fixture, priv)):
                if category(other) not in GRASPS:
                    raise BadInput(f"scripted expert cannot move '{other}' out of the way into {fixture}")
                park = doors.FixedTarget(tuple(float(v) for v in doors.parking_point(other, fixture, priv, k)))
                before.append(PickPlace(other, park, fixture))
            skills[-1:-1] = before
        elif s.kind == "close_door":
            skills.append(doors.SwingDoor(s.args[0]))
        else:
            raise AssertionError(s.kind)
    for sk in skills:
        if isinstance(sk, PickPlace):
            sk.obstacle_fn = fx.fixture_obstacles
    _share_regions(skills, priv)
    return skills


def _share_regions(skills: list, priv: dict[str, np.ndarray]) -> None:
    """Two objects put on the same region site (both moka pots on the burner) or into the same container
    (both cans into the basket: dropped on the first, the second can stay on top of it) go side by side
    along the site's or container's x axis, each to the slot nearer to where it stands."""
    from evalkit.policies.scripted_skills import PickPlace

    groups: dict[str, list] = {}
    for sk in skills:
        if not isinstance(sk, PickPlace) or sk.target.rim:
            continue
        if sk.target.is_site or category(sk.target.ref) in CONTAINER_SLOTS:
            groups.setdefault(sk.target.ref, []).append(sk)
    for ref, group in groups.items():
        if len(group) != 2:
            continue
        site = group[0].target.is_site
        quat = priv[f"{ref}_site_quat"] if site else priv[f"{ref}_quat"]
        axis = Rotation.from_quat(quat).apply([1.0, 0.0, 0.0])[:2]
        axis = axis / max(float(np.linalg.norm(axis)), 1e-9)
        spread = SLOT_SPREAD if site else CONTAINER_SLOTS[category(ref)]
        slots = [spread * axis, -spread * axis]
        centre = group[0].target.point(priv)[:2]
        a, b = (vec(priv, f"{sk.obj}_pos")[:2] for sk in group)
        cost = np.linalg.norm(a - centre - slots[0]) + np.linalg.norm(b - centre - slots[1])
        swap = cost > np.linalg.norm(a - centre - slots[1]) + np.linalg.norm(b - centre - slots[0])
        for sk, slot in zip(group, slots[::-1] if swap else slots):
            sk.place_shift = sk.place_shift + slot


def _owner_or_region(region: str, priv: dict[str, np.ndarray]) -> str:
    """What demonstrations record as the target: the owner object, or the region's site (table regions);
    either has `<name>_pos` in the observation."""
    try:
        return owner(region, priv)
    except BadInput:
        return f"{region}_site"


def push_aim(obj: str, centre: np.ndarray, priv: dict[str, np.ndarray]) -> np.ndarray:
    """Where in its goal region to push `obj`: the point whose straight path from the object passes
    farthest from the other objects on the table (ties: the region's centre)."""
    start = vec(priv, f"{obj}_pos")[:2]
    others = [vec(priv, f"{n}_pos")[:2] for n in movable_names(priv)
              if n != obj and f"{n}_joint_pos" not in priv and abs(vec(priv, f"{n}_pos")[2] - priv[f"{obj}_pos"][2]) < 0.1]
    best, best_score = centre, np.inf
    for dx in np.linspace(-PUSH_AIM, PUSH_AIM, 6):
        for dy in np.linspace(-PUSH_AIM, PUSH_AIM, 6):
            aim = centre + np.array([dx, dy])
            seg = aim - start
            score = 0.0
            for q in others:
                t = np.clip((q - start) @ seg / max(seg @ seg, 1e-12), 0.0, 1.0)
                score += max(0.0, PUSH_RADIUS - float(np.linalg.norm(start + t * seg - q)))
            score += 1e-3 * float(np.hypot(dx, dy))
            if score < best_score:
                best, best_score = aim, score
    return best
