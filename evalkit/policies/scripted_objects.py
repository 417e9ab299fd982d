"""What the scripted expert knows about LIBERO's objects: grasps per object category and where things go.

- `GRASPS`: how to hold each movable object (eef height above its reported position, xy offset,
  its lowest point, yaw alignment). Heights come from the objects' collision geometry in the LIBERO
  scenes (axis-aligned extents of the collision geoms relative to the body position).
- `place_point`: the xy point and the surface height an object is put on/in for a BDDL target, which
  is either a movable object (`plate_1`, `basket_1_contain_region` -> its owner `basket_1`) or a
  region site (`flat_stove_1_cook_region`, `wooden_cabinet_1_top_side`, `main_table_..._region`), whose
  pose the env adapter adds to the privileged observation as `<site>_site_pos/_quat`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from evalkit.errors import BadInput


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
    yaw: float = 0.0  # fixed gripper yaw (about world z) when not aligning to the object
    height: float = 0.0  # object's top above its reported position (clearance while carrying)
    # Grasp point and finger closing axis in the object's own frame (they turn with the object): mugs are
    # held by the rim opposite their handle, a moka pot by its handle.
    local_offset: tuple[float, float] | None = None
    local_axis: float = 0.0  # direction (rad, object frame) the fingers close along
    # How far (rad) the grasp yaw may turn from its default, and the grasp point slide along the object's
    # own x (m), to keep the hand clear of neighbours (cans: any yaw; boxes: until the fingers no longer
    # close across the short side, and along the long side while the pads stay on it).
    yaw_free: float = 0.0
    slide: float = 0.0
    rim: bool = False  # the grasp point turns with the yaw around the object (any point of a bowl's rim)
    # The middle of the object's body relative to its position (object frame), where it differs: what is
    # centred in a tight compartment (the book's body is 1.2 cm off its position, its slot 1.2 cm wider).
    centre: tuple[float, float] = (0.0, 0.0)


# Extents measured in the LIBERO scenes (collision geoms: top/bottom relative to the object's position).
GRASPS: dict[str, Grasp] = {
    "akita_black_bowl": Grasp(dz=0.03, offset=(0.0, 0.05), bottom=0.0, place_clear=0.02,
                              inside_offset=(-0.05, 0.0), inside_yaw=np.pi / 2, height=0.052, yaw_free=np.pi,
                              rim=True),
    "alphabet_soup": Grasp(dz=0.015, bottom=-0.038, height=0.04, yaw_free=np.pi / 2),
    "tomato_sauce": Grasp(dz=0.015, bottom=-0.038, height=0.04, yaw_free=np.pi / 2),
    "salad_dressing": Grasp(dz=0.05, bottom=-0.073, height=0.07),
    "ketchup": Grasp(dz=0.05, bottom=-0.072, height=0.07),
    "bbq_sauce": Grasp(dz=0.035, bottom=-0.055, height=0.06),
    "milk": Grasp(dz=0.045, bottom=-0.07, height=0.07),
    "orange_juice": Grasp(dz=0.045, bottom=-0.07, height=0.07),
    "cream_cheese": Grasp(dz=0.0, bottom=-0.009, align_yaw=True, height=0.009, yaw_free=0.6, slide=0.025),
    "butter": Grasp(dz=0.0, bottom=-0.009, align_yaw=True, height=0.009, yaw_free=0.6, slide=0.025),
    "chocolate_pudding": Grasp(dz=0.002, bottom=-0.013, align_yaw=True, height=0.013, yaw_free=0.6, slide=0.025),
    # Mugs: the rim's outer edge opposite the handle (object frame), pads 1.6 cm below the rim's top.
    "porcelain_mug": Grasp(dz=0.092, bottom=-0.002, height=0.108, local_offset=(0.058, 0.0)),
    "white_yellow_mug": Grasp(dz=0.087, bottom=0.0, height=0.103, local_offset=(-0.069, 0.0)),
    "red_coffee_mug": Grasp(dz=0.115, bottom=0.002, height=0.131, local_offset=(-0.059, 0.0)),
    # Moka pot: its handle (1.4 cm thick, object +y) 4.5 cm above the pot's centre, fingers across it.
    "moka_pot": Grasp(dz=0.045, bottom=-0.066, height=0.086, local_offset=(0.0, 0.075), local_axis=0.0),
    # A plate is pinched at its rim (a thin cone rising to 1.6 cm at r 6.8 cm), fingertips 2.5 mm above
    # the table; the planner picks the rim point (towards where it slides) and the yaw.
    "plate": Grasp(dz=0.009, bottom=-0.003, place_clear=0.006, height=0.016),
    # A standing book: by its top edge, fingers across its 3 cm thickness (object x), at its middle.
    "black_book": Grasp(dz=0.122, bottom=0.002, height=0.137, local_offset=(0.0, -0.012), place_clear=0.0,
                        centre=(0.0, -0.012)),
    # The bottle's collision body is 4.4 cm wide up to 6.6 cm, then a neck up to 15.8 cm: hold the
    # neck high enough that the palm (3 cm above the eef) clears its top.
    "wine_bottle": Grasp(dz=0.125, bottom=0.0, height=0.158, place_clear=0.01, yaw=np.pi / 2),
}

# Obstacle model of the objects standing around a grasp: (radius of a disc around the position, top
# above the position), from the collision geoms' extents (boxes: half their diagonal). Unknown
# categories: a 5 cm, 15 cm tall disc.
FOOTPRINTS: dict[str, tuple[float, float]] = {
    "alphabet_soup": (0.035, 0.038), "tomato_sauce": (0.035, 0.038), "milk": (0.037, 0.061),
    "orange_juice": (0.037, 0.061), "ketchup": (0.033, 0.073), "salad_dressing": (0.033, 0.073),
    "bbq_sauce": (0.033, 0.06), "cream_cheese": (0.046, 0.009), "butter": (0.046, 0.009),
    "chocolate_pudding": (0.046, 0.014), "basket": (0.11, 0.146), "akita_black_bowl": (0.055, 0.052),
    "plate": (0.07, 0.016), "wine_bottle": (0.025, 0.158), "porcelain_mug": (0.06, 0.108),
    "red_coffee_mug": (0.06, 0.131), "white_yellow_mug": (0.065, 0.103), "moka_pot": (0.065, 0.086),
    "black_book": (0.06, 0.137), "chefmate_8_frypan": (0.12, 0.05),
}
HAND_HALF = (0.11, 0.04)  # the hand's half extents across the table: along the fingers' axis, across it
HAND_ABOVE_EEF = 0.031  # its lowest point above the eef
FINGERS = (0.028, 0.054, 0.012)  # open fingers: from/to along the fingers' axis, half width across
FINGERTIPS_BELOW_EEF = 0.009


def hand_overlap(xy: np.ndarray, eef_z: float, yaw: float, priv: dict[str, np.ndarray], skip: str,
                 extra: tuple[tuple[float, float, float, float], ...] = ()) -> float:
    """How deep the hand and its open fingers, pointing down at `xy` with the fingers' axis turned by
    `yaw`, would reach into the footprints of the other objects taller than their lowest point (0: clear).
    `extra`: more obstacles as (x, y, radius, top z) (fixture parts such as drawer handles)."""
    c, s = np.cos(yaw), np.sin(yaw)
    axis, side = np.array([-s, c]), np.array([c, s])  # fingers close along the gripper's y
    obstacles = [(*np.asarray(priv[f"{n}_pos"], np.float64)[:2], *_footprint(n, priv)) for n in movable_names(priv)
                 if n != skip and f"{n}_joint_pos" not in priv]
    total = 0.0
    for x, y, r, top in [*obstacles, *extra]:
        d = np.array([x, y]) - xy
        du, dv = float(d @ axis), float(d @ side)
        if top > eef_z + HAND_ABOVE_EEF:  # the hand
            total += _overlap(du, dv, -HAND_HALF[0], HAND_HALF[0], HAND_HALF[1], r)
        if top > eef_z - FINGERTIPS_BELOW_EEF:  # the fingers, either side
            total += _overlap(du, dv, FINGERS[0], FINGERS[1], FINGERS[2], r)
            total += _overlap(du, dv, -FINGERS[1], -FINGERS[0], FINGERS[2], r)
    return total


def _footprint(name: str, priv: dict[str, np.ndarray]) -> tuple[float, float]:
    """(radius, top z) of an object's obstacle disc."""
    r, top = FOOTPRINTS.get(category(name), (0.05, 0.15))
    return r, float(priv[f"{name}_pos"][2]) + top


