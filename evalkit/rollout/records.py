"""The episode record (docs/architecture.md): one row per finished episode."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

TIMEOUT = "timeout"
NAN_ACTION = "nan_action"
EXCEPTION = "exception"


@dataclass
class EpisodeRecord:
    suite: str
    task_id: int
    task_name: str
    init_state_id: int
    seed: int
    success: bool
    steps: int  # policy-driven env steps (settle steps excluded)
    failure_reason: str | None  # None | "timeout" | "nan_action" | "exception: <message>"
    wall_time_s: float
    policy_time_s: float  # time spent in the policy calls this episode waited for
    policy_calls: int
    video_path: str | None = None
    instruction: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EpisodeRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def key(self) -> tuple[int, int]:
        return (self.task_id, self.init_state_id)
