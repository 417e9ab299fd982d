"""run_fidelity: the candidate policy (the run's backend) against the same policy under the reference backend, on
held-out check probes, before any episode is simulated. Seconds on the CPU for the reference policy.

What is compared (every number measured from outside the backend; evalkit.fidelity.hooks, .drive):
- the probes go in `check_calls` predict calls of different sizes and order (unlike calibration), and every call
  is compared: a backend that keeps state from an earlier call, or fits its calibration batch, shows it;
- actions per probe (SQNR), each layer's residual update with the reference's input fed in (teacher forcing:
  isolates the layer's own error) and each layer's free-running hidden state (the candidate's own computation,
  accumulated error: sees layers run out of order), budgeted per precision class at p50 and min;
- the order modules run in, against the reference's, first difference named;
- the denoise steps the expert layers really ran (hooks), cross-checked with the model's own counter;
- effective weights by driving every Linear (basis inputs), each against its own reference layer, and layers
  distinct from each other;
- silent fallback: a targeted module of a class below the reference's bits must compute something other than
  the reference module on the same real input (bit-identical outputs = it did not quantize), whatever its
  report row says; the matmul dtypes seen are reported beside.
Run it before CUDA graphs / torch.compile hide the hooks (`policy.eager()` lifts them for the duration).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from evalkit.fidelity.budgets import CLASS_BITS, Budget
from evalkit.fidelity.config import FidelityConfig
from evalkit.fidelity.drive import drive_linear, in_features_of
from evalkit.fidelity.fallback import (
    claimed_low_precision,
    precision_bits,
    storage_mismatches,
)
from evalkit.fidelity.hooks import (
    MatmulDtypes,
    ModuleInput,
    record_layers,
    trace_modules,
)
from evalkit.fidelity.metrics import (
    cosine_per_row,
    quantiles_db,
    sqnr_db,
    sqnr_db_per_row,
    update_agreement_per_row,
    update_sqnr_db_per_row,
)
from evalkit.fidelity.report import (
    FAIL,
    PASS,
    SKIP,
    FidelityCheck,
    FidelityReport,
    LayerResult,
)
from evalkit.policies.base import ObsBatch

_LAYER = re.compile(r"^(\w+)\.layers\.(\d+)$")
SAMPLE_ROWS = 16  # rows of a real input kept per module for the output comparisons


def _check(name, value, threshold, status, detail) -> FidelityCheck:
    return FidelityCheck(name, value, threshold, status != FAIL, detail, status)


@contextmanager
def _eager(policy):
    """The policy's eager path (CUDA-graph replays fire no forward hooks), through its public `eager()`."""
    with (policy.eager() if hasattr(policy, "eager") else nullcontext()):
        yield


def _expert_calls(policy) -> int | None:
    v = getattr(getattr(policy, "model", None), "expert_calls", None)
    return int(v) if isinstance(v, (int, np.integer)) else None


def split_calls(n: int, max_calls: int) -> list[list[int]]:
    """Probe indices per predict call: reversed order (calibration runs forward) in batches of sizes 1, 1, 2, 2,
    3, 3, ...: every size comes twice with different observations, so a backend that keeps state from an earlier
    call meets an observation it did not compute; the last call takes what is left. Then the first batch of two or
    more again with its rows reversed: the same input shapes with other rows in them, so state keyed by shape
    (a stale CUDA graph) is met even when no two batches of a size pad to the same length (prompts of different
    lengths: libero_goal's instructions)."""
    order = list(range(n))[::-1]
    sizes: list[int] = []
    k = 1
    while sum(sizes) < n and len(sizes) < max_calls - 1:
        sizes.append(min(k, n - sum(sizes)))
        if len(sizes) % 2 == 0:
            k += 1
    if sum(sizes) < n:
        sizes.append(n - sum(sizes))
    out, s = [], 0
    for size in sizes:
        out.append(order[s : s + size])
        s += size
    first_multi = next((c for c in out if len(c) > 1), None)
    if first_multi is not None:
        out.append(first_multi[::-1])
    return out


