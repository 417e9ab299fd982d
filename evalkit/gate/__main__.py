"""`python -m evalkit.gate candidate=RUN baseline=RUN [gate.max_drop=0.1] [tracking_uri=...] [json=out.json]`

Re-judges stored runs without re-running them. RUN: MLflow run id, run directory, `latest`
(baseline only), or a references key (ref:policy/backend/suite/steps). Exit 0 pass, 1 regression, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from evalkit.errors import EXIT_BAD_INPUT, BadInput
from evalkit.gate.config import GateConfig
from evalkit.gate.judge import judge
from evalkit.gate.render import print_gate
from evalkit.gate.runs import DEFAULT_TRACKING_URI, load_run

USAGE = "usage: python -m evalkit.gate candidate=RUN baseline=RUN [gate.<field>=VALUE ...] [tracking_uri=URI] [json=PATH]"


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
    if "candidate" not in opts:
        raise BadInput(f"candidate=RUN is required; {USAGE}")
    opts.setdefault("baseline", cfg.baseline or "")
    if not opts["baseline"]:
        raise BadInput(f"baseline=RUN (or gate.baseline=RUN) is required; {USAGE}")
    return opts, cfg


def main(argv: list[str] | None = None) -> int:
    try:
        opts, cfg = parse_args(sys.argv[1:] if argv is None else argv)
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