def _overlap(du: float, dv: float, u0: float, u1: float, half_v: float, r: float) -> float:
    """Depth of a disc of radius r at (du, dv) into the rectangle [u0, u1] x [-half_v, half_v]."""
    gap = float(np.hypot(du - np.clip(du, u0, u1), dv - np.clip(dv, -half_v, half_v)))
    return max(0.0, r - gap)


# Height of the surface an object is put on/in, above the target's reported position (movable targets).
SURFACE: dict[str, float] = {"plate": 0.01, "basket": 0.15, "akita_black_bowl": 0.02}
# Thin objects put into a narrow region stand with their thin side (object x) along the region's narrow axis.
THIN: tuple[str, ...] = ("black_book",)


@dataclass(frozen=True)
class SitePlace:
    """How to put an object into a region site: its position goes `surface` above the site (world z) plus
    `local` (in the site's frame), `rim` is the height of the walls to carry it over, and `press` lowers
    the release point below contact (the object counts while still held against the surface)."""

    surface: float = 0.0
    rim: float = 0.0
    local: tuple[float, float, float] = (0.0, 0.0, 0.0)
    press: float = 0.0


_DRAWER = SitePlace(surface=-0.027, rim=0.065)  # the region site sits 2.7 cm above a drawer's floor
SITE_PLACES: dict[str, SitePlace] = {
    **{f"{cab}:{lvl}_region": _DRAWER for cab in ("wooden_cabinet", "white_cabinet") for lvl in ("top", "middle", "bottom")},
    # The caddy's compartments: LIBERO's box starts 2 mm above the caddy's floor, above a standing book's
    # position; the book counts as in while still held 1.4 cm above the floor.
    "desk_caddy:back_contain_region": SitePlace(surface=-0.058, rim=0.14),
    "desk_caddy:front_contain_region": SitePlace(surface=-0.013, rim=0.14),
    "desk_caddy:left_contain_region": SitePlace(surface=-0.038, rim=0.14),
    "desk_caddy:right_contain_region": SitePlace(surface=-0.038, rim=0.14),
    # The wine rack's top shelf is a plate sloping 27.5 degrees (site z axis: up the slope, -y: its normal);
    # LIBERO counts a bottle whose base centre is within 2.2 cm of that plane and touches the rack. A
    # lying bottle's base centre is 2.4 cm off it, so the bottle is held upright with its base on the
    # shelf 4 cm up the slope from the lip (base centre 1.25 cm off the plane).
    "wine_rack:top_region": SitePlace(rim=0.12, local=(0.0, -0.0125, 0.04), press=0.01),
}


