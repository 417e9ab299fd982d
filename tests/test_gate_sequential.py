"""Sequential gate: the exact group-sequential sign test (against brute-force enumeration), the
non-inferiority test martingale, the stop rule, and the rollout engine's stop/ordering logic (pure logic:
a fake worker stands in for LIBERO)."""

from __future__ import annotations

import itertools
import math
from collections import deque

import numpy as np
import pandas as pd
import pytest
from evalkit.suites.specs import SuiteSpec
from scipy import special

from evalkit import stats as S
from evalkit.gate import GateConfig, StoredRun, judge
from evalkit.gate import sequential as SEQ
from evalkit.rollout import engine
from evalkit.rollout.journal import Journal
from evalkit.rollout.records import EpisodeRecord
from evalkit.rollout.schedule import next_in_rounds

TASKS = 10


def test_noninferiority_martingale_has_expectation_one_on_its_null_boundary():
    n, margin = 25, 0.05  # trinomial with p10 - p01 = margin, any nuisance
    b = np.arange(n + 1)[:, None]
    c = np.arange(n + 1)[None, :]
    rest = np.maximum(n - b - c, 0)
    ok = b + c <= n
    lc = special.gammaln(n + 1) - special.gammaln(b + 1) - special.gammaln(c + 1) - special.gammaln(rest + 1)
    e = np.exp(SEQ.log_e_noninferior(np.where(ok, b, 0), np.where(ok, c, 0), n, margin))
    for x in (0.0, 0.01, 0.1, 0.3):
        w = np.where(ok, np.exp(lc + special.xlogy(b, x + margin) + special.xlogy(c, x) + special.xlogy(rest, 1 - 2 * x - margin)), 0)
        assert float(np.sum(w * e)) == pytest.approx(1.0, abs=1e-9)


def _brute_force(check_m, check_n, m, level, drop_stop):
    """Every sign sequence of m discordant pairs (prob 2^-m each); every block end is a look (repeated m too).
    Returns per sequence: crossing block (-1), boundary there or at the last look (-1: unreachable), p-value."""
    seqs = np.array(list(itertools.product((0, 1), repeat=m)), dtype=int).reshape(-1, m)  # 1: a lost pair
    w = 0.5**m
    cum = np.concatenate([np.zeros((len(seqs), 1), int), np.cumsum(seqs, axis=1)], axis=1)
    alive = np.ones(len(seqs), bool)
    cross_at = np.full(len(seqs), -1)
    bound = np.full(len(seqs), -1)
    p = np.full(len(seqs), np.nan)
    spent = 0.0
    for k, (mk, nk) in enumerate(zip(check_m, check_n)):
        bk = cum[:, mk]
        allowed = level * SEQ.SPEND_SHARE * (1 - math.exp(-mk / SEQ.SPEND_SCALE))
        kk = next(x for x in range(mk + 2) if spent + w * np.sum(alive & (bk >= x)) <= allowed * (1 + 1e-9) or x == mk + 1)
        kk = min(max(kk, math.ceil((mk + drop_stop * nk) / 2 - 1e-9)), mk + 1)
        hit = alive & (bk >= kk)
        for i in np.flatnonzero(hit):
            p[i] = spent + w * np.sum(alive & (bk >= bk[i]))
        bound = np.where(alive, kk if kk <= mk else -1, bound)
        cross_at[hit] = k
        spent += w * hit.sum()
        alive &= ~hit
    for i in np.flatnonzero(alive):
        p[i] = spent + w * np.sum(alive & (cum[:, m] >= cum[i, m]))
    return seqs, cum, cross_at, bound, np.minimum(p, 1.0), spent


