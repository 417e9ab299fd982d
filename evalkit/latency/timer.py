"""Per-stage timing of one policy call: CUDA events on a GPU, time.perf_counter on a CPU.

A policy receives a timer and wraps each stage in `with timer.stage("encode"): ...`; a stage may
occur several times in one call (one "denoise" per Euler step). GPU events are read only after the
call ends, so timing adds no synchronization inside the call.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch


class NullTimer:
    """Does nothing: the default, so untimed calls pay nothing."""

    def stage(self, name: str):
        return nullcontext()


class StageTimer:
    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._marks: list[tuple[str, object, object]] = []

    def begin_call(self) -> None:
        self._marks = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._marks.append((name, start, end))

    def end_call(self) -> dict[str, list[float]]:
        """Milliseconds of every stage occurrence in this call, in order."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out: dict[str, list[float]] = {}
        for name, start, end in self._marks:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3  # type: ignore[union-attr,operator]
            out.setdefault(name, []).append(ms)
        self._marks = []
        return out
