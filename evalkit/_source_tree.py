"""Make `evalkit.backends`, `evalkit.suites` and `evalkit.kernels` importable from a source checkout.

pyproject.toml installs the top-level folders backends/, suites/ and kernels/ as subpackages of evalkit
(setuptools `package-dir`), so site-packages holds no package named `backends` or `suites`. A checkout used
without installing (PYTHONPATH=$PWD on the GPU machine) has no such mapping; this finder supplies the same one,
and only for those three names. It goes first on sys.meta_path so that the subpackages always come from the
same checkout as the evalkit that was imported (a second checkout on PYTHONPATH beside an editable install must not
mix in the installed tree's backends). An installed wheel has no pyproject.toml beside it and skips it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

SUBPACKAGES = ("backends", "suites", "kernels")


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.rpartition(".")
        if prefix != "evalkit" or name not in SUBPACKAGES:
            return None
        init = self.root / name / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def install() -> None:
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():  # an installed wheel: setuptools placed the subpackages already
        return
    if not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceTreeFinder(root))
