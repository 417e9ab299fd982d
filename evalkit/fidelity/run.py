"""run_fidelity: compare a candidate policy (configured backend) with a reference policy (gate.reference_backend)
on a fixed probe batch, before any episode is simulated. Seconds, not minutes.

Both policies follow evalkit.policies.base.TorchPolicy: `.model`, `.transformer_stacks()`, `.predict(ObsBatch,
noise_seed)`. torch forward hooks record every layer's output in every stack; torch does the math
(evalkit.fidelity.metrics). Run it before enabling CUDA graphs or torch.compile: graph replays fire no hooks.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from evalkit.fidelity.fallback import claimed_low_precision, precision_bits, storage_mismatches
from evalkit.fidelity.metrics import cosine_per_row, sqnr_db_per_row, update_agreement_per_row
from evalkit.fidelity.report import FAIL, PASS, SKIP, FidelityCheck, FidelityReport, LayerResult
from evalkit.fidelity.weights import compare_stacks
from evalkit.policies.base import ObsBatch


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    return None


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return None


@contextmanager
def _record(stacks: dict[str, torch.nn.ModuleList], sink, force=None):
    """Call sink(layer_name, call_index, input, output) for every forward call of every layer of every stack.

    force(layer_name, call_index) -> tensor or None: when given, the layer's first positional input is
    replaced by that tensor (teacher forcing: every layer sees the reference's input).
    """
    handles, calls = [], {}
    for stack, layers in stacks.items():
        for i, layer in enumerate(layers):
            name = f"{stack}.layers.{i}"
            seen: dict[str, torch.Tensor | None] = {}

            def pre(mod, args, kwargs, name=name, seen=seen):
                x = _first_arg(args, kwargs)
                if force is not None and x is not None:
                    r = force(name, calls.get(name, 0))
                    if r is not None and r.shape == x.shape:
                        x = r.to(device=x.device, dtype=x.dtype)
                        args = (x,) + tuple(args[1:])
                seen["x"] = x
                return args, kwargs

            def post(mod, args, out, name=name, seen=seen):
                k = calls.get(name, 0)
                calls[name] = k + 1
                t = _first_tensor(out)
                if t is not None:
                    sink(name, k, seen.get("x"), t.detach())

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _eager(policy):
    """Run the policy's eager path: CUDA-graph replays fire no forward hooks.

    Uses `policy.eager()` when the policy offers it, else lifts a `_graphs` sampler (evalkit's pi05) for the
    duration; the weights are the same objects either way.
    """
    if hasattr(policy, "eager"):
        with policy.eager():
            yield
        return
    graphs = getattr(policy, "_graphs", None)
    if graphs is not None:
        policy._graphs = None
    try:
        yield
    finally:
        if graphs is not None:
            policy._graphs = graphs


def _check(name, value, threshold, status, detail) -> FidelityCheck:
    return FidelityCheck(name, value, threshold, status != FAIL, detail, status)


def _expert_calls(policy) -> int | None:
    v = getattr(getattr(policy, "model", None), "expert_calls", None)
    return int(v) if isinstance(v, (int, np.integer)) else None


@torch.no_grad()
def run_fidelity(
    reference_policy,
    candidate_policy,
    probes: ObsBatch,
    backend_report,
    cfg,
    denoise_steps: int | None = None,
) -> FidelityReport:
    """Every fidelity check of issue 5, pass or fail, with value and threshold.

    reference_policy: the same policy built under cfg.reference_backend; candidate_policy: under the run's
    backend (after backend.apply); backend_report: the candidate's BackendReport; cfg: GateConfig;
    denoise_steps: expected expert calls per predict (default: candidate_policy.denoise_steps).
    """
    seed = int(getattr(cfg, "probe_noise_seed", 0))
    ref_stacks = reference_policy.transformer_stacks()
    cand_stacks = candidate_policy.transformer_stacks()

    # 1) reference: keep every layer's input and output (on its device, in its dtype)
    ref_io: dict[tuple[str, int], tuple[torch.Tensor | None, torch.Tensor]] = {}

    def keep(n, k, x, t):
        ref_io[(n, k)] = (None if x is None else x.clone(), t.clone())

    with _eager(reference_policy), _record(ref_stacks, keep):
        ref_actions = np.asarray(reference_policy.predict(probes, noise_seed=seed), dtype=np.float32)

    # 2) candidate, free running: the actions it really produces, expert calls, output cosine per layer
    state_cos: dict[str, float] = {}

    hidden_identical = [True]

    def free(n, k, x, t):
        r = ref_io.get((n, k))
        c = 0.0 if r is None or r[1].shape != t.shape else float(cosine_per_row(r[1], t.to(r[1].device)).min())
        state_cos[n] = min(state_cos.get(n, 1.0), c)
        if hidden_identical[0] and (r is None or r[1].dtype != t.dtype or not torch.equal(r[1], t.to(r[1].device))):
            hidden_identical[0] = False

    before = _expert_calls(candidate_policy)
    with _eager(candidate_policy), _record(cand_stacks, free) as cand_calls:
        cand_actions = np.asarray(candidate_policy.predict(probes, noise_seed=seed), dtype=np.float32)
    after = _expert_calls(candidate_policy)

    # 3) candidate, teacher forced: each layer gets the reference's input, so comparing its residual
    # update (output - input) with the reference's isolates that layer's own error. The residual stream
    # itself hides a missing branch: out = h vs h + mlp(h) can still have cosine > 0.98.
    upd_cos: dict[str, float] = {}
    order: dict[str, int] = {}
    missing: list[str] = []

    def forced(n, k, x, t):
        order.setdefault(n, len(order))
        r = ref_io.get((n, k))
        if r is None or r[0] is None or r[1].shape != t.shape or x is None or x.shape != r[0].shape:
            missing.append(f"{n} call {k}")
            upd_cos[n] = min(upd_cos.get(n, 1.0), 0.0)
            return
        # x is the reference input (forced), so both updates are measured from the same point
        upd_cos[n] = min(upd_cos.get(n, 1.0), float(update_agreement_per_row(r[0], r[1], t).min()))

    def force(n, k):
        r = ref_io.get((n, k))
        return None if r is None else r[0]

    calls_mark = _expert_calls(candidate_policy)
    with _eager(candidate_policy), _record(cand_stacks, forced, force=force):
        candidate_policy.predict(probes, noise_seed=seed)
    if calls_mark is not None:
        candidate_policy.model.expert_calls = calls_mark  # the diagnostic pass is not a real predict
    ref_io.clear()

    checks: list[FidelityCheck] = []

    # action chunk cosine and SQNR (min over probes)
    if ref_actions.shape != cand_actions.shape:
        checks.append(_check("action_cosine", 0.0, cfg.action_cosine_min, FAIL,
                             f"action shapes differ: reference {ref_actions.shape}, candidate {cand_actions.shape}"))
        checks.append(_check("action_sqnr", -math.inf, cfg.sqnr_min_db, FAIL, "action shapes differ"))
    else:
        finite = bool(np.isfinite(cand_actions).all())
        cos = cosine_per_row(ref_actions, np.nan_to_num(cand_actions)) if finite else np.zeros(len(ref_actions))
        sq = sqnr_db_per_row(ref_actions, np.nan_to_num(cand_actions)) if finite else np.full(len(ref_actions), -math.inf)
        worst = int(np.argmin(cos))
        checks.append(_check(
            "action_cosine", float(cos.min()), cfg.action_cosine_min, PASS if cos.min() >= cfg.action_cosine_min else FAIL,
            (f"min over {len(cos)} probes (worst probe {worst}); mean {cos.mean():.5f}" if finite
             else "candidate actions contain NaN/inf"),
        ))
        checks.append(_check(
            "action_sqnr", float(sq.min()), cfg.sqnr_min_db, PASS if sq.min() >= cfg.sqnr_min_db else FAIL,
            f"min over probes of 10 log10(|ref|^2 / |ref - cand|^2) in dB (worst probe {int(np.argmin(sq))})",
        ))

    # per-layer hidden-state cosine (teacher-forced residual update), first divergent layer in execution order
    layers = [LayerResult(n, upd_cos[n], state_cos.get(n, float("nan")), cand_calls.get(n, 0), order[n])
              for n in sorted(order, key=order.get)]
    not_run = [f"{s}.layers.{i}" for s, ls in cand_stacks.items() for i in range(len(ls)) if f"{s}.layers.{i}" not in order]
    first = next((lr for lr in layers if lr.cosine_min < cfg.layer_cosine_min), None)
    if not layers:
        checks.append(_check("layer_cosine", None, cfg.layer_cosine_min, SKIP,
                             "skipped: no layer output captured (no transformer_stacks, or CUDA graphs/compile hide the hooks)"))
    else:
        lmin = min(lr.cosine_min for lr in layers)
        detail = (f"first divergent layer: {first.layer} (cosine {first.cosine_min:.4f}); " if first else "all layers agree; ")
        detail += ("agreement of each layer's residual update, reference input fed in (teacher forcing): "
                   "1/sqrt(1 + |out_c - out_r|^2 / |out_r - in|^2), min over probes and calls; "
                   f"{len(layers)} layers in {len(cand_stacks)} stacks")
        if missing:
            detail += f"; no matching reference call for {len(missing)} calls (e.g. {missing[0]})"
        if not_run:
            detail += f"; layers that never ran: {', '.join(not_run[:4])}"
        checks.append(_check("layer_cosine", float(lmin), cfg.layer_cosine_min, FAIL if first or missing else PASS, detail))

    # weights: each matches its own reference layer, layers stay distinct
    wf = compare_stacks(ref_stacks, cand_stacks, float(getattr(cfg, "weight_sqnr_min_db", 12.0)))
    if wf.compared == 0:
        checks.append(_check("weight_match", None, cfg.weight_sqnr_min_db, SKIP, "skipped: no layer weights found"))
    else:
        d = f"{wf.compared} modules; worst {wf.worst_module} at {wf.worst_sqnr_db:.1f} dB"
        if wf.mismatched:
            d = f"{len(wf.mismatched)} modules differ from their reference layer: {'; '.join(wf.mismatched[:4])}; " + d
        if wf.unmatched:
            d += f"; {'; '.join(wf.unmatched[:2])}"
        checks.append(_check("weight_match", float(wf.worst_sqnr_db), cfg.weight_sqnr_min_db, FAIL if wf.mismatched else PASS, d))
        checks.append(_check(
            "weight_distinct", len(wf.shared), 0, FAIL if wf.shared else PASS,
            ("layers share weights that are distinct in the reference: " + "; ".join(wf.shared[:4])) if wf.shared
            else "every layer's weights are distinct from the other layers' (as in the reference)",
        ))

    # silent fallback: claims vs storage, and bit-identical outputs
    ref_bits = precision_bits(getattr(cfg, "reference_backend", "bf16")) or 16
    claimed = claimed_low_precision(backend_report, ref_bits)
    # bit-identical = same actions AND same hidden states in every layer (a policy whose actions barely
    # depend on the network, like a randomly initialised one, can repeat its actions bit for bit)
    identical = (ref_actions.shape == cand_actions.shape and np.array_equal(ref_actions, cand_actions)
                 and hidden_identical[0] and bool(state_cos))
    if not claimed:
        checks.append(_check("silent_fallback", 0, 0, PASS,
                             f"backend claims nothing below the reference precision ({ref_bits} bits)"
                             + ("; outputs bit-identical to the reference, as expected" if identical else "")))
    else:
        problems = storage_mismatches(candidate_policy.model, claimed)
        if identical:
            problems.insert(0, f"actions and hidden states bit-identical to the {cfg.reference_backend} reference although {len(claimed)} modules claim lower precision")
        checks.append(_check(
            "silent_fallback", len(problems), 0, FAIL if problems else PASS,
            ("; ".join(problems[:4]) + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")) if problems
            else f"{len(claimed)} modules claim < {ref_bits} bits and store the claimed dtype; outputs differ from the reference",
        ))

    # denoise steps: the expert ran exactly denoise_steps times in one predict
    want = denoise_steps if denoise_steps is not None else getattr(candidate_policy, "denoise_steps", None)
    if want is None:
        checks.append(_check("denoise_steps", None, None, SKIP, "skipped: the policy has no denoise_steps"))
    else:
        if before is not None and after is not None:
            ran, src = after - before, "policy.model.expert_calls"
        elif "expert" in cand_stacks and len(cand_stacks["expert"]):
            ran, src = cand_calls.get("expert.layers.0", 0), "forward calls of expert.layers.0"
        else:
            ran, src = None, ""
        if ran is None:
            checks.append(_check("denoise_steps", None, int(want), SKIP, "skipped: no expert_calls counter and no expert stack"))
        else:
            checks.append(_check("denoise_steps", int(ran), int(want), PASS if ran == want else FAIL,
                                 f"expert ran {ran} times in one predict (from {src}); configured {want}"))

    return FidelityReport(
        checks=checks,
        reference_backend=str(getattr(cfg, "reference_backend", "")),
        candidate_backend=str(getattr(backend_report, "backend", "")),
        probes=len(probes),
        layers=layers,
        first_divergent_layer=first.layer if first else None,
    )