def linear_names(model: nn.Module) -> list[str]:
    """Every plain nn.Linear of the (reference) model: the modules whose weights are driven and compared."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def targeted_names(names: list[str], targets: str | None) -> set[str]:
    """The Linear names a backend's `targets` select (all of them when the string is not one evalkit knows)."""
    try:
        from evalkit.backends.targets import target_regex

        rx = target_regex(targets or "prefix_mlp")
    except Exception:  # a custom backend's own target grammar: judge every Linear by its class
        return set(names)
    hit = {n for n in names if rx.match(n)}
    return hit or set(names)


def _candidate_module(model: nn.Module, ref_name: str) -> tuple[str, nn.Module] | None:
    """The candidate's module for a reference Linear: same name, or one wrapper deeper in the same layer with the
    same leaf name (e.g. mlp.gate_proj -> mlp.inner.gate_proj)."""
    try:
        return ref_name, model.get_submodule(ref_name)
    except AttributeError:
        pass
    layer = ".".join(ref_name.split(".")[:3]) + "."
    leaf = "." + ref_name.rsplit(".", 1)[-1]
    found = [(n, m) for n, m in model.named_modules() if n.startswith(layer) and n.endswith(leaf)]
    return found[0] if len(found) == 1 else None


def _first_order_difference(ref: list[str], cand: list[str]) -> str | None:
    """Where the candidate's module order departs from the reference's: layer calls must match exactly; other
    modules are compared on the names both ran (a fused kernel legitimately skips its parts)."""
    lr = [n for n in ref if _LAYER.match(n)]
    lc = [n for n in cand if _LAYER.match(n)]
    for i, (a, b) in enumerate(zip(lr, lc)):
        if a != b:
            return f"layer call {i}: reference ran {a}, candidate ran {b}"
    if len(lr) != len(lc):
        i = min(len(lr), len(lc))
        return (f"layer call {i}: reference ran {lr[i]}, candidate stopped after {len(lc)} layer calls" if len(lr) > len(lc)
                else f"layer call {i}: candidate ran {lc[i]} after the reference's {len(lr)} layer calls")
    both = set(ref) & set(cand)
    fr, fc = [n for n in ref if n in both], [n for n in cand if n in both]
    for i, (a, b) in enumerate(zip(fr, fc)):
        if a != b:
            return f"module call {i}: reference ran {a}, candidate ran {b}"
    if len(fr) != len(fc):
        return f"the modules both ran were called {len(fr)} times in the reference, {len(fc)} in the candidate"
    return None


@dataclass
class _Acc:
    """Per-layer and per-probe numbers accumulated over every call."""

    upd_db: dict[str, list[float]] = field(default_factory=dict)
    upd_agree: dict[str, float] = field(default_factory=dict)
    state_db: dict[str, list[float]] = field(default_factory=dict)
    state_rows: dict[str, list[int]] = field(default_factory=dict)  # the probe of each state_db value (-1: none)
    cand_calls: dict[str, int] = field(default_factory=dict)
    ref_calls: dict[str, int] = field(default_factory=dict)
    first_seen: dict[str, int] = field(default_factory=dict)
    action_db: list[float] = field(default_factory=list)
    action_rows: list[int] = field(default_factory=list)  # the probe of each action_db value
    action_cos: list[float] = field(default_factory=list)
    order_problems: list[str] = field(default_factory=list)
    step_problems: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    hidden_identical: bool = True
    actions_identical: bool = True
    cand_inputs: dict[str, ModuleInput] = field(default_factory=dict)
    ref_inputs: dict[str, ModuleInput] = field(default_factory=dict)


