"""The headline metrics: copies of the four numbers a reader of a run wants first, named to sort first in MLflow.

MLflow lists metric names in plain code-point order (the compare page's metric table, the column and chart
pickers) and its chart view groups `<prefix>/<name>` metrics into one section per prefix, sections in the same
order. Upper-case letters sort before lower-case ones, so the `Headline/` prefix puts success rate, its Wilson
interval and the p50 policy latency together at the top of every such list and in the chart view's first section,
titled "Headline" like MLflow's own "Model metrics" section. The DESIGN.md names (`success_rate`,
`success_ci_low`, `success_ci_high`, `latency_ms_p50`) are still logged beside them: queries, evalkit's own
readers and runs logged before the headline names existed use those.
"""

from __future__ import annotations

from typing import Mapping

HEADLINE_PREFIX = "Headline/"
# DESIGN.md name -> headline name (the order of this table is the order they are logged in)
HEADLINE = {
    "success_rate": f"{HEADLINE_PREFIX}success_rate",
    "success_ci_low": f"{HEADLINE_PREFIX}success_rate_ci_low",
    "success_ci_high": f"{HEADLINE_PREFIX}success_rate_ci_high",
    "latency_ms_p50": f"{HEADLINE_PREFIX}latency_p50_ms",
}
# Rounded for people reading them in MLflow's tables (0.3550 rather than 0.35500000000000004); the DESIGN.md
# names keep the full value.
_DECIMALS = {"latency_ms_p50": 2}


def headline_metrics(values: Mapping[str, float | None]) -> dict[str, float]:
    """The headline metrics of `values` (keyed by their DESIGN.md names); absent or None values are left out."""
    return {head: round(float(values[name]), _DECIMALS.get(name, 4)) for name, head in HEADLINE.items()
            if values.get(name) is not None}


def with_design_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics` with every DESIGN.md name a headline metric stands for filled in when only the headline one is
    there, and the headline names dropped: what readers of the DESIGN.md names expect."""
    out = {k: v for k, v in metrics.items() if not k.startswith(HEADLINE_PREFIX)}
    for name, head in HEADLINE.items():
        if name not in out and head in metrics:
            out[name] = metrics[head]
    return out
