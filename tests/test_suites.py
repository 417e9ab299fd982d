import pytest
from evalkit.suites.specs import SUITES, customize, get_suite

from evalkit.errors import BadInput


def test_protocol_defaults_match_openpi():
    assert {n: SUITES[n].max_steps for n in ["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"]} == {
        "libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
    s = get_suite("libero_spatial")
    assert (s.num_steps_wait, s.replan_steps, s.seed, s.resolution, s.image_size) == (10, 5, 7, 256, 224)


def test_quick_and_pro_variants():
    q = get_suite("libero_spatial_quick")
    assert q.task_ids == (0, 1, 2) and q.trials == 3 and len(q.episodes()) == 9
    assert q.episodes()[0] == (0, 0) and q.episodes()[-1] == (2, 2)
    for v in ("lan", "object", "swap", "task"):
        assert get_suite(f"libero_object_{v}").max_steps == 280


def test_seeds_are_deterministic_and_distinct():
    s = get_suite("libero_spatial")
    seeds = {s.episode_seed(t, i) for t, i in s.episodes()}
    assert len(seeds) == len(s.episodes())
    assert s.episode_seed(3, 4) == get_suite("libero_spatial_quick").episode_seed(3, 4)  # same episode, same seed


def test_bad_overrides_name_the_problem():
    s = get_suite("libero_spatial")
    with pytest.raises(BadInput, match="out of range.*0..9"):
        customize(s, tasks=[99])
    with pytest.raises(BadInput, match="1..50"):
        customize(s, trials=0)
    with pytest.raises(BadInput, match="valid: "):
        get_suite("nope")
    assert customize(s, tasks=[0, 3], trials=2).episodes() == [(0, 0), (0, 1), (3, 0), (3, 1)]


def test_seed_mode_defaults_to_openpi_and_protocol_records_what_ran():
    s = get_suite("libero_spatial")
    assert s.seed_mode == "openpi"
    p = s.protocol()
    assert p["seed"] == 7 and p["seed_mode"] == "openpi" and "once per task" in p["seeding"]
    q = customize(s, seed_mode="independent", seed=3).protocol()
    assert q["seed_mode"] == "independent" and "crc32('3/<suite>/<task>/<episode>')" in q["seeding"]
    with pytest.raises(BadInput, match="suite.seed_mode=random: valid: openpi, independent"):
        customize(s, seed_mode="random")


def test_seed_mode_is_a_config_knob():
    from hydra import compose, initialize_config_dir

    from evalkit.config import CONF_DIR, register, validate

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        base = ["tracking=offline", "device=cpu"]
        assert validate(compose("config", overrides=base)).suite.seed_mode == "openpi"
        cfg = compose("config", overrides=[*base, "suite.seed_mode=independent"])
        assert validate(cfg).suite.seed_mode == "independent"
        with pytest.raises(BadInput, match="valid: openpi, independent"):
            validate(compose("config", overrides=[*base, "suite.seed_mode=nope"]))