def _reference_pass(reference_policy, batch: ObsBatch, seed: int, watch: set[str]):
    """The reference's layer inputs/outputs, actions, layer call counts and module trace for one call, memoized
    on the reference policy (its outputs are a function of the batch and the noise seed): judging several
    candidates against one reference (tests, sweeps in one process) runs each reference call once."""
    key = (tuple((o.episode_key, o.step) for o in batch.observations), seed, frozenset(watch))
    memo = reference_policy.__dict__.setdefault("_fidelity_reference_calls", {})
    if key in memo:
        return memo[key]
    ref_io: dict[tuple[str, int], tuple[torch.Tensor | None, torch.Tensor]] = {}

    def keep(n, i, x, t):
        ref_io[(n, i)] = (None if x is None else x.clone(), t.clone())

    with _eager(reference_policy), record_layers(reference_policy.transformer_stacks(), keep) as ref_calls, \
            trace_modules(reference_policy.model, watch, keep_rows=SAMPLE_ROWS) as ref_trace:
        ref_actions = np.asarray(reference_policy.predict(batch, noise_seed=seed), dtype=np.float64)
    memo[key] = (ref_io, ref_actions, dict(ref_calls), ref_trace)
    return memo[key]


def _compare_call(k: int, batch: ObsBatch, seed: int, reference_policy, candidate_policy, watch: set[str],
                  expected_steps: int | None, acc: _Acc, rows: list[int]) -> None:
    """rows: the batch's probes' indices in the whole probe set (each compared value is filed under its probe)."""
    cand_stacks = candidate_policy.transformer_stacks()
    ref_io, ref_actions, ref_calls, ref_trace = _reference_pass(reference_policy, batch, seed, watch)

    def free(n, i, x, t):
        r = ref_io.get((n, i))
        if r is None or r[1].shape != t.shape:
            acc.unmatched.append(f"call {k}: {n} #{i}")
            acc.state_db.setdefault(n, []).append(-math.inf)
            acc.state_rows.setdefault(n, []).append(-1)
            acc.hidden_identical = False
            return
        vals = sqnr_db_per_row(r[1], t.to(r[1].device)).tolist()
        acc.state_db.setdefault(n, []).extend(vals)
        acc.state_rows.setdefault(n, []).extend(rows if len(vals) == len(rows) else [-1] * len(vals))
        if acc.hidden_identical and (r[1].dtype != t.dtype or not torch.equal(r[1], t.to(r[1].device))):
            acc.hidden_identical = False

    before = _expert_calls(candidate_policy)
    with _eager(candidate_policy), record_layers(cand_stacks, free) as cand_calls, \
            trace_modules(candidate_policy.model, watch) as cand_trace:
        cand_actions = np.asarray(candidate_policy.predict(batch, noise_seed=seed), dtype=np.float64)
    after = _expert_calls(candidate_policy)

    def forced(n, i, x, t):
        acc.first_seen.setdefault(n, len(acc.first_seen))
        r = ref_io.get((n, i))
        if r is None or r[0] is None or r[1].shape != t.shape or x is None or x.shape != r[0].shape:
            acc.upd_db.setdefault(n, []).append(-math.inf)
            acc.upd_agree[n] = 0.0
            return
        acc.upd_db.setdefault(n, []).extend(update_sqnr_db_per_row(r[0], r[1], t).tolist())
        acc.upd_agree[n] = min(acc.upd_agree.get(n, 1.0), float(update_agreement_per_row(r[0], r[1], t).min()))

    def force(n, i):
        r = ref_io.get((n, i))
        return None if r is None else r[0]

    mark = _expert_calls(candidate_policy)
    with _eager(candidate_policy), record_layers(cand_stacks, forced, force=force):
        candidate_policy.predict(batch, noise_seed=seed)
    if mark is not None:
        candidate_policy.model.expert_calls = mark  # the diagnostic pass is not a real predict

    # actions
    acc.action_rows.extend(rows)
    if ref_actions.shape != cand_actions.shape:
        acc.action_db.extend([-math.inf] * len(batch))
        acc.action_cos.extend([0.0] * len(batch))
        acc.actions_identical = False
    else:
        finite = bool(np.isfinite(cand_actions).all())
        acc.action_db.extend(sqnr_db_per_row(ref_actions, cand_actions).tolist() if finite else [-math.inf] * len(batch))
        acc.action_cos.extend(cosine_per_row(ref_actions, np.nan_to_num(cand_actions)).tolist() if finite else [0.0] * len(batch))
        acc.actions_identical &= bool(np.array_equal(ref_actions, cand_actions))

    # what ran: calls per layer, module order, denoise steps (hooks, then the model's own counter)
    for n, c in ref_calls.items():
        acc.ref_calls[n] = acc.ref_calls.get(n, 0) + c
    for n, c in cand_calls.items():
        acc.cand_calls[n] = acc.cand_calls.get(n, 0) + c
    diff = _first_order_difference(ref_trace.order, cand_trace.order)
    if diff:
        acc.order_problems.append(f"call {k} ({len(batch)} probes): {diff}")
    expert = sorted(n for n in ref_calls if n.startswith("expert.layers."))
    if expert:
        seen = {n: cand_calls.get(n, 0) for n in expert}
        want = {n: ref_calls[n] for n in expert}
        if expected_steps is not None and any(v != expected_steps for v in want.values()):
            acc.step_problems.append(f"call {k}: the reference's expert layers ran {sorted(set(want.values()))} times, "
                                     f"configured {expected_steps}")
        if seen != want:
            bad = next(n for n in expert if seen[n] != want[n])
            acc.step_problems.append(f"call {k}: {bad} ran {seen[bad]} times (hooks), the reference's {want[bad]}")
        if before is not None and after is not None and after - before != seen[expert[0]]:
            acc.step_problems.append(f"call {k}: the model's expert_calls counter says {after - before} steps, "
                                     f"hooks saw {expert[0]} run {seen[expert[0]]} times")
    for name, inp in cand_trace.inputs.items():
        acc.cand_inputs.setdefault(name, inp)
    for name, inp in ref_trace.inputs.items():
        acc.ref_inputs.setdefault(name, inp)


