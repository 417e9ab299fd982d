"""Atomic artifact writes: content goes to a temp file beside the target, then `os.replace` puts it in place.

A reader (or a run killed by a full disk, a signal or kill -9) therefore sees the old file or the whole new one,
never a torn or 0-byte file under the final name. The temp file sits in the same folder (same filesystem, so the
rename is atomic), keeps the target's extension (writers such as imageio and pandas pick the format from it) and
is removed when the write fails, whatever the exception.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable


def temp_path(path: Path) -> Path:
    """A fresh hidden name beside `path` with the same suffix: `.name.tmp-<random>.<suffix>`."""
    return path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")


def write_atomic(path: str | Path, write: Callable[[Path], Any], allow_empty: bool = False) -> Path:
    """Call `write(tmp)` to produce the content at a temp path, check it, fsync it and rename it onto `path`.

    A write that leaves no file or (unless `allow_empty`) an empty one raises OSError; nothing is renamed then.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        if not tmp.is_file():
            raise OSError(f"writing {path.name} produced no file")
        if not allow_empty and tmp.stat().st_size == 0:
            raise OSError(f"writing {path.name} produced an empty file (disk full?)")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the name points at them
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str, allow_empty: bool = False) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text), allow_empty=allow_empty)


def write_bytes_atomic(path: str | Path, data: bytes, allow_empty: bool = False) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data), allow_empty=allow_empty)


def write_json_atomic(path: str | Path, obj: Any, **dumps_kw: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, **dumps_kw))
