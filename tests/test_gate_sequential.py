"""Sequential gate: the test martingales, the exact final analysis, the stop rule, and the rollout engine's
stop/ordering logic (pure logic: a fake worker stands in for LIBERO)."""

from __future__ import annotations

import itertools
import math
from collections import deque

import numpy as np
import pandas as pd
import pytest
from evalkit.suites.specs import SuiteSpec
from scipy import special
from scipy import stats as sps

from evalkit import stats as S
from evalkit.gate import GateConfig, StoredRun, judge
from evalkit.gate import sequential as SEQ
from evalkit.rollout import engine
from evalkit.rollout.journal import Journal
from evalkit.rollout.records import EpisodeRecord

TASKS = 10


def test_e_processes_have_expectation_one_on_their_null_boundary():
    for m in range(0, 31):  # regression: b ~ Binomial(m, 1/2) given m discordant pairs
        b = np.arange(m + 1)
        e = np.exp(SEQ.log_e_regression(b, m - b))
        assert float(sps.binom.pmf(b, m, 0.5) @ e) == pytest.approx(1.0, abs=1e-9)
    n, margin = 25, 0.05  # non-inferiority: trinomial with p10 - p01 = margin, any nuisance
    b = np.arange(n + 1)[:, None]
    c = np.arange(n + 1)[None, :]
    rest = np.maximum(n - b - c, 0)
    ok = b + c <= n
    lc = special.gammaln(n + 1) - special.gammaln(b + 1) - special.gammaln(c + 1) - special.gammaln(rest + 1)
    e = np.exp(SEQ.log_e_noninferior(np.where(ok, b, 0), np.where(ok, c, 0), n, margin))
    d0 = margin / 2  # the early regression stop's null: drop <= d0
    e_reg = np.exp(SEQ.log_e_regression(np.where(ok, b, 0), np.where(ok, c, 0), n, d0))
    for x in (0.0, 0.01, 0.1, 0.3):
        w = np.where(ok, np.exp(lc + special.xlogy(b, x + margin) + special.xlogy(c, x) + special.xlogy(rest, 1 - 2 * x - margin)), 0)
        assert float(np.sum(w * e)) == pytest.approx(1.0, abs=1e-9)
        w = np.where(ok, np.exp(lc + special.xlogy(b, x + d0) + special.xlogy(c, x) + special.xlogy(rest, 1 - 2 * x - d0)), 0)
        assert float(np.sum(w * e_reg)) == pytest.approx(1.0, abs=1e-9)
    # a drop shown > d0 is shown > 0: E_reg(d0) <= the d0 = 0 mixture (same bets) on every path
    lam = SEQ._bets_regression(d0)
    e0 = special.logsumexp(b[..., None] * np.log1p(lam) + c[..., None] * np.log1p(-lam), axis=-1) - math.log(len(lam))
    assert np.all(SEQ.log_e_regression(b, c, n, d0)[ok] <= e0[ok] + 1e-12)


def test_anytime_false_alarm_checked_after_every_pair():
    rng = np.random.default_rng(11)
    steps = np.where(rng.random((4000, 300)) < 0.5, 1, 0)  # fair coins: b-pair or c-pair
    b = np.cumsum(steps, axis=1)
    m = np.arange(1, 301)[None, :]
    mm, bb = np.meshgrid(np.arange(301), np.arange(301), indexing="ij")
    table = SEQ.log_e_regression(np.minimum(bb, mm), mm - np.minimum(bb, mm))  # log E for every (m, b) once
    crossed = (table[m, b] >= math.log(20)).any(axis=1)
    assert crossed.mean() <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 4000)


@pytest.mark.parametrize("level,above", [(0.2, 0.0), (0.05, 0.0), (0.2, 0.025)])
def test_final_analysis_matches_brute_force(level, above):
    """Fixed positions of the discordant pairs, checks at block ends (3 pairs per block): enumerate every sign."""
    thr = math.log(1 / level)
    rng = np.random.default_rng(3)
    for n_pairs in (6, 15, 24):
        disc = rng.random(n_pairs) < 0.5
        pos = np.flatnonzero(disc)
        m = len(pos)
        ends = np.arange(3, n_pairs + 1, 3)  # pairs seen at each block end
        check_m = np.array([int(disc[:e].sum()) for e in ends])
        cross, tail = 0.0, np.zeros(m + 2)
        for signs in itertools.product((0, 1), repeat=m):  # 1: a lost pair (b), 0: a gained one (c)
            b_at = np.concatenate([[0], np.cumsum(signs)])[check_m]
            if (SEQ.log_e_regression(b_at, check_m - b_at, ends, above) >= thr).any():
                cross += 0.5**m
            else:
                tail[: sum(signs) + 1] += 0.5**m
        for bo in range(m + 1):
            got = SEQ.final_p_regression([bo], [m], check_m[None], ends[None], level, above)[0]
            assert got == pytest.approx(min(1.0, cross + tail[bo]), abs=1e-12)