def boundary_probes(acc: _Acc, every: int) -> list[int]:
    """The probes excused from the free-running min budgets: the ceil(n / every) with the lowest finite action
    SQNR (FidelityConfig.boundary_excuse_every). A probe whose actions are not finite is never excused."""
    n = len(set(acc.action_rows))
    if not every or not n:
        return []
    broken = {r for v, r in zip(acc.action_db, acc.action_rows) if not math.isfinite(v)}
    picked: list[int] = []
    for _, r in sorted((v, r) for v, r in zip(acc.action_db, acc.action_rows) if math.isfinite(v)):
        if r not in picked and r not in broken and len(picked) < math.ceil(n / every):
            picked.append(r)  # a probe compared twice (the repeated call) counts once
    return picked


def _min_without(values: list[float], rows: list[int], excused: set[int]) -> float:
    # a NaN/inf-broken value (-inf dB) is kept even for an excused probe: no decision boundary explains it
    kept = [v for v, r in zip(values, rows, strict=True) if r not in excused or not math.isfinite(v)]
    return quantiles_db(kept)[1] if kept else quantiles_db(values)[1]


def _layer_checks(acc: _Acc, budget: Budget, cand_stacks,
                  excused: set[int] = frozenset()) -> tuple[list[FidelityCheck], list[LayerResult], str | None]:
    order = sorted(set(acc.first_seen) | set(acc.state_db), key=lambda n: acc.first_seen.get(n, 10**6))
    layers, bad_upd, bad_state = [], [], []
    for n in order:
        up50, upmin = quantiles_db(acc.upd_db.get(n, []))
        st50, _ = quantiles_db(acc.state_db.get(n, []))
        stmin = _min_without(acc.state_db.get(n, []), acc.state_rows.get(n, []), excused)
        layers.append(LayerResult(n, acc.upd_agree.get(n, float("nan")), up50, upmin, st50, stmin,
                                  acc.cand_calls.get(n, 0), acc.ref_calls.get(n, 0), acc.first_seen.get(n, -1)))
        if up50 < budget.layer_p50 or upmin < budget.layer_min:
            bad_upd.append(layers[-1])
        if st50 < budget.state_p50 or stmin < budget.state_min:
            bad_state.append(layers[-1])
    not_run = [f"{s}.layers.{i}" for s, ls in cand_stacks.items() for i in range(len(ls))
               if acc.cand_calls.get(f"{s}.layers.{i}", 0) == 0 and acc.ref_calls.get(f"{s}.layers.{i}", 0) > 0]
    checks = []
    if not layers:
        checks.append(_check("layer_cosine", None, None, SKIP, "skipped: no layer output captured (no transformer_stacks)"))
        checks.append(_check("layer_states", None, None, SKIP, "skipped: no layer output captured"))
        return checks, layers, None
    worst_u = min(layers, key=lambda lr: lr.update_min_db)
    d = (f"first divergent layer: {bad_upd[0].layer} (update SQNR p50 {bad_upd[0].update_p50_db:.1f} dB, "
         f"min {bad_upd[0].update_min_db:.1f} dB); " if bad_upd else "every layer within budget; ")
    d += (f"each layer's residual update with the reference's input fed in (teacher forcing), SQNR per probe row and "
          f"call, budget p50 >= {budget.layer_p50:.1f} dB, min >= {budget.layer_min:.1f} dB; {len(layers)} layers")
    if not_run:
        d += f"; layers that never ran: {', '.join(not_run[:4])}"
    checks.append(_check("layer_cosine", float(worst_u.update_min_db), budget.layer_min,
                         FAIL if (bad_upd or not_run) else PASS, d))
    worst_s = min(layers, key=lambda lr: lr.state_min_db)
    d = (f"first divergent layer: {bad_state[0].layer} (hidden-state SQNR p50 {bad_state[0].state_p50_db:.1f} dB, "
         f"min {bad_state[0].state_min_db:.1f} dB); " if bad_state else "every layer within budget; ")
    d += (f"the candidate's own hidden states (free running) against the reference's, budget p50 >= "
          f"{budget.state_p50:.1f} dB, min >= {budget.state_min:.1f} dB")
    if excused:
        d += f" (min without the decision-boundary probes {sorted(excused)})"
    if acc.unmatched:
        d += f"; {len(acc.unmatched)} layer calls without a reference counterpart (e.g. {acc.unmatched[0]})"
    checks.append(_check("layer_states", float(worst_s.state_min_db), budget.state_min,
                         FAIL if (bad_state or acc.unmatched) else PASS, d))
    first = (bad_upd or bad_state or [None])[0]
    return checks, layers, first.layer if first else None


