"""Append-only JSONL journal of finished episodes (episodes.jsonl): a killed run resumes from it.

Each record is one line, flushed and fsync'ed as the episode ends. Reading checks every line against the
record schema (evalkit.rollout.records); the rules (docs/journal.md):
- a bad line (invalid UTF-8, not JSON, a torn last line, JSON that is not an object, a record with a missing
  field or a wrong type) is not a result: `recover` moves it to episodes.rejected.jsonl (appended, with the
  reason) and the episode it might have held runs again;
- an episode recorded more than once counts once: the FIRST valid record wins (the engine never re-runs a
  journaled episode, so a later line comes from a second writer or a hand edit, and the first is what every
  reader saw until then); later records with another outcome are reported as conflicts.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from evalkit.atomic import write_bytes_atomic
from evalkit.rollout.records import EpisodeRecord, RecordError, record_from_json

REJECTED_SUFFIX = ".rejected.jsonl"


@dataclass
class BadLine:
    line_no: int  # 1-based, in the journal as read
    reason: str
    raw: bytes


@dataclass
class JournalRead:
    """One pass over a journal: the records that count and everything that did not."""

    records: list[EpisodeRecord] = field(default_factory=list)  # one per episode, first valid record, file order
    bad: list[BadLine] = field(default_factory=list)
    duplicates: int = 0  # valid records dropped because their episode was recorded earlier
    conflicts: list[tuple[int, int]] = field(default_factory=list)  # episodes whose later records disagree
    good_lines: list[bytes] = field(default_factory=list)  # every valid line as read (duplicates included)

    def bad_warning(self, journal: Path, moved_to: Path | None) -> str | None:
        """One line counting the bad lines by kind (None when there are none)."""
        if not self.bad:
            return None
        kinds: dict[str, int] = {}
        for b in self.bad:
            kind = b.reason.split(":", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        where = f"moved to {moved_to.name}" if moved_to else "skipped"
        detail = ", ".join(f"{n} {k}" for k, n in kinds.items())
        return (f"journal: {len(self.bad)} bad line(s) in {journal.name} {where} ({detail}); "
                f"their episodes run again")

    def conflict_warning(self) -> str | None:
        if not self.conflicts:
            return None
        shown = ", ".join(f"task {t} init {i}" for t, i in self.conflicts[:5])
        more = f" and {len(self.conflicts) - 5} more" if len(self.conflicts) > 5 else ""
        return (f"journal: {len(self.conflicts)} episode(s) recorded again with another outcome ({shown}{more}); "
                f"the first record of each counts (docs/journal.md)")


def _parse(raw: bytes, last: bool) -> EpisodeRecord:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"invalid UTF-8: byte {e.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        kind = "torn line" if last else "not JSON"  # only a last line without newline can be a cut-off write
        raise RecordError(f"{kind}: {e.msg} at column {e.colno}") from None
    try:
        return record_from_json(obj)
    except RecordError as e:
        raise RecordError(f"not a record: {e}") from None


def read_lines(data: bytes) -> JournalRead:
    """Check every line of a journal's bytes (pure: nothing is written)."""
    out = JournalRead()
    first: dict[tuple[int, int], EpisodeRecord] = {}
    lines = data.split(b"\n")
    torn_tail = not data.endswith(b"\n")
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = _parse(raw.rstrip(b"\r"), last=torn_tail and i == len(lines) - 1)
        except RecordError as e:
            out.bad.append(BadLine(i + 1, str(e), raw))
            continue
        out.good_lines.append(raw)
        kept = first.get(rec.key)
        if kept is None:
            first[rec.key] = rec
            out.records.append(rec)
            continue
        out.duplicates += 1
        if rec.outcome() != kept.outcome() and rec.key not in out.conflicts:
            out.conflicts.append(rec.key)
    return out


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def rejected_path(self) -> Path:
        return self.path.with_name(self.path.name.removesuffix(".jsonl") + REJECTED_SUFFIX)

    def read(self) -> JournalRead:
        """Every line checked; nothing changed on disk (for readers of other runs: merge, reports)."""
        if not self.path.exists():
            return JournalRead()
        return read_lines(self.path.read_bytes())

    def load(self) -> list[EpisodeRecord]:
        """The records that count: one per (task, init state), the first valid one (bad lines skipped)."""
        return self.read().records

    def recover(self) -> JournalRead:
        """Read, then move bad lines aside (appended to episodes.rejected.jsonl with the reason) and rewrite the
        journal with the valid lines only, atomically. The rejected file is written first: a kill in between
        can at worst list a bad line twice, never lose one."""
        got = self.read()
        if got.bad:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            with self.rejected_path.open("a") as f:
                for b in got.bad:
                    f.write(json.dumps({"line": b.line_no, "reason": b.reason, "at": stamp,
                                        "text": b.raw.decode("utf-8", errors="backslashreplace")}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            write_bytes_atomic(self.path, b"".join(line + b"\n" for line in got.good_lines), allow_empty=True)
        return got

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
