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

from evalkit.config import (
    CONF_DIR,
    GROUPS,
    TrackingMode,
    VideoMode,
    group_options,
    register,
    unknown_choice,
    unknown_key,
    validate,
)
from evalkit.errors import (
    EXIT_BAD_INPUT,
    BadInput,
    CapabilityError,
    Interrupted,
    signals_raise_interrupted,
)

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


ENUM_KNOBS = {"video": VideoMode, "tracking.mode": TrackingMode}
# Text options whose value is a comma-separated list: outside a multirun, `backend.targets=a,b` means that list
# (Hydra would read a bare a,b as a sweep and refuse it as ambiguous), so it is quoted before Hydra parses it.
COMMA_KEYS = ("backend.targets",)
DIR_FLAGS = {"--config-dir": "dir", "-cd": "dir", "--config-path": "path", "-cp": "path",
             "--config-name": "name", "-cn": "name"}


def is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def quote_comma_values(argv: list[str]) -> list[str]:
    """`backend.targets=prefix_mlp,expert` -> `backend.targets='prefix_mlp,expert'` (not in a multirun)."""
    if is_multirun(argv):
        return list(argv)
    out = []
    for a in argv:
        key, sep, value = a.partition("=")
        if sep and key.lstrip("+~") in COMMA_KEYS and "," in value and value[:1] not in ("'", '"', "["):
            a = f"{key}='{value}'"
        out.append(a)
    return out


def config_flags(argv: list[str]) -> dict[str, str]:
    """The values of --config-dir/-cd, --config-path/-cp, --config-name/-cn (as `dir`, `path`, `name`)."""
    out: dict[str, str] = {}
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if flag in DIR_FLAGS:
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
            out[DIR_FLAGS[flag]] = value
    return out


def config_dirs(argv: list[str]) -> tuple[Path, list[Path]]:
    """(the primary config dir Hydra searches first, the extra dirs after it: --config-dir, and hydra.searchpath's
    file:// entries)."""
    flags = config_flags(argv)
    main = Path(flags["path"]) if flags.get("path") and Path(flags["path"]).is_absolute() else CONF_DIR
    extra = [Path(flags["dir"]).absolute()] if flags.get("dir") else []
    for a in argv:
        key, _, value = a.partition("=")
        if key.lstrip("+") == "hydra.searchpath":
            for entry in value.strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if entry.startswith("file://"):
                    extra.append(Path(entry[len("file://"):]).absolute())
    return main, extra


def _other_search_paths(argv: list[str]) -> bool:
    """hydra.searchpath names a source other than a folder (pkg://...): its options cannot be listed here."""
    return any(a.partition("=")[0].lstrip("+") == "hydra.searchpath" and "pkg://" in a for a in argv)


