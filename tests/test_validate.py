"""The pre-run validation stage's parts on their own: calibration sources (a real recorded demonstration, trimmed to
12 steps: tests/data/demo_libero_spatial_task00_ep0000.npz), the tracking check, baseline compatibility, typos."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from evalkit.suites.specs import get_suite

from evalkit.config import did_you_mean, unknown_choice, unknown_key
from evalkit.errors import BadInput

DEMO = Path(__file__).parent / "data" / "demo_libero_spatial_task00_ep0000.npz"
SPEC = get_suite("libero_spatial_quick")


@pytest.fixture
def demos_root(tmp_path: Path) -> Path:
    d = tmp_path / "demos" / "libero_spatial"
    d.mkdir(parents=True)
    shutil.copy(DEMO, d / "task00_ep0000.npz")
    shutil.copy(DEMO, d / "task00_ep0001.npz")
    return tmp_path / "demos"


def test_demos_n_picks_n_observations_spread_over_every_episode(demos_root):
    from evalkit.fidelity.calib_sources import load_observations, parse_calib, pick

    src = parse_calib("demos:6", SPEC, demos_root)
    assert src.kind == "demos" and src.available == 24 and src.count == 6  # the suite's LIBERO name was found
    picked = pick(src)
    assert len(picked) == 6 and {i for i, _ in picked} == {0, 1} and picked == pick(parse_calib("demos:6", SPEC, demos_root))
    obs = load_observations(src)
    assert len(obs) == 6 and all(o.state.shape == (8,) and o.instruction for o in obs)
    assert Path(obs[0].task["bddl_file"]).is_file() and "akita_black_bowl_1_pos" in obs[0].privileged
    with pytest.raises(BadInput, match="holds 24 observations in 2 episodes, fewer than 25"):
        parse_calib("demos:25", SPEC, demos_root)


def test_a_path_gives_every_observation_of_its_episodes(demos_root):
    from evalkit.fidelity.calib_sources import parse_calib

    one = parse_calib(str(demos_root / "libero_spatial" / "task00_ep0000.npz"), SPEC)
    folder = parse_calib(str(demos_root / "libero_spatial"), SPEC)
    assert (one.kind, one.count, len(one.files)) == ("path", 12, 1) and (folder.count, len(folder.files)) == (24, 2)


def test_calibration_set_from_demos_runs_the_policy_and_records_its_identity(demos_root):
    """The reference policy (state features from privileged observations) calibrates on recorded demonstrations:
    every item runs a real predict, and the record names the source, the count and a hash of the data."""
    import torch

    from evalkit.fidelity.stage import calibration_set
    from evalkit.policies.reference import build

    policy = build({"kind": "reference"}, torch.device("cpu"))
    calib = calibration_set(policy, SPEC, source="demos:10", demos_root=demos_root)
    assert calib.observations == 10 and calib.source.startswith("demos:10: 10 of 24 observations from 2 episode")
    actions = [item() for item in calib.items]
    assert len(actions) == 2 and sum(a.shape[0] for a in actions) == 10 and all(np.isfinite(a).all() for a in actions)
    again = calibration_set(policy, SPEC, source="demos:10", demos_root=demos_root)
    other = calibration_set(policy, SPEC, source="demos:11", demos_root=demos_root)
    assert again.digest == calib.digest and other.digest != calib.digest
    policy.needs_images = True  # recorded demonstrations hold no images: such a policy calibrates on probes
    with pytest.raises(BadInput, match="hold no camera images"):
        calibration_set(policy, SPEC, source="demos:10", demos_root=demos_root)


def test_tracking_check_creates_nothing_and_announces_a_dead_server(tmp_path):
    from evalkit.validate import check_tracking

    t = check_tracking({"mode": "online", "uri": "sqlite:///sub/dir/mlflow.db"}, base_dir=tmp_path)
    assert t.online and t.uri == f"sqlite:///{(tmp_path / 'sub/dir/mlflow.db').resolve()}"
    assert not (tmp_path / "sub").exists()
    dead = check_tracking({"mode": "online", "uri": "http://127.0.0.1:9"})
    assert not dead.online and len(dead.notes) == 1 and "python -m evalkit.sync" in dead.notes[0]
    assert check_tracking({"mode": "offline", "uri": "http://127.0.0.1:9"}).notes == []


def test_baseline_compatibility_refuses_what_the_judge_would_and_warns_about_the_rest():
    from evalkit.gate.compat import check_baseline_compatible
    from evalkit.results.summary import RunSummary

    cand = {"policy": "pi05", "suite": "libero_spatial", "denoise_steps": 5}
    same_sim = RunSummary.from_dict({"versions": {"mujoco": "2.3.7"}})
    warnings = check_baseline_compatible(cand, {"suite": "libero_spatial", "policy": "pi05", "denoise_steps": "10"},
                                         same_sim, {"mujoco": "2.3.7"}, False)
    assert warnings == ["baseline denoise_steps differs: this run 5, baseline 10"]
    with pytest.raises(BadInput, match="mujoco 3.2.3 vs 2.3.7"):
        check_baseline_compatible(cand, {"suite": "libero_spatial"}, same_sim, {"mujoco": "3.2.3"}, False)
    assert check_baseline_compatible(cand, {"suite": "libero_spatial"}, same_sim, {"mujoco": "3.2.3"}, True) == []


def test_typos_get_the_closest_name_then_every_valid_one():
    assert did_you_mean("trails", ["trials", "tasks"]) == " did you mean 'trials'?"
    assert did_you_mean("zzz", ["trials"]) == ""
    assert unknown_choice("backend", "int9", ["int8", "int4", "bf16"]) == (
        "unknown backend 'int9'; did you mean 'int8'? valid: bf16, int4, int8")
    assert unknown_key("suite.trials") is None and unknown_key("policy.anything") is None
    assert unknown_key("backend.options.x") is None and "did you mean 'baseline'" in unknown_key("baselin")
