"""Which episode a free worker runs next: keep each worker's env alive as long as its task has episodes.

Building a LIBERO env costs seconds (model compile, render context), an episode a few seconds, so the
order episodes are handed out decides how many envs a run builds. Two orders:

- `task` (default): episodes are grouped by task. A worker keeps the task whose env it holds while that
  task has episodes left; a worker without one (at start, or its task ran out) takes the task with the
  most episodes left per worker already holding it, so workers spread over tasks instead of all starting
  on task 0 and rebuilding when it runs out. Each worker builds at most one env per task it visits, so a
  run builds at most tasks x workers envs, and about one env per worker plus a few moves at the end.
- `interleave`: round by round, every task's init state 0, then 1, ...; a worker prefers its task only
  within the oldest round. A sequential stop rule needs this so the early rounds stand for the whole
  suite (evalkit/gate/sequential.py).

The order never changes an episode's result: each episode's scene is fixed by (task, init state) alone
(suites/seeding.py replays openpi's seed stream for any order).
"""

from __future__ import annotations

from collections import Counter, deque

ORDERS = ("task", "interleave")


def next_in_rounds(queue: deque, prefer_task: int | None, same_round: bool = False) -> tuple[int, int] | None:
    """Pop the next (task, init) of `queue`, preferring `prefer_task` (same_round: only among the episodes of
    the oldest round, the head's init state id)."""
    if not queue:
        return None
    if prefer_task is not None:
        for i, (t, init) in enumerate(queue):
            if same_round and init != queue[0][1]:
                break
            if t == prefer_task:
                item = queue[i]
                del queue[i]
                return item
    return queue.popleft()


class EpisodeQueue:
    """The episodes not started yet, handed out by `pop_for`."""

    def __init__(self, todo: list[tuple[int, int]], order: str = "task"):
        if order not in ORDERS:
            raise ValueError(f"RolloutOptions.order={order!r}; valid: {', '.join(ORDERS)}")
        self.order = order
        # one structure per order: interleave pops (task, init) in round order; task keeps each task's inits
        self._rounds = deque(sorted(todo, key=lambda k: (k[1], k[0]))) if order == "interleave" else deque()
        self._by_task: dict[int, deque] = {}
        if order == "task":
            for t, i in sorted(todo):
                self._by_task.setdefault(t, deque()).append(i)

    def __len__(self) -> int:
        if self.order == "interleave":
            return len(self._rounds)
        return sum(len(q) for q in self._by_task.values())

    def clear(self) -> None:
        self._rounds.clear()
        self._by_task.clear()

    def pop_for(self, env_task: int | None, holders: Counter) -> tuple[int, int] | None:
        """The next episode for a worker holding an env of `env_task` (None: no env); `holders[t]` counts the
        OTHER workers holding task t's env."""
        if self.order == "interleave":
            return next_in_rounds(self._rounds, env_task, same_round=True)
        if env_task is not None and self._by_task.get(env_task):
            return env_task, self._take(env_task)
        left = [t for t, q in self._by_task.items() if q]
        if not left:
            return None
        # most episodes left per worker on it; ties: the lower task id (a stable, reproducible order)
        task = max(left, key=lambda t: (len(self._by_task[t]) / (holders.get(t, 0) + 1), -t))
        return task, self._take(task)

    def _take(self, task: int) -> int:
        q = self._by_task[task]
        init = q.popleft()
        if not q:
            del self._by_task[task]
        return init
