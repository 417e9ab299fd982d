"""Which episode a free worker runs next (evalkit/rollout/schedule.py): pure logic, simulated workers."""

import heapq
from collections import Counter

import numpy as np
import pytest

from evalkit.rollout.schedule import EpisodeQueue


def simulate(tasks: int, trials: int, workers: int, seed: int = 0) -> tuple[list[tuple[int, int]], int]:
    """Workers take episodes of random length from the queue; returns the episodes in hand-out order and the
    number of env builds (a worker's first episode of a task it does not hold)."""
    rng = np.random.default_rng(seed)
    q = EpisodeQueue([(t, i) for t in range(tasks) for i in range(trials)], "task")
    env = [None] * workers
    handed, builds, clock = [], 0, []
    for w in range(workers):
        clock.append((0.0, w))
    heapq.heapify(clock)
    while clock:
        now, w = heapq.heappop(clock)
        holders = Counter(t for v, t in enumerate(env) if v != w and t is not None)
        item = q.pop_for(env[w], holders)
        if item is None:
            continue
        built = item[0] != env[w]
        builds += built
        env[w] = item[0]
        handed.append(item)
        heapq.heappush(clock, (now + rng.uniform(2.0, 6.0) + 4.0 * built, w))  # a build costs seconds too
    return handed, builds


@pytest.mark.parametrize("tasks,trials,workers", [(10, 20, 16), (10, 50, 16), (10, 5, 16), (3, 4, 2), (10, 2, 1)])
def test_every_episode_once_and_envs_live_long(tasks, trials, workers):
    handed, builds = simulate(tasks, trials, workers)
    assert sorted(handed) == [(t, i) for t in range(tasks) for i in range(trials)]
    assert builds <= tasks * workers  # the bound
    # far below it: one env per worker (or per task when tasks outnumber workers), plus moves near the end
    assert builds <= max(tasks, min(workers, tasks * trials)) + workers


def test_workers_spread_over_tasks_at_start():
    q = EpisodeQueue([(t, i) for t in range(10) for i in range(20)], "task")
    held: Counter = Counter()
    first = []
    for _ in range(16):
        t, _i = q.pop_for(None, held)
        held[t] += 1
        first.append(t)
    assert set(first) == set(range(10)) and max(held.values()) == 2  # 6 tasks get 2 workers, 4 get 1


def test_a_worker_keeps_its_task_and_moves_to_the_least_served_one():
    q = EpisodeQueue([(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0)], "task")
    assert q.pop_for(0, Counter()) == (0, 0)
    assert q.pop_for(0, Counter()) == (0, 1)
    # task 0 is out: task 1 has 3 left and 1 other worker (3/2), task 2 has 1 and none (1/1)
    assert q.pop_for(0, Counter({1: 1})) == (1, 0)
    assert len(q) == 3


def test_interleave_keeps_rounds():
    q = EpisodeQueue([(t, i) for t in range(3) for i in range(2)], "interleave")
    got = [q.pop_for(2, Counter()) for _ in range(6)]
    assert [i for _t, i in got] == [0, 0, 0, 1, 1, 1] and got[0] == (2, 0)


def test_unknown_order_lists_the_valid_ones():
    with pytest.raises(ValueError, match="task, interleave"):
        EpisodeQueue([], "random")
