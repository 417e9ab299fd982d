"""Bad input, as a hostile or hurried user types it (issues 20 and 24), table-driven.

Every row must exit 2 with one line on stderr ("evalkit: error: ..."), no traceback, no run folder left under
outputs/ and no episode run. Rows run the real CLI (`evalkit.cli.main`: argv rewriting, pre-checks, Hydra, the
validation stage) in-process in a fresh working directory, so a row costs Hydra's composition, not a Python start
(a subprocess per row costs 3-5 s of imports on a 2-core machine). Rows for corrupt checkpoints live in
tests/test_checkpoint_abuse.py, rows for journals and signals with the journal tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from evalkit import cli

NOOP = ["policy=noop"]
SHORT = ["suite.tasks=[0]", "suite.trials=1", "suite.max_steps=1", "workers=0", "video=none", "quiet=true"]


@dataclass
class Result:
    code: int | None
    out: str
    err: str


def run_in_process(args: list[str], cwd: Path, monkeypatch, capsys) -> Result:
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["evalkit", *args])
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return Result(code, out, err)


def make_read_only(path: Path) -> Callable[[], None]:
    """Make `path` refuse new files for real (chmod, or the immutable flag when we are root); skip if impossible."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    undo = [lambda: path.chmod(0o755)]
    probe = path / ".probe"
    try:
        probe.touch()
        probe.unlink()
        writable = True
    except OSError:
        writable = False
    if writable:  # root ignores permission bits
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
            undo.insert(0, lambda: subprocess.run(["chattr", "-i", str(path)], capture_output=True))
            writable = False
    if writable:
        for u in undo:
            u()
        pytest.skip("cannot make a folder read-only here (root without chattr)")
    return lambda: [u() for u in undo]


def write_run_dir(path: Path, **summary) -> Path:
    path.mkdir(parents=True)
    doc = {"success_rate": 0.5, "episodes": 2, "successes": 1,
           "params": {"policy": "noop", "backend": "bf16", "suite": "libero_spatial_quick", "denoise_steps": 10,
                      "device": "cpu"}}
    doc.update(summary)
    (path / "summary.json").write_text(json.dumps(doc))
    return path


def write_episode(path: Path, steps: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, state=np.zeros((steps, 8), np.float32), instruction=np.array("pick"),
             suite=np.array("libero_spatial"), task_id=np.array(0))
    return path


def with_files(files: dict[str, str | bytes | None], *args: str) -> Callable[[Path], list[str]]:
    """Arguments that name files made first in the working dir D: `files` maps a path under D to its text (bytes;
    None: an empty folder; "episode": a small demonstration episode); "{D}" in an argument is D."""
    def make(d: Path) -> list[str]:
        for rel, content in files.items():
            f = d / rel
            if content is None:
                f.mkdir(parents=True, exist_ok=True)
            elif content == "episode":
                write_episode(f)
            else:
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
        return [a.replace("{D}", str(d)) for a in args]

    return make


