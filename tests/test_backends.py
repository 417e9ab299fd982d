"""Quantization backends on pi05_tiny (CPU): what runs matches what the report says, quantized kernels
apply their scales, GPU-only engines refuse the CPU with one clear line, and each fault backend plants
exactly the fault it names."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from evalkit.backends.base import Backend, BackendReport, module_weight_bytes
from evalkit.backends.quant import QuantLinear, describe_model
from evalkit.backends.registry import BACKENDS, backend_from_config, get_backend
from evalkit.backends.targets import select_linears
from evalkit.backends.verify import verify_report
from torch import nn

from evalkit.errors import BadInput, CapabilityError
from evalkit.policies.base import ObsBatch, Observation
from tests.conftest import quant_linear_reference

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
MLPS = "prefix_mlp,expert_mlp"

# (backend, options, targets, tolerance of the relative weight error of dequantized_weight())
CPU_RUNNABLE = [
    ("fp8", {"engine": "emulated"}, "all", 0.05),
    ("fp8_weight_only", {}, "all", 0.05),
    ("int8", {}, "all", 0.02),
    ("int8_weight_only", {}, "all", 0.02),
    ("int4", {"group_size": 32}, MLPS, 0.15),
    ("int4", {"group_size": 32, "engine": "emulated"}, MLPS, 0.15),
    ("sparse24", {"engine": "emulated"}, "all", 0.75),
    ("sparse24", {"engine": "emulated", "dtype": "int8"}, "all", 0.75),
    ("nvfp4", {"engine": "emulated"}, "all", 0.2),
    ("w4a8", {"engine": "emulated", "group_size": 32}, MLPS, 0.2),
    ("torch_trt_fp8", {"engine": "fake_quant"}, "all", 0.1),
]
GPU_ONLY = [
    ("fp8", {}, "compute capability >= 8.9"),
    ("sparse24", {}, "compute capability >= 8.0"),
    ("sparse24", {"dtype": "int8"}, "compute capability >= 8.0"),
    ("nvfp4", {}, "compute capability >= 10.0"),
    ("w4a8", {}, "compute capability >= 10.0"),
]


def tiny_policy():
    from evalkit.policies.pi05.policy import build

    cfg = yaml.safe_load((ROOT / "conf/policy/pi05_tiny.yaml").read_text())
    return build(cfg, CPU)


def probe_batch(n: int = 2, seed: int = 0) -> ObsBatch:
    rng = np.random.default_rng(seed)
    return ObsBatch(
        [
            Observation(
                state=rng.standard_normal(8).astype(np.float32),
                instruction="put the black bowl on the plate",
                episode_key=f"probe/{i}",
                step=0,
                agentview=rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
                wrist=rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
            )
            for i in range(n)
        ]
    )


def mlp_outputs(policy, batch) -> dict[str, torch.Tensor]:
    """Output of every decoder layer's `mlp` (prefix and expert) during one predict."""
    seen: dict[str, torch.Tensor] = {}
    current = [""]
    hooks, mlps = [], {}
    for stack in ("prefix", "expert"):
        for i, layer in enumerate(getattr(policy.model, stack).layers):
            key = f"{stack}.{i}"
            hooks.append(layer.register_forward_pre_hook(lambda m, a, key=key: current.__setitem__(0, key)))
            hooks.append(layer.register_forward_hook(lambda m, a, o, key=key: seen.__setitem__(key + ".out", o.detach().float().clone())))
            mlps[id(layer.mlp)] = layer.mlp  # a shared module gets one hook; the layer pre-hook says who called it
    for mlp in mlps.values():
        hooks.append(mlp.register_forward_hook(lambda m, a, o: seen.__setitem__(current[0] + ".mlp", o.detach().float().clone())))
    policy.predict(batch, noise_seed=0)
    for h in hooks:
        h.remove()
    return seen


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def reference():
    """bf16 pi05_tiny: original target weights (fp32) and per-layer MLP outputs on the probe."""
    p = tiny_policy()
    weights = {n: m.weight.detach().clone() for n, m in p.model.named_modules() if isinstance(m, nn.Linear)}
    get_backend("bf16", targets="all").apply(p.model)
    return {"weights": weights, "outputs": mlp_outputs(p, probe_batch())}


def calib_items(policy):
    return [lambda: policy.predict(probe_batch(2, seed=s), noise_seed=s) for s in (1, 2)]