def category(name: str) -> str:
    """'akita_black_bowl_1' -> 'akita_black_bowl'."""
    head, _, tail = name.rpartition("_")
    return head if tail.isdigit() else name


def movable_names(priv: dict[str, np.ndarray]) -> list[str]:
    """Names with a pose in the observation (objects and fixtures, not sites), longest first."""
    names = [k[:-4] for k in priv if k.endswith("_pos") and not k.startswith("robot0")
             and not k.endswith(("_site_pos", "_joint_pos", "_to_robot0_eef_pos")) and f"{k[:-4]}_quat" in priv]
    return sorted(names, key=len, reverse=True)


def owner(region: str, priv: dict[str, np.ndarray]) -> str:
    """'basket_1_contain_region' -> 'basket_1' (longest object/fixture name that prefixes the region)."""
    for n in movable_names(priv):
        if region == n or region.startswith(n + "_"):
            return n
    raise BadInput(f"goal target '{region}' matches no object in the observation")


def site_name(region: str, priv: dict[str, np.ndarray]) -> str | None:
    return region if f"{region}_site_pos" in priv else None


@dataclass(frozen=True)
class PlaceTarget:
    """Where to put an object: `ref` is the name whose pose locates it (an object or a region site)."""

    ref: str
    is_site: bool
    surface: float  # surface height above the reference's position
    rim: float = 0.0  # height of the container's walls above that surface (carry the object over them)
    local: tuple[float, float, float] = (0.0, 0.0, 0.0)  # offset in the site's frame
    press: float = 0.0  # release this far below the contact height

    def point(self, priv: dict[str, np.ndarray]) -> np.ndarray:
        key = f"{self.ref}_site_pos" if self.is_site else f"{self.ref}_pos"
        p = np.asarray(priv[key], np.float64) + np.array([0.0, 0.0, self.surface])
        if any(self.local):
            p = p + Rotation.from_quat(priv[f"{self.ref}_site_quat"]).apply(self.local)
        return p


def place_target(region: str, priv: dict[str, np.ndarray]) -> PlaceTarget:
    """The placement reference for a BDDL target. A movable owner (plate, basket, bowl) locates the goal by
    its own pose; a fixture's or the table's region (stove burner, cabinet top, drawer) by its site."""
    site = site_name(region, priv)
    try:
        own = owner(region, priv)
    except BadInput:
        if site is None:
            raise
        own = None
    if own is not None and (f"{own}_joint_pos" not in priv or site is None):  # fixtures carry joint_pos
        return PlaceTarget(own, False, SURFACE.get(category(own), 0.02))
    sp = SITE_PLACES.get(_site_kind(site), SitePlace())
    return PlaceTarget(site, True, sp.surface, sp.rim, sp.local, sp.press)


def _site_kind(site: str) -> str:
    """'wooden_cabinet_1_top_side' -> 'wooden_cabinet:top_side' (owner category + region name)."""
    m = site.split("_")
    for k in range(len(m) - 1, 0, -1):
        if m[k - 1].isdigit():
            return category("_".join(m[:k])) + ":" + "_".join(m[k:])
    return site
