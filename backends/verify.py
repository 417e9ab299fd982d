"""Check a BackendReport against the real module state: a backend must not claim a precision its
modules do not hold. Used by the tests and available to the CLI (print the problems, fail the run)."""

from __future__ import annotations

from torch import nn

from backends.base import BackendReport, module_weight_bytes
from backends.quant import describe_model


def _storage_dtype(mod: nn.Module) -> str | None:
    store = getattr(mod, "weight_store", None)
    desc = getattr(mod, "_evalkit_desc", None)
    name = store if isinstance(store, str) else (desc["weight_store"] if desc else "weight")
    t = getattr(mod, name, None)
    return None if t is None else str(t.dtype)


def verify_report(model: nn.Module, report: BackendReport) -> list[str]:
    """Every mismatch between the report and the model, one line each (empty list: the report is true)."""
    problems: list[str] = []
    seen = set()
    for row in report.modules:
        seen.add(row.name)
        try:
            mod = model.get_submodule(row.name)
        except AttributeError:
            problems.append(f"{row.name}: reported but not in the model")
            continue
        actual = _storage_dtype(mod)
        claimed = row.weight_dtype.split(" ", 1)[0]
        if actual != claimed:
            problems.append(f"{row.name}: report claims weights {claimed}, module stores {actual}")
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