# ------------------------------------------------------------------------------------------ targets
def test_targets_select_the_named_linears():
    p = tiny_policy()
    depth = p.model.cfg.prefix.depth
    names = {t: [n for n, _ in select_linears(p.model, t)] for t in ("prefix_mlp", "expert_mlp", "attn", "vision", "all")}
    assert len(names["prefix_mlp"]) == 3 * depth and all(n.startswith("prefix.layers.") and ".mlp." in n for n in names["prefix_mlp"])
    assert len(names["expert_mlp"]) == 3 * depth and all(n.startswith("expert.layers.") for n in names["expert_mlp"])
    assert len(names["attn"]) == 8 * depth and all(".self_attn." in n for n in names["attn"])
    assert all(n.startswith("vision.layers.") for n in names["vision"]) and names["vision"]
    assert set(names["all"]) == set(names["prefix_mlp"] + names["expert_mlp"] + names["attn"] + names["vision"])
    pa, ea, ex = (set(n for n, _ in select_linears(p.model, t)) for t in ("prefix_attn", "expert_attn", "expert"))
    assert pa | ea == set(names["attn"]) and not pa & ea and all(n.startswith("expert.") for n in ea)
    assert ex == ea | set(names["expert_mlp"])
    assert "action_out_proj" not in names["all"]  # heads and adaRMS projections are never targets
    with pytest.raises(BadInput, match="valid: prefix_mlp"):
        select_linears(p.model, "mlp")


# ------------------------------------------------------------------------------------------ CPU backends
@pytest.mark.parametrize("name,opts,targets,wtol", CPU_RUNNABLE, ids=[f"{c[0]}-{c[1].get('engine', 'native')}" for c in CPU_RUNNABLE])
def test_backend_runs_and_report_matches_module_state(name, opts, targets, wtol, reference):
    p = tiny_policy()
    target_names = [n for n, _ in select_linears(p.model, targets)]
    backend = get_backend(name, targets=targets, **opts)
    report = backend.apply(p.model, calib_items(p) if name == "torch_trt_fp8" else None)

    assert verify_report(p.model, report) == []
    assert report.latency_representative == (opts.get("engine", "native") == "native")
    assert report.weight_bytes_after == module_weight_bytes(p.model)
    rows = {r.name: r for r in report.modules}
    for n in target_names:
        mod = p.model.get_submodule(n)
        assert type(mod) is not nn.Linear or name == "torch_trt_fp8", f"{n} was not transformed"
        assert rows[n].kernel and rows[n].activation_precision
        # the effective weight is the original weight up to this scheme's quantization error
        err = rel(mod.dequantized_weight(), reference["weights"][n])
        assert 0 < err < wtol, f"{n}: weight error {err}"
    untouched = [r for r in report.modules if r.name not in target_names and r.kind == "Linear"]
    assert all(r.weight_dtype == "torch.bfloat16" for r in untouched)

    out = mlp_outputs(p, probe_batch())
    worst = max(rel(out[k], reference["outputs"][k]) for k in out if k.endswith(".mlp"))
    assert np.isfinite(worst) and worst < 4 * wtol + 0.1, f"MLP outputs drift {worst}"


@pytest.mark.parametrize("name,opts", [(c[0], c[1]) for c in CPU_RUNNABLE if c[0] != "torch_trt_fp8"],
                         ids=[f"{c[0]}-{c[1].get('engine', 'native')}" for c in CPU_RUNNABLE if c[0] != "torch_trt_fp8"])
def test_kernel_computes_what_the_module_stores(name, opts):
    """Each quantized module's forward equals a matmul of its dequantized weights with its declared activation
    quantization: a kernel that ignored a scale, or ran a different precision, fails here."""
    p = tiny_policy()
    get_backend(name, targets=MLPS, **opts).apply(p.model)
    torch.manual_seed(0)
    for n, mod in p.model.named_modules():
        if isinstance(mod, QuantLinear):
            x = torch.randn(7, mod.in_features)
            got = mod(x.to(torch.bfloat16)).float()
            err = rel(got, quant_linear_reference(mod, x.to(torch.bfloat16).float()))
            assert err < 0.02, f"{name} {n}: kernel output differs from its stored weights by {err}"


