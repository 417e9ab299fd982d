"""Helpers the benchmarks share: the median time of a CUDA-graph replay and the bytes a forward must read."""

from __future__ import annotations

import torch
from evalkit.backends.quant import capture_cuda_graph
from torch import nn


def graph_ms(fn, reps: int = 30) -> float:
    """Median ms of one CUDA-graph replay of fn (captured after one eager call that also warms kernel choices)."""
    fn()
    g, _ = capture_cuda_graph(fn)
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    times.sort()
    return times[len(times) // 2]


def read_bytes(model: nn.Module) -> int:
    """Bytes a forward must read: QuantLinear.read_bytes() (one packing of the weights plus scales) for
    quantized linears, every parameter and buffer for the rest. The weight-read floor divides this."""
    from evalkit.backends.quant import QuantLinear

    total, inside = 0, set()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += mod.read_bytes()
            inside.update(id(t) for t in mod.buffers())
    return total + sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()) if id(t) not in inside)
