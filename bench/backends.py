"""Every backend the GPU supports on true-size π0.5 (random init), batch 1, 2 views, 10 denoise steps, one run.

    PYTHONUNBUFFERED=1 python bench/backends.py --out bench/results/backends.json

Per backend (fresh model each, same seed): end-to-end p50 (CUDA graphs of encode/prefill/denoise when
they capture, else eager: the row says which), per-stage p50, prefix-MLP time (the model's own 18
prefix MLPs replayed in one CUDA graph at the real prefill length), denoise time, weight bytes,
action cosine and relative error vs bf16 (same noise), the report's verification against the module
state, and floors beside them (stage floors from measured bf16 peak/bandwidth; the weight-read floor of
the backend's bytes). Writes JSON after every backend.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evalkit.backends.quant import CHOICE_LOG, KERNEL_CHOICE  # noqa: E402
from evalkit.backends.registry import get_backend  # noqa: E402
from evalkit.backends.verify import verify_report  # noqa: E402
from md_tables import gpu_stages_ms  # noqa: E402  (bench/, this script's folder: e2e without the host stages)

from bench.gpu_timing import graph_ms, read_bytes  # noqa: E402
from evalkit.bench import synthetic_batch  # noqa: E402
from evalkit.errors import CapabilityError  # noqa: E402
from evalkit.latency import measure  # noqa: E402
from evalkit.latency.floors import copy_bandwidth_gbs, matmul_peak_tflops  # noqa: E402
from evalkit.policies.pi05.cost import pi05_work  # noqa: E402
from evalkit.policies.pi05.policy import build  # noqa: E402

# label -> (backend, options incl. targets)
VARIANTS = {
    "bf16": ("bf16", {"targets": "all"}),
    "fp8": ("fp8", {"targets": "prefix_mlp"}),
    "fp8[prefix+expert mlp]": ("fp8", {"targets": "prefix_mlp,expert_mlp"}),
    "fp8[prefix mlp+expert]": ("fp8", {"targets": "prefix_mlp,expert"}),  # + the expert's attention (M = 10)
    "fp8[all]": ("fp8", {"targets": "all"}),
    "fp8_weight_only": ("fp8_weight_only", {"targets": "prefix_mlp"}),
    "int8": ("int8", {"targets": "prefix_mlp"}),
    "int8_weight_only": ("int8_weight_only", {"targets": "prefix_mlp"}),
    "int4": ("int4", {"targets": "prefix_mlp"}),
    "int4[expert mlp]": ("int4", {"targets": "expert_mlp"}),
    "int4[expert]": ("int4", {"targets": "expert"}),  # expert MLPs and attention projections: every denoise GEMM
    "fp8(prefix)+int4(expert)": None,  # composed below: two backends on disjoint targets
    "sparse24": ("sparse24", {"targets": "prefix_mlp"}),
    "sparse24[int8]": ("sparse24", {"targets": "prefix_mlp", "dtype": "int8"}),
    "fp16": ("fp16", {"targets": "all"}),
    "nvfp4": ("nvfp4", {"targets": "prefix_mlp"}),  # needs compute capability >= 10.0
    "w4a8": ("w4a8", {"targets": "prefix_mlp"}),  # needs compute capability >= 10.0
    "torch_trt_fp8": ("torch_trt_fp8", {"targets": "prefix_mlp"}),  # needs TensorRT + Torch-TensorRT
    # A/B variants of this session's fp8/int4 options (run by name with --backends)
    "fp8[prefix mlp+expert] no qkv fusion": ("fp8", {"targets": "prefix_mlp,expert", "fuse_qkv": False}),
    "fp8[prefix mlp+expert] inductor geglu quant": ("fp8", {"targets": "prefix_mlp,expert", "compiled_geglu_quant": "inductor"}),
    # the expert layers' adaRMS norms and gated residual adds as separate kernels (fuse_norms=false; the default folds
    # them into the mma launches, evalkit/policies/pi05/fused_layer.py)
    "fp8[prefix mlp+expert] unfused norms": ("fp8", {"targets": "prefix_mlp,expert", "fuse_norms": False}),
    "fp8[prefix mlp+expert] unfused norms no pdl": ("fp8", {"targets": "prefix_mlp,expert", "fuse_norms": False, "pdl": False}),
    "fp8[prefix mlp+expert] no pdl": ("fp8", {"targets": "prefix_mlp,expert", "pdl": False}),
    # the expert's attention through SDPA (FlashAttention's split-KV) instead of our one-launch kernel
    "bf16 sdpa attention": ("bf16", {"targets": "all"}),
    "fp8[prefix mlp+expert] sdpa attention": ("fp8", {"targets": "prefix_mlp,expert"}),
    # our attention kernel launched after the q|k|v projection has finished (no programmatic dependent launch)
    "bf16 attention no pdl": ("bf16", {"targets": "all"}),
    "fp8[prefix mlp+expert] attention no pdl": ("fp8", {"targets": "prefix_mlp,expert"}),
    "fp8[prefix mlp+expert] unfused norms attention no pdl": ("fp8", {"targets": "prefix_mlp,expert", "fuse_norms": False}),
    "int4[expert] attention no pdl": ("int4", {"targets": "expert"}),
}
POLICY_OVERRIDES = {k: {"decode_attention": "sdpa"} for k in VARIANTS if k.endswith(" sdpa attention")}
POLICY_OVERRIDES.update({k: {"decode_attention_pdl": False} for k in VARIANTS if k.endswith(" attention no pdl")})
AB_VARIANTS = {k for k in VARIANTS if k.startswith(("fp8[prefix mlp+expert] ", "int4[expert] ", "bf16 "))}  # not in the default run


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def prefix_mlp_ms(policy, prefix_len: int, dev: torch.device) -> float:
    layers = policy.model.prefix.layers
    x = torch.randn(1, prefix_len, policy.cfg.prefix.width, device=dev, dtype=policy.model.compute_dtype)  # fp16 under fp16

    def run():
        for layer in layers:
            layer.mlp(x)

    with torch.no_grad():
        if dev.type == "cuda":
            return graph_ms(run, 20)
        t = time.perf_counter()  # CPU logic check only
        run()
        return (time.perf_counter() - t) * 1e3


def velocities(policy, obs) -> torch.Tensor:
    """The expert's velocity outputs of every denoise step (eager): far more sensitive than the actions of a
    random-init model, whose actions are mostly the integrated noise."""
    seen = []
    h = policy.model.action_out_proj.register_forward_hook(lambda m, a, o: seen.append(o.detach().float().flatten()))
    try:
        policy.predict(obs, noise_seed=0)
    finally:
        h.remove()
    return torch.cat(seen)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/backends.json")
    ap.add_argument("--backends", default=",".join(v for v in VARIANTS if v not in AB_VARIANTS))
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variant", default="full")
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--device", default="cuda", help="cpu: logic check on --variant tiny only (no floors, no graphs)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the stages (default mode) before CUDA-graph capture, "
                    "for every backend alike: compares backends at the policy's fastest setting")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: bench/backends.py needs a CUDA GPU (or --device cpu --variant tiny for a logic check)", file=sys.stderr)
        return 2
    from evalkit.provenance import git_sha, package_versions

    t0 = time.time()
    sha, dirty = git_sha()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    peak, bw = (matmul_peak_tflops(dev), copy_bandwidth_gbs(dev)) if dev.type == "cuda" else (1.0, 10.0)
    result: dict = {
        "command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (logic check)",
        "versions": {**package_versions(), "torch": torch.__version__, "cuda": torch.version.cuda},
        "git_sha": sha, "git_dirty": dirty, "batch": 1, "views": 2, "denoise_steps": 10, "compile": args.compile,
        "ceilings": {"bf16_tflops": peak, "copy_gbs": bw}, "rows": [], "errors": [], "skipped": [],
    }

    def save():
        result["elapsed_s"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(result, indent=2))

    obs = synthetic_batch(1)
    ref_actions = ref_vel = None
    for label in [b for b in args.backends.split(",") if b]:
        if time.time() - t0 > args.budget_s:
            result["skipped"].append({"backend": label, "why": "time budget"})
            continue
        policy = None
        try:
            t1 = time.time()
            # each row compiles afresh: dynamo keys its cache on the code object, so rows' new models pile up
            # recompiles of expert_forward and, past torch._dynamo.config.recompile_limit (8), later rows ran eager
            torch._dynamo.reset()
            torch.manual_seed(0)
            policy = build({"kind": "pi05", "variant": args.variant, "init": "random", "tokenizer": "bytes",
                            "num_views": 2, "denoise_steps": 10, "seed": 0, "dtype": "bfloat16",
                            **POLICY_OVERRIDES.get(label, {})}, dev)
            if VARIANTS[label] is None:
                r1 = get_backend("fp8", targets="prefix_mlp").apply(policy.model)
                report = get_backend("int4", targets="expert").apply(policy.model)
                report.notes = r1.notes + report.notes
            else:
                name, opts = VARIANTS[label]
                calib = [lambda: policy.predict(obs, noise_seed=0)]  # used by calibrated backends (torch_trt_fp8)
                report = get_backend(name, **opts).apply(policy.model, calib=calib)
            problems = verify_report(policy.model, report)
            build_s = time.time() - t1
            first = policy.predict(obs, noise_seed=0)  # eager: int4 picks its kernels here
            vel = velocities(policy, obs)
            mode = "cuda_graph" if dev.type == "cuda" else "eager"
            try:
                if dev.type == "cuda" and args.compile:
                    mode = "compile+cuda_graph"
                    policy.enable_compile()
                    policy.predict(obs, noise_seed=0)  # compiles here, before capture
                if dev.type == "cuda":
                    policy.enable_cuda_graph()
                actions = policy.predict(obs, noise_seed=0)
            except Exception as e:  # recorded in the row; timing then is eager
                mode = f"eager (graph capture failed: {repr(e)[:200]})"
                policy._graphs = None
                actions = first
            rep = measure(lambda t: policy.predict(obs, noise_seed=0, timer=t), dev, args.calls, args.warmup)
            if label == "bf16":
                ref_actions, ref_vel = actions, vel
            prompt_tokens = int(policy.preprocess(obs)["tokens"].shape[1])
            work, prefix_len = pi05_work(policy.model, 1, 2, prompt_tokens, 10)
            floors = {k: w.floor_ms(peak, bw) for k, w in work.items()}
            rbytes = read_bytes(policy.model)
            st = rep.stages
            row = {
                "backend": label, "mode": mode, "report_backend": report.backend, "build_s": round(build_s, 1),
                "decode_attention": policy.model.decode_impl, "decode_attention_pdl": policy.model.decode_pdl,
                "e2e_ms_p50": rep.end_to_end.p50, "e2e_ms_p90": rep.end_to_end.p90,
                "stage_ms_p50": {k: v.p50 for k, v in st.items()},
                "denoise_ms_p50": st["denoise"].p50 if "denoise" in st else None,
                "prefix_tokens": prefix_len, "prefix_mlp_ms": prefix_mlp_ms(policy, prefix_len, dev),
                "weight_bytes": report.weight_bytes_after, "read_bytes": rbytes,
                "weight_read_floor_ms": rbytes / (bw * 1e9) * 1e3,
                "stage_floor_ms_bf16": {**floors, "total": sum(floors.values())},
                "action_cosine_vs_bf16": None if ref_actions is None else cosine(actions, ref_actions),
                "action_rel_err_vs_bf16": None if ref_actions is None else float(np.linalg.norm(actions - ref_actions) / (np.linalg.norm(ref_actions) + 1e-30)),
                "velocity_cosine_vs_bf16": None if ref_vel is None else float(torch.nn.functional.cosine_similarity(vel, ref_vel, dim=0)),
                "graph_vs_eager_rel_err": float(np.linalg.norm(actions - first) / (np.linalg.norm(first) + 1e-30)),
                "report_problems": problems, "by_precision": report.summary_by_precision(), "notes": report.notes,
                "latency_representative": report.latency_representative,
                # fused expert layer (evalkit/policies/pi05/fused_layer.py): installed where, chosen or not, its timing log
                "fused_expert_layers": sum(getattr(m, "fused", None) is not None for m in policy.model.modules()),
                "fused_layer_choice": {str(k): {"choice": v, "log": CHOICE_LOG.get(k)} for k, v in KERNEL_CHOICE.items()
                                       if k[0] == "fp8layer"},
            }
            row["gpu_stages_ms_p50"] = gpu_stages_ms(row)
            base = next((r for r in result["rows"] if r["backend"] == "bf16"), None)
            if base:
                row["e2e_speedup_vs_bf16"] = base["e2e_ms_p50"] / row["e2e_ms_p50"]
                row["gpu_stages_speedup_vs_bf16"] = base["gpu_stages_ms_p50"] / row["gpu_stages_ms_p50"]
                row["prefix_mlp_speedup_vs_bf16"] = base["prefix_mlp_ms"] / row["prefix_mlp_ms"]
                if row["denoise_ms_p50"]:
                    row["denoise_speedup_vs_bf16"] = base["denoise_ms_p50"] / row["denoise_ms_p50"]
            result["rows"].append(row)
            print(f"{label:>34} [{mode[:10]}] e2e {row['e2e_ms_p50']:7.2f} ms  prefix-MLP {row['prefix_mlp_ms']:6.2f} ms  "
                  f"denoise {row['denoise_ms_p50'] or 0:6.2f} ms  {row['weight_bytes'] / 1e9:5.2f} GB  "
                  f"cos {row['action_cosine_vs_bf16']} vel-cos {row['velocity_cosine_vs_bf16']}  problems {len(problems)}", flush=True)
        except CapabilityError as e:  # this GPU / these packages cannot run it: recorded, with the check's words
            print(f"{label:>34} not supported here: {e}", flush=True)
            result["skipped"].append({"backend": label, "why": str(e)})
        except Exception as e:
            traceback.print_exc()
            result["errors"].append({"backend": label, "error": repr(e)[:1000]})
        finally:
            policy = None  # frees the model before the next variant
            torch.cuda.empty_cache()
            save()
    save()  # a backend skipped for the time budget comes after the last per-row save
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    print(f"\n{result['device']} ceilings {result['ceilings']}")
    print(f"{'backend':>34} {'e2e p50':>8} {'x bf16':>6} {'GPU stg':>8} {'x bf16':>6} {'prefixMLP':>9} {'x bf16':>6} {'denoise':>8} "
          f"{'x bf16':>6} {'GB':>6} {'act cos':>9} {'vel cos':>9}")
    for r in result["rows"]:
        print(f"{r['backend']:>34} {r['e2e_ms_p50']:8.2f} {r.get('e2e_speedup_vs_bf16', 1):6.2f} {r['gpu_stages_ms_p50']:8.2f} "
              f"{r.get('gpu_stages_speedup_vs_bf16', 1):6.2f} {r['prefix_mlp_ms']:9.2f} "
              f"{r.get('prefix_mlp_speedup_vs_bf16', 1):6.2f} {r['denoise_ms_p50'] or 0:8.2f} {r.get('denoise_speedup_vs_bf16', 1):6.2f} "
              f"{r['weight_bytes'] / 1e9:6.2f} {r['action_cosine_vs_bf16'] or 1:9.6f} {r['velocity_cosine_vs_bf16'] or 1:9.6f}")
    for e in result["skipped"]:
        print("NOT RUN", e)
    for e in result["errors"]:
        print("ERROR", e)


if __name__ == "__main__":
    raise SystemExit(main())
