"""The episode journal under abuse (docs/journal.md): every line checked against the record schema, bad lines moved
to episodes.rejected.jsonl and their episodes run again, one record per episode (the first valid one), and
artifacts (tables, videos) written whole or not at all."""

import json
import os

import pytest

from evalkit.atomic import write_atomic, write_text_atomic
from evalkit.results.summary import build_summary, episodes_frame
from evalkit.rollout.journal import Journal, read_lines
from evalkit.rollout.records import EpisodeRecord, PolicyCall, record_from_json


def rec(task, init, success=False, reason="timeout", steps=3, suite="s"):
    return EpisodeRecord(suite, task, "t", init, 1, success, steps, None if success else reason, 1.0, 0.1, 1,
                         session="20260101T000000-aaaaaa", session_s=2.0, calls=[PolicyCall(0, 0.01, 1)])


def line(r: EpisodeRecord) -> bytes:
    return json.dumps(r.to_dict()).encode() + b"\n"


GOOD = rec(0, 1).to_dict()
# kind of bad line -> (bytes as they stand in the file, what the reason must say)
BAD_LINES = {
    "json list": (b"[1, 2, 3]\n", "JSON list, not an object"),
    "json null": (b"null\n", "JSON null, not an object"),
    "json string": (b'"episode"\n', "JSON string, not an object"),
    "json number": (b"42\n", "JSON int, not an object"),
    "empty object": (b"{}\n", "missing field(s) suite, task_id"),
    "invalid utf-8": (b'{"suite": "s", "task_name": "\xff\xfe"}\n', "invalid UTF-8"),
    "garbage text": (b"hello, I am not json\n", "not JSON"),
    "half line mid-file": (line(rec(0, 1))[:40] + b"\n", "not JSON"),
    "missing field": (json.dumps({k: v for k, v in GOOD.items() if k != "seed"}).encode() + b"\n",
                      "missing field(s) seed"),
    "task_id as string": (json.dumps({**GOOD, "task_id": "0"}).encode() + b"\n", "task_id: expected int, got string"),
    "success as int": (json.dumps({**GOOD, "success": 1}).encode() + b"\n", "success: expected bool, got int"),
    "steps as bool": (json.dumps({**GOOD, "steps": True}).encode() + b"\n", "steps: expected int, got bool"),
    "reason as number": (json.dumps({**GOOD, "failure_reason": 3}).encode() + b"\n", "failure_reason: expected str"),
    "calls not a list": (json.dumps({**GOOD, "calls": {"n": 0}}).encode() + b"\n", "calls: expected a list"),
    "call missing seconds": (json.dumps({**GOOD, "calls": [{"n": 0, "batch": 1}]}).encode() + b"\n",
                             "calls[0]: missing field(s) s"),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_a_bad_line_is_moved_aside_with_its_reason_and_its_episode_runs_again(tmp_path, kind):
    raw, reason = BAD_LINES[kind]
    j = Journal(tmp_path / "episodes.jsonl")
    j.path.write_bytes(line(rec(0, 0)) + raw + line(rec(0, 2)))
    before = j.path.read_bytes()
    got = j.read()  # reading changes nothing
    assert j.path.read_bytes() == before and not j.rejected_path.exists()
    assert [r.key for r in got.records] == [(0, 0), (0, 2)]  # (0, 1) is not done: a resume runs it again
    (bad,) = got.bad
    assert bad.line_no == 2 and reason in bad.reason, bad.reason
    warning = got.bad_warning(j.path, j.rejected_path)
    assert warning.startswith("journal: 1 bad line(s) in episodes.jsonl moved to episodes.rejected.jsonl (1 ")
    assert "\n" not in warning

    j.recover()
    assert j.path.read_bytes() == line(rec(0, 0)) + line(rec(0, 2))  # the valid lines, byte for byte
    (moved,) = [json.loads(x) for x in j.rejected_path.read_text().splitlines()]
    assert moved["line"] == 2 and reason in moved["reason"]
    assert moved["text"] == raw.rstrip(b"\n").decode("utf-8", errors="backslashreplace")
    # a second resume finds nothing more to move: the rejected file is not appended again
    assert j.recover().bad == [] and len(j.rejected_path.read_text().splitlines()) == 1


def test_torn_last_line_from_a_kill_is_rejected_and_the_next_append_is_clean(tmp_path):
    j = Journal(tmp_path / "e.jsonl")
    j.append(rec(0, 0))
    with open(j.path, "a") as f:
        f.write('{"suite": "s", "task_id": 0, "init_st')  # kill -9 in the middle of a write
    (bad,) = j.read().bad
    assert bad.reason.startswith("torn line")
    j.append(rec(1, 0))  # starts on a fresh line
    got = j.read()
    assert sorted(r.key for r in got.records) == [(0, 0), (1, 0)] and len(got.bad) == 1
    assert got.bad[0].reason.startswith("not JSON")  # no longer the last line


def test_rejected_lines_are_appended_across_resumes(tmp_path):
    j = Journal(tmp_path / "episodes.jsonl")
    j.path.write_bytes(line(rec(0, 0)) + b"null\n")
    j.recover()
    with open(j.path, "ab") as f:
        f.write(b"[1]\n\xff\xff\n")
    j.recover()
    moved = [json.loads(x) for x in j.rejected_path.read_text().splitlines()]
    assert [m["reason"].split(":")[0] for m in moved] == ["not a record", "not a record", "invalid UTF-8"]
    assert moved[2]["text"] == "\\xff\\xff"  # the raw bytes stay visible
    assert [r.key for r in j.load()] == [(0, 0)]


def test_first_valid_record_wins_and_conflicts_count_each_episode_once(tmp_path):
    j = Journal(tmp_path / "e.jsonl")
    j.append(rec(0, 0))  # timeout
    j.append(rec(0, 1))
    j.append(rec(0, 0))  # the same outcome again: a plain duplicate
    j.append(rec(0, 0, success=True, steps=9))  # another outcome: a conflict
    j.append(rec(0, 0, reason="nan_action", steps=2))  # a third one: still one conflicting episode
    got = j.read()
    assert [r.key for r in got.records] == [(0, 0), (0, 1)]
    kept = got.records[0]
    assert (kept.success, kept.failure_reason, kept.steps) == (False, "timeout", 3)  # the first record
    assert got.duplicates == 3 and got.conflicts == [(0, 0)]
    assert got.conflict_warning() == ("journal: 1 episode(s) recorded again with another outcome (task 0 init 0); "
                                      "the first record of each counts (docs/journal.md)")
    s = build_summary(episodes_frame(got.records), {}, {}, {}, 1.0)
    assert s.episodes == 2 and s.failure_reasons == {"timeout": 2}  # each episode once
    assert got.bad_warning(j.path, None) is None


def test_records_round_trip_with_their_calls_and_unknown_keys_are_ignored(tmp_path):
    r = rec(2, 3)
    r.calls = [PolicyCall(0, 0.5, 2, {"denoise": [1.0, 2.0]}), PolicyCall(1, 0.01, 2)]
    d = json.loads(json.dumps(r.to_dict()))
    assert record_from_json(d) == r
    assert record_from_json({**d, "from_a_newer_version": 1}) == r
    old = {k: v for k, v in d.items() if k not in ("calls", "session", "session_s", "video_error")}
    assert record_from_json(old).calls is None  # journals of older versions still load
    got = read_lines(line(r) + b"\n\n   \n")  # blank lines are not bad lines
    assert got.records == [r] and got.bad == []


# -- artifacts: whole or not at all -------------------------------------------------------------
def test_atomic_write_leaves_the_old_file_or_the_new_one_never_a_torn_or_empty_one(tmp_path):
    target = tmp_path / "summary.json"
    write_text_atomic(target, '{"old": true}')

    def dies_midway(tmp):
        tmp.write_text('{"new": tr')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, dies_midway)
    with pytest.raises(OSError, match="empty file"):
        write_atomic(target, lambda tmp: tmp.write_bytes(b""))
    assert target.read_text() == '{"old": true}' and os.listdir(tmp_path) == ["summary.json"]  # no temp left
    write_text_atomic(target, '{"new": true}')
    assert target.read_text() == '{"new": true}' and os.listdir(tmp_path) == ["summary.json"]


