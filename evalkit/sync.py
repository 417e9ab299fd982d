"""`python -m evalkit.sync runs=[DIR,...] [uri=URI]`: upload offline run bundles to MLflow.

DIR is a run directory (holding mlflow_bundle/) or any folder above run directories (a multirun
sweep dir, outputs/): every bundle found below it is synced. Already-synced runs are skipped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from evalkit.cli_args import opt, parse
from evalkit.errors import EXIT_BAD_INPUT, BadInput
from evalkit.tracking.bundle import BUNDLE_DIR
from evalkit.tracking.store import DEFAULT_URI, reachable, resolve_uri, sync_bundle


def find_run_dirs(root: Path) -> list[Path]:
    if (root / BUNDLE_DIR / "run.json").exists():
        return [root]
    return sorted(p.parent.parent for p in root.rglob(f"{BUNDLE_DIR}/run.json"))


@dataclass
class SyncOptions:
    runs: list[str] = opt(help="run dirs, or folders above them (a sweep dir, outputs/): runs=DIR or runs=[A,B]")
    uri: str = opt(DEFAULT_URI, "MLflow tracking URI")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(SyncOptions, sys.argv[1:] if argv is None else argv, prog="python -m evalkit.sync",
                     about=__doc__.splitlines()[0].split(": ", 1)[1])
        if not args.runs:
            raise BadInput("runs=[...] needs at least one directory")
    except BadInput as e:
        print(f"evalkit.sync: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    dirs = [Path(d) for d in args.runs]
    uri = resolve_uri(args.uri)
    ok, why = reachable(uri)
    if not ok:
        print(f"evalkit.sync: tracking store {uri} unreachable ({why}); nothing uploaded", file=sys.stderr)
        return EXIT_BAD_INPUT
    runs = [r for d in dirs for r in find_run_dirs(d)]
    if not runs:
        print(f"evalkit.sync: no run bundles under {', '.join(map(str, dirs))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for r in runs:
        try:
            run_id = sync_bundle(r, uri)
        except BadInput as e:
            print(f"evalkit.sync: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"synced {r} -> run {run_id}")
    from evalkit.tracking.sweep import sync_sweeps

    for line in sync_sweeps(runs, uri):  # a sweep's cells side by side on its parent run
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