def test_report_lists_real_dtypes_per_scheme():
    p = tiny_policy()
    r = get_backend("fp8", targets="prefix_mlp", engine="emulated").apply(p.model)
    fp8_rows = [m for m in r.modules if "mlp" in m.name and m.name.startswith("prefix")]
    assert fp8_rows and all(m.weight_dtype.startswith("torch.float8_e4m3fn") for m in fp8_rows)
    assert all(p.model.get_submodule(m.name).qweight.dtype == torch.float8_e4m3fn for m in fp8_rows)
    p = tiny_policy()
    r = get_backend("int4", targets="expert_mlp", group_size=32).apply(p.model)
    rows = [m for m in r.modules if m.name.startswith("expert.layers.") and ".mlp." in m.name]
    assert all(m.weight_dtype.startswith("torch.uint8 (int4") and m.kernel == "torch._weight_int4pack_mm_for_cpu" for m in rows)
    assert r.weight_bytes_after < r.weight_bytes_before


def test_verify_report_catches_a_precision_claim_the_weights_do_not_have():
    p = tiny_policy()
    report = get_backend("bf16", targets="all").apply(p.model)
    assert verify_report(p.model, report) == []
    row = next(m for m in report.modules if m.name == "prefix.layers.0.mlp.up_proj")
    row.weight_dtype = "torch.float8_e4m3fn"
    problems = verify_report(p.model, report)
    assert any("claims weights torch.float8_e4m3fn, module stores torch.bfloat16" in x for x in problems)


def test_int4_options_are_checked():
    p = tiny_policy()
    with pytest.raises(BadInput, match="multiple of group size 128"):
        get_backend("int4", targets="prefix_mlp").apply(p.model)  # tiny widths are < 128
    with pytest.raises(BadInput, match="not on CUDA"):
        get_backend("int4", targets="prefix_mlp", group_size=32, kernel="tinygemm").apply(tiny_policy().model)
    with pytest.raises(BadInput, match="no engine 'fake_quant'"):
        get_backend("int4", engine="fake_quant")


def test_sparse24_values_are_checked():
    with pytest.raises(BadInput, match="valid: bf16, int8"):
        get_backend("sparse24", engine="emulated", dtype="fp4").apply(tiny_policy().model)


def test_torch_trt_fp8_needs_calibration_and_records_it():
    p = tiny_policy()
    with pytest.raises(BadInput, match="calibration"):
        get_backend("torch_trt_fp8", engine="fake_quant").apply(p.model, None)
    p = tiny_policy()
    r = get_backend("torch_trt_fp8", engine="fake_quant", targets="prefix_mlp").apply(p.model, calib_items(p))
    assert any("calibrated on 2 probe items" in n for n in r.notes)
    mod = p.model.get_submodule("prefix.layers.0.mlp.down_proj")
    assert float(mod.input_quantizer.amax) > 0  # a calibrated, static activation scale


def test_backends_compose_on_disjoint_targets():
    """A second backend must not cast the first one's float8 weights / fp32 scales."""
    p = tiny_policy()
    get_backend("fp8", targets="prefix_mlp", engine="emulated").apply(p.model)
    r = get_backend("int4", targets="expert_mlp", group_size=32).apply(p.model)
    fp8 = p.model.get_submodule("prefix.layers.0.mlp.up_proj")
    assert fp8.qweight.dtype == torch.float8_e4m3fn and fp8.wscale.dtype == torch.float32
    assert verify_report(p.model, r) == []
    kinds = {m.weight_dtype.split(" ")[0] for m in r.modules if ".mlp." in m.name and not m.name.startswith("vision")}
    assert kinds == {"torch.float8_e4m3fn", "torch.uint8"}


# ------------------------------------------------------------------------------------------ GPU-only on CPU
@pytest.mark.parametrize("name,opts,needs", GPU_ONLY, ids=[c[0] for c in GPU_ONLY])
def test_gpu_only_engines_refuse_the_cpu_with_one_line(name, opts, needs):
    p = tiny_policy()
    before = {n: type(m) for n, m in p.model.named_modules()}
    with pytest.raises(CapabilityError) as e:
        get_backend(name, targets="prefix_mlp", **opts).apply(p.model)
    msg = str(e.value)
    assert needs in msg and "\n" not in msg and name in msg
    assert {n: type(m) for n, m in p.model.named_modules()} == before  # nothing was touched


def test_torch_trt_fp8_native_needs_tensorrt_or_gpu():
    with pytest.raises(CapabilityError) as e:
        get_backend("torch_trt_fp8", targets="prefix_mlp").apply(tiny_policy().model, [lambda: None])
    assert "compute capability >= 8.9" in str(e.value) or "tensorrt" in str(e.value)