def _pairs(drop: float, trials: int, rng, rho: float = 0.9, mu: float = 0.8):
    p = mu + 0.15 * np.linspace(-1, 1, TASKS)
    u = rng.random((trials, TASKS))
    v = np.where(rng.random((trials, TASKS)) < rho, u, rng.random((trials, TASKS)))
    base = {(t, i): bool(u[i, t] < p[t]) for i in range(trials) for t in range(TASKS)}
    cand = {(t, i): bool(v[i, t] < p[t] - drop) for i in range(trials) for t in range(TASKS)}
    return base, cand


def _frame(outcomes: dict, suite="libero_spatial") -> pd.DataFrame:
    keys = sorted(outcomes)
    return pd.DataFrame({"suite": suite, "task_id": [t for t, _ in keys], "init_state_id": [i for _, i in keys],
                         "seed": 7, "success": [outcomes[k] for k in keys],
                         "failure_reason": [None if outcomes[k] else "timeout" for k in keys]})


def _stored(outcomes: dict, with_episodes=True) -> StoredRun:
    df = _frame(outcomes)
    params = {"suite": "libero_spatial", "policy": "pi05", "device": "cpu"}
    summary = {"episodes": len(df), "successes": int(df.success.sum()), "params": params}
    return StoredRun(summary, df if with_episodes else None, params, {}, ref="r")


def _rec(key, ok, suite="libero_spatial") -> EpisodeRecord:
    return EpisodeRecord(suite, key[0], f"t{key[0]}", key[1], 7, ok, 10, None if ok else "timeout", 1.0, 0.1, 1)


@pytest.mark.parametrize("drop,expect", [(0.3, "regression"), (0.0, "pass")])
def test_stop_rule_and_judge_reach_the_same_decision(drop, expect):
    rng = np.random.default_rng(4)
    base, cand = _pairs(drop, 50, rng, rho=1.0 if drop == 0 else 0.9)
    cfg = GateConfig(sequential=True)
    spec = SuiteSpec("libero_spatial", "libero_spatial", TASKS, tuple(range(TASKS)), 50, 220)
    rule = SEQ.sequential_stop_rule(_stored(base), cfg, spec)
    order = sorted(cand, key=lambda k: (k[1], k[0]))  # the engine's interleaved order
    done, reason = [], None
    for k in order:
        done.append(_rec(k, cand[k]))
        reason = rule(done)
        if reason:
            break
    assert reason and expect.split()[0][:8] in reason.replace("non-inferior", "pass")
    assert len(done) < 250  # decided well before the 500-episode suite ends
    in_flight = order[len(done): len(done) + 3]  # episodes that were running when the rule fired finish too
    ran = {k: cand[k] for k in order[: len(done)] + in_flight}
    r = judge(_stored(ran), _stored(base), cfg)
    assert r.design == "sequential" and r.verdict == expect
    seq = r.evidence["sequential"]
    assert seq["stage"] == "interim" and seq["pairs_at_decision"] == rule.outcome.pairs_at_decision


def test_stop_rule_applies_only_when_it_can():
    rng = np.random.default_rng(0)
    base, _ = _pairs(0.0, 5, rng)
    assert SEQ.sequential_stop_rule(_stored(base), GateConfig(), "libero_spatial") is None  # sequential off
    on = GateConfig(sequential=True)
    assert SEQ.sequential_stop_rule(_stored(base, with_episodes=False), on, "libero_spatial") is None  # ref: baseline
    assert SEQ.sequential_stop_rule(_stored(base), on, "libero_goal") is None  # no episode of that suite
    assert SEQ.sequential_stop_rule(_stored(base), {"sequential": True}, "libero_spatial") is not None


def test_unfinished_blocks_do_not_count_and_late_blocks_cannot_skip_a_gap():
    base = {(t, i): True for t in range(3) for i in range(4)}
    cand = dict(base)
    del cand[(1, 1)]  # block 1 incomplete: the path stops after block 0 even though blocks 2 and 3 are complete
    out = SEQ.evaluate(base, cand, GateConfig(sequential=True))
    assert out.blocks == 1 and out.pairs_at_decision == 3
    assert SEQ.plan_blocks([(0, 0), (1, 0), (0, 1)]) == [[(0, 0), (1, 0)]]
    none = SEQ.evaluate(base, {(0, 0): False, (1, 1): True}, GateConfig(sequential=True))  # no complete block
    assert none.blocks == 0 and none.decision is None and none.p_regression == pytest.approx(S.mcnemar_exact(1, 0))


