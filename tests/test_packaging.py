"""Package shape: import names under evalkit, dependencies that point one way, no import cycles.

Static (the source's import statements, deferred imports inside functions included), so a cycle or an upward
import fails here even where the import that closes it only runs on a GPU.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# import name -> folder (pyproject's package-dir)
ROOTS = {"evalkit": "evalkit", "evalkit.backends": "backends", "evalkit.suites": "suites", "evalkit.kernels": "kernels"}

# Layers, lowest first: a module may import its own layer or any layer below, never one above. kernels import
# nothing of evalkit at all (checked separately). The commands (run, cli, nightly, ...) sit on top.
LAYERS: list[set[str]] = [
    {"errors", "imports", "stats", "provenance", "_source_tree", "evalkit", "cli_args", "atomic"},
    {"kernels"},
    {"latency", "backends", "tracking"},
    {"policies"},
    {"suites"},
    {"rollout", "fidelity"},
    {"results", "progress", "report", "gate"},
    {"config"},
    {"validate"},
    {"run", "cli", "__main__", "merge", "nightly", "bench", "serve", "sync", "train", "demos"},
]


def module_name(path: Path) -> str:
    for pkg, folder in sorted(ROOTS.items(), key=lambda kv: -len(kv[0])):
        try:
            rel = path.relative_to(ROOT / folder)
        except ValueError:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        return ".".join([pkg, *parts])
    raise AssertionError(path)


def sources() -> dict[str, Path]:
    return {module_name(f): f for folder in ROOTS.values() for f in (ROOT / folder).rglob("*.py")}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """evalkit modules `path` imports; `from pkg import sub` counts as importing pkg.sub where sub is a module."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("evalkit")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("evalkit"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            out |= subs or {node.module}
    return out


def layer_group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "evalkit"


def rank(group: str) -> int:
    for i, layer in enumerate(LAYERS):
        if group in layer:
            return i
    raise AssertionError(f"evalkit.{group} is in no layer of tests/test_packaging.py's LAYERS; add it where it belongs")


def test_no_upward_import_between_layers():
    mods = sources()
    upward = []
    for mod, path in mods.items():
        for target in imports_of(path, set(mods)):
            src, dst = layer_group(mod), layer_group(target)
            if src != dst and rank(dst) > rank(src):
                upward.append(f"{mod} -> {target}")
    assert not upward, "upward imports (a lower layer reaching up):\n" + "\n".join(sorted(upward))


def test_kernels_import_nothing_of_evalkit_outside_kernels():
    mods = sources()
    bad = [f"{m} -> {t}" for m, p in mods.items() if m.startswith("evalkit.kernels")
           for t in imports_of(p, set(mods)) if not t.startswith("evalkit.kernels")]
    assert not bad, bad


def test_no_import_cycle_between_modules():
    mods = sources()
    # a submodule importing its own parent package is how Python loads packages, not a cycle
    edges = {m: {t for t in imports_of(p, set(mods)) if t in mods and t != m and not m.startswith(t + ".")}
             for m, p in mods.items()}
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(edges[u]):
            if state[v] == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif state[v] == 0:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(mods):
        if state[m] == 0:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_pyproject_lists_every_package_of_the_tree():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    want = {module_name(f.parent / "__init__.py") for folder in ROOTS.values() for f in (ROOT / folder).rglob("__init__.py")}
    assert listed - {"evalkit.conf"} == want
    assert cfg["package-dir"] == {k: v for k, v in ROOTS.items() if k != "evalkit"} | {"evalkit.conf": "conf"}


def test_installed_wheel_has_no_top_level_backends_or_suites(tmp_path):
    """`pip install .` puts backends/suites/kernels/conf under evalkit only (built without network: setuptools is here)."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(ROOT)], check=True, cwd=tmp_path)
    assert not (target / "backends").exists() and not (target / "suites").exists()
    assert (target / "evalkit" / "backends" / "fp8.py").is_file()
    assert (target / "evalkit" / "conf" / "config.yaml").is_file()
    code = ("import importlib.util as u, evalkit.backends.registry, evalkit.suites.specs, evalkit.config as c; "
            "assert u.find_spec('backends') is None and u.find_spec('suites') is None; "
            "assert c.CONF_DIR.is_dir(), c.CONF_DIR; print(evalkit.backends.registry.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(target) in out.stdout