# ------------------------------------------------------------------------------------------ faults
def test_fault_shared_layer_weights(reference):
    p = tiny_policy()
    r = get_backend("fault_shared_layer_weights", targets=MLPS).apply(p.model)
    for stack in ("prefix", "expert"):
        layers = getattr(p.model, stack).layers
        assert all(layer.mlp is layers[0].mlp for layer in layers)
    assert any(n.startswith("FAULT: shared layer weights") for n in r.notes)
    assert verify_report(p.model, r) == []  # honest report: the shared modules appear once
    out = mlp_outputs(p, probe_batch())
    assert rel(out["prefix.0.mlp"], reference["outputs"]["prefix.0.mlp"]) < 1e-6
    assert rel(out["prefix.1.mlp"], reference["outputs"]["prefix.1.mlp"]) > 0.5
    assert rel(out["expert.2.mlp"], reference["outputs"]["expert.2.mlp"]) > 0.5


def test_fault_drop_mlp_residual(reference):
    p = tiny_policy()
    r = get_backend("fault_drop_mlp_residual", targets="prefix_mlp").apply(p.model)
    assert any("MLP branch dropped" in n for n in r.notes)
    seen = {}
    layer = p.model.prefix.layers[1]
    hooks = [
        layer.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.detach().float())),
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.__setitem__("h", a[0].detach().float())),
        layer.mlp.inner.register_forward_hook(lambda m, a, o: seen.__setitem__("real_mlp", o.detach().float())),
    ]
    p.predict(probe_batch(), noise_seed=0)
    for h in hooks:
        h.remove()
    assert seen["real_mlp"].abs().max() > 0  # the MLP still computes ...
    assert torch.equal(seen["out"], seen["h"])  # ... but the layer returns h = x + attn only
    # the expert is untouched by a prefix_mlp fault
    assert type(p.model.expert.layers[0].mlp).__name__ == "GemmaMLP"


def test_fault_ignored_scale(reference):
    p = tiny_policy()
    r = get_backend("fault_ignored_scale", targets="prefix_mlp").apply(p.model)  # inner int8_weight_only
    assert r.backend == "fault_ignored_scale(int8_weight_only)"
    mod = p.model.get_submodule("prefix.layers.0.mlp.up_proj")
    assert mod.scales_ignored
    assert torch.equal(mod.dequantized_weight(), mod.qweight.float())  # int8 values used as if scale were 1
    assert rel(mod.dequantized_weight(), reference["weights"]["prefix.layers.0.mlp.up_proj"]) > 10
    out = mlp_outputs(p, probe_batch())
    assert rel(out["prefix.0.mlp"], reference["outputs"]["prefix.0.mlp"]) > 10
    with pytest.raises(BadInput, match="quantized inner"):
        get_backend("fault_ignored_scale", inner="bf16").apply(tiny_policy().model)
    # also wraps other quantized backends
    p = tiny_policy()
    get_backend("fault_ignored_scale", targets="expert_mlp", inner="int4", inner_options={"group_size": 32}).apply(p.model)
    assert all(m.scales_ignored for m in p.model.modules() if isinstance(m, QuantLinear))


def test_fault_silent_fallback(reference):
    p = tiny_policy()
    r = get_backend("fault_silent_fallback", targets="prefix_mlp").apply(p.model)
    claimed = [m for m in r.modules if m.name.startswith("prefix.layers.") and ".mlp." in m.name]
    assert claimed and all(m.weight_dtype.startswith("torch.float8_e4m3fn") for m in claimed)
    assert all(type(p.model.get_submodule(m.name)) is nn.Linear for m in claimed)  # really bf16 nn.Linear
    problems = verify_report(p.model, r)
    assert any("module stores torch.bfloat16" in x for x in problems)
    out = mlp_outputs(p, probe_batch())
    assert all(torch.equal(out[k], reference["outputs"][k]) for k in out)  # bit-identical to bf16


def test_fault_backends_wrap_quantized_inner():
    p = tiny_policy()
    r = get_backend("fault_shared_layer_weights", targets="prefix_mlp", inner="fp8", engine="emulated").apply(p.model)
    assert r.backend == "fault_shared_layer_weights(fp8)" and r.latency_representative is False
    assert isinstance(p.model.prefix.layers[2].mlp.up_proj, QuantLinear)
    with pytest.raises(BadInput, match="real backend"):
        get_backend("fault_drop_mlp_residual", inner="fault_silent_fallback")


