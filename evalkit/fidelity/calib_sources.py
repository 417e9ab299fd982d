"""Where a calibrating backend's data comes from (`backend.calib`), checked before anything is built.

- `probes` (default): the suite's calibration probes (evalkit/fidelity/probes.py), rendered once and cached.
- `demos:N`: N observations recorded by `python -m evalkit.demos` (its default folder, `data/demos/<suite>`,
  under the current directory; the suite's own name first, then its LIBERO benchmark's name).
- `PATH`: every observation of one episode file (`.npz`) or of a folder of them (`task*_ep*.npz`).

An episode file holds `state` [T, 8], `instruction`, `suite` (LIBERO benchmark), `task_id` and the privileged
arrays `p:<key>` [T, ...] (evalkit/demos.py); it holds no camera images, so a policy that reads images is
calibrated on probes. `demos:N` takes N observations spread evenly over every episode and step (sorted file
order, `numpy.linspace` over the flat index), so the same files always give the same set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evalkit.errors import BadInput
from evalkit.policies.base import Observation

DEMOS_ROOT = Path("data") / "demos"
EPISODE_GLOB = "task*_ep*.npz"


@dataclass(frozen=True)
class CalibSource:
    kind: str  # probes | demos | path
    text: str  # backend.calib as given
    files: tuple[Path, ...] = ()
    lengths: tuple[int, ...] = ()  # observations per file
    count: int = 0  # observations to use (demos: N; path: all)

    @property
    def available(self) -> int:
        return int(sum(self.lengths))


def _episode_length(f: Path) -> int:
    try:
        with np.load(f) as z:
            state = z["state"]
            if state.ndim != 2 or not len(state) or "instruction" not in z.files:
                raise ValueError("needs 'state' [T, 8] and 'instruction' (python -m evalkit.demos writes them)")
            return int(len(state))
    except Exception as e:  # zip, pickle or key errors of a file that is not an episode: one line naming it
        raise BadInput(f"backend.calib: {f} is not a demonstration episode ({type(e).__name__}: {e})") from None


def _episode_files(path: Path) -> list[Path]:
    return sorted(path.glob(EPISODE_GLOB)) if path.is_dir() else [path]


def demos_dirs(spec, root: Path | None = None) -> list[Path]:
    root = Path(root) if root is not None else DEMOS_ROOT
    return list(dict.fromkeys([root / spec.name, root / spec.libero_name]))


def parse_calib(value: str | None, spec, demos_root: Path | None = None) -> CalibSource:
    """`backend.calib` checked against the disk (files exist, are episodes, hold enough observations); BadInput."""
    text = "probes" if value in (None, "") else str(value).strip()
    if text == "probes":
        return CalibSource("probes", text)
    if text.startswith("demos:") or text == "demos":
        n_text = text.partition(":")[2]
        try:
            n = int(n_text)
        except ValueError:
            n = 0
        if n < 1:
            raise BadInput(f"backend.calib={text}: N must be an integer >= 1 (demos:64 takes 64 recorded observations)")
        dirs = demos_dirs(spec, demos_root)
        found = next((d for d in dirs if d.is_dir() and any(d.glob(EPISODE_GLOB))), None)
        if found is None:
            raise BadInput(f"backend.calib={text}: no demonstrations in {' or '.join(map(str, dirs))}; record some: "
                           f"python -m evalkit.demos suite={spec.libero_name} episodes_per_task=2 "
                           f"(or pass a folder: backend.calib=PATH)")
        files = _episode_files(found)
        lengths = tuple(_episode_length(f) for f in files)
        if sum(lengths) < n:
            raise BadInput(f"backend.calib={text}: {found} holds {sum(lengths)} observations in {len(files)} episodes, "
                           f"fewer than {n}; ask for fewer or record more (python -m evalkit.demos)")
        return CalibSource("demos", text, tuple(files), lengths, n)
    path = Path(text).expanduser()
    if not path.exists():
        raise BadInput(f"backend.calib={text}: not 'probes', not 'demos:N' and no such file or folder")
    files = _episode_files(path)
    if not files:
        raise BadInput(f"backend.calib={text}: the folder holds no {EPISODE_GLOB} episodes (python -m evalkit.demos "
                       f"out={text} records some)")
    if path.is_file() and path.suffix != ".npz":
        raise BadInput(f"backend.calib={text}: expected a .npz episode or a folder of them")
    lengths = tuple(_episode_length(f) for f in files)
    return CalibSource("path", text, tuple(files), lengths, int(sum(lengths)))


def pick(src: CalibSource) -> list[tuple[int, int]]:
    """(file index, step) of the observations to use: all of them, or `count` spread evenly over the flat index."""
    flat = [(i, t) for i, n in enumerate(src.lengths) for t in range(n)]
    if src.count >= len(flat):
        return flat
    idx = np.unique(np.linspace(0, len(flat) - 1, src.count).round().astype(int))
    return [flat[k] for k in idx]


def load_observations(src: CalibSource) -> list[Observation]:
    """The picked observations as the env adapter makes them (state, instruction, privileged, task with its BDDL)."""
    from evalkit.suites.env import load_task
    from evalkit.suites.specs import SUITES

    by_file: dict[int, list[int]] = {}
    for i, t in pick(src):
        by_file.setdefault(i, []).append(t)
    obs: list[Observation] = []
    bddl: dict[tuple[str, int], str] = {}
    for i, steps in by_file.items():
        f = src.files[i]
        with np.load(f) as z:
            libero, task_id, instruction = str(z["suite"]), int(z["task_id"]), str(z["instruction"])
            if (libero, task_id) not in bddl:
                spec = next((s for s in SUITES.values() if s.libero_name == libero), None)
                if spec is None:
                    raise BadInput(f"backend.calib: {f} was recorded on unknown LIBERO benchmark '{libero}'")
                bddl[(libero, task_id)] = load_task(spec, task_id)[0].bddl_file
            priv = {k[2:]: z[k] for k in z.files if k.startswith("p:")}
            state = z["state"]
            for t in steps:
                obs.append(Observation(
                    state=np.asarray(state[t], np.float32), instruction=instruction,
                    episode_key=f"calib/{f.stem}", step=t, privileged={k: v[t] for k, v in priv.items()},
                    task={"suite": libero, "task_id": task_id, "bddl_file": bddl[(libero, task_id)],
                          "language": instruction},
                ))
    return obs


def describe(src: CalibSource) -> str:
    where = src.files[0].parent if len(src.files) > 1 or src.kind == "demos" else src.files[0]
    return (f"{src.text}: {min(src.count, src.available)} of {src.available} observations from {len(src.files)} "
            f"episode(s) in {where}")
