"""`python -m evalkit.nightly [key=value ...]`: run the nightly matrix, judge every cell, report, exit non-zero on regression.

The matrix (conf/experiment/nightly.yaml: backends x suites x denoise_steps) runs cell by cell through a
`runner` callable; the real one calls the evalkit CLI as a subprocess. The candidates are judged as one
family (evalkit.gate.family.judge_family) against their suite's baseline cell (paired on episodes when
both have tables): Holm's adjustment by default, so an unchanged stack fails a night with probability
<= alpha however many cells it has. With `gate.sequential` (on in nightly.yaml) each candidate cell is
started with its baseline and the family size, so its run can stop early once the group-sequential test
has decided (evalkit.gate.sequential). The report (evalkit.report: Markdown + self-contained HTML) and
every verdict are logged to MLflow under a parent run tagged evalkit.nightly=true. OmegaConf reads the
config; MLflow's client does the logging.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from evalkit.cli_args import parse
from evalkit.config import CONF_DIR
from evalkit.errors import EXIT_BAD_INPUT, EXIT_PASS, EXIT_REGRESSION, BadInput
from evalkit.gate.config import GateConfig
from evalkit.gate.family import judge_family
from evalkit.gate.runs import StoredRun, load_run
from evalkit.policies.base import DEFAULT_DENOISE_STEPS
from evalkit.report import ReportRun, write_report
from evalkit.tracking.store import DEFAULT_URI

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = CONF_DIR / "experiment" / "nightly.yaml"


@dataclass
class NightlyConfig:
    policy: str = "reference"  # the policy every cell runs
    baseline_backend: str = "bf16"  # backend of each suite's baseline cell (baseline=matrix)
    baseline_denoise_steps: int = DEFAULT_DENOISE_STEPS  # denoise steps of each suite's baseline cell (baseline=matrix)
    baseline: str = "matrix"  # matrix | latest | ref:<key>
    backends: list[str] = field(default_factory=lambda: ["bf16"])  # matrix: candidate backends
    suites: list[str] = field(default_factory=lambda: ["libero_spatial_quick"])  # matrix: suites ([]: `covers`)
    # the suites each policy succeeds on, so its success rates can show a drop (a suite at 0 % cannot)
    covers: dict = field(default_factory=dict)
    denoise_steps: list[int] = field(default_factory=lambda: [DEFAULT_DENOISE_STEPS])  # matrix: denoise steps
    overrides: list[str] = field(default_factory=list)  # extra overrides of every cell's run, e.g. [suite.trials=2]
    output_dir: str = "outputs/nightly"  # the night's folder <output_dir>/<timestamp> (cells, report)
    tracking_uri: str = DEFAULT_URI  # MLflow store of the cells and the parent run
    experiment: str = "evalkit-nightly"  # MLflow experiment of the parent run
    timeout_s: int = 14400  # per cell
    gate: dict = field(default_factory=dict)  # gate overrides (conf/gate fields), e.g. gate.alpha=0.01


@dataclass(frozen=True)
class Cell:
    policy: str
    backend: str
    suite: str
    denoise_steps: int

    @property
    def label(self) -> str:
        return f"{self.backend} / {self.suite} / {self.denoise_steps} steps"

    @property
    def slug(self) -> str:
        return f"{self.backend}_{self.suite}_d{self.denoise_steps}"


@dataclass
class CellResult:
    cell: Cell
    run_dir: Path
    returncode: int
    run: StoredRun | None = None
    error: str | None = None
    gate: dict[str, Any] | None = None
    is_baseline: bool = False


Runner = Callable[[Cell, Path, list], int]  # (cell, run_dir, overrides) -> exit code; writes summary.json into run_dir


def load_config(argv: list[str], path: Path = DEFAULT_CONFIG) -> NightlyConfig:
    """nightly.yaml merged with key=value overrides (config=<file> picks another file), validated by the dataclass."""
    cfg = parse(NightlyConfig, argv, prog="python -m evalkit.nightly", config=path,
                about="run the nightly matrix, judge every cell, report, exit 1 on regression")
    if not cfg.suites:
        if cfg.policy not in cfg.covers:
            raise BadInput(f"nightly suites=[] takes the suites policy '{cfg.policy}' covers, but `covers` lists only "
                           f"{sorted(cfg.covers)}: name the suites (suites=[libero_spatial,...]) or add it to covers")
        cfg.suites = list(cfg.covers[cfg.policy])
    if not cfg.backends or not cfg.suites or not cfg.denoise_steps:
        raise BadInput("nightly matrix is empty: backends, suites and denoise_steps need at least one value each")
    return cfg


def gate_config(cfg: NightlyConfig) -> GateConfig:
    try:
        g: GateConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GateConfig), cfg.gate or {}))  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise BadInput(f"nightly gate overrides: {str(e).splitlines()[0]}") from None
    return g.validate()


STAT_FIELDS = ("alpha", "power", "max_drop", "sequential", "family_method", "fail_inconclusive")


def cell_overrides(cell: Cell, base: dict[str, Cell], cfg: NightlyConfig, gcfg: GateConfig, root: Path,
                   family_size: int) -> list[str]:
    """Extra overrides of a candidate cell when the gate is sequential: its baseline (so the run can stop early)
    and the statistics settings the nightly judges with, family size included (its early stops use alpha / K)."""
    if not gcfg.sequential or (cfg.baseline == "matrix" and cell == base[cell.suite]):
        return []
    if cfg.baseline == "matrix":
        b = root / base[cell.suite].slug
        if not (b / "summary.json").exists():
            return []  # the baseline cell failed: this cell runs its full size and is reported without a baseline
        baseline = str(b)
    elif cfg.baseline.startswith("ref:"):
        return []  # a reference has no episodes to pair with: no early stop possible
    else:
        baseline = cfg.baseline
    stats = [f"gate.{k}={str(getattr(gcfg, k)).lower() if isinstance(getattr(gcfg, k), bool) else getattr(gcfg, k)}"
             for k in STAT_FIELDS]
    return [f"baseline={baseline}", *stats, f"gate.family_size={family_size}"]


def matrix(cfg: NightlyConfig) -> tuple[list[Cell], dict[str, Cell]]:
    """All cells (baselines first when baseline=matrix) and, per suite, the baseline cell."""
    base = {s: Cell(cfg.policy, cfg.baseline_backend, s, int(cfg.baseline_denoise_steps)) for s in cfg.suites}
    cells = [Cell(cfg.policy, b, s, int(d)) for s in cfg.suites for b in cfg.backends for d in cfg.denoise_steps]
    if cfg.baseline == "matrix":
        cells = list(base.values()) + [c for c in cells if c not in base.values()]
    return cells, base


def subprocess_runner(timeout_s: int) -> Runner:
    def run(cell: Cell, run_dir: Path, overrides: list) -> int:
        cmd = [sys.executable, "-m", "evalkit", f"policy={cell.policy}", f"backend={cell.backend}", f"suite={cell.suite}",
               f"denoise_steps={cell.denoise_steps}", f"hydra.run.dir={run_dir}", *map(str, overrides)]
        print("nightly: $ " + " ".join(cmd), flush=True)
        try:
            return subprocess.run(cmd, cwd=REPO, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            return 124

    return run


def run_cells(cells: list[Cell], root: Path, runner: Runner, overrides: list,
              extra: Callable[[Cell], list] | None = None) -> dict[Cell, CellResult]:
    out: dict[Cell, CellResult] = {}
    for cell in cells:
        run_dir = root / cell.slug
        t0 = time.time()
        code = runner(cell, run_dir, list(overrides) + (extra(cell) if extra else []))
        res = CellResult(cell, run_dir, code)
        if (run_dir / "summary.json").exists():
            res.run = load_run(str(run_dir))
            res.run.ref = cell.label
        else:
            res.error = f"exit {code}, no summary.json in {run_dir}"
        print(f"nightly: {cell.label}: exit {code} in {time.time() - t0:.0f} s", flush=True)
        out[cell] = res
    return out


def judged_cells(cells: list[Cell], base: dict[str, Cell], cfg: NightlyConfig) -> list[Cell]:
    """The cells the gate judges (the family): every cell but the matrix baselines."""
    return [c for c in cells if not (cfg.baseline == "matrix" and c == base[c.suite])]


def judge_cells(results: dict[Cell, CellResult], base: dict[str, Cell], cfg: NightlyConfig, gcfg: GateConfig) -> dict:
    """Fill each result's gate verdict (a dict), judging all candidates as one family; baseline cells of a
    matrix baseline are not judged. Returns the family's description (method, size, alpha)."""
    pending: list[tuple[CellResult, StoredRun, StoredRun]] = []
    for cell, res in results.items():
        if cfg.baseline == "matrix" and cell == base[cell.suite]:
            res.is_baseline = True
            if res.run is None:
                continue
            fid = res.run.summary.fidelity
            if fid and not fid.passed:
                res.error = "baseline failed its own fidelity checks"
            continue
        if res.run is None:
            continue
        try:
            if cfg.baseline == "matrix":
                b = results.get(base[cell.suite])
                if b is None or b.run is None:
                    res.error = f"baseline {base[cell.suite].label} has no results"
                    continue
                baseline = b.run
            else:
                baseline = load_run(cfg.baseline, cfg.tracking_uri, like=res.run.params)
            pending.append((res, res.run, baseline))
        except BadInput as e:
            res.error = f"gate: {e}"
    verdicts = judge_family([(c, b) for _, c, b in pending], gcfg)
    for (res, _, _), v in zip(pending, verdicts):
        if isinstance(v, BadInput):
            res.error = f"gate: {v}"
        else:
            res.gate = v.to_dict()
    size = sum(not isinstance(v, BadInput) for v in verdicts)
    return {"method": gcfg.family_method, "size": size, "alpha": gcfg.alpha, "sequential": gcfg.sequential}