def test_a_failed_or_truncated_video_leaves_no_file(tmp_path, monkeypatch):
    import imageio
    import numpy as np

    from evalkit.rollout.worker import write_video

    frames = [np.full((32, 32, 3), i, np.uint8) for i in range(12)]
    good = tmp_path / "good.mp4"
    write_video(good, frames)
    real = imageio.mimwrite

    def disk_full(path, *a, **k):  # the encoder wrote part of the file, then the disk filled up
        real(path, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(600)
        raise OSError(28, "No space left on device")

    def silently_truncated(path, *a, **k):  # no error at all, but the file is cut off (the 4 KB MP4)
        real(path, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(600)

    for fake, msg in ((disk_full, "No space left"), (silently_truncated, "does not decode")):
        monkeypatch.setattr(imageio, "mimwrite", fake)
        with pytest.raises(OSError, match=msg):
            write_video(tmp_path / "v.mp4", frames)
    assert sorted(os.listdir(tmp_path)) == ["good.mp4"]  # no partial file, no temp file


def test_the_engine_reruns_rejected_episodes_and_records_a_failed_video_as_missing(tmp_path):
    """One real episode: its journal line was corrupt (a resume runs it again), and its video cannot be written."""
    from evalkit.suites.specs import customize, get_suite

    from evalkit.policies.noop import NoopPolicy
    from evalkit.rollout.engine import RolloutOptions, run_rollouts

    spec = customize(get_suite("libero_spatial_quick"), tasks=[0], trials=2, max_steps=2)
    j = Journal(tmp_path / "episodes.jsonl")
    done = rec(0, 0, suite=spec.name)
    j.path.write_bytes(line(done) + json.dumps({**rec(0, 1, suite=spec.name).to_dict(), "steps": "2"}).encode())
    blocker = tmp_path / "videos"
    blocker.write_text("a file where the video folder should be")
    res = run_rollouts(NoopPolicy(), spec, j, RolloutOptions(workers=0, video_mode="all", video_dir=str(blocker / "v")))
    assert res.resumed == 1 and [r.key for r in res.records] == [(0, 0), (0, 1)] and res.records[0] == done
    rerun = res.records[1]
    assert rerun.steps == 2 and rerun.session == res.session and len(rerun.calls) == rerun.policy_calls == 1
    assert rerun.video_path is None and rerun.video_error and "Error" in rerun.video_error, rerun.video_error
    assert "steps: expected int" in json.loads(j.rejected_path.read_text())["reason"]
    assert [r.key for r in j.load()] == [(0, 0), (0, 1)] and j.read().bad == []
    assert j.load()[1].video_error == rerun.video_error
    errors = episodes_frame(res.records)["video_error"]
    assert errors.isna().tolist() == [True, False] and errors.iloc[1] == rerun.video_error
