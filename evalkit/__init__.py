"""evalkit: LIBERO evaluation and regression tracking for fast robot policies."""

__version__ = "0.1.0"