SAME_DB = 50.0  # two layers' driven weights this close are one weight (distinct layers differ by ~0 dB)


def _input_dtype(mod: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype a module expects when no run-time call of it was traced (e.g. a module shared under two names)."""
    out = getattr(mod, "out_dtype", None)
    if isinstance(out, torch.dtype):
        return out
    for t in list(mod.parameters()) + list(mod.buffers()):
        if t.is_floating_point() and t.element_size() >= 2:
            return t.dtype
    return default


# A module of a class below 16 bits cannot reproduce its weights better than its formats' best case: a grid of L
# levels over uniformly spread values gives 20 log10(L) dB (int8 48.1, int4 23.5; fp8 and fp4 less), plus 3 dB of
# slack. A 16-bit computation reaches ~55 dB: driven weights above the ceiling were not quantized.
CLASS_CEILING_DB = {"8-bit": 51.0, "4-bit": 26.5, "fp4": 26.5}


def _weight_checks(reference_policy, candidate_policy, names: list[str], targeted: set[str], acc: _Acc,
                   budget: Budget, max16: float, precision_class: str, ref_bits: int):
    """Drive every Linear; returns (checks, per-module SQNR dict, targeted modules too precise for their class)."""
    ref_model, cand_model = reference_policy.model, candidate_policy.model
    device = next(iter(list(cand_model.parameters()) + list(cand_model.buffers()))).device
    dtype = getattr(cand_model, "compute_dtype", torch.bfloat16)
    sq: dict[str, float] = {}
    mismatched, undriven, identical = [], [], []
    fingerprints: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for name in names:
        ref_mod = ref_model.get_submodule(name)
        found = _candidate_module(cand_model, name)
        k = in_features_of(ref_mod)
        if found is None or k is None:
            undriven.append(name)
            continue
        cname, cmod = found
        seen, dt = acc.cand_inputs.get(cname) or acc.cand_inputs.get(name), _input_dtype(cmod, dtype)
        try:
            driven = drive_linear(cmod, k, seen, device, dt)
        except Exception as e:  # a module that cannot be called alone (a fused part) is judged by the layer checks
            undriven.append(f"{name} ({type(e).__name__})")
            continue
        # the reference's weights driven the same way, at the candidate's activation dtype: the rounding of a bias
        # in bf16 then affects both sides alike, and what remains is what the candidate changed
        w, b = ref_mod.weight.detach(), None if ref_mod.bias is None else ref_mod.bias.detach()
        ref_at = lambda x, w=w, b=b: torch.nn.functional.linear(  # noqa: E731
            x, w.to(device=x.device, dtype=x.dtype), None if b is None else b.to(device=x.device, dtype=x.dtype))
        ref_cols = drive_linear(ref_at, k, seen, device, dt).weight
        if driven.weight.shape != ref_cols.shape:
            mismatched.append(f"{name}: driven output {tuple(driven.weight.shape)} vs reference {tuple(ref_cols.shape)}")
            sq[name] = -math.inf
            continue
        s = sqnr_db(ref_cols, driven.weight)
        sq[name] = s
        need = budget.weight if name in targeted else max16
        if s < need:
            mismatched.append(f"{name}: {s:.1f} dB < {need:.1f}")
        if name in targeted and s >= CLASS_CEILING_DB.get(precision_class, math.inf):
            identical.append(f"{name} ({s:.1f} dB)")
        m = _LAYER.match(".".join(name.split(".")[:3]))
        if m:
            rel = name.split(".", 3)[3] if name.count(".") >= 3 else ""
            fingerprints.setdefault(f"{m.group(1)}|{rel}", []).append((int(m.group(2)), driven.weight, ref_cols))
    shared = []
    for key, items in fingerprints.items():
        stack, rel = key.split("|")
        for a in range(len(items)):
            for b in range(a):
                (i, wi, ri), (j, wj, rj) = items[a], items[b]
                # the same weights (up to the driving's rounding) where the reference's layers differ
                if wi.shape == wj.shape and sqnr_db(wj, wi) > SAME_DB and sqnr_db(rj, ri) < SAME_DB:
                    shared.append(f"{stack}.layers.{i} == {stack}.layers.{j} ({rel})")
    checks = []
    if not sq:
        checks.append(_check("weight_match", None, budget.weight, SKIP, "skipped: no Linear could be driven"))
        return checks, sq, identical
    worst = min(sq, key=sq.get)
    d = (f"{len(mismatched)} modules' effective weights differ from their own reference layer: {'; '.join(mismatched[:4])}; "
         if mismatched else "")
    d += (f"{len(sq)} Linear modules driven with basis inputs (effective weights measured, not read); worst {worst} at "
          f"{sq[worst]:.1f} dB; budget {budget.weight:.1f} dB for targeted modules ({len(targeted & set(sq))}), "
          f"{max16:.1f} dB for the rest")
    if undriven:
        d += f"; {len(undriven)} not drivable alone (judged by the layer checks): {', '.join(undriven[:3])}"
    checks.append(_check("weight_match", float(sq[worst]), budget.weight, FAIL if mismatched else PASS, d))
    checks.append(_check(
        "weight_distinct", len(shared), 0, FAIL if shared else PASS,
        ("layers compute with the same weights where the reference's differ: " + "; ".join(shared[:4])) if shared
        else "every layer computes with its own weights (driven outputs differ wherever the reference's do)"))
    return checks, sq, identical


@torch.no_grad()
def _fallback_check(reference_policy, candidate_policy, targeted: set[str], acc: _Acc, identical_weights: list[str],
                    precision_class: str, ref_bits: int, backend_report) -> FidelityCheck:
    cls_bits = CLASS_BITS[precision_class]
    same_out, dtypes_seen = [], {}
    for name in sorted(targeted):
        inp = acc.ref_inputs.get(name)
        found = _candidate_module(candidate_policy.model, name)
        if inp is None or inp.sample is None or found is None:
            continue
        cname, cmod = found
        cin = acc.cand_inputs.get(cname) or acc.cand_inputs.get(name)
        x = inp.sample.to(dtype=cin.dtype if cin else inp.sample.dtype)
        mode = MatmulDtypes()
        try:
            with mode:
                cand_out = cmod(x)
        except Exception:
            continue
        dtypes_seen[name] = sorted({d for _, ds in mode.seen for d in ds})
        ref_mod = reference_policy.model.get_submodule(name)
        for dt in dict.fromkeys([inp.sample.dtype, torch.bfloat16, torch.float16, torch.float32]):
            # the reference module computing at each full precision: a fallback reproduces one of them bit for bit
            bias = None if ref_mod.bias is None else ref_mod.bias.to(dt)
            ref_out = torch.nn.functional.linear(inp.sample.to(dt), ref_mod.weight.to(dt), bias)
            if cand_out.numel() == ref_out.numel() and torch.equal(cand_out.reshape(ref_out.shape).to(dt), ref_out):
                same_out.append(f"{name} (= the {str(dt).replace('torch.', '')} reference)")
                break
    if cls_bits >= 16:
        note = "; actions and hidden states bit-identical to the reference" if (acc.actions_identical and acc.hidden_identical) else ""
        return _check("silent_fallback", 0, 0, PASS,
                      f"precision class {precision_class} is not below the reference's {ref_bits} bits: nothing to fall back from{note}")
    problems = []
    if same_out:
        first = same_out[0].split(" ")[0]
        problems.append(f"{len(same_out)} of {len(targeted)} targeted modules compute bit-identically to a "
                        f"full-precision reference on a real input (e.g. {same_out[0]}, matmul inputs "
                        f"{'/'.join(dtypes_seen.get(first, [])) or 'none seen'})")
    if identical_weights:
        problems.append(f"{len(identical_weights)} targeted modules' driven weights are closer to the reference than "
                        f"any {precision_class} format allows (e.g. {identical_weights[0]})")
    if acc.actions_identical and acc.hidden_identical:
        problems.append("actions and every hidden state bit-identical to the reference")
    claimed = claimed_low_precision(backend_report, ref_bits)
    problems += storage_mismatches(candidate_policy.model, claimed)[:2]
    if problems:
        return _check("silent_fallback", len(problems), 0, FAIL,
                      f"backend of class {precision_class} did not change what is computed: " + "; ".join(problems[:4]))
    some = next(iter(dtypes_seen.items()), None)
    seen = f"; matmul inputs seen e.g. {some[0]}: {'/'.join(some[1]) or 'no dispatched matmul (custom kernel)'}" if some else ""
    return _check("silent_fallback", 0, 0, PASS,
                  f"{len(targeted)} targeted modules of class {precision_class} compute differently from the reference "
                  f"on real inputs{seen}")


@torch.no_grad()
def run_fidelity(reference_policy, candidate_policy, probes: ObsBatch, backend_report, cfg: FidelityConfig | dict | None,
                 precision_class: str = "16-bit", class_source: str = "default", denoise_steps: int | None = None,
                 targets: str | None = None) -> FidelityReport:
    """Every fidelity check, pass or fail, with value and budget (module docstring).

    reference_policy / candidate_policy: the same policy under cfg.reference_backend and under the run's backend
    (after backend.apply); probes: the held-out check probes; precision_class: the backend's class
    (evalkit.fidelity.budgets.class_of_backend); denoise_steps: the run's configured steps; targets: the backend's
    `targets` (which modules must show their class's precision).
    """
    cfg = FidelityConfig.from_dict(cfg)
    budget = cfg.budget(precision_class)
    max16 = cfg.budget("16-bit").weight
    ref_bits = precision_bits(cfg.reference_backend) or 16
    names = linear_names(reference_policy.model)
    targeted = targeted_names(names, targets)
    acc = _Acc()
    calls = split_calls(len(probes), cfg.check_calls)
    checks: list[FidelityCheck] = []
    raised = None
    for k, idx in enumerate(calls):
        batch = ObsBatch([probes.observations[i] for i in idx])
        try:
            _compare_call(k, batch, int(cfg.probe_noise_seed) + k, reference_policy, candidate_policy, set(names),
                          denoise_steps, acc, rows=list(idx))
        except Exception as e:  # a candidate that crashes on an observation would crash the episode too
            raised = f"call {k} ({len(batch)} probes) raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            break
    checks.append(_check("calls", len(calls) if raised is None else k, len(calls), FAIL if raised else PASS,
                         raised or f"{len(probes)} held-out probes in {len(calls)} predict calls of sizes "
                                   f"{[len(c) for c in calls]} (reversed order), every call compared"))

    excused = boundary_probes(acc, int(cfg.boundary_excuse_every))
    a50, _ = quantiles_db(acc.action_db)
    amin = _min_without(acc.action_db, acc.action_rows, set(excused))
    if acc.action_db:
        shown = {r: v for v, r in zip(acc.action_db, acc.action_rows) if r in excused}
        note = ("; excused as decision-boundary probes (shown, not judged): "
                + ", ".join(f"#{r} {shown[r]:.1f} dB" for r in excused)) if excused else ""
        checks.append(_check(
            "action_sqnr", amin, budget.action_min,
            FAIL if (a50 < budget.action_p50 or amin < budget.action_min) else PASS,
            f"action chunk SQNR per probe over {len(acc.action_db)} probes: p50 {a50:.1f} dB, min {amin:.1f} dB "
            f"(budget p50 >= {budget.action_p50:.1f}, min >= {budget.action_min:.1f}); cosine min "
            f"{min(acc.action_cos):.5f}{note}"))
    else:
        checks.append(_check("action_sqnr", None, budget.action_min, FAIL if raised else SKIP, "no call completed"))

    cand_stacks = candidate_policy.transformer_stacks()
    lchecks, layers, first = _layer_checks(acc, budget, cand_stacks, set(excused))
    checks += lchecks
    checks.append(_check("execution_order", len(acc.order_problems), 0, FAIL if acc.order_problems else PASS,
                         acc.order_problems[0] + (f" (+{len(acc.order_problems) - 1} more calls)" if len(acc.order_problems) > 1 else "")
                         if acc.order_problems else "modules ran in the reference's order in every call"))
    if not any(n.startswith("expert.layers.") for n in acc.ref_calls):
        checks.append(_check("denoise_steps", None, denoise_steps, SKIP, "skipped: the policy has no expert stack"))
    else:
        per = acc.cand_calls.get("expert.layers.0", 0) / max(len(calls), 1)
        checks.append(_check("denoise_steps", per, denoise_steps, FAIL if acc.step_problems else PASS,
                             "; ".join(acc.step_problems[:3]) if acc.step_problems else
                             f"every expert layer ran {per:g} times per predict (forward hooks), as the reference and "
                             f"the configured {denoise_steps}; the model's counter agrees"))

    wchecks, wsq, identical = _weight_checks(reference_policy, candidate_policy, names, targeted, acc, budget, max16,
                                             precision_class, ref_bits)
    checks += wchecks
    checks.append(_fallback_check(reference_policy, candidate_policy, targeted, acc, identical, precision_class,
                                  ref_bits, backend_report))
    return FidelityReport(
        checks=checks,
        reference_backend=cfg.reference_backend,
        candidate_backend=str(getattr(backend_report, "backend", "")),
        probes=len(probes),
        layers=layers,
        first_divergent_layer=first,
        precision_class=precision_class,
        class_source=class_source,
        budget=budget.__dict__.copy(),
        calls=len(calls),
        action_cosine_min=min(acc.action_cos) if acc.action_cos else None,
        weight_sqnr_db=wsq,
    )