# (id, arguments or a function of the working dir giving them, a piece of the expected one-line message)
Args = list[str] | Callable[[Path], list[str]]
ROWS: list[tuple[str, Args, str]] = [
    # -- typos: group options and keys, with a did-you-mean ------------------------------------------------------
    ("backend-typo", [*NOOP, "backend=fp9"], "unknown backend 'fp9'; did you mean 'fp8'? valid: "),
    ("suite-typo", [*NOOP, "suite=libero_spatail"], "did you mean 'libero_spatial'?"),
    ("policy-typo", ["policy=refernce"], "unknown policy 'refernce'; did you mean 'reference'?"),
    ("gate-typo", [*NOOP, "gate=strct"], "unknown gate 'strct'; did you mean 'strict'?"),
    ("tracking-typo", [*NOOP, "tracking=ofline"], "unknown tracking 'ofline'; did you mean 'offline'?"),
    ("experiment-typo", [*NOOP, "experiment=nighty"], "unknown experiment 'nighty'; did you mean 'nightly'?"),
    ("plus-foo", [*NOOP, "+foo=1"], "unknown key 'foo'; valid: backend, baseline,"),
    ("plus-key-typo", [*NOOP, "+seeds=3"], "unknown key 'seeds'; did you mean 'seed'?"),
    ("suite-key-typo", [*NOOP, "suite.trails=3"], "unknown key 'trails' in suite; did you mean 'trials'?"),
    ("backend-plus-key", [*NOOP, "+backend.foo=1"], "unknown key 'foo' in backend; valid: calib,"),
    ("gate-key-typo", [*NOOP, "gate.alpah=0.1"], "unknown key 'alpah' in gate; did you mean 'alpha'?"),
    ("fidelity-key-typo", [*NOOP, "gate.fidelity.margin_dbb=1"], "did you mean 'margin_db'?"),
    ("backend-option-typo", [*NOOP, "+backend.options.fuse_norm=true"], "backend 'bf16' has no option 'fuse_norm'"),
    ("policy-field", [*NOOP, "+policy.foo=1"], "unknown noop policy fields ['foo']"),
    ("delete-required", [*NOOP, "~seed"], "seed is required"),
    ("not-key-value", [*NOOP, "foo"], "arguments are key=value"),
    ("ambiguous-comma", [*NOOP, "suite.tasks=0,1"], "ambiguous value 'suite.tasks=0,1'"),
    # -- values and types of the top-level knobs ------------------------------------------------------------------
    ("denoise-0", [*NOOP, "denoise_steps=0"], "denoise_steps=0: must be >= 1"),
    ("denoise-text", [*NOOP, "denoise_steps=abc"], "denoise_steps='abc' is not an integer"),
    ("workers-neg", [*NOOP, "workers=-1"], "workers=-1: must be >= 0"),
    ("workers-text", [*NOOP, "workers=abc"], "workers='abc' is not an integer"),
    ("batch-window-neg", [*NOOP, "batch_window_ms=-5"], "batch_window_ms=-5.0: must be >= 0"),
    ("seed-text", [*NOOP, "seed=abc"], "seed='abc' is not an integer"),
    ("seed-float", [*NOOP, "seed=1.5"], "seed='1.5' is not an integer"),
    ("device-tpu", [*NOOP, "device=tpu"], "device=tpu: valid: auto, cpu, cuda, cuda:N"),
    ("video-x", [*NOOP, "video=x"], "unknown video value 'x'; valid: all, failures, none"),
    ("quiet-maybe", [*NOOP, "quiet=maybe"], "Value 'maybe' is not a valid bool"),
    ("videos-neg", [*NOOP, "videos_per_task=-1"], "videos_per_task=-1: must be >= 0"),
    ("resume-missing", [*NOOP, "resume=/nonexistent/run"], "no evalkit run there"),
    # -- the suite: nothing ever runs 0 episodes ------------------------------------------------------------------
    ("tasks-empty", [*NOOP, "suite.tasks=[]"], "this run has no episodes: suite.tasks is empty"),
    ("shard-empty", [*NOOP, "shard=0/10"], "this run has no episodes: shard=0/10"),
    ("shard-text", [*NOOP, "shard=abc"], "expected K/N"),
    ("trials-0", [*NOOP, "suite.trials=0"], "suite.trials=0: must be 1..50"),
    ("trials-51", [*NOOP, "suite.trials=51"], "suite.trials=51: must be 1..50"),
    ("max-steps-0", [*NOOP, "suite.max_steps=0"], "suite.max_steps=0: must be >= 1"),
    ("tasks-range", [*NOOP, "suite.tasks=[99]"], "out of range; libero_spatial has tasks 0..9"),
    ("tasks-dup", [*NOOP, "suite.tasks=[0,0]"], "has duplicates"),
    ("seed-mode", [*NOOP, "suite.seed_mode=foo"], "suite.seed_mode=foo: valid:"),
    ("replan-0", [*NOOP, "suite.replan_steps=0"], "suite.replan_steps=0 is out of range"),
    # -- the tracking store --------------------------------------------------------------------------------------
    ("uri-garbage", [*NOOP, "tracking.uri=garbage"], "tracking.uri='garbage' is not a tracking store"),
    ("uri-two-slashes", [*NOOP, "tracking.uri=sqlite://mlflow.db"], "a sqlite store is sqlite:///relative"),
    ("uri-bad-port", [*NOOP, "tracking.uri=http://:abc"], "not a server address"),
    ("uri-under-file", with_files({"afile": "x"}, *NOOP, "tracking.uri=sqlite:///{D}/afile/mlflow.db"),
     "is a file, not a folder"),
    ("tracking-mode", [*NOOP, "tracking.mode=sometimes"], "unknown tracking.mode value 'sometimes'"),
    # -- the baseline ----------------------------------------------------------------------------------------------
    ("baseline-nope", [*NOOP, "baseline=nope"], "cannot resolve run 'nope'"),
    ("baseline-no-summary", with_files({"empty_run": None}, *NOOP, "baseline={D}/empty_run"), "has no summary.json"),
    ("baseline-run-id-no-store", [*NOOP, "baseline=0123456789abcdef0123456789abcdef"], "no tracking store at"),
    ("baseline-other-suite", lambda d: [*NOOP, f"baseline={write_run_dir(d / 'goal', params={'suite': 'libero_goal'})}"],
     "the baseline ran suite 'libero_goal', this run suite 'libero_spatial_quick'"),
    ("baseline-other-sim", lambda d: [*NOOP, f"baseline={write_run_dir(d / 'sim', versions={'mujoco': '0.0.1'})}"],
     "ran different simulators (mujoco"),
    # -- the backend ----------------------------------------------------------------------------------------------
    ("target-not-backend", [*NOOP, "backend.target=os.path"], "'os.path' (a module) is not a evalkit.backends.base"),
    ("target-no-module", [*NOOP, "backend.target=no_such_module.Thing"], "cannot import 'no_such_module'"),
    ("targets-typo", [*NOOP, "backend.targets=prefix_mpl"], "unknown backend.targets 'prefix_mpl'"),
    ("targets-bare-comma-typo", [*NOOP, "backend.targets=prefix_mlp,exprt"], "unknown backend.targets 'prefix_mlp,exprt'"),
    ("engine-unknown", [*NOOP, "backend=int8", "backend.engine=turbo"], "backend 'int8' has no engine 'turbo'"),
    ("engine-not-a-knob", [*NOOP, "backend.engine=fake_quant"], "backend 'bf16' has no 'engine' setting"),
    # -- calibration data -------------------------------------------------------------------------------------------
    ("calib-demos-0", [*NOOP, "backend.calib=demos:0"], "N must be an integer >= 1"),
    ("calib-demos-text", [*NOOP, "backend.calib=demos:many"], "N must be an integer >= 1"),
    ("calib-demos-none", [*NOOP, "backend.calib=demos:5"], "no demonstrations in data/demos/libero_spatial_quick"),
    ("calib-demos-too-few", with_files({"data/demos/libero_spatial/task00_ep0000.npz": "episode"}, *NOOP,
                                       "backend.calib=demos:1000"), "holds 3 observations in 1 episodes, fewer than 1000"),
    ("calib-missing-path", [*NOOP, "backend.calib=/nonexistent/demos"], "no such file or folder"),
    ("calib-empty-folder", with_files({"nodemos": None}, *NOOP, "backend.calib={D}/nodemos"),
     "holds no task*_ep*.npz episodes"),
    ("calib-not-episode", with_files({"junk.npz": b"not a zip"}, *NOOP, "backend.calib={D}/junk.npz"),
     "is not a demonstration episode"),
    ("calib-not-npz", with_files({"notes.txt": "x"}, *NOOP, "backend.calib={D}/notes.txt"), "expected a .npz episode"),
    # -- gate thresholds ----------------------------------------------------------------------------------------------
    ("gate-alpha-text", [*NOOP, "gate.alpha=abc"], "gate.alpha='abc': expected a number"),
    ("gate-alpha-range", [*NOOP, "gate.alpha=0.9"], "gate.alpha=0.9 must be in (0.0, 0.5)"),
    ("gate-max-drop-0", [*NOOP, "gate.max_drop=0"], "gate.max_drop=0 must be in (0.0, 1.0)"),
    ("gate-family", [*NOOP, "gate.family_method=foo"], "gate.family_method='foo'; valid:"),
    ("gate-family-size", [*NOOP, "gate.family_size=0"], "gate.family_size=0 must be >= 1"),
    ("gate-bool", [*NOOP, "gate.fail_inconclusive=maybe"], "gate.fail_inconclusive='maybe': expected true/false"),
    ("gate-latency-ratio", [*NOOP, "gate.max_latency_ratio=0"], "gate.max_latency_ratio=0 must be > 0"),
    ("gate-reference", [*NOOP, "gate.fidelity.reference_backend=bf61"],
     "unknown gate.fidelity.reference_backend 'bf61'; did you mean 'bf16'?"),
    ("gate-check-steps", [*NOOP, "gate.fidelity.check_steps=[-1]"], "check_steps must be >= 0"),
    # -- config files ------------------------------------------------------------------------------------------------
    ("config-dir-broken", with_files({"cd/config.yaml": "defaults:\n  - policy: [broken\n"}, "--config-dir", "{D}/cd",
                                     *NOOP), "config.yaml is not valid YAML"),
    ("config-dir-shadowed-primary", with_files({"cd/config.yaml": "seed: 3\n"}, "--config-dir", "{D}/cd", *NOOP),
     "has the name of evalkit's own primary config"),
    ("config-dir-shadowed-option", with_files({"cd/policy/reference.yaml": "kind: noop\n"}, "--config-dir", "{D}/cd",
                                              "policy=reference"), "has the name of evalkit's own option"),
    ("config-dir-broken-option", with_files({"cd/policy/mine.yaml": "kind: [noop\n"}, "--config-dir", "{D}/cd",
                                            "policy=mine"), "policy/mine.yaml is not valid YAML"),
    ("config-name-broken", with_files({"cd/mine.yaml": "a: [1, 2\nb: :\n"}, "--config-dir", "{D}/cd", "--config-name",
                                      "mine"), "mine.yaml is not valid YAML"),
    ("config-name-missing", ["--config-name", "nonexistent"], "Cannot find primary config 'nonexistent'"),
    ("config-dir-missing", ["--config-dir", "/nonexistent/conf", *NOOP], "Additional config directory"),
    ("run-dir-unmakeable", [*NOOP, "hydra.run.dir=/proc/evalkit/run"], "cannot use /proc/evalkit"),
]


