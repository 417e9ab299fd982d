"""Scripted expert: BDDL parsing and planning (pure), geometry helpers, and real LIBERO episodes.

Default tier: the planner on every libero_spatial/object/goal/10 BDDL file, small pure helpers, and two
short real episodes (libero_spatial pick-and-place, libero_goal stove knob). Slow tier: one episode of
each other skill family (drawer open + push, drawer close, plate slide, moka pots side by side, book,
a mug carried into the microwave by its handle and the door pushed shut).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from evalkit.errors import BadInput
from evalkit.policies.scripted import ScriptedPolicy, category, owner
from evalkit.policies.scripted_goal import (
    Predicate,
    parse_goal,
    parse_goal_text,
    parse_init,
    parse_section_text,
)
from evalkit.policies.scripted_plan import Step, plan_steps, push_aim

BDDL = """
(define (problem LIBERO_Tabletop_Manipulation)
  (:domain robosuite)
  (:objects akita_black_bowl_1 akita_black_bowl_2 - akita_black_bowl plate_1 - plate)
  (:init
    (In akita_black_bowl_1 wooden_cabinet_1_top_region) ; a comment (On x y)
    (On plate_1 main_table_plate_region)
  )
  (:goal
    (And (On akita_black_bowl_1 plate_1))
  )
)
"""


def test_parse_goal_and_init():
    assert parse_goal_text(BDDL) == [Predicate("on", ("akita_black_bowl_1", "plate_1"))]
    init = parse_section_text(BDDL, ":init")
    assert init[0] == Predicate("in", ("akita_black_bowl_1", "wooden_cabinet_1_top_region"))
    assert len(init) == 2


def test_parse_goal_without_and_and_missing_goal():
    assert parse_goal_text("(:goal (In milk_1 basket_1_contain_region))") == [
        Predicate("in", ("milk_1", "basket_1_contain_region"))]
    with pytest.raises(BadInput):
        parse_goal_text("(:init (On a b))")


def test_region_resolves_to_owner_object():
    priv = {"basket_1_pos": np.zeros(3), "basket_1_quat": np.array([0, 0, 0, 1.0]), "milk_1_pos": np.zeros(3),
            "milk_1_quat": np.array([0, 0, 0, 1.0]), "robot0_eef_pos": np.zeros(3)}
    assert owner("basket_1_contain_region", priv) == "basket_1"
    with pytest.raises(BadInput):
        owner("plate_1", priv)
    assert category("akita_black_bowl_1") == "akita_black_bowl" and category("plate") == "plate"


# ---------------------------------------------------------------------------------------- planning


def _bddl_files(suite: str) -> list[str]:
    from evalkit.suites.env import load_task
    from evalkit.suites.specs import get_suite

    spec = get_suite(suite)
    return [load_task(spec, t)[0].bddl_file for t in range(spec.num_tasks)]


def _plan(bddl: str) -> list[Step]:
    return plan_steps(parse_goal(bddl), parse_init(bddl))


# The plan of every task whose shape is not a single pick-and-place (libero_goal, libero_10).
EXPECTED = {
    ("libero_goal", 0): ["open"],
    ("libero_goal", 3): ["clear", "open", "pick_place"],
    ("libero_goal", 5): ["push"],
    ("libero_goal", 7): ["turn_on"],
    ("libero_10", 2): ["turn_on", "pick_place"],
    ("libero_10", 3): ["pick_place", "close"],
    ("libero_10", 8): ["pick_place", "pick_place"],  # the stove is already on in the init state
    ("libero_10", 9): ["insert", "close_door"],  # the microwave's door is open in the init state
}


@pytest.mark.parametrize("suite", ["libero_spatial", "libero_object", "libero_goal", "libero_10"])
def test_every_task_maps_to_a_plan(suite):
    for task, bddl in enumerate(_bddl_files(suite)):
        kinds = [s.kind for s in _plan(bddl)]
        assert kinds == EXPECTED.get((suite, task), ["pick_place"] * len(parse_goal(bddl))), (suite, task, kinds)


def test_refusals_name_the_predicate():
    with pytest.raises(BadInput, match=r"\(Turnoff flat_stove_1\)"):
        plan_steps([Predicate("turnoff", ("flat_stove_1",))], [])
    with pytest.raises(BadInput, match="no grasp for 'teapot_1'"):
        plan_steps([Predicate("on", ("teapot_1", "plate_1"))], [])
    # a drawer already open in the init is not opened again; one to be shut is closed last
    steps = plan_steps([Predicate("close", ("white_cabinet_1_top_region",)),
                        Predicate("in", ("akita_black_bowl_1", "white_cabinet_1_top_region"))],
                       [Predicate("open", ("white_cabinet_1_top_region",))])
    assert [s.kind for s in steps] == ["pick_place", "close"]
    # into the microwave: only through a door the init leaves open; on top of it is a plain pick-and-place
    into = Predicate("in", ("white_yellow_mug_1", "microwave_1_heating_region"))
    with pytest.raises(BadInput, match=r"does not open doors .*\(In white_yellow_mug_1 microwave_1_heating_region\)"):
        plan_steps([into], [])
    steps = plan_steps([Predicate("close", ("microwave_1",)), into], [Predicate("open", ("microwave_1",))])
    assert [(s.kind, s.args) for s in steps] == [("insert", ("white_yellow_mug_1", "microwave_1")),
                                                 ("close_door", ("microwave_1",))]
    on_top = plan_steps([Predicate("on", ("white_yellow_mug_1", "microwave_1_top_side"))], [])
    assert [s.kind for s in on_top] == ["pick_place"]


def test_push_aim_steers_the_path_away_from_an_obstacle():
    quat = np.array([0, 0, 0, 1.0])
    priv = {"plate_1_pos": np.array([0.0, 0.0, 0.9]), "plate_1_quat": quat,
            "bowl_1_pos": np.array([-0.1, 0.15, 0.9]), "bowl_1_quat": quat}
    aim = push_aim("plate_1", np.array([0.0, 0.3]), priv)
    assert aim[0] > 0.0  # the straight path bends away from the bowl standing left of it
    del priv["bowl_1_pos"], priv["bowl_1_quat"]
    assert np.allclose(push_aim("plate_1", np.array([0.0, 0.3]), priv), [0.0, 0.3], atol=0.01)


def test_geometry_helpers():
    from evalkit.policies.scripted_fixtures import facing
    from evalkit.policies.scripted_objects import hand_overlap
    from evalkit.policies.scripted_skills import near_yaw

    assert np.isclose(near_yaw(np.pi / 2 + 0.1, -1.4), -np.pi / 2 + 0.1)
    assert np.isclose(near_yaw(0.2, 0.0), 0.2)
    r = facing(np.array([0.0, 1.0, 0.0]), fingers_vertical=True).as_matrix()
    assert np.allclose(r[:, 2], [0, -1, 0], atol=1e-9)  # pointing into the fixture's front
    assert np.allclose(abs(r[:, 1]), [0, 0, 1], atol=1e-9)  # fingers close vertically
    quat = np.array([0, 0, 0, 1.0])
    priv = {"milk_1_pos": np.array([0.0, 0.09, 0.5]), "milk_1_quat": quat,
            "cream_cheese_1_pos": np.array([0.0, 0.0, 0.45]), "cream_cheese_1_quat": quat}
    # a hand with its long side along y reaches the milk carton 9 cm away; turned along x it does not
    assert hand_overlap(np.zeros(2), 0.45, 0.0, priv, "cream_cheese_1") > 0.0
    assert hand_overlap(np.zeros(2), 0.45, np.pi / 2, priv, "cream_cheese_1") == 0.0


def _microwave_scene(q: float, others: dict[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    ident = np.array([0, 0, 0, 1.0])
    priv = {"microwave_1_pos": np.array([0.0, 0.35, 0.92]), "microwave_1_quat": ident,
            "microwave_1_joint_pos": np.array([q]), "robot0_eef_pos": np.zeros(3)}
    for name, (x, y) in others.items():
        priv[f"{name}_pos"], priv[f"{name}_quat"] = np.array([x, y, 0.9]), ident
    return priv


def test_door_helpers():
    from evalkit.policies.scripted_doors import (
        corridor_objects,
        door_in_the_way,
        horizontal,
        toward,
    )

    r = horizontal(np.array([0.0, 2.0, 0.5])).as_matrix()
    assert np.allclose(r[:, 2], [0, 1, 0], atol=1e-9)  # pointing along the direction, made horizontal
    assert np.isclose(r[2, 1], 0.0, atol=1e-9)  # fingers close horizontally
    goal = Rotation.from_euler("x", 1.5)
    step = toward(goal, Rotation.identity().as_quat(), 0.4)
    assert np.isclose(step.magnitude(), 0.4) and np.allclose(step.as_rotvec() / 0.4, [1, 0, 0])
    assert toward(goal, Rotation.from_euler("x", 1.3).as_quat(), 0.4) is goal
    # the door's free edge leans into the corridor when it is open less than about 90 degrees
    assert door_in_the_way("microwave_1", _microwave_scene(-1.35, {}))
    assert not door_in_the_way("microwave_1", _microwave_scene(-1.9, {}))
    # objects in front of the opening (the second mug) are parked; the carried one and far ones are not
    priv = _microwave_scene(-1.6, {"porcelain_mug_1": (-0.1, -0.24), "white_yellow_mug_1": (0.0, 0.0),
                                   "plate_1": (0.35, -0.2)})
    assert corridor_objects("white_yellow_mug_1", "microwave_1", priv) == ["porcelain_mug_1"]


def test_drawer_drop_point_clears_the_handle_above():
    from evalkit.policies.scripted_fixtures import drawer

    ident = np.array([0, 0, 0, 1.0])
    priv = {"white_cabinet_1_pos": np.zeros(3), "white_cabinet_1_quat": ident,
            "white_cabinet_1_joint_pos": np.array([-0.15, 0.0, -0.14])}
    for level, q in (("bottom", -0.14), ("top", -0.15)):
        # the region site sits in the middle of the drawer (LIBERO: 1.1 cm behind the cabinet's middle), moving
        # with it; the cabinet's front faces -y, its face 7.8 cm in front of its middle
        priv[f"white_cabinet_1_{level}_region_site_pos"] = np.array([0.003, 0.011 + q, 0.05])
        d = drawer(f"white_cabinet_1_{level}_region", priv, open_it=True)
        drop = priv[f"white_cabinet_1_{level}_region_site_pos"][:2] + d.place_shift(
            priv, f"white_cabinet_1_{level}_region", 0.055, q)
        ahead = -0.078 - drop[1]  # the bowl's middle in front of the face
        if level == "bottom":  # under the middle drawer's handle bar: as far out as the drawer's front wall allows
            assert np.isclose(ahead, 0.14 - 0.013 - 0.8 * 0.055)
        else:  # nothing above the top drawer: just clear of the face
            assert np.isclose(ahead, 0.055 + 0.004)


def test_two_objects_into_one_basket_go_side_by_side():
    from evalkit.policies.scripted_plan import bind

    ident = np.array([0, 0, 0, 1.0])
    priv = {"basket_1_pos": np.array([0.0, 0.25, 0.43]), "basket_1_quat": ident,
            "alphabet_soup_1_pos": np.array([-0.2, 0.1, 0.47]), "alphabet_soup_1_quat": ident,
            "tomato_sauce_1_pos": np.array([0.1, 0.0, 0.47]), "tomato_sauce_1_quat": ident,
            "robot0_eef_pos": np.zeros(3)}
    goal = [Predicate("in", ("alphabet_soup_1", "basket_1_contain_region")),
            Predicate("in", ("tomato_sauce_1", "basket_1_contain_region"))]
    soup, sauce = bind(plan_steps(goal, []), (), priv)
    assert soup.container and sauce.container
    # opposite slots along the basket's x axis, each to the one nearer where it stands
    assert np.allclose(soup.place_shift, [-0.025, 0.0]) and np.allclose(sauce.place_shift, [0.025, 0.0])
    assert np.linalg.norm(priv["tomato_sauce_1_pos"][:2] - (priv["basket_1_pos"][:2] + sauce.place_shift)) < \
        np.linalg.norm(priv["tomato_sauce_1_pos"][:2] - (priv["basket_1_pos"][:2] + soup.place_shift))


def test_build_rejects_unknown_fields():
    from evalkit.policies.scripted import build

    p = build({"kind": "scripted", "name": "scripted", "denoise_steps": 10, "kp": 2.0}, "cpu")
    assert p.kp == 2.0 and p.needs_privileged and not p.needs_images
    with pytest.raises(BadInput):
        build({"kind": "scripted", "kpp": 2.0}, "cpu")


# ---------------------------------------------------------------------------------------- real episodes


def run_episode(suite: str, task: int, init: int) -> tuple[bool, int, ScriptedPolicy]:
    from evalkit.suites.env import LiberoEnv
    from evalkit.suites.specs import get_suite

    from evalkit.policies.base import ObsBatch

    spec = get_suite(suite)
    env = LiberoEnv(spec, task, render=False)
    try:
        policy = ScriptedPolicy()
        obs = env.reset(init)
        policy.reset(obs.episode_key)
        ok, steps = False, 0
        while steps < spec.max_steps and not ok:
            chunk = policy.predict(ObsBatch([obs]))
            assert chunk.shape == (1, policy.action_horizon, 7) and chunk.dtype == np.float32
            assert np.all(np.abs(chunk) <= 1.0)
            for a in chunk[0, : spec.replan_steps]:
                obs, ok = env.step(a)
                steps += 1
                if ok or steps >= spec.max_steps:
                    break
        return ok, steps, policy
    finally:
        env.close()


def test_scripted_solves_spatial_task0_init0():
    ok, steps, _ = run_episode("libero_spatial", 0, 0)
    assert ok, f"scripted expert failed libero_spatial task 0 init 0 within {steps} steps"


def test_scripted_turns_on_the_stove():
    ok, steps, policy = run_episode("libero_goal", 7, 0)
    assert ok, f"scripted expert failed to turn on the stove (libero_goal task 7 init 0) in {steps} steps"
    assert steps < 200


def test_privileged_observation_carries_fixture_state():
    from evalkit.suites.env import LiberoEnv
    from evalkit.suites.specs import get_suite

    env = LiberoEnv(get_suite("libero_goal"), 0, render=False)
    try:
        obs = env.reset(0)
        p = obs.privileged
        assert p["wooden_cabinet_1_joint_pos"].shape == (3,) and p["flat_stove_1_joint_pos"].shape == (1,)
        assert np.allclose(p["wooden_cabinet_1_joint_pos"], 0.0, atol=1e-3)  # drawers shut at the start
        site = Rotation.from_quat(p["wooden_cabinet_1_top_region_site_quat"])  # a valid xyzw quaternion
        assert np.isclose(np.linalg.norm(site.as_quat()), 1.0)
        assert "flat_stove_1_cook_region_site_pos" in p and "main_table_stove_front_region_site_pos" in p
        # demonstrations record the plan's (object, target) and featurize them from `<name>_pos`
        from evalkit.policies.base import ObsBatch

        policy = ScriptedPolicy()
        policy.predict(ObsBatch([obs]))
        plan = policy.plans[obs.episode_key]
        assert plan.obj == "wooden_cabinet_1" and f"{plan.target}_pos" in p
    finally:
        env.close()


@pytest.mark.slow
@pytest.mark.parametrize("suite,task,init", [
    ("libero_goal", 3, 0),   # push the bowl clear, open the top drawer, put the bowl in
    ("libero_goal", 5, 0),   # slide the plate by its rim
    ("libero_goal", 9, 0),   # bottle upright against the sloping rack
    ("libero_10", 3, 0),     # bowl into the open drawer, push the drawer shut
    ("libero_10", 5, 0),     # book into the caddy's back compartment
    ("libero_10", 8, 0),     # two moka pots side by side on the burner
    ("libero_10", 9, 0),     # second mug parked, mug into the microwave by its handle, door pushed shut
])
def test_scripted_solves_skill_family(suite, task, init):
    ok, steps, _ = run_episode(suite, task, init)
    assert ok, f"scripted expert failed {suite} task {task} init {init} within {steps} steps"
