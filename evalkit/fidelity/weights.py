"""Per-layer weight checks: each layer's effective weights match its own reference layer, and layers stay
distinct from each other (catches "every layer runs layer 0's weights"). torch does the math.

The effective weight of a module is what its kernel multiplies by: `module.dequantized_weight()` for
quantized modules (the backends' QuantLinear contract), `weight.dequantize()` for tensor subclasses
(torchao), else the plain `weight`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from evalkit.fidelity.metrics import sqnr_db

FINGERPRINT_SAMPLES = 4096


def effective_weight(mod: nn.Module) -> torch.Tensor | None:
    if hasattr(mod, "dequantized_weight"):
        return mod.dequantized_weight().detach().float()
    w = mod._parameters.get("weight", None) if hasattr(mod, "_parameters") else None
    if w is None:
        w = getattr(mod, "_buffers", {}).get("weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    if hasattr(w, "dequantize") and not isinstance(w, nn.Parameter) and type(w) is not torch.Tensor:
        return w.dequantize().detach().float()
    return w.detach().float()


def layer_weights(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules (in the weight sense) of a layer that hold a weight, in registration order.

    A quantized module counts as a leaf even if it has children; modules below it are not listed twice.
    """
    out: list[tuple[str, nn.Module]] = []
    skip: tuple[str, ...] = ()
    for name, mod in layer.named_modules():
        if skip and any(name.startswith(s + ".") for s in skip):
            continue
        if hasattr(mod, "dequantized_weight"):
            out.append((name, mod))
            skip = skip + (name,)
            continue
        if any(True for _ in mod.children()):
            continue
        if isinstance(mod._parameters.get("weight", None), torch.Tensor) or isinstance(mod._buffers.get("weight", None), torch.Tensor):
            out.append((name, mod))
    return out


def fingerprint(w: torch.Tensor) -> torch.Tensor:
    """A small fixed sample of a weight's entries plus its norm: equal fingerprints <=> (almost surely) equal weights."""
    flat = w.flatten()
    g = torch.Generator().manual_seed(flat.numel())  # same positions for every weight of this size
    idx = torch.randint(0, flat.numel(), (min(FINGERPRINT_SAMPLES, flat.numel()),), generator=g).to(flat.device)
    return torch.cat([flat[idx].double().cpu(), flat.double().norm().reshape(1).cpu()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-6, atol=1e-9))


@dataclass
class WeightFindings:
    worst_sqnr_db: float
    worst_module: str | None
    mismatched: list[str]  # "<layer>.<module>: SQNR x dB"
    shared: list[str]  # "<layer j> == <layer i> (<module>)"
    unmatched: list[str]  # modules only one side has
    compared: int


def _pair_modules(ref_layer: nn.Module, cand_layer: nn.Module) -> tuple[list[tuple[str, nn.Module, nn.Module]], list[str]]:
    ref = layer_weights(ref_layer)
    cand = layer_weights(cand_layer)
    cmap = dict(cand)
    pairs, unmatched = [], []
    if all(n in cmap for n, _ in ref):
        pairs = [(n, m, cmap[n]) for n, m in ref]
    elif len(ref) == len(cand):  # a wrapper renamed modules (e.g. mlp -> mlp.inner): pair in order
        pairs = [(rn, rm, cm) for (rn, rm), (_, cm) in zip(ref, cand)]
        unmatched.append(f"names differ ({', '.join(n for n, _ in cand if n not in dict(ref))}); paired in order")
    else:
        pairs = [(n, m, cmap[n]) for n, m in ref if n in cmap]
        unmatched += [f"{n} (reference only)" for n, _ in ref if n not in cmap]
        unmatched += [f"{n} (candidate only)" for n, _ in cand if n not in dict(ref)]
    return pairs, unmatched


@torch.no_grad()
def compare_stacks(
    ref_stacks: dict[str, nn.ModuleList], cand_stacks: dict[str, nn.ModuleList], weight_sqnr_min_db: float
) -> WeightFindings:
    worst, worst_name = math.inf, None
    mismatched: list[str] = []
    shared: list[str] = []
    unmatched: list[str] = []
    compared = 0
    for stack, ref_layers in ref_stacks.items():
        cand_layers = cand_stacks.get(stack)
        if cand_layers is None or len(cand_layers) != len(ref_layers):
            unmatched.append(f"stack {stack}: reference has {len(ref_layers)} layers, candidate {0 if cand_layers is None else len(cand_layers)}")
            continue
        fps_ref: dict[str, list[tuple[int, torch.Tensor]]] = {}
        fps_cand: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for i, (rl, cl) in enumerate(zip(ref_layers, cand_layers)):
            pairs, um = _pair_modules(rl, cl)
            unmatched += [f"{stack}.layers.{i}: {u}" for u in um]
            for name, rm, cm in pairs:
                wr, wc = effective_weight(rm), effective_weight(cm)
                if wr is None or wc is None:
                    continue
                full = f"{stack}.layers.{i}.{name}"
                compared += 1
                if wr.shape != wc.shape:
                    mismatched.append(f"{full}: shape {tuple(wc.shape)} vs reference {tuple(wr.shape)}")
                    worst, worst_name = -math.inf, full
                    continue
                s = sqnr_db(wr, wc)
                if s < worst:
                    worst, worst_name = s, full
                if s < weight_sqnr_min_db:
                    mismatched.append(f"{full}: SQNR {s:.1f} dB")
                fps_ref.setdefault(name, []).append((i, fingerprint(wr)))
                fps_cand.setdefault(name, []).append((i, fingerprint(wc)))
        for name, cand_list in fps_cand.items():
            ref_fp = dict(fps_ref[name])
            for a in range(len(cand_list)):
                for b in range(a):
                    (i, fi), (j, fj) = cand_list[a], cand_list[b]
                    if _same(fi, fj) and not _same(ref_fp[i], ref_fp[j]):
                        shared.append(f"{stack}.layers.{i} == {stack}.layers.{j} ({name})")
                        break
    return WeightFindings(worst, worst_name, mismatched, shared, unmatched, compared)
