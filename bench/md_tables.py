"""Markdown tables for docs/backends.md from the committed result files (no GPU needed).

    python bench/md_tables.py stacked research/results/gemm_sweep_stacked.json
    python bench/md_tables.py pi05 bench/results/backends.json

`stacked`: research/probes/gemm_sweep.py's stacked-MLP part; `pi05`: bench/backends.py. The docs paste these tables
as printed, so a table and its JSON cannot drift apart.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

# backends whose kernel is chosen per shape at run time -> the chooser kinds they record
AUTO_KINDS = {"int4": ("int4", "int4mlp", "int4qkv"), "int8_weight_only": ("int8wo",), "fp8": ("fp8", "fp8mlp", "fp8qkv")}


def _choices(row: dict) -> str:
    """Kernel choices of an auto-choosing backend as 'int4 N=4096: tinygemm, ...' (the bench records the
    process-wide cache, keys str((kind, device, N, K, M, group)); only this backend's kinds are shown)."""
    out = []
    for key, choice in row.get("kernel_choices", {}).items():
        kind, _, n, *_ = ast.literal_eval(key)
        if kind in AUTO_KINDS.get(row["backend"], ()):
            out.append(f"{kind} N={n}: {choice}")
    return ", ".join(out)


def stacked_table(d: dict) -> str:
    lines = [
        "| stack | M | backend | ms | × bf16 (same run) | weight-read floor ms | × read floor | output cosine vs bf16 | kernels chosen (auto backends) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in d["stacked"]:
        lines.append(f"| {r['set']} | {r['M']} | {r['backend']} | {r['ms']:.3f} | {r['speedup_vs_bf16']:.2f} | "
                     f"{r['weight_read_floor_ms']:.3f} | {r['x_weight_read_floor']:.1f} | {r['out_cosine_vs_bf16']:.4f} | {_choices(r)} |")
    return "\n".join(lines)


HOST_STAGES = ("pre", "post")  # host-side processing and copies: not what a backend changes, and noisy


def gpu_stages_ms(row: dict) -> float:
    """Sum of a row's p50 stage times without the host stages (encode, prefill, time_cond, denoise)."""
    return sum(v for k, v in row["stage_ms_p50"].items() if k not in HOST_STAGES)


def pi05_table(d: dict) -> str:
    rows = {r["backend"]: r for r in d["rows"]}
    base = rows["bf16"]
    lines = [
        "| backend | e2e p50 ms | × bf16 | GPU stages ms | × bf16 | encode ms | prefill ms | prefix-MLP ms (18, graph) | × bf16 "
        "| denoise ms (10 steps) | × bf16 | weight GB | action cosine | velocity cosine | report problems |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        st = r["stage_ms_p50"]
        gpu = gpu_stages_ms(r)
        lines.append(
            f"| {name} | {r['e2e_ms_p50']:.2f} | {base['e2e_ms_p50'] / r['e2e_ms_p50']:.2f} | {gpu:.2f} | "
            f"{gpu_stages_ms(base) / gpu:.2f} | {st['encode']:.2f} | {st['prefill']:.2f} | "
            f"{r['prefix_mlp_ms']:.2f} | {base['prefix_mlp_ms'] / r['prefix_mlp_ms']:.2f} | {r['denoise_ms_p50']:.2f} | "
            f"{base['denoise_ms_p50'] / r['denoise_ms_p50']:.2f} | {r['weight_bytes'] / 1e9:.2f} | {r['action_cosine_vs_bf16']:.5f} | "
            f"{r['velocity_cosine_vs_bf16']:.4f} | {len(r['report_problems'])} |")
    for s in d.get("skipped", []):
        lines.append(f"- not run: `{s['backend']}`: {s['why']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=("stacked", "pi05"))
    ap.add_argument("path")
    args = ap.parse_args()
    d = json.loads(Path(args.path).read_text())
    print(stacked_table(d) if args.kind == "stacked" else pi05_table(d))


if __name__ == "__main__":
    main()
