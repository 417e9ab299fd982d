"""evalkit: LIBERO evaluation and regression tracking for fast robot policies."""

from evalkit import _source_tree

__version__ = "0.1.0"

_source_tree.install()
