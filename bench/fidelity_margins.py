"""How far healthy backends sit from the fidelity gate's budgets: every check statistic per backend, against the
reference backend, on the held-out check probes.

Prints a table (backend, precision class, verdict, weight SQNR, per-layer update / hidden state / action SQNR p50
and min, least headroom over the budgets) and writes bench/results/fidelity_margins.json with the machine,
versions and command. docs/fidelity.md's "Measured" tables are this output.

    python bench/fidelity_margins.py policy=reference                       # default gate (bf16 reference)
    python bench/fidelity_margins.py policy=reference reference=fp32 margin_db=2 out=...  # gate=strict's settings
"""

from __future__ import annotations

import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from evalkit.backends.registry import backend_from_config  # noqa: E402
from evalkit.suites.specs import get_suite  # noqa: E402

from evalkit.fidelity.budgets import class_of_backend  # noqa: E402
from evalkit.fidelity.config import FidelityConfig  # noqa: E402
from evalkit.fidelity.run import linear_names, run_fidelity, targeted_names  # noqa: E402
from evalkit.fidelity.stage import build_reference, calibration_set, check_probes  # noqa: E402
from evalkit.policies.registry import build_policy  # noqa: E402
from evalkit.provenance import git_sha, package_versions  # noqa: E402

# "name key=value ...": the backends a user compares, at their default targets and on every target
DEFAULT_BACKENDS = [
    "bf16", "fp16", "fp32", "fp8 engine=emulated", "fp8_weight_only", "int8", "int8_weight_only", "int4",
    "nvfp4 engine=emulated", "w4a8 engine=emulated", "torch_trt_fp8 engine=fake_quant",
    "fp8 engine=emulated targets=all", "int8 targets=all", "int4 targets=prefix_mlp,expert_mlp",
    "nvfp4 engine=emulated targets=all",
]


@dataclass
class Options:
    policy: str = "reference"
    suite: str = "libero_spatial_quick"
    reference: str = "bf16"
    margin_db: float = 0.0
    denoise_steps: int = 10
    backends: list = field(default_factory=lambda: list(DEFAULT_BACKENDS))
    out: str = "bench/results/fidelity_margins.json"


def parse(argv: list[str]) -> Options:
    opts = Options()
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not hasattr(opts, key):
            raise SystemExit(f"unknown argument '{arg}'; valid keys: {', '.join(Options.__dataclass_fields__)}")
        setattr(opts, key, yaml.safe_load(value) if key != "backends" else [b for b in value.split(";") if b])
    return opts


def backend_config(spec: str) -> dict:
    name, *rest = spec.split()
    cfg: dict = {"name": name, "targets": "prefix_mlp", "engine": "native", "options": {}}
    for kv in rest:
        k, _, v = kv.partition("=")
        if k.startswith("options."):
            cfg["options"][k[len("options."):]] = yaml.safe_load(v)
        else:
            cfg[k] = v
    return cfg


def stats(fid, reference_model, targets: str) -> dict:
    tn = targeted_names(linear_names(reference_model), targets)
    action = next(c for c in fid.checks if c.name == "action_sqnr")
    a50, amin = (float(v) for v in re.search(r"p50 (\S+) dB, min (\S+) dB", action.detail).groups())
    return {
        "weight_db": min([v for k, v in fid.weight_sqnr_db.items() if k in tn] or [math.inf]),
        "layer_p50_db": min(r.update_p50_db for r in fid.layers), "layer_min_db": min(r.update_min_db for r in fid.layers),
        "state_p50_db": min(r.state_p50_db for r in fid.layers), "state_min_db": min(r.state_min_db for r in fid.layers),
        "action_p50_db": a50, "action_min_db": amin,
    }


def headroom(row: dict, budget: dict) -> float:
    keys = ("layer_p50", "layer_min", "state_p50", "state_min", "action_p50", "action_min")
    return min(row[f"{k}_db"] - budget[k] for k in keys)


def main(argv: list[str]) -> int:
    opts = parse(argv)
    pcfg = yaml.safe_load((REPO / "conf" / "policy" / f"{opts.policy}.yaml").read_text())
    pcfg["denoise_steps"] = opts.denoise_steps
    spec = get_suite(opts.suite)
    cfg = FidelityConfig(reference_backend=opts.reference, margin_db=opts.margin_db)
    probes = check_probes(spec, cfg, bool(getattr(build_policy(dict(pcfg), "cpu"), "needs_images", True)))
    reference = build_reference(pcfg, "cpu", opts.reference)
    rows = []
    print(f"policy={opts.policy} reference={opts.reference} margin_db={opts.margin_db} probes={len(probes)}")
    print(f"{'backend':36s} {'class':7s} verdict  weight   layer p50/min   state p50/min  action p50/min  headroom")
    for spec_str in opts.backends:
        t0 = time.perf_counter()
        bc = backend_config(spec_str)
        policy = build_policy(dict(pcfg), "cpu")
        backend = backend_from_config(bc)
        report = backend.apply(policy.model, calibration_set(policy, spec, cfg).items)
        cls, src = class_of_backend(backend)
        fid = run_fidelity(reference, policy, probes, report, cfg, cls, src, opts.denoise_steps, backend.targets)
        row = {"backend": spec_str, "class": cls, "passed": fid.passed, "failed": [c.name for c in fid.failed()],
               **stats(fid, reference.model, backend.targets), "seconds": round(time.perf_counter() - t0, 1)}
        row["headroom_db"] = headroom(row, fid.budget)
        rows.append(row)
        f = lambda v: "inf" if v == math.inf else f"{v:.1f}"  # noqa: E731
        print(f"{spec_str[:36]:36s} {cls:7s} {'pass' if fid.passed else 'FAIL':7s} {f(row['weight_db']):>6s}  "
              f"{f(row['layer_p50_db']):>6s}/{f(row['layer_min_db']):<6s}  {f(row['state_p50_db']):>6s}/{f(row['state_min_db']):<6s}"
              f"  {f(row['action_p50_db']):>6s}/{f(row['action_min_db']):<6s}  {f(row['headroom_db'])}")
    out = {"command": " ".join(["python bench/fidelity_margins.py", *argv]), "machine": platform.node(),
           "cpu": platform.processor() or platform.machine(), "git_sha": git_sha(), "versions": package_versions(),
           "date": time.strftime("%Y-%m-%d"), "policy": opts.policy, "suite": opts.suite, "reference": opts.reference,
           "margin_db": opts.margin_db, "probes": len(probes),
           "rows": [{k: (None if math.isinf(v) else round(v, 2)) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}
    path = REPO / opts.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