def _yaml_error_line(e: Exception) -> str:
    """A YAML parse error without its source excerpt: what, where (line, column)."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark is not None:
        context = getattr(e, "context", None)
        return f"{context + ': ' if context else ''}{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def check_config_dirs(argv: list[str]) -> str | None:
    """A `--config-dir` (or hydra.searchpath folder) must hold valid YAML, and no file that evalkit's own config tree
    shadows: Hydra reads conf/ first, so a user's config.yaml or policy/reference.yaml there would be ignored without
    a word."""
    import yaml

    flags = config_flags(argv)
    main, extra = config_dirs(argv)
    primary = f"{flags.get('name') or 'config'}.yaml"
    for d in extra:
        if not d.is_dir():
            return None  # Hydra names the missing folder itself
        for f in sorted(d.rglob("*.yaml")):
            rel = f.relative_to(d)
            try:
                yaml.safe_load(f.read_text())
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                return f"config dir {d}: {rel} is not valid YAML: {_yaml_error_line(e)}"
            shadowed = (main / rel).is_file() and (len(rel.parts) > 1 or rel.name == primary)
            if shadowed and len(rel.parts) == 1:
                return (f"config dir {d}: {rel} has the name of evalkit's own primary config ({main / rel}), which "
                        f"Hydra reads first, so yours would be ignored; rename it (e.g. my_run.yaml) and pass "
                        f"--config-name my_run")
            if shadowed:
                return (f"config dir {d}: {rel} has the name of evalkit's own option {main / rel}, which Hydra reads "
                        f"first, so yours would be ignored; give it another name (e.g. {rel.parent}/my_{rel.name}) "
                        f"and select it ({rel.parent}=my_{rel.stem})")
    return None


def prevalidate(argv: list[str]) -> str | None:
    """Catch the common mistakes before Hydra, with one line naming the valid choices (and a did-you-mean)."""
    main, extra = config_dirs(argv)
    dirs = [main, *extra] if main != CONF_DIR else extra
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        deleting = key.startswith("~")
        key = key.lstrip("+~")
        if key.startswith("hydra"):
            continue
        values = [v.strip() for v in value.split(",")] if not value.startswith(("[", "'", '"')) else [value]
        if key in GROUPS:
            if _other_search_paths(argv):
                continue  # Hydra names an unknown option itself (one line, hydra_error_line)
            valid = group_options(key, dirs)
            for v in values:
                if v and v != "null" and v not in valid and not any(ch in v for ch in "*()$"):
                    return unknown_choice(key, v, valid)
            continue
        problem = None if deleting else unknown_key(key)
        if problem:
            return problem
        if key in ENUM_KNOBS:
            names = [m.value for m in ENUM_KNOBS[key]]
            for v in values:
                if v not in names and not any(ch in v for ch in "()$"):
                    return unknown_choice(f"{key} value", v, names)
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
    from evalkit.validate import discard_unused_run_dir

    hc = HydraConfig.get()
    fresh_dir = Path(hc.runtime.output_dir)
    outputs_root = Path(hydra.utils.get_original_cwd()) / "outputs"
    try:
        settings = validate(cfg)
        sweep_key = str(Path(hc.sweep.dir).resolve()) if hc.mode == RunMode.MULTIRUN else None
        return execute(settings, fresh_dir, OmegaConf.to_yaml(cfg, resolve=True), outputs_root, sweep_key)
    except (BadInput, CapabilityError) as e:
        print(f"evalkit: error: {e}", file=sys.stderr)
        # Hydra made the run folder before this job started: a run stopped before its first episode leaves none
        discard_unused_run_dir(fresh_dir, Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else outputs_root.parent)
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


def hydra_error_line(e: BaseException) -> str:
    """Hydra's (or OmegaConf's, YAML's) own error as one line: the first line of each message in the chain, without
    the key/type/search-path detail lines; an unknown group option gets the did-you-mean line."""
    from hydra.errors import MissingConfigException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
        group, _, name = str(e.missing_cfg_file).rpartition("/")
        return unknown_choice(group or "config", name, e.options)
    text = str(e)
    if text.startswith("Ambiguous value for argument"):
        arg = text.splitlines()[0].split("'", 1)[-1].rstrip("'")
        return (f"ambiguous value '{arg}': write key=[a,b] for a list, \"key='a,b'\" for text, "
                f"or add --multirun to sweep over it")
    import yaml

    if isinstance(e, yaml.YAMLError):
        return f"broken YAML: {_yaml_error_line(e)}"
    if isinstance(e, OSError) and e.filename:  # Hydra making the run dir, or reading a config file
        return f"cannot use {e.filename}: {e.strerror} (the run dir is hydra.run.dir=DIR; outputs/ must be writable)"
    if text.startswith("Error parsing override") and e.__cause__ is None:
        return f"{text.splitlines()[0]}: arguments are key=value (python -m evalkit --help lists every key)"
    skip = ("full_key:", "object_type=", "reference_type=", "Config search path", "provider=", "Available options",
            "Set the environment variable HYDRA_FULL_ERROR", "To append to your config")
    parts: list[str] = []
    for err in (e, e.__cause__):  # Hydra's message, then the OmegaConf/YAML error it wraps
        lines = [ln.strip() for ln in str(err or "").splitlines() if ln.strip() and not ln.strip().startswith(skip)]
        if lines and lines[0] not in parts:
            parts.append(lines[0].rstrip("."))
    return ": ".join(parts) or f"Hydra could not compose the config ({type(e).__name__})"


def _config_error(e: BaseException) -> bool:
    """Errors of composing the config (Hydra, OmegaConf, YAML, files and folders it reads or makes, MLflow stores a
    sweep callback opens): bad input. Anything else escaping Hydra is a bug."""
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (isinstance(e, (HydraException, OmegaConfBaseException, yaml.YAMLError, OSError, ValueError))
            or type(e).__module__.startswith("mlflow"))


def run_main() -> None:
    _job_codes.clear()  # a second run in the same process (tests, notebooks) starts with no codes
    register()
    sys.argv[1:] = quote_comma_values(sys.argv[1:])
    problem = check_config_dirs(sys.argv[1:]) or prevalidate(sys.argv[1:])
    if problem:
        print(f"evalkit: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    fd, codes_file = tempfile.mkstemp(prefix="evalkit_job_codes_")
    os.close(fd)
    os.environ[CODES_ENV] = codes_file
    user_full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors to us instead of printing them: one line below
    try:
        with signals_raise_interrupted():  # SIGINT/SIGTERM: one line with the resume command, exit 130/143
            _hydra_main()
    except Exception as e:
        _launcher_codes(codes_file)  # removes the temp file
        bad_input = _config_error(e)
        if user_full_error or not bad_input:  # HYDRA_FULL_ERROR=1 asked for the whole trace
            traceback.print_exc()
        else:
            print(f"evalkit: error: {hydra_error_line(e)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT if bad_input else EXIT_INTERNAL)
    except Interrupted as e:
        _launcher_codes(codes_file)  # removes the temp file
        print(e.line(), file=sys.stderr)
        sys.exit(e.exit_code)
    except SystemExit as e:
        _job_codes.extend(_launcher_codes(codes_file))
        # Hydra exits 1 when composing the config fails (bad override, type error): that is bad input.
        if not _job_codes and e.code not in (0, None):
            sys.exit(EXIT_BAD_INPUT)
        raise
    finally:
        if not user_full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    _job_codes.extend(_launcher_codes(codes_file))
    sys.exit(max(_job_codes) if _job_codes else 0)
