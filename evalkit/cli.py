"""`python -m evalkit [overrides]`: Hydra composes the run, `evalkit.run.execute` runs it.

`evalkit` (the console script) is the same command; `evalkit TOOL key=value ...` runs `python -m evalkit.TOOL`
with the same arguments (TOOLS below; every tool takes key=value overrides, evalkit/cli_args.py).

Exit codes: 0 pass, 1 regression, 2 bad input/config (one clear line, no traceback),
3 internal error (a bug: traceback printed). In a multirun the worst job decides.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from evalkit.config import CONF_DIR, GROUPS, group_options, register, validate
from evalkit.errors import EXIT_BAD_INPUT, BadInput, CapabilityError

EXIT_INTERNAL = 3
INT_KNOBS = ("denoise_steps", "workers", "seed", "videos_per_task", "suite.trials", "suite.max_steps")
_job_codes: list[int] = []
CODES_ENV = "EVALKIT_JOB_CODES_FILE"  # where launcher jobs in other processes write their exit codes
TOOLS = {  # subcommand -> (module with main(argv) -> int, what it does)
    "bench": ("evalkit.bench", "latency only, no simulator"),
    "gate": ("evalkit.gate.__main__", "re-judge stored runs; `gate plan`: episodes a candidate needs"),
    "merge": ("evalkit.merge", "join the shards of a run into one result"),
    "sync": ("evalkit.sync", "upload offline run bundles to MLflow"),
    "nightly": ("evalkit.nightly", "run the nightly matrix, judge every cell, report"),
    "serve": ("evalkit.serve", "serve an evalkit policy over openpi's websocket protocol"),
    "demos": ("evalkit.demos", "record scripted-expert demonstrations"),
    "train": ("evalkit.train", "train the small reference policy on demonstrations"),
}


def prevalidate(argv: list[str]) -> str | None:
    """Catch the common mistakes before Hydra, with one line naming the valid choices."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key.startswith("hydra"):
            continue
        values = [v.strip() for v in value.split(",")] if not value.startswith("[") else [value]
        if key in GROUPS:
            valid = group_options(key)
            for v in values:
                if v and v != "null" and v not in valid and not any(ch in v for ch in "*()$"):
                    return f"unknown {key} '{v}'; valid: {', '.join(valid)}"
        if key in INT_KNOBS:
            for v in values:
                try:
                    int(v)
                except ValueError:
                    if not any(ch in v for ch in "()$"):  # leave sweep functions like range(1,3) to Hydra
                        return f"{key}={v!r} is not an integer"
    return None


def run_from_config(cfg: DictConfig) -> int:
    from evalkit.run import execute

    try:
        settings = validate(cfg)
        hc = HydraConfig.get()
        fresh_dir = Path(hc.runtime.output_dir)
        sweep_key = str(Path(hc.sweep.dir).resolve()) if hc.mode == RunMode.MULTIRUN else None
        outputs_root = Path(hydra.utils.get_original_cwd()) / "outputs"
        return execute(settings, fresh_dir, OmegaConf.to_yaml(cfg, resolve=True), outputs_root, sweep_key)
    except (BadInput, CapabilityError) as e:
        print(f"evalkit: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        raise
    except Exception:
        traceback.print_exc()
        print("evalkit: internal error (exit 3); the journal keeps finished episodes: rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERNAL


# An absolute path: the config tree lives at the repo root (docs/architecture.md), beside the packages.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> int:
    code = run_from_config(cfg)
    _job_codes.append(code)
    codes_file = os.environ.get(CODES_ENV)
    if codes_file:  # jobs of a launcher run in other processes (joblib, submitit local): report through a file
        with open(codes_file, "a") as f:
            f.write(f"{code}\n")
    return code


def _launcher_codes(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []
    finally:
        if os.path.exists(path):
            os.unlink(path)


def tools_help() -> str:
    width = max(map(len, TOOLS))
    rows = [f"  evalkit {name:<{width}}  {about}" for name, (_, about) in TOOLS.items()]
    return "\n".join(["usage: evalkit [key=value ...]          run (as python -m evalkit; options below)",
                      "       evalkit TOOL [key=value ...]     a tool (as python -m evalkit.TOOL; TOOL --help)", "",
                      "tools:", *rows, "", "exit codes: 0 pass, 1 regression, 2 bad input (docs/cli.md)", "", ""])


def run_tool(name: str, args: list[str]) -> None:
    """`evalkit TOOL ...`: the tool's main with only its own arguments (sys.argv too: some tools read it)."""
    import importlib

    from evalkit.errors import exit_with

    module = importlib.import_module(TOOLS[name][0])
    sys.argv = [f"{sys.argv[0]} {name}", *args]
    exit_with(lambda: module.main(args))


def main() -> None:
    """The console script and `python -m evalkit`: a tool when the first argument names one, else the run."""
    args = sys.argv[1:]
    if args and args[0] in TOOLS:
        run_tool(args[0], args[1:])
    if any(a in ("-h", "--help") for a in args):
        print(tools_help(), end="")
    run_main()


def run_main() -> None:
    register()
    problem = prevalidate(sys.argv[1:])
    if problem:
        print(f"evalkit: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    fd, codes_file = tempfile.mkstemp(prefix="evalkit_job_codes_")
    os.close(fd)
    os.environ[CODES_ENV] = codes_file
    try:
        _hydra_main()
    except SystemExit as e:
        _job_codes.extend(_launcher_codes(codes_file))
        # Hydra exits 1 when composing the config fails (bad override, type error): that is bad input.
        if not _job_codes and e.code not in (0, None):
            sys.exit(EXIT_BAD_INPUT)
        raise
    _job_codes.extend(_launcher_codes(codes_file))
    sys.exit(max(_job_codes) if _job_codes else 0)