# ------------------------------------------------------------------------------------------ registry / configs
class HalvedWeights(Backend):
    """A custom backend living outside backends/: halves the targeted weights and says so."""

    name = "halved"

    def apply(self, model, calib=None):
        for _, lin in select_linears(model, self.targets):
            with torch.no_grad():
                lin.weight.mul_(0.5)
        b = module_weight_bytes(model)
        return BackendReport(self.name, "cpu", describe_model(model), b, b, notes=["weights halved"])


def test_custom_backend_by_import_path():
    b = get_backend("anything", target_path=f"{__name__}.HalvedWeights", targets="expert_mlp")
    assert isinstance(b, HalvedWeights) and b.targets == "expert_mlp"
    p = tiny_policy()
    w0 = p.model.expert.layers[0].mlp.up_proj.weight.clone()
    r = b.apply(p.model)
    assert torch.equal(p.model.expert.layers[0].mlp.up_proj.weight, w0 * 0.5) and r.notes == ["weights halved"]
    b2 = backend_from_config({"name": "mine", "targets": "attn", "target": f"{__name__}.HalvedWeights", "options": {}})
    assert isinstance(b2, HalvedWeights) and b2.targets == "attn"
    with pytest.raises(BadInput, match="not a evalkit.backends.base.Backend"):
        get_backend("x", target_path=f"{__name__}.rel")


def test_every_backend_is_a_config_option_and_its_yaml_holds_only_what_differs():
    """Every registered backend composes as `backend=<name>` (conf/backend/<name>.yaml, or the schema alone when
    the backend needs nothing else) and builds; a YAML holds only keys that differ from the schema's defaults."""
    import dataclasses

    from hydra import compose, initialize_config_dir

    from evalkit.config import CONF_DIR, BackendConfig, group_options, register

    defaults = dataclasses.asdict(BackendConfig(name="?"))
    for f in sorted((ROOT / "conf/backend").glob("*.yaml")):
        cfg = yaml.safe_load(f.read_text())
        assert cfg["name"] == f.stem and set(cfg) <= set(defaults), f
        assert all(v != defaults[k] for k, v in cfg.items() if k != "name"), f"{f} repeats a schema default"
    assert set(group_options("backend")) >= set(BACKENDS)
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        for name in BACKENDS:
            cfg = compose("config", overrides=[f"backend={name}"]).backend
            assert cfg.name == name
            assert backend_from_config(dict(cfg)).name == name
    with pytest.raises(BadInput, match="no 'engine' setting"):
        backend_from_config({"name": "bf16", "engine": "emulated"})
    with pytest.raises(BadInput, match="unknown backend 'nope'"):
        backend_from_config({"name": "nope"})


def test_kernel_chooser_picks_the_fastest_correct_candidate(monkeypatch):
    """Pure logic of evalkit.backends.quant.choose_kernel (timing stubbed): wrong or crashing candidates are excluded,
    names with ':' (tile configs) compete like the others, and the choice is cached per key."""
    import evalkit.backends.quant as q

    times = {"ref": 3.0, "fast:cfg1": 1.0, "wrong:cfg2": 0.1, "crash": 0.05, "mid:cfg3": 2.0}
    calls = []

    def fake_time(fn, reps=20):
        out = fn()
        calls.append(out)
        return times[out["name"]], "graph"

    monkeypatch.setattr(q, "time_cuda_ms", fake_time)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    good = torch.ones(4)

    class Out(dict):
        def float(self):
            return self["t"]

    def cand(name, t):
        return lambda: Out(name=name, t=t)

    def crash():
        raise RuntimeError("no kernel for this shape")

    c = {"ref": cand("ref", good), "fast:cfg1": cand("fast:cfg1", good), "wrong:cfg2": cand("wrong:cfg2", 2 * good),
         "crash": crash, "mid:cfg3": cand("mid:cfg3", good * (1 + 1e-4))}
    key = ("test", 0, 1, 2, 3)
    assert q.choose_kernel(key, c, reference="ref") == "fast:cfg1"
    assert "rejected" in q.CHOICE_LOG[key]["wrong:cfg2"] and "rejected" in q.CHOICE_LOG[key]["crash"]
    n = len(calls)
    assert q.choose_kernel(key, c, reference="ref") == "fast:cfg1" and len(calls) == n  # cached, not re-timed
    q.KERNEL_CHOICE.pop(key)


