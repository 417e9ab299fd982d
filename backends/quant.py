"""Shared pieces of the quantization backends: the QuantLinear base, quantization math, the report builder.

Every quantized module stores its real low-precision tensors as buffers (so `module_weight_bytes` counts
them), names the buffer that holds the weights (`weight_store`), says what its matmul consumes
(`activation_precision`) and what computes it (`kernel`), and can return the effective weight
(`dequantized_weight()`) for fidelity fingerprints. The report is read off these modules.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from evalkit.backends.base import (
    Backend,
    BackendReport,
    ModuleReport,
    module_weight_bytes,
)
from evalkit.backends.targets import model_device, replace_module, select_linears
from evalkit.kernels.formats import (  # noqa: F401 (re-exported)
    FP8_MAX,
    fake_quant_fp8_rows,
    quant_fp8_rows,
    unpack_nibbles,
)
from torch import nn

from evalkit.errors import BadInput, CapabilityError

DTYPE_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
ENGINES = ("native", "emulated", "fake_quant")


class QuantLinear(nn.Module):
    """Base of every quantized Linear replacement. Subclasses fill the buffers and `forward`."""

    weight_store: str = "qweight"  # name of the buffer that holds the (packed) weights
    weight_format: str = ""  # human description appended to the storage dtype in the report
    scale_buffers: tuple[str, ...] = ()  # buffers a correct kernel must apply (fault_ignored_scale zeroes their effect)
    activation_precision: str = "bf16"
    kernel: str = ""

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.out_dtype = out_dtype
        b = linear.bias
        self.register_buffer("bias", None if b is None else b.detach().to(out_dtype).clone())
        self.scales_ignored = False

    # -- what the report reads
    def weight_dtype_str(self) -> str:
        store = getattr(self, self.weight_store)
        return f"{store.dtype} ({self.weight_format})" if self.weight_format else str(store.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The effective weight [out, in] in fp32 after dequantization (what the kernel multiplies by)."""
        raise NotImplementedError

    def read_bytes(self) -> int:
        """Bytes one forward must read from memory at least (the weight-read floor's numerator): every buffer,
        unless a subclass keeps a second packing of the same weights for another kernel."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def ignore_scales(self) -> None:
        """Fault injection: make the kernel run the quantized weights as if every scale were 1 (zero points 0)."""
        for name in self.scale_buffers:
            t = getattr(self, name)
            setattr(self, name, torch.ones_like(t))
        for name in getattr(self, "zero_buffers", ()):
            setattr(self, name, torch.zeros_like(getattr(self, name)))
        self.scales_ignored = True
        self._after_scale_change()

    def _after_scale_change(self) -> None:  # subclasses that pre-pack scales re-pack here
        return None

    def _finish(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w={self.weight_dtype_str()}, act={self.activation_precision}, kernel={self.kernel}"


# ------------------------------------------------------------------------------------------------ math
def quant_int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: q int8 [R, C], scale [R] fp32 with t ≈ q * scale."""
    t32 = t.float()
    scale = (t32.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
    q = torch.round(t32 / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quant_int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uint4 per (row, group of `group` along K), tinygemm convention w ≈ (q - 8) * s + z.

    Returns q uint8 [N, K] in 0..15, scales [N, K/g] fp32, zeros [N, K/g] fp32.
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15.0).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.uint8)
    z = lo + 8.0 * s
    return q.reshape(n, k), s, z


