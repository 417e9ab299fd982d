"""Scripted expert: BDDL goal parsing (pure) and one real LIBERO episode (libero_spatial task 0, init 0)."""

from __future__ import annotations

import numpy as np
import pytest

from evalkit.errors import BadInput, CapabilityError
from evalkit.policies.scripted import ScriptedPolicy, category, pick_place_goal, resolve_target
from evalkit.policies.scripted_goal import Predicate, parse_goal_text, parse_section_text

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
    priv = {"basket_1_pos": np.zeros(3), "milk_1_pos": np.zeros(3), "robot0_eef_pos": np.zeros(3)}
    assert resolve_target("basket_1_contain_region", priv) == "basket_1"
    assert pick_place_goal((Predicate("in", ("milk_1", "basket_1_contain_region")),), priv) == ("milk_1", "basket_1")
    with pytest.raises(BadInput):
        resolve_target("plate_1", priv)
    with pytest.raises(CapabilityError):
        pick_place_goal((Predicate("open", ("drawer_1",)),), priv)
    assert category("akita_black_bowl_1") == "akita_black_bowl" and category("plate") == "plate"


def test_scripted_solves_spatial_task0_init0():
    from evalkit.policies.base import ObsBatch
    from evalkit.suites.env import LiberoEnv
    from evalkit.suites.specs import get_suite

    spec = get_suite("libero_spatial")
    env = LiberoEnv(spec, 0, render=False)
    try:
        policy = ScriptedPolicy()
        obs = env.reset(0)
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
        assert ok, f"scripted expert failed libero_spatial task 0 init 0 within {spec.max_steps} steps"
    finally:
        env.close()


def test_build_rejects_unknown_fields():
    from evalkit.policies.scripted import build

    p = build({"kind": "scripted", "name": "scripted", "denoise_steps": 10, "kp": 2.0}, "cpu")
    assert p.kp == 2.0 and p.needs_privileged and not p.needs_images
    with pytest.raises(BadInput):
        build({"kind": "scripted", "kpp": 2.0}, "cpu")