@pytest.mark.parametrize("name, args, message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(name, args, message, tmp_path, monkeypatch, capsys):
    argv = args(tmp_path) if callable(args) else args
    r = run_in_process(argv, tmp_path, monkeypatch, capsys)
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == 2, (r.code, r.out[-2000:], r.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("evalkit: error: "), r.err
    assert message in lines[0], lines[0]
    assert "Traceback" not in r.out + r.err
    assert not (tmp_path / "outputs").exists(), list((tmp_path / "outputs").rglob("*"))  # no run folder left
    assert not list(tmp_path.rglob("episodes.jsonl"))  # no episode ran


def test_row_count():
    assert len(ROWS) >= 40


def test_read_only_tracking_store_says_what_to_do(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    undo = make_read_only(ro)
    try:
        r = run_in_process([*NOOP, f"tracking.uri=sqlite:///{ro}/mlflow.db"], tmp_path, monkeypatch, capsys)
    finally:
        undo()
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == 2 and len(lines) == 1 and "cannot write in" in lines[0] and "tracking=offline" in lines[0]
    assert not any((tmp_path / "outputs").rglob("*")) if (tmp_path / "outputs").exists() else True


def test_read_only_outputs_is_one_line(tmp_path, monkeypatch, capsys):
    undo = make_read_only(tmp_path / "outputs")
    try:
        r = run_in_process([*NOOP], tmp_path, monkeypatch, capsys)
    finally:
        undo()
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == 2 and len(lines) == 1 and "cannot use" in lines[0] and "writable" in lines[0], r.err


def test_readme_default_with_unknown_baseline_stops_before_anything(tmp_path, monkeypatch, capsys):
    """Issue 20's acceptance: `python -m evalkit baseline=nope` (README defaults) exits 2, no episode, no folder;
    the header line (printed once the run starts) never appears, so nothing was built."""
    r = run_in_process(["baseline=nope"], tmp_path, monkeypatch, capsys)
    assert r.code == 2 and "cannot resolve run 'nope'" in r.err and "Traceback" not in r.err
    assert "run dir" not in r.out and "backend" not in r.out
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlruns").exists()  # validation creates nothing


def test_torch_trt_fp8_without_gpu_names_the_fake_quant_command(tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the native engine's requirement is then the GPU's, not its absence")
    r = run_in_process([*NOOP, "backend=torch_trt_fp8", "suite=libero_spatial_quick"], tmp_path, monkeypatch, capsys)
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == 2 and len(lines) == 1, r.err
    assert "needs a CUDA GPU" in lines[0]
    assert lines[0].endswith("python -m evalkit policy=noop backend=torch_trt_fp8 suite=libero_spatial_quick "
                             "backend.engine=fake_quant")
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*"))


def test_device_cuda_without_gpu(tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    r = run_in_process([*NOOP, "device=cuda"], tmp_path, monkeypatch, capsys)
    assert r.code == 2 and "no CUDA GPU is visible" in r.err and "Traceback" not in r.err


def test_valid_custom_option_in_config_dir_is_accepted_and_runs(tmp_path, monkeypatch, capsys):
    """A policy option that lives only in the user's --config-dir is a valid choice (it was refused by a pre-check
    that read conf/ only); the run composes it, runs its one episode and records it."""
    cd = tmp_path / "myconf" / "policy"
    cd.mkdir(parents=True)
    (cd / "mynoop.yaml").write_text("kind: noop\nname: mynoop\n")
    run_dir = tmp_path / "run"
    r = run_in_process(["--config-dir", str(tmp_path / "myconf"), "policy=mynoop", *SHORT, "tracking=offline",
                        f"hydra.run.dir={run_dir}"], tmp_path, monkeypatch, capsys)
    assert r.code == 0, r.out[-3000:] + r.err[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["episodes"] == 1 and s["params"]["policy"] == "mynoop"


def test_bare_comma_targets_are_one_value_outside_a_multirun():
    assert cli.quote_comma_values(["backend.targets=prefix_mlp,expert"]) == ["backend.targets='prefix_mlp,expert'"]
    assert cli.quote_comma_values(["-m", "backend.targets=prefix_mlp,expert"]) == ["-m", "backend.targets=prefix_mlp,expert"]
    assert cli.quote_comma_values(["backend.targets='a,b'", "policy=noop,random"]) == ["backend.targets='a,b'",
                                                                                        "policy=noop,random"]


def test_bare_comma_targets_compose_as_the_list(tmp_path, monkeypatch, capsys):
    """The bare form passes Hydra (no "Ambiguous value") and reaches validation as one value: a typo in it is named
    whole, and a valid one is refused only by the later check this row provokes (an unknown baseline)."""
    r = run_in_process([*NOOP, "backend=int8", "backend.targets=prefix_mlp,expert", "baseline=nope"], tmp_path,
                       monkeypatch, capsys)
    assert r.code == 2 and "cannot resolve run 'nope'" in r.err and "mbiguous" not in r.err


def test_discard_keeps_any_folder_with_results(tmp_path):
    from evalkit.validate import discard_unused_run_dir

    outputs = tmp_path / "outputs"
    fresh = outputs / "day" / "run"
    (fresh / ".hydra").mkdir(parents=True)
    (fresh / "cli.log").write_text("")
    assert discard_unused_run_dir(fresh, outputs) and not (outputs / "day").exists() and outputs.exists()
    for keep in ("episodes.jsonl", "summary.json", "notes.txt"):
        d = outputs / keep
        (d / ".hydra").mkdir(parents=True)
        (d / keep).write_text("x")
        assert not discard_unused_run_dir(d, outputs) and (d / keep).exists()


def test_resume_latest_never_picks_a_folder_that_failed_validation(tmp_path):
    """A folder a validation failure could leave (had the process died before removing it) holds no run_key.json,
    so `resume=latest` cannot pick it."""
    from evalkit.run import find_resume_dir

    outputs = tmp_path / "outputs"
    (outputs / "day" / "failed" / ".hydra").mkdir(parents=True)
    fresh = outputs / "day" / "fresh"
    assert find_resume_dir("latest", fresh, {"k": 1}, outputs) == fresh
