"""Measured hardware ceilings for latency floors: bf16 matmul peak and device copy bandwidth.

Floors use measured ceilings (not datasheet numbers): time >= FLOPs / peak and >= bytes / bandwidth.
"""

from __future__ import annotations

import torch

from evalkit.errors import CapabilityError


def _time_ms(fn, device: torch.device, iters: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    out = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    return out


def matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Median bf16 TFLOP/s of an n^3 matmul on random data (zeros run faster and would flatter the peak)."""
    if device.type != "cuda":
        raise CapabilityError("matmul peak is measured on a CUDA GPU only")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    ms = sorted(_time_ms(lambda: torch.matmul(a, b, out=c), device, iters))
    return 2 * n**3 / (ms[len(ms) // 2] * 1e-3) / 1e12


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Median device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        raise CapabilityError("copy bandwidth is measured on a CUDA GPU only")
    src = torch.randint(0, 255, (nbytes,), device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = sorted(_time_ms(lambda: dst.copy_(src), device, iters))
    return 2 * nbytes / (ms[len(ms) // 2] * 1e-3) / 1e9