def verdict(res: CellResult) -> str:
    """ERROR | REGRESSION | INCONCLUSIVE | PASS | BASELINE | NOT JUDGED for one cell."""
    if res.error is not None:
        return "ERROR"
    if res.gate is None:
        return "BASELINE" if res.is_baseline else "NOT JUDGED"
    v = res.gate.get("verdict") or ("pass" if res.gate.get("passed") else "regression")
    return v.upper()


def failed(res: CellResult, fail_inconclusive: bool = False) -> bool:
    v = verdict(res)
    return v in ("ERROR", "REGRESSION") or (fail_inconclusive and v == "INCONCLUSIVE")


PARENT_ENV = "EVALKIT_PARENT_RUN_ID"  # evalkit.tracking's variable: children that honour it nest under the parent


def start_parent(cfg: NightlyConfig, name: str) -> str:
    """Create the MLflow parent run (tag evalkit.nightly=true) before the cells run, so they can nest under it."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
    run = client.create_run(exp_id, run_name=f"nightly {name}", tags={"evalkit.nightly": "true"})
    rid = run.info.run_id
    for k in ("policy", "baseline_backend", "baseline_denoise_steps", "baseline"):
        client.log_param(rid, k, getattr(cfg, k))
    client.log_param(rid, "matrix", f"{list(cfg.backends)} x {list(cfg.suites)} x {list(cfg.denoise_steps)}")
    return rid


def finish_parent(cfg: NightlyConfig, rid: str, root: Path, results: dict[Cell, CellResult], passed: bool) -> None:
    """Log the report, the verdicts and the pass/fail tag to the parent run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    client.set_tag(rid, "evalkit.nightly.passed", str(passed).lower())
    client.log_metric(rid, "runs", len(results))
    client.log_metric(rid, "regressions", sum(failed(r) for r in results.values()))
    client.log_metric(rid, "inconclusive", sum(verdict(r) == "INCONCLUSIVE" for r in results.values()))
    for f in ("report.md", "report.html", "nightly.json"):
        client.log_artifact(rid, str(root / f))
    for res in results.values():  # link children whose run id the CLI recorded in summary.json
        child = res.run.summary.mlflow_run_id if res.run else None
        if child:
            try:
                client.set_tag(child, "mlflow.parentRunId", rid)
            except Exception as e:  # a child in another store must not hide the verdicts
                print(f"nightly: could not link child run {child}: {e}", file=sys.stderr)
    client.set_terminated(rid, "FINISHED")


