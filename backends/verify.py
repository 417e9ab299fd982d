"""Check a BackendReport against the real module state: a backend must not claim a precision its
modules do not hold. Used by the tests and available to the CLI (print the problems, fail the run)."""

from __future__ import annotations

import torch
from evalkit.backends.base import BackendReport, module_weight_bytes
from evalkit.backends.quant import describe_model
from torch import nn


def storage_tensor(mod: nn.Module) -> torch.Tensor | None:
    """The tensor that holds a module's weights (the backends' `weight_store` / `_evalkit_desc` contract)."""
    store = getattr(mod, "weight_store", None)
    desc = getattr(mod, "_evalkit_desc", None)
    name = store if isinstance(store, str) else (desc.get("weight_store") if isinstance(desc, dict) else "weight")
    t = getattr(mod, name, None)
    return t if isinstance(t, torch.Tensor) else None


def storage_mismatches(model: nn.Module, rows: list) -> list[str]:
    """Report rows whose module is missing or stores its weights in another dtype than the row claims."""
    problems = []
    for r in rows:
        try:
            mod = model.get_submodule(r.name)
        except AttributeError:
            problems.append(f"{r.name}: reported but not in the model")
            continue
        t = storage_tensor(mod)
        claimed = r.weight_dtype.split(" ", 1)[0]
        actual = None if t is None else str(t.dtype)
        if actual != claimed:
            problems.append(f"{r.name}: report claims weights {claimed}, module stores {actual}")
    return problems


def verify_report(model: nn.Module, report: BackendReport) -> list[str]:
    """Every mismatch between the report and the model, one line each (empty list: the report is true)."""
    problems = storage_mismatches(model, report.modules)
    for row in report.modules:
        try:
            mod = model.get_submodule(row.name)
        except AttributeError:
            continue  # already reported
        nbytes = module_weight_bytes(mod)
        if nbytes != row.weight_bytes:
            problems.append(f"{row.name}: report claims {row.weight_bytes} weight bytes, module holds {nbytes}")
    truth = {r.name: r for r in describe_model(model)}
    claimed = {r.name: r for r in report.modules}
    for name, t in truth.items():
        r = claimed.get(name)
        if r is None:
            problems.append(f"{name}: holds weights but is missing from the report")
        elif t.activation_precision != "-" and (r.activation_precision, r.kernel) != (t.activation_precision, t.kernel):
            problems.append(
                f"{name}: report claims act {r.activation_precision} / {r.kernel}; module runs act {t.activation_precision} / {t.kernel}"
            )
    total = module_weight_bytes(model)
    if report.weight_bytes_after != total:
        problems.append(f"report claims {report.weight_bytes_after} weight bytes after, model holds {total}")
    return problems