def test_sequential_judge_without_early_decision_uses_the_final_analysis():
    rng = np.random.default_rng(7)
    base, cand = _pairs(0.0, 3, rng, rho=0.0)  # 30 noisy pairs: neither boundary is reachable
    r = judge(_stored(cand), _stored(base), GateConfig(sequential=True))
    seq = r.evidence["sequential"]
    assert seq["stage"] in (None, "final") and r.design == "sequential"
    b, c = seq["b_all"], seq["c_all"]
    fixed = S.mcnemar_exact(b, c)  # the design's p adds the (small) chance of an early crossing
    assert fixed <= r.family["p_raw"] <= fixed + 0.05


# --- the rollout engine's stop rule and order (a fake worker: no simulator) --------------------------------


class _FakeWorker:
    """Finishes an episode the moment it starts: success when (task + init) is even."""

    started: list = []

    def __init__(self, spec):
        self.spec, self._reply, self.conn = spec, None, None

    def send(self, msg):
        ep = msg[1]
        _FakeWorker.started.append((ep.task_id, ep.init_state_id))
        self._reply = ("done", _rec((ep.task_id, ep.init_state_id), (ep.task_id + ep.init_state_id) % 2 == 0, self.spec.name))

    def ready(self):
        return self._reply is not None

    def recv(self):
        r, self._reply = self._reply, None
        return r

    def alive(self):
        return True

    def exitcode(self):
        return None

    def close(self):
        pass


class _Policy:
    needs_images = False


@pytest.fixture
def fake_engine(monkeypatch):
    _FakeWorker.started = []
    monkeypatch.setattr(engine, "_LocalWorker", _FakeWorker)
    return SuiteSpec("libero_spatial", "libero_spatial", TASKS, (0, 1, 2), 4, 220)


def test_engine_default_order_is_unchanged_and_runs_everything(fake_engine, tmp_path):
    res = engine.run_rollouts(_Policy(), fake_engine, Journal(tmp_path / "j.jsonl"), engine.RolloutOptions(workers=0))
    assert _FakeWorker.started == sorted(fake_engine.episodes()) and len(res.records) == 12
    assert res.stop_reason is None and res.not_run == 0


def test_engine_stop_rule_stops_scheduling_and_counts_what_was_not_run(fake_engine, tmp_path):
    calls = []

    def rule(records):
        calls.append(len(records))
        return "enough" if len(records) >= 5 else None

    res = engine.run_rollouts(_Policy(), fake_engine, Journal(tmp_path / "j.jsonl"),
                              engine.RolloutOptions(workers=0, stop_rule=rule, order="interleave"))
    assert res.stop_reason == "enough" and len(res.records) == 5 and res.not_run == 7
    assert calls == [1, 2, 3, 4, 5]  # checked after each finished episode, not after the decision
    # round by round; the worker keeps its task (2) when that task has an episode in the oldest round left
    assert _FakeWorker.started == [(0, 0), (1, 0), (2, 0), (2, 1), (0, 1)]
    assert len(Journal(tmp_path / "j.jsonl").load()) == 5


def test_engine_resumed_records_can_decide_before_anything_runs(fake_engine, tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    for k in [(0, 0), (1, 0)]:
        j.append(_rec(k, True))
    res = engine.run_rollouts(_Policy(), fake_engine, j, engine.RolloutOptions(workers=0, stop_rule=lambda r: "decided"))
    assert _FakeWorker.started == [] and res.stop_reason == "decided" and res.not_run == 10 and len(res.records) == 2
    with pytest.raises(ValueError, match="interleave"):
        engine.run_rollouts(_Policy(), fake_engine, j, engine.RolloutOptions(workers=0, order="random"))


def test_interleaved_queue_prefers_the_workers_task_only_within_the_oldest_round():
    q = deque(sorted([(t, i) for t in range(3) for i in range(3)], key=lambda k: (k[1], k[0])))
    assert engine._next_episode(q, prefer_task=2, same_round=True) == (2, 0)
    assert engine._next_episode(q, prefer_task=2, same_round=True) == (0, 0)  # (2, 1) waits for round 0 to empty
    q2 = deque(sorted([(t, i) for t in range(3) for i in range(3)]))
    assert engine._next_episode(q2, prefer_task=2) == (2, 0)  # default: the worker's task wherever it is