@pytest.mark.parametrize("level,drop_stop", [(0.9, 0.0), (0.9, 0.3), (0.4, 0.0)])
def test_group_sequential_sign_test_matches_brute_force(level, drop_stop):
    """Fixed positions of the discordant pairs (a look repeats an m), every sign sequence enumerated. Levels
    far above alpha make the small designs cross often enough to test every branch."""
    for check_m in ([3, 3, 6, 9], [2, 2, 5, 7, 10, 12]):
        check_m = np.array(check_m)
        n_blocks = len(check_m)
        check_n = 5.0 * np.arange(1, n_blocks + 1)
        m = int(check_m[-1]) + 2  # two discordant pairs after the last complete block (they count at the end)
        seqs, cum, cross_at, bound, p, spent = _brute_force(check_m, check_n, m, level, drop_stop)
        got = SEQ.regression_paths(cum[:, check_m], np.broadcast_to(check_m, (len(seqs), n_blocks)),
                                   np.broadcast_to(check_n, (len(seqs), n_blocks)), cum[:, m], m, level, drop_stop)
        assert np.array_equal(got.index, cross_at) and np.array_equal(got.boundary, bound)
        np.testing.assert_allclose(got.p, p, atol=1e-12)
        assert cross_at.max() >= 0  # the case exercises crossings
        # the design is exact: P(p <= x) <= x at every level, and the looks never spend more than allowed
        for x in np.unique(p):
            assert np.sum(p <= x) * 0.5**m <= x + 1e-12
        assert spent <= level * SEQ.SPEND_SHARE + 1e-12
        crossed = got.index >= 0
        assert np.all(2 * cum[crossed, check_m[got.index[crossed]]] - check_m[got.index[crossed]]
                      >= drop_stop * check_n[got.index[crossed]] - 1e-9)  # an early stop shows the drop it needs


def test_false_alarm_at_500_pairs_with_the_real_constants():
    rng = np.random.default_rng(11)
    reps, blocks, a = 3000, 50, 0.05
    p = 0.6 + 0.36 * np.linspace(-1, 1, TASKS)  # an unchanged, noisy policy (independent outcomes)
    base = rng.random((reps, blocks, TASKS)) < p
    cand = rng.random((reps, blocks, TASKS)) < p
    cb = np.cumsum((base & ~cand).sum(2), 1)
    cm = cb + np.cumsum((~base & cand).sum(2), 1)
    cn = np.broadcast_to(TASKS * np.arange(1, blocks + 1), (reps, blocks))
    out = SEQ.regression_paths(cb, cm, cn, cb[:, -1], cm[:, -1], a, SEQ.regression_stop_drop(GateConfig()))
    se = 3 * math.sqrt(a * (1 - a) / reps)
    assert np.mean(out.p <= a) <= a + se
    assert np.mean(out.index >= 0) <= a * SEQ.SPEND_SHARE + se  # early stops spend at most their share
    assert np.all(out.spent <= a * SEQ.SPEND_SHARE * (1 + 1e-9))


def test_boundaries_depend_only_on_the_pairs_seen_not_on_the_plan():
    """A 100-episode run and a 500-episode run with the same first blocks decide the same way at the same look."""
    rng = np.random.default_rng(5)
    base, cand = _pairs(0.3, 50, rng, rho=0.0)
    cfg = GateConfig(sequential=True)
    long_plan = SEQ.plan_blocks(base)
    short = SEQ.evaluate(base, cand, cfg, long_plan[:10], final=False)
    full = SEQ.evaluate(base, cand, cfg, long_plan, final=False)
    assert short.decision == full.decision == "regression" and short.pairs_at_decision == full.pairs_at_decision
    assert short.regression_boundary == full.regression_boundary and short.p_regression == full.p_regression


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
    assert f"decided '{expect}" in r.checks[0].explanation.replace("non-inferior", "pass")


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
    fixed = S.mcnemar_exact(b, c)  # the design's p adds P(an early crossing, then fewer lost pairs at the end)
    assert fixed <= r.family["p_raw"] <= fixed + 0.05 * SEQ.SPEND_SHARE
    assert "McNemar at the level left" in r.checks[0].explanation


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
    assert next_in_rounds(q, prefer_task=2, same_round=True) == (2, 0)
    assert next_in_rounds(q, prefer_task=2, same_round=True) == (0, 0)  # (2, 1) waits for round 0 to empty
    q2 = deque(sorted([(t, i) for t in range(3) for i in range(3)]))
    assert next_in_rounds(q2, prefer_task=2) == (2, 0)  # default: the worker's task wherever it is