def run_nightly(cfg: NightlyConfig, runner: Runner | None = None, stamp: str | None = None) -> tuple[int, Path]:
    """Run the matrix, judge, write + log the report. Returns (exit code, nightly folder)."""
    gcfg = gate_config(cfg)
    stamp = stamp or datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    root = Path(cfg.output_dir) / stamp
    root.mkdir(parents=True, exist_ok=True)
    cells, base = matrix(cfg)
    parent = None
    try:
        parent = start_parent(cfg, stamp)
        os.environ[PARENT_ENV] = parent
    except Exception as e:  # the matrix still runs; the verdict still decides the exit code
        print(f"nightly: could not create the MLflow parent run at {cfg.tracking_uri}: {e}", file=sys.stderr)
    overrides = [f"tracking.uri={cfg.tracking_uri}", *cfg.overrides]  # children log to the same store
    family_size = len(judged_cells(cells, base, cfg))
    try:
        results = run_cells(cells, root, runner or subprocess_runner(cfg.timeout_s), overrides,
                            extra=lambda c: cell_overrides(c, base, cfg, gcfg, root, family_size))
    finally:
        os.environ.pop(PARENT_ENV, None)
    gcfg = replace(gcfg, family_size=family_size)  # the cells' early stops used alpha / family_size: judge alike
    family = judge_cells(results, base, cfg, gcfg)
    bad = [r for r in results.values() if failed(r, gcfg.fail_inconclusive)]
    unsure = [r for r in results.values() if verdict(r) == "INCONCLUSIVE"]
    passed = not bad
    report_runs = [
        ReportRun(label=("[baseline] " if r.is_baseline else "") + c.label,
                  summary=(r.run.summary if r.run else {"params": {"backend": c.backend, "suite": c.suite,
                                                                   "denoise_steps": c.denoise_steps}}),
                  gate=r.gate, link=str(r.run_dir), error=r.error)
        for c, r in results.items()
    ]
    notes = [f"policy {cfg.policy}; baseline {cfg.baseline} ({cfg.baseline_backend}, {cfg.baseline_denoise_steps} steps); "
             f"gate alpha={gcfg.alpha} power={gcfg.power} max_drop={gcfg.max_drop} (non-inferiority margin) "
             f"max_latency_ratio={gcfg.max_latency_ratio}",
             f"family: {family['size']} judged cells, {family['method']} adjustment of the regression p-values, "
             f"family-wise alpha {gcfg.alpha}; {'sequential' if gcfg.sequential else 'fixed-size'} tests "
             f"(docs/gate_statistics.md)"]
    write_report(report_runs, root, title=f"evalkit nightly {stamp}", notes=notes)
    (root / "nightly.json").write_text(json.dumps({
        "passed": passed,
        "family": family,
        "cells": [{"cell": c.label, "run_dir": str(r.run_dir), "returncode": r.returncode, "baseline": r.is_baseline,
                   "verdict": verdict(r), "error": r.error, "gate": r.gate} for c, r in results.items()],
    }, indent=2, default=str))
    if parent is not None:
        try:
            finish_parent(cfg, parent, root, results, passed)
            print(f"nightly: MLflow parent run {parent} ({cfg.tracking_uri})")
        except Exception as e:  # the verdict stands even when the store is unreachable; say so loudly
            print(f"nightly: could not log the report to MLflow at {cfg.tracking_uri}: {e}", file=sys.stderr)
    for r in bad:
        why = r.error or ", ".join(c["name"] for c in r.gate["checks"] if c.get("status") in ("fail", "inconclusive"))
        print(f"nightly: {verdict(r)} {r.cell.label}: {why}")
    for r in unsure:
        if r not in bad:
            print(f"nightly: INCONCLUSIVE {r.cell.label}: {'; '.join(w for w in r.gate.get('warnings', []) if w.startswith('inconclusive')) or 'not decided'}")
    word = "FAIL" if not passed else ("PASS with inconclusive cells" if unsure else "PASS")
    print(f"nightly: {word}: report {root / 'report.html'}")
    return (EXIT_PASS if passed else EXIT_REGRESSION), root


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        code, _ = run_nightly(cfg)
    except BadInput as e:
        print(f"nightly: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return code


if __name__ == "__main__":
    sys.exit(main())
