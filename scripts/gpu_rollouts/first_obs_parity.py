"""Dump and compare the first processed observation of a few episodes across machines (CPU OSMesa vs GPU EGL).

    # here (CPU, OSMesa, robosuite's numba path on, as in openpi and in the GPU bundle): the committed reference dump
    MUJOCO_GL=osmesa python scripts/gpu_rollouts/first_obs_parity.py dump --out tests/data/first_obs_cpu.npz
    # ... and with robosuite's numba path off (macros.ENABLE_NUMBA=False), physics only, for a machine without numba:
    ... dump --physics-only --out tests/data/first_obs_cpu_numba_off.npz
    # GPU machine (EGL), inside the bundle (scripts/gpu_rollouts/first_obs.sh does this):
    MUJOCO_GL=egl python scripts/gpu_rollouts/first_obs_parity.py compare --ref tests/data/first_obs_cpu.npz \
        --out $OUT/first_obs_parity.json

A case is (suite, task, episode) under seed_mode=openpi: the observation after reset, set_init_state and
the settle steps, as the policy receives it (both cameras rotated and resized to 224, float32 state),
plus the scene (fixture body_pos/body_quat, qpos, qvel). `compare` renders the same cases here and reports
per field whether it is bit-identical and, where not, how far apart: max |diff|, the share of pixels that
differ, and the mean |diff| of those. The physics is compared apart from the pixels so a renderer
difference (OSMesa vs EGL rasterization) is told apart from a simulation difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# libero_spatial only: the GPU bundle carries one suite's assets (build_bundle.py --suite libero_spatial).
CASES = (("libero_spatial", 0, 0), ("libero_spatial", 4, 1), ("libero_spatial", 9, 3))
SCENE = ("body_pos", "body_quat", "qpos", "qvel")
OBS = ("state", "agentview", "wrist")


def robosuite_numba() -> bool | None:
    """Whether robosuite's jitted functions really run under numba here (the macro on *and* numba's dispatcher);
    None when that cannot be told."""
    try:
        import robosuite.utils.transform_utils as T
        from robosuite import macros
    except Exception:  # noqa: BLE001 (reported, not fatal)
        return None
    if not macros.ENABLE_NUMBA:
        return False
    try:
        from numba.core.dispatcher import Dispatcher
    except Exception:  # noqa: BLE001 (a placeholder or no numba: the macro cannot be in effect)
        return False
    return isinstance(T.mat2quat, Dispatcher)


def _meta() -> dict:
    from evalkit.provenance import package_versions

    return {"versions": package_versions(), "mujoco_gl": os.environ.get("MUJOCO_GL"), "robosuite_numba": robosuite_numba(),
            "python": sys.version.split()[0]}


def render_cases(cases=CASES) -> dict[str, np.ndarray]:
    from evalkit.suites.env import LiberoEnv
    from evalkit.suites.specs import customize, get_suite

    out: dict[str, np.ndarray] = {}
    for suite, task, episode in cases:
        env = LiberoEnv(customize(get_suite(suite), seed_mode="openpi"), task, render=True)
        try:
            obs = env.reset(episode)
            m, d = env.raw.sim.model._model, env.raw.sim.data._data
            key = f"{suite}/{task}/{episode}"
            out.update({f"{key}/state": obs.state, f"{key}/agentview": obs.agentview, f"{key}/wrist": obs.wrist,
                        f"{key}/body_pos": m.body_pos.copy(), f"{key}/body_quat": m.body_quat.copy(),
                        f"{key}/qpos": d.qpos.copy(), f"{key}/qvel": d.qvel.copy()})
        finally:
            env.close()
        print(f"rendered {suite} task {task} episode {episode}", flush=True)
    return out


def dump(path: Path, physics_only: bool = False) -> None:
    arrays = render_cases()
    if physics_only:  # the small numba-off companion of a full dump (see compare)
        arrays = {k: v for k, v in arrays.items() if k.rsplit("/", 1)[1] in SCENE}
    arrays["meta"] = np.frombuffer(json.dumps(_meta()).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def diff(a: np.ndarray, b: np.ndarray) -> dict:
    if a.shape != b.shape:
        return {"identical": False, "shape": [list(a.shape), list(b.shape)]}
    if np.array_equal(a, b):
        return {"identical": True}
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    row = {"identical": False, "max_abs": float(d.max())}
    if a.dtype == np.uint8:  # images: share of pixels with any channel different, and how much they differ
        px = d.max(axis=-1) > 0
        row.update(pixels_differ=float(px.mean()), mean_abs_of_differing=float(d.max(axis=-1)[px].mean()))
    return row


def numba_off_path(ref_path: Path) -> Path:
    return ref_path.with_name(f"{ref_path.stem}_numba_off.npz")


def _load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(bytes(arrays.pop("meta")).decode())


def compare(ref_path: Path, out: Path | None) -> int:
    ref, ref_meta = _load(ref_path)
    here_meta = _meta()
    # robosuite's numba path changes the controller's float rounding (qpos differs in the last bits after the
    # settle steps). The GPU bundle runs it (the image's numba), as the reference dump was made; a machine that
    # runs without it has its physics compared with a CPU dump made the same way (numba off).
    alt = numba_off_path(ref_path)
    physics_ref = "reference"
    if here_meta["robosuite_numba"] is None:
        raise SystemExit("cannot tell whether robosuite's numba path is on here (robosuite does not import)")
    if here_meta["robosuite_numba"] != ref_meta.get("robosuite_numba"):
        if here_meta["robosuite_numba"] is False and alt.exists():
            off, _ = _load(alt)
            ref.update(off)
            physics_ref = alt.name
        else:
            print(f"warning: robosuite's numba path is {'on' if here_meta['robosuite_numba'] else 'off'} here but "
                  f"{ref_meta.get('robosuite_numba')} in {ref_path.name}: physics may differ in the last bits", flush=True)
    cases = sorted({tuple(k.split("/")[:3]) for k in ref})
    here = render_cases([(s, int(t), int(e)) for s, t, e in cases])
    rows = {}
    for s, t, e in cases:
        key = f"{s}/{t}/{e}"
        rows[key] = {f: diff(here[f"{key}/{f}"], ref[f"{key}/{f}"]) for f in OBS + SCENE}
    report = {"reference": {"file": str(ref_path), **ref_meta}, "physics_compared_with": physics_ref,
              "here": here_meta, "cases": rows,
              "physics_identical": all(r[f]["identical"] for r in rows.values() for f in ("state",) + SCENE),
              "images_identical": all(r[f]["identical"] for r in rows.values() for f in ("agentview", "wrist"))}
    print(json.dumps(report, indent=1))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    return 0 if report["physics_identical"] and report["images_identical"] else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--physics-only", action="store_true", help="scene arrays only (the numba-off companion dump)")
    c = sub.add_parser("compare")
    c.add_argument("--ref", type=Path, default=REPO / "tests" / "data" / "first_obs_cpu.npz")
    c.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    if args.cmd == "dump":
        dump(args.out, args.physics_only)
    else:
        sys.exit(compare(args.ref, args.out))


if __name__ == "__main__":
    main()
