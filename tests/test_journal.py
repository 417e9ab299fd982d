from evalkit.rollout.journal import Journal
from evalkit.rollout.records import EpisodeRecord


def rec(task, init, success=False):
    return EpisodeRecord("s", task, "t", init, 1, success, 3, None if success else "timeout", 1.0, 0.1, 1)


def test_append_and_load_last_write_wins(tmp_path):
    j = Journal(tmp_path / "e.jsonl")
    j.append(rec(0, 0))
    j.append(rec(0, 1))
    j.append(rec(0, 0, success=True))
    got = {r.key: r for r in j.load()}
    assert set(got) == {(0, 0), (0, 1)} and got[(0, 0)].success


def test_torn_line_from_kill_is_ignored_and_next_append_is_clean(tmp_path):
    j = Journal(tmp_path / "e.jsonl")
    j.append(rec(0, 0))
    with open(j.path, "a") as f:
        f.write('{"suite": "s", "task_id": 0, "init_st')  # kill -9 in the middle of a write
    assert [r.key for r in j.load()] == [(0, 0)]
    j.append(rec(1, 0))
    assert sorted(r.key for r in j.load()) == [(0, 0), (1, 0)]
