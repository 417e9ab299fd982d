"""What a policy really does during one `predict`, seen from outside the backend: torch forward hooks and a
dispatch mode. Nothing here trusts a module's own description of itself.

- `record_layers`: every transformer layer's input and output per call (optionally replacing the input:
  teacher forcing).
- `trace_modules`: the order in which named modules run, and the inputs the Linear-like ones receive.
- `MatmulDtypes`: the dtypes of the tensors every matrix-multiply op consumes (a TorchDispatchMode), so a
  backend that claims low precision but multiplies bf16 by bf16 is seen doing so.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

LayerSink = Callable[[str, int, "torch.Tensor | None", torch.Tensor], None]


def first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    return None


def _first_arg(args: tuple) -> torch.Tensor | None:
    return args[0] if args and isinstance(args[0], torch.Tensor) else None


def layer_names(stacks: dict[str, torch.nn.ModuleList]) -> list[str]:
    return [f"{stack}.layers.{i}" for stack, layers in stacks.items() for i in range(len(layers))]


@contextmanager
def record_layers(stacks: dict[str, torch.nn.ModuleList], sink: LayerSink,
                  force: Callable[[str, int], "torch.Tensor | None"] | None = None) -> Iterator[dict[str, int]]:
    """Call sink(layer, call_index, input, output) for every forward call of every layer of every stack.

    force(layer, call_index) -> tensor or None: when given, the layer's first positional input is replaced by that
    tensor (teacher forcing: each layer sees the reference's input). Yields the per-layer call counts.
    """
    handles, calls = [], {}
    for stack, layers in stacks.items():
        for i, layer in enumerate(layers):
            name = f"{stack}.layers.{i}"
            seen: dict[str, torch.Tensor | None] = {}

            def pre(mod, args, kwargs, name=name, seen=seen):
                x = _first_arg(args)
                if force is not None and x is not None:
                    r = force(name, calls.get(name, 0))
                    if r is not None and r.shape == x.shape:
                        x = r.to(device=x.device, dtype=x.dtype)
                        args = (x,) + tuple(args[1:])
                seen["x"] = x
                return args, kwargs

            def post(mod, args, out, name=name, seen=seen):
                k = calls.get(name, 0)
                calls[name] = k + 1
                t = first_tensor(out)
                if t is not None:
                    sink(name, k, seen.get("x"), t.detach())

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@dataclass
class ModuleInput:
    """What a Linear-like module received at run time: enough to drive it the same way later."""

    dtype: torch.dtype
    rows: int  # rows of the flattened [rows, in_features] input of the first call (the M its kernel saw)
    rms: float  # root mean square of the input entries (the size of a typical activation)
    sample: torch.Tensor | None = None  # up to `keep_rows` rows of a real input (for output comparisons)


@dataclass
class Trace:
    order: list[str] = field(default_factory=list)  # module names in the order their forward started
    inputs: dict[str, ModuleInput] = field(default_factory=dict)


@contextmanager
def trace_modules(model: torch.nn.Module, watch: set[str] | None = None, keep_rows: int = 0) -> Iterator[Trace]:
    """Record the name of every module of `model` as its forward starts, and, for the modules named in `watch`,
    the dtype, row count and RMS of their first input (plus up to `keep_rows` rows of it)."""
    trace = Trace()
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def pre(m, args, name=name):
            trace.order.append(name)
            if watch is not None and name in watch and name not in trace.inputs:
                x = _first_arg(args)
                if x is not None and x.is_floating_point() and x.numel():
                    flat = x.detach().reshape(-1, x.shape[-1])
                    rms = float(flat.float().pow(2).mean().sqrt())
                    sample = flat[:keep_rows].clone() if keep_rows else None
                    trace.inputs[name] = ModuleInput(x.dtype, flat.shape[0], rms, sample)

        handles.append(mod.register_forward_pre_hook(pre))
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()


# Ops that multiply matrices: their operand dtypes say what precision the hardware really computed in.
_MATMUL_WORDS = ("mm", "matmul", "linear", "gemm", "gemv", "conv", "addmm", "bmm")


class MatmulDtypes(TorchDispatchMode):
    """Records (op name, operand dtypes) for every matrix-multiply-like op dispatched inside the mode.

    Custom ops (Triton/CUDA kernels registered with torch.library) appear under their own names; a raw kernel
    launch that bypasses the dispatcher is invisible here (the output comparisons still see what it computed).
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[str, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(getattr(func, "__name__", func))
        base = name.split(".")[0].lower()
        if any(w in base for w in _MATMUL_WORDS):
            dts = tuple(str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor))
            self.seen.append((name, dts))
        return func(*args, **(kwargs or {}))
