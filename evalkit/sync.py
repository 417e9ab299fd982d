"""`python -m evalkit.sync DIR [DIR ...] [--uri URI]`: upload offline run bundles to MLflow.

DIR is a run directory (holding mlflow_bundle/) or any folder above run directories (a multirun
sweep dir, outputs/): every bundle found below it is synced. Already-synced runs are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evalkit.errors import EXIT_BAD_INPUT, BadInput
from evalkit.tracking.bundle import BUNDLE_DIR
from evalkit.tracking.store import DEFAULT_URI, reachable, resolve_uri, sync_bundle


def find_run_dirs(root: Path) -> list[Path]:
    if (root / BUNDLE_DIR / "run.json").exists():
        return [root]
    return sorted(p.parent.parent for p in root.rglob(f"{BUNDLE_DIR}/run.json"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evalkit.sync", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--uri", default=DEFAULT_URI, help=f"MLflow tracking URI (default {DEFAULT_URI})")
    args = ap.parse_args(argv)
    uri = resolve_uri(args.uri)
    ok, why = reachable(uri)
    if not ok:
        print(f"evalkit.sync: tracking store {uri} unreachable ({why}); nothing uploaded", file=sys.stderr)
        return EXIT_BAD_INPUT
    runs = [r for d in args.dirs for r in find_run_dirs(d)]
    if not runs:
        print(f"evalkit.sync: no run bundles under {', '.join(map(str, args.dirs))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for r in runs:
        try:
            run_id = sync_bundle(r, uri)
        except BadInput as e:
            print(f"evalkit.sync: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"synced {r} -> run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
