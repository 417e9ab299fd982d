"""One grammar for every command: `key=value` overrides, `--help` listing the options, exit 2 on bad input.

The per-tool checks call each tool's `main` in-process through `evalkit.errors.exit_with`, the runner its
`python -m` entry uses (fast); a few subprocesses check the real entry points and the `evalkit` console script.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from evalkit.cli import TOOLS
from evalkit.cli_args import opt, parse
from evalkit.errors import BadInput, exit_with

# tool (as `evalkit TOOL`), leading subcommand words, options its --help must list, a key=value of a wrong type
CASES = [
    ("bench", [], ["policy", "backend", "denoise_steps", "views", "calls", "mlflow", "policy.KEY"], "calls=many"),
    ("merge", [], ["runs", "out", "uri", "allow_partial"], "allow_partial=maybe"),
    ("sync", [], ["runs", "uri"], "uri=null"),
    ("serve", [], ["policy", "host", "port", "device", "policy.KEY"], "port=eighty"),
    ("nightly", [], ["backends", "suites", "denoise_steps", "timeout_s", "gate", "config"], "timeout_s=soon"),
    ("train", [], ["data", "steps", "lr", "model", "config"], "steps=abc"),
    ("demos", [], ["suite", "episodes_per_task", "workers", "tasks"], "workers=two"),
    ("gate", [], ["candidate", "baseline", "tracking_uri", "json", "gate.max_drop", "gate.fidelity.margin_db"],
     "gate.alpha=oops"),
    ("gate", ["plan"], ["baseline", "margin", "alpha", "power", "family_size"], "margin=wide"),
]
IDS = [" ".join([t, *sub]) for t, sub, _, _ in CASES]


def run_main(tool: str, argv: list[str]) -> int:
    """The tool's exit code as its `python -m` entry would give it."""
    module = importlib.import_module(TOOLS[tool][0])
    with pytest.raises(SystemExit) as e:
        exit_with(lambda: module.main(argv))
    return e.value.code


@pytest.mark.parametrize("tool, sub, keys, bad", CASES, ids=IDS)
def test_help_lists_every_option_and_exits_0(tool, sub, keys, bad, capsys):
    assert run_main(tool, [*sub, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "exit codes: 0 pass, 1 regression, 2 bad input" in out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert set(keys) <= listed, set(keys) - listed


@pytest.mark.parametrize("tool, sub, keys, bad", CASES, ids=IDS)
def test_unknown_key_exits_2_listing_the_valid_ones(tool, sub, keys, bad, capsys):
    assert run_main(tool, [*sub, "no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'no_such_key'; valid:" in err and keys[0] in err.split("valid:")[1]


@pytest.mark.parametrize("tool, sub, keys, bad", CASES, ids=IDS)
def test_bad_value_exits_2_naming_key_and_type(tool, sub, keys, bad, capsys):
    assert run_main(tool, [*sub, bad]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: expected " in err, err


@pytest.mark.parametrize("tool, sub, keys, bad", CASES, ids=IDS)
def test_positional_argument_exits_2_with_the_usage(tool, sub, keys, bad, capsys):
    assert run_main(tool, [*sub, "some/dir"]) == 2
    err = capsys.readouterr().err
    assert "argument 'some/dir' is not key=value; usage:" in err


# -- the parser itself ---------------------------------------------------------------------------------------
@dataclass
class Inner:
    depth: int = opt(4, "layers")


@dataclass
class Opts:
    run: str = opt(help="a run id")
    steps: list[int] = opt([10], "denoise steps")
    dirs: list[str] = opt([], "folders")
    scale: float = 0.5  # help from this comment
    note: Optional[str] = None
    flag: bool = False
    extra: dict = opt({}, "anything below")
    inner: Inner = field(default_factory=Inner)


def test_values_read_like_omegaconf_and_text_as_written():
    o = parse(Opts, ["run=0123", "steps=[1,3]", "dirs=/a:b", "scale=1e-3", "note=null", "flag=true",
                     "extra.k.j=2", "inner.depth=2"], prog="t", about="x")
    assert o == Opts(run="0123", steps=[1, 3], dirs=["/a:b"], scale=0.001, note=None, flag=True,
                     extra={"k": {"j": 2}}, inner=Inner(depth=2))
    assert parse(Opts, ["run=r", "steps=5", "dirs=[x,y]"], prog="t", about="x").steps == [5]  # one value: a list of one


@pytest.mark.parametrize("argv, message", [
    (["steps=[1]"], "run=... required; usage: t run=... [key=value ...]"),
    (["run=r", "inner.width=3"], "unknown option 'inner.width'; valid: run, steps, dirs, scale, note, flag, extra.KEY, inner.depth"),
    (["run=r", "steps=1,3"], "steps=1,3: expected list[int], e.g. [1,2]"),
    (["run=r", "steps=[1,"], "steps=[1,: expected list[int]"),  # not even YAML
    (["run=r", "scale=${nowhere}"], "Interpolation key 'nowhere' not found"),
    (["run=r", "inner.depth=deep"], "inner.depth=deep: expected int"),
    (["run=r", "--flag"], "argument '--flag' is not key=value"),
])
def test_parser_errors_are_bad_input(argv, message):
    with pytest.raises(BadInput) as e:
        parse(Opts, argv, prog="t", about="x")
    assert message in str(e.value)


def test_help_shows_type_default_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        parse(Opts, ["--help", "steps=[2]"], prog="t", about="a tool")
    assert e.value.code == 0
    lines = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")}
    assert lines["run"][:3] == ["run", "str", "(required)"] and lines["steps"][:3] == ["steps", "list[int]", "[2]"]
    assert " ".join(lines["scale"][3:]) == "help from this comment" and lines["inner.depth"][:3] == ["inner.depth", "int", "4"]


# -- real entry points ---------------------------------------------------------------------------------------
def test_bench_takes_the_main_commands_grammar(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "evalkit.bench", "backend=int8", "policy=pi05_tiny", "device=cpu",
                        "calls=2", "warmup=0", "denoise_steps=1", "views=1", "mlflow=false", f"out={out}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["backend"], row["denoise_steps"], row["views"], row["latency"]["calls"]) == ("int8", 1, 1, 2)


def test_module_entry_exits_2_on_an_unknown_key(tmp_path):
    p = subprocess.run([sys.executable, "-m", "evalkit.sync", "dir=x"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 2 and "unknown option 'dir'; valid: runs, uri" in p.stderr and "Traceback" not in p.stderr


def console_script() -> str:
    path = Path(sys.executable).with_name("evalkit")
    found = str(path) if path.exists() else shutil.which("evalkit")
    assert found, "the `evalkit` console script is missing: pip install -e . installs it"
    return found


def test_console_script_dispatches_to_tools(tmp_path):
    p = subprocess.run([console_script(), "bench", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0 and "denoise_steps" in p.stdout and "policy.KEY" in p.stdout, p.stderr
    p = subprocess.run([console_script(), "gate", "plan", "margin=0.1"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 2 and "baseline=... required" in p.stderr


def test_console_script_help_lists_tools_and_the_runs_options(tmp_path):
    p = subprocess.run([console_script(), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert all(f"evalkit {t} " in p.stdout for t in TOOLS)
    assert "Config groups" in p.stdout and "denoise_steps" in p.stdout  # Hydra's help of the run follows