def test_backends_bench_logic_on_cpu(tmp_path):
    """bench/backends.py end to end on pi05_tiny (CPU logic check): casts run (fp16 too: its prefix-MLP probe
    input follows the model's dtype), GPU-only backends are recorded as not run with their capability line."""
    import json
    import subprocess
    import sys

    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "bench/backends.py", "--device", "cpu", "--variant", "tiny", "--calls", "2",
                           "--warmup", "1", "--backends", "bf16,fp16,sparse24,nvfp4", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["errors"] == []
    rows = {r["backend"]: r for r in res["rows"]}
    assert set(rows) == {"bf16", "fp16"} and rows["fp16"]["e2e_speedup_vs_bf16"] > 0
    assert rows["fp16"]["action_cosine_vs_bf16"] > 0.99 and rows["fp16"]["report_problems"] == []
    # "GPU stages": every stage but the host's pre/post, so e2e noise on the host does not move the ratio
    gpu = rows["fp16"]["gpu_stages_ms_p50"]
    assert 0 < gpu < rows["fp16"]["e2e_ms_p50"] and rows["fp16"]["gpu_stages_speedup_vs_bf16"] > 0
    assert abs(gpu - sum(v for k, v in rows["fp16"]["stage_ms_p50"].items() if k not in ("pre", "post"))) < 1e-9
    why = {s["backend"]: s["why"] for s in res["skipped"]}
    assert "compute capability >= 8.0" in why["sparse24"] and "compute capability >= 10.0" in why["nvfp4"]


def test_backend_docs_tables_are_printed_from_the_committed_results():
    """docs/backends.md pastes bench/md_tables.py's output for the stacked-MLP and π0.5 result files: a table that
    drifts from its JSON (or a JSON replaced without refreshing the docs) fails here."""
    sys.path.insert(0, str(ROOT / "bench"))
    import md_tables

    docs = (ROOT / "docs" / "backends.md").read_text()
    for kind, name in (("stacked", "gemm_sweep_stacked"), ("pi05", "backends"), ("pi05", "backends_compile")):
        folder = ROOT / ("research" if kind == "stacked" else "bench") / "results"  # the sweep is a research record
        d = json.loads((folder / f"{name}.json").read_text())
        table = md_tables.stacked_table(d) if kind == "stacked" else md_tables.pi05_table(d)
        rows = d["stacked"] if kind == "stacked" else d["rows"]
        assert len([l for l in table.splitlines() if l.startswith("| ") and "---" not in l]) == len(rows) + 1
        assert table in docs, f"docs/backends.md does not hold the table of {folder / name}.json"


def test_int4_mma_layers_option_is_checked():
    with pytest.raises(BadInput, match="mma_layers 'some' unknown; valid: expert, all, none"):
        get_backend("int4", targets="prefix_mlp", mma_layers="some", group_size=32).apply(tiny_policy().model)


def test_fp8_mma_layers_option_is_checked():
    with pytest.raises(BadInput, match="mma_layers 'x' unknown; valid: expert, all, none"):
        get_backend("fp8", targets="prefix_mlp", engine="emulated", mma_layers="x").apply(tiny_policy().model)


def test_an_unknown_backend_option_is_bad_input_listing_the_valid_ones():
    """A typo in backend.options must not run silently without the option it meant."""
    with pytest.raises(BadInput, match=r"backend 'fp8' has no option 'fuse_norm'; valid: .*fuse_norms"):
        get_backend("fp8", targets="prefix_mlp", fuse_norm=True)
    with pytest.raises(BadInput, match=r"backend 'int4' has no option 'groupsize'; valid: group_size"):
        get_backend("int4", groupsize=32)
    with pytest.raises(BadInput, match=r"backend 'fault_ignored_scale' has no option 'group_size'; valid: inner_options"):
        get_backend("fault_ignored_scale", inner="int4", group_size=32)
    with pytest.raises(BadInput, match=r"backend 'int4' has no option 'groupsize'"):  # inside inner_options: the inner backend checks
        get_backend("fault_ignored_scale", inner="int4", inner_options={"groupsize": 32})
    assert get_backend("sparse24", dtype="int8").options == {"dtype": "int8"}