def int4_pack(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (nibble-packed uint8 [N, K/2], bf16 scales+zeros [K/g, N, 2]): the int4 backend's storage."""
    q, s, z = quant_int4_groups(w, group)
    return pack_nibbles(q), torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()


def dequant_int4_groups(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    g = (q.float().reshape(n, k // group, group) - 8.0) * s.float()[..., None] + z.float()[..., None]
    return g.reshape(n, k)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> uint8 [N, K/2], even column in the high nibble (tinygemm's input order)."""
    return ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)


def check_group(name: str, k: int, group: int) -> None:
    if k % group:
        raise BadInput(f"{name}: in_features {k} is not a multiple of group size {group}; set backend.options.group_size")


def wants_packing(layer_name: str, mma_layers: str, forced: bool = False) -> bool:
    """Whether a quantized layer keeps the M <= 16 kernels' fragment copy of its weights: `options.mma_layers`
    = expert (default: the action expert's layers, which run at M = horizon x batch) | all | none, or a
    forced small-M kernel."""
    if mma_layers not in ("expert", "all", "none"):
        raise BadInput(f"backend.options.mma_layers '{mma_layers}' unknown; valid: expert, all, none")
    return forced or mma_layers == "all" or (mma_layers == "expert" and re.search(r"(^|\.)expert\.", layer_name) is not None)


# ------------------------------------------------------------------------------------------------ report
def describe_module(name: str, mod: nn.Module) -> ModuleReport | None:
    """One report row for a module that holds weights directly (a leaf in the weight sense), else None.

    Foreign modules (ModelOpt, Torch-TensorRT) are described by an `_evalkit_desc` dict set on them by the
    backend that made them: {"weight_store", "weight_format", "activation_precision", "kernel"}.
    """
    if isinstance(mod, QuantLinear):
        return ModuleReport(name, type(mod).__name__, mod.weight_dtype_str(), module_weight_bytes(mod), mod.activation_precision, mod.kernel)
    desc = getattr(mod, "_evalkit_desc", None)
    if desc is not None:
        store = getattr(mod, desc["weight_store"])
        wd = f"{store.dtype} ({desc['weight_format']})" if desc.get("weight_format") else str(store.dtype)
        return ModuleReport(name, type(mod).__name__, wd, module_weight_bytes(mod), desc["activation_precision"], desc["kernel"])
    w = mod._parameters.get("weight", None)
    if w is None:
        w = mod._buffers.get("weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    act = DTYPE_SHORT.get(w.dtype, str(w.dtype)) if isinstance(mod, nn.Linear) else "-"
    return ModuleReport(name, type(mod).__name__, str(w.dtype), module_weight_bytes(mod), act, f"torch:{type(mod).__name__}")


def describe_model(model: nn.Module) -> list[ModuleReport]:
    rows = []
    for name, mod in model.named_modules():
        r = describe_module(name, mod)
        if r is not None:
            rows.append(r)
    return rows


def device_str(dev: torch.device) -> str:
    if dev.type == "cuda":
        cc = torch.cuda.get_device_capability(dev)
        return f"{dev} ({torch.cuda.get_device_name(dev)}, sm_{cc[0]}{cc[1]})"
    return str(dev)


def capability_line(ok: bool, what: str) -> str:
    return f"capability: {'ok ' if ok else 'MISSING '}{what}"


# ------------------------------------------------------------------------------------------------ base backend
class QuantBackend(Backend):
    """Cast the model to `base_dtype` (bf16) and replace every targeted nn.Linear with `make_module(name, linear)`.

    Subclasses set `engines` (which `engine` values they accept), override `check_engine` for up-front
    capability checks (one clear line each) and implement `make_module`.
    """

    engines: tuple[str, ...] = ("native",)
    known_options: tuple[str, ...] = ()  # subclasses list the options they read
    base_dtype = torch.bfloat16
    replaces_targets = True  # False: `prepare` transforms the targets itself (ModelOpt converts modules in place)

    def __init__(self, targets: str = "prefix_mlp", engine: str = "native", **options: Any) -> None:
        super().__init__(targets=targets, **options)
        if engine not in self.engines:
            raise BadInput(f"backend '{self.name}' has no engine '{engine}'; valid: {', '.join(self.engines)}")
        self.engine = engine
        self.capability_notes: list[str] = []

    def check_engine(self, device: torch.device) -> None:
        """Raise CapabilityError (one line) when `self.engine` cannot run on `device`; record what was checked."""
        return None

    def require_cuda_cc(self, device: torch.device, cc: tuple[int, int], why: str) -> None:
        if device.type != "cuda":
            raise CapabilityError(
                f"backend '{self.name}' (engine={self.engine}) needs a CUDA GPU with compute capability >= {cc[0]}.{cc[1]} "
                f"({why}); device is {device}"
                + ("; use backend.engine=emulated for an accuracy-only emulation" if "emulated" in self.engines else "")
            )
        have = torch.cuda.get_device_capability(device)
        if tuple(have) < cc:
            raise CapabilityError(
                f"backend '{self.name}' (engine={self.engine}) needs compute capability >= {cc[0]}.{cc[1]} ({why}); "
                f"{torch.cuda.get_device_name(device)} has {have[0]}.{have[1]}"
                + ("; use backend.engine=emulated for an accuracy-only emulation" if "emulated" in self.engines else "")
            )
        self.capability_notes.append(capability_line(True, f"compute capability {have[0]}.{have[1]} >= {cc[0]}.{cc[1]} ({why})"))

    @property
    def latency_representative(self) -> bool:
        return self.engine == "native"

    def make_module(self, name: str, linear: nn.Linear, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def apply(self, model: nn.Module, calib: Iterable[Any] | None = None) -> BackendReport:
        device = model_device(model)
        self.check_requirements(device)
        self.check_engine(device)
        targets = select_linears(model, self.targets)  # BadInput before touching the model
        before = module_weight_bytes(model)
        cast_unquantized(model, self.base_dtype)
        self.prepare(model, targets, calib)
        for name, lin in targets if self.replaces_targets else ():
            replace_module(model, name, self.make_module(name, lin, device))
        self.post_replace(model)
        notes = list(self.capability_notes)
        notes.append(f"targets={self.targets}: {len(targets)} Linear modules quantized; the rest of the model cast to {self.base_dtype}")
        notes += self.extra_notes()
        return BackendReport(
            backend=self.name,
            device=device_str(device),
            modules=describe_model(model),
            weight_bytes_before=before,
            weight_bytes_after=module_weight_bytes(model),
            latency_representative=self.latency_representative,
            notes=notes,
        )

    def prepare(self, model: nn.Module, targets: list[tuple[str, nn.Linear]], calib: Iterable[Any] | None) -> None:
        """Hook before replacement (calibration); default nothing."""
        return None

    def extra_notes(self) -> list[str]:
        return []

    def post_replace(self, model: nn.Module) -> None:
        """Hook after the targets were replaced (fusions across modules); default nothing."""
        return None


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating params/buffers to `dtype`, except inside modules an earlier backend quantized
    (`model.to(dtype)` would also cast their float8 weights and fp32 scales: backends compose safely)."""
    for mod in model.modules():
        if isinstance(mod, QuantLinear) or hasattr(mod, "_evalkit_desc"):
            continue
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                if t is None or not t.is_floating_point() or t.dtype == dtype or t.element_size() == 1:
                    continue
                if isinstance(t, nn.Parameter):
                    store[k] = nn.Parameter(t.detach().to(dtype), requires_grad=t.requires_grad)
                else:
                    store[k] = t.to(dtype)


def run_calibration(model: nn.Module, calib: Iterable[Any]) -> int:
    """Run every calibration item through the model: a callable is called (it runs the policy on probe
    observations), a dict is passed as keyword arguments, a tuple/list as positional arguments."""
    n = 0
    with torch.no_grad():
        for item in calib:
            if callable(item):
                item()
            elif isinstance(item, dict):
                model(**item)
            elif isinstance(item, (tuple, list)):
                model(*item)
            else:
                model(item)
            n += 1
    return n


def linear_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference matmul of the emulation paths, in fp32 so the only error is the quantization being emulated."""
    return F.linear(x.float(), w.float())


Maker = Callable[[str, nn.Linear, torch.device], nn.Module]


# ------------------------------------------------------------------------------------------------ kernel choice
# (kind, device index, N, K, M, extra) -> chosen candidate, and what was measured to choose it.
KERNEL_CHOICE: dict[tuple, str] = {}
CHOICE_LOG: dict[tuple, dict[str, Any]] = {}


_L2_FLUSH: dict[str, torch.Tensor] = {}


def flush_l2(device: torch.device) -> None:
    """Evict the L2 cache (write 256 MiB): in the model a layer's weights are cold, read from HBM."""
    buf = _L2_FLUSH.get(str(device))
    if buf is None:
        buf = _L2_FLUSH[str(device)] = torch.empty(64 << 20, device=device, dtype=torch.int32)
    buf.zero_()


def capture_cuda_graph(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run fn once on a side stream (PyTorch's rule before capture), then capture one call of it:
    (graph, fn's output tensors as the graph writes them on every replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def time_cuda_ms(fn: Callable[[], Any], reps: int = 20) -> tuple[float, str]:
    """Median GPU ms of fn, timed as CUDA-graph replays (how the policy runs; eager timing would mostly
    measure Python launch overhead, which differs between Triton and ATen kernels), each after an L2 flush
    outside the timed span (a single GEMM's weights would otherwise stay in L2 and favour other kernels
    than the cold reads of a real forward do). A candidate that cannot be captured is timed eagerly, and
    the returned mode says so."""
    for _ in range(3):
        fn()
    mode, g = "graph", None
    try:
        g, _ = capture_cuda_graph(fn)
    except RuntimeError:
        mode, g = "eager", None
    run = g.replay if g is not None else fn
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    device = torch.device("cuda", torch.cuda.current_device())
    for _ in range(reps):
        flush_l2(device)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], mode


def choose_kernel(key: tuple, candidates: dict[str, Callable[[], torch.Tensor]], reference: str, tol: float = 1e-2,
                  own_refs: dict[str, Callable[[], torch.Tensor]] | None = None) -> str:
    """Pick the fastest candidate for one GEMM shape, once per process (cached by `key`).

    Every candidate is first checked against `reference`'s output (relative error < tol), or against its
    entry in `own_refs` (the exact math of a candidate that rounds differently on purpose, e.g. finer
    activation scales); a candidate that fails or raises is excluded and the reason kept in CHOICE_LOG, so a
    fast wrong kernel is never chosen. Must not run during CUDA-graph capture: warm up with one eager call first.
    """
    choice = KERNEL_CHOICE.get(key)
    if choice is not None:
        return choice
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"no kernel chosen yet for {key}; run one eager forward before CUDA-graph capture")
    ref = candidates[reference]().float()
    log: dict[str, Any] = {}
    own_refs = own_refs or {}
    for name, fn in candidates.items():
        try:
            want = own_refs[name]().float() if name in own_refs else ref
            err = float((fn().float() - want).norm() / want.norm().clamp(min=1e-30))
            if not err < tol:
                log[name] = f"rejected: rel err {err:.3g} vs {'its own reference' if name in own_refs else reference}"
                continue
            ms, mode = time_cuda_ms(fn)
            log[name] = ms
            if mode != "graph":
                log.setdefault("timed_eagerly", []).append(name)  # not capturable: its time includes launch overhead
        except Exception as e:  # a kernel that cannot run this shape is not a candidate for it
            log[name] = f"rejected: {type(e).__name__}: {str(e)[:200]}"
    timed = {k: v for k, v in log.items() if isinstance(v, float)}
    choice = min(timed, key=timed.get)
    KERNEL_CHOICE[key], CHOICE_LOG[key] = choice, log
    return choice
