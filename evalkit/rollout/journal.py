"""Append-only JSONL journal of finished episodes: a killed run resumes from it.

Each record is one line, flushed and fsync'ed as the episode ends. A kill -9 can at worst
leave a torn last line, which `load` ignores (that episode simply runs again).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from evalkit.rollout.records import EpisodeRecord


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> list[EpisodeRecord]:
        """Records already finished, last write wins per (task, init state)."""
        if not self.path.exists():
            return []
        by_key: dict[tuple[int, int], EpisodeRecord] = {}
        with self.path.open() as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = EpisodeRecord.from_dict(json.loads(line))
                except (json.JSONDecodeError, TypeError):
                    continue  # torn line from a killed run
                by_key[rec.key] = rec
        return list(by_key.values())

    def append(self, record: EpisodeRecord) -> None:
        line = json.dumps(record.to_dict()) + "\n"
        # A torn line left by a kill -9 has no newline: start ours on a fresh line.
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not self._ends_with_newline()
        with self.path.open("a") as f:
            if needs_newline:
                f.write("\n")
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
