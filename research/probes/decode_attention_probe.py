"""Development probe (GPU): the action expert's attention (10 queries x 8 heads over 555 cached keys, 1 KV head,
head_dim 256) under each SDPA backend and layout, and our one-launch Triton kernel
(kernels/decode_attention.py) in each tile config, in chains of 18 (one CUDA graph): microseconds
per call. "masked:" rows pass a key mask (a padded prompt), which rules FlashAttention out.

    python research/probes/decode_attention_probe.py --out research/results/decode_attention_probe.json

Why: research/probes/pi05_kernel_profile.py shows cuDNN's flash kernel taking ~17 us per expert attention call, about
3 ms of a 21 ms compiled π0.5 call. "folded" puts the 8 query heads of the one KV head into the query length
(valid: the heads share K/V and the mask), so a kernel sees 80 queries of one head instead of 10 of 8.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from evalkit.backends.quant import time_cuda_ms  # noqa: E402
from evalkit.kernels.decode_attention import launch_decode_attention  # noqa: E402
from evalkit.provenance import package_versions  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--keys", type=int, default=555)
args = ap.parse_args()
dev = torch.device("cuda")
torch.manual_seed(0)
H, T, D, S = 8, 10, 256, args.keys
qs = [torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16) for _ in range(18)]
ks = [torch.randn(1, 1, S, D, device=dev, dtype=torch.bfloat16) for _ in range(18)]
vs = [torch.randn(1, 1, S, D, device=dev, dtype=torch.bfloat16) for _ in range(18)]
ref = F.scaled_dot_product_attention(qs[0].float(), ks[0].float(), vs[0].float(), enable_gqa=True)
key_mask = torch.ones(1, S, dtype=torch.bool, device=dev)
key_mask[:, S - T - 40:S - T] = False  # 40 padding tokens at the end of the prompt
ref_masked = F.scaled_dot_product_attention(qs[0].float(), ks[0].float(), vs[0].float(), attn_mask=key_mask[:, None, None],
                                            enable_gqa=True)


def gqa(backend):
    def f(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return f


def folded(backend):
    def f(q, k, v):
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q.reshape(1, 1, H * T, D), k, v)
        return o.view(1, H, T, D)
    return f


def manual(q, k, v):
    s = (q.reshape(H * T, D) @ k[0, 0].t()).float() * D**-0.5
    return (s.softmax(-1).to(q.dtype) @ v[0, 0]).view(1, H, T, D)


variants = {f"gqa:{b.name}": gqa(b) for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)}
variants.update({f"folded:{b.name}": folded(b) for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)})
variants["manual_matmul_softmax"] = manual
variants["manual_compiled"] = torch.compile(manual)


def ours(keys_per_split, block_n, warps, mask=None):
    def f(q, k, v):
        return launch_decode_attention(q, k, v, mask, keys_per_split, block_n, warps).view(1, T, H, D).transpose(1, 2)
    return f


for kps in (32, 64, 128, 192, 256, 576):
    for bn in (32, 64):
        for w in (4, 8):
            if kps % bn == 0:
                variants[f"evalkit:kps{kps}:bn{bn}:w{w}"] = ours(kps, bn, w)
# the model's form: raw q|k|v projections of the step, RoPE and the step's keys inside the kernel
qkv_raw = torch.randn(1, T, (H + 2) * D, device=dev, dtype=torch.bfloat16)
q_raw, k_raw, v_raw = qkv_raw.split([H * D, D, D], dim=-1)
cos, sin = (torch.randn(1, T, D, device=dev, dtype=torch.bfloat16) for _ in range(2))


def ours_new(keys_per_split, block_n, warps):
    def f(q, k, v):  # q ignored: the raw projection above (same shape of work)
        return launch_decode_attention(q_raw, k, v, None, keys_per_split, block_n, warps, new=(k_raw, v_raw, cos, sin))
    return f


for kps in (64, 128):
    variants[f"evalkit_rope_new_keys:kps{kps}:bn64:w4"] = ours_new(kps, 64, 4)
masked = {"masked:gqa:CUDNN_ATTENTION": lambda q, k, v: gqa_masked(q, k, v)}
for kps in (64, 128):
    masked[f"masked:evalkit:kps{kps}:bn64:w4"] = ours(kps, 64, 4, key_mask)


def gqa_masked(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None], enable_gqa=True)


variants.update(masked)
rows = {}
t0 = time.time()
for name, f in variants.items():
    try:
        r = ref_masked if name.startswith("masked:") else ref
        # the new-keys form's correctness is tests/test_decode_attention_gpu.py's; here only its time
        err = None if "new_keys" in name else float((f(qs[0], ks[0], vs[0]).float() - r).norm() / r.norm())
        ms, mode = time_cuda_ms(lambda f=f: [f(q, k, v) for q, k, v in zip(qs, ks, vs)], 20)
        rows[name] = {"us_per_call": ms / 18 * 1000, "rel_err": err, "mode": mode}
        print(f"{name:28} {ms / 18 * 1000:7.2f} us  err {'-' if err is None else f'{err:.1e}'}  ({mode})", flush=True)
    except Exception as e:  # a backend that cannot run this shape
        rows[name] = {"error": repr(e)[:300]}
        print(f"{name:28} error {repr(e)[:150]}", flush=True)
Path(args.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
                                      "versions": package_versions(), "shape": {"heads": H, "queries": T, "head_dim": D, "keys": S},
                                      "rows": rows, "elapsed_s": time.time() - t0}, indent=1))
