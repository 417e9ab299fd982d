"""`python -m evalkit.gate candidate=RUN baseline=RUN [gate.max_drop=0.1] [tracking_uri=...] [json=out.json]`
`python -m evalkit.gate plan baseline=RUN [margin=0.05] [alpha=0.05] [power=0.8] [family_size=1] [tracking_uri=...]`

Re-judges stored runs without re-running them; `plan` prints how many episodes a candidate needs against a
baseline. RUN: MLflow run id, run directory, `latest` (baseline only), or a references key
(ref:policy/backend/suite/steps). Exit 0 pass or inconclusive (1 with gate.fail_inconclusive=true),
1 regression, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from evalkit.cli_args import opt, parse
from evalkit.errors import EXIT_BAD_INPUT, EXIT_PASS, BadInput
from evalkit.gate.config import GateConfig
from evalkit.gate.judge import judge
from evalkit.gate.plan import format_plan, plan
from evalkit.gate.render import print_gate
from evalkit.gate.runs import DEFAULT_TRACKING_URI, load_run

PROG = "python -m evalkit.gate"
RUN_HELP = "MLflow run id, run dir, latest, or ref:policy/backend/suite/steps"
_D = GateConfig()


@dataclass
class GateOptions:
    candidate: str = opt(help=f"the run to judge: {RUN_HELP}")
    baseline: str = opt("", f"the run to judge against (default gate.baseline): {RUN_HELP}")
    tracking_uri: str = opt(DEFAULT_TRACKING_URI, "MLflow store the run ids and `latest` are looked up in")
    json: Optional[str] = opt(None, "also write the verdict as JSON to this path")
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass
class PlanOptions:
    baseline: str = opt(help=f"the baseline the candidate will be judged against: {RUN_HELP}")
    margin: float = opt(_D.max_drop, "the drop to detect (gate.max_drop)")
    alpha: float = opt(_D.alpha, "false-alarm rate (gate.alpha)")
    power: float = opt(_D.power, "probability of catching a drop of `margin` (gate.power)")
    family_size: int = opt(1, "comparisons judged together (gate.family_size)")
    tracking_uri: str = opt(DEFAULT_TRACKING_URI, "MLflow store the baseline is looked up in")


def parse_args(argv: list[str]) -> GateOptions:
    opts = parse(GateOptions, argv, prog=PROG, about="re-judge stored runs without re-running them",
                 notes=[f"{PROG} plan --help: how many episodes a candidate needs against a baseline"])
    opts.gate.validate()
    opts.baseline = opts.baseline or opts.gate.baseline or ""
    if not opts.baseline:
        raise BadInput(f"baseline=RUN (or gate.baseline=RUN) is required; usage: {PROG} candidate=RUN baseline=RUN "
                       "[key=value ...]")
    return opts


def parse_plan_args(argv: list[str]) -> PlanOptions:
    opts = parse(PlanOptions, argv, prog=f"{PROG} plan", about="episodes a candidate needs against a baseline")
    for k, lo, hi in (("margin", 0, 1), ("alpha", 0, 0.5), ("power", 0, 1)):
        if not lo < getattr(opts, k) < hi:
            raise BadInput(f"{k}={getattr(opts, k):g} must be in ({lo}, {hi})")
    if opts.family_size < 1:
        raise BadInput("family_size must be >= 1")
    return opts


def main_plan(argv: list[str]) -> int:
    o = parse_plan_args(argv)
    base = load_run(o.baseline, o.tracking_uri)
    print(format_plan(plan(base, o.margin, o.alpha, o.power, o.family_size)))
    return EXIT_PASS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "plan":
            return main_plan(argv[1:])
        opts = parse_args(argv)
        cand = load_run(opts.candidate, opts.tracking_uri)
        base = load_run(opts.baseline, opts.tracking_uri, like=cand.params, exclude_run_id=cand.ref)
        result = judge(cand, base, opts.gate)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print_gate(result)
    if opts.json:
        Path(opts.json).write_text(json.dumps(result.to_dict(), indent=2))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
