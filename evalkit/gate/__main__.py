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
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from evalkit.errors import EXIT_BAD_INPUT, EXIT_PASS, BadInput
from evalkit.gate.config import GateConfig
from evalkit.gate.judge import judge
from evalkit.gate.plan import format_plan, plan
from evalkit.gate.render import print_gate
from evalkit.gate.runs import DEFAULT_TRACKING_URI, load_run

USAGE = "usage: python -m evalkit.gate candidate=RUN baseline=RUN [gate.<field>=VALUE ...] [tracking_uri=URI] [json=PATH]"
PLAN_USAGE = ("usage: python -m evalkit.gate plan baseline=RUN [margin=0.05] [alpha=0.05] [power=0.8] [family_size=1] "
              "[tracking_uri=URI]")


def parse_args(argv: list[str]) -> tuple[dict[str, str], GateConfig]:
    opts: dict[str, str] = {}
    gate_over: list[str] = []
    for a in argv:
        if "=" not in a:
            raise BadInput(f"argument '{a}' is not key=value; {USAGE}")
        k, v = a.split("=", 1)
        if k.startswith("gate."):
            gate_over.append(f"{k[5:]}={v}")
        elif k in ("candidate", "baseline", "tracking_uri", "json"):
            opts[k] = v
        else:
            raise BadInput(f"unknown argument '{k}'; {USAGE}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(GateConfig), OmegaConf.from_dotlist(gate_over))
    except OmegaConfBaseException as e:
        raise BadInput(f"bad gate override: {str(e).splitlines()[0]}") from None
    cfg: GateConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    cfg.validate()
    if "candidate" not in opts:
        raise BadInput(f"candidate=RUN is required; {USAGE}")
    opts.setdefault("baseline", cfg.baseline or "")
    if not opts["baseline"]:
        raise BadInput(f"baseline=RUN (or gate.baseline=RUN) is required; {USAGE}")
    return opts, cfg


def parse_plan_args(argv: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for a in argv:
        k, sep, v = a.partition("=")
        if not sep or k not in ("baseline", "margin", "alpha", "power", "family_size", "tracking_uri"):
            raise BadInput(f"bad plan argument '{a}'; {PLAN_USAGE}")
        opts[k] = v
    if not opts.get("baseline"):
        raise BadInput(f"baseline=RUN is required; {PLAN_USAGE}")
    try:
        nums = {k: float(opts[k]) for k in ("margin", "alpha", "power") if k in opts}
        size = int(opts.get("family_size", 1))
    except ValueError:
        raise BadInput(f"margin/alpha/power must be numbers and family_size an integer; {PLAN_USAGE}") from None
    for k, lo, hi in (("margin", 0, 1), ("alpha", 0, 0.5), ("power", 0, 1)):
        if k in nums and not lo < nums[k] < hi:
            raise BadInput(f"{k}={opts[k]} must be in ({lo}, {hi}); {PLAN_USAGE}")
    if size < 1:
        raise BadInput(f"family_size must be >= 1; {PLAN_USAGE}")
    return opts


def main_plan(argv: list[str]) -> int:
    d = GateConfig()
    opts = parse_plan_args(argv)
    base = load_run(opts["baseline"], opts.get("tracking_uri", DEFAULT_TRACKING_URI))
    p = plan(base, float(opts.get("margin", d.max_drop)), float(opts.get("alpha", d.alpha)),
             float(opts.get("power", d.power)), int(opts.get("family_size", 1)))
    print(format_plan(p))
    return EXIT_PASS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "plan":
            return main_plan(argv[1:])
        opts, cfg = parse_args(argv)
        uri = opts.get("tracking_uri", DEFAULT_TRACKING_URI)
        cand = load_run(opts["candidate"], uri)
        base = load_run(opts["baseline"], uri, like=cand.params, exclude_run_id=cand.ref)
        result = judge(cand, base, cfg)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print_gate(result)
    if opts.get("json"):
        Path(opts["json"]).write_text(json.dumps(result.to_dict(), indent=2))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
