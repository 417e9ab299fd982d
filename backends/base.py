"""The backend contract (docs/architecture.md): `apply(model, calib) -> BackendReport`.

A backend transforms a policy's nn.Module in place, declares what it needs up front
(`check_requirements` raises CapabilityError with one clear line) and reports, per module,
what really runs. It never falls back silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch

from evalkit.errors import CapabilityError


@dataclass
class ModuleReport:
    name: str  # dotted module name, e.g. "prefix.layers.3.mlp.up_proj"
    kind: str  # "Linear", "Embedding", ...
    weight_dtype: str  # the dtype the weights are stored in, read off the module (e.g. "torch.float8_e4m3fn")
    weight_bytes: int  # bytes of weights + scales as stored
    activation_precision: str  # what the matmul consumes: "bf16", "fp8_e4m3", "int8", ...
    kernel: str  # what computes it: "torch.nn.functional.linear", "torch._scaled_mm", "triton:int4_gemv", ...


@dataclass
class BackendReport:
    backend: str
    device: str
    modules: list[ModuleReport] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    latency_representative: bool = True  # False for emulated / fake-quant modes (accuracy studies only)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_by_precision(self) -> dict[str, int]:
        """Count of modules per (weight dtype, activation precision, kernel) for a one-screen print."""
        counts: dict[str, int] = {}
        for m in self.modules:
            key = f"{m.weight_dtype} / act {m.activation_precision} / {m.kernel}"
            counts[key] = counts.get(key, 0) + 1
        return counts


def module_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer a module holds directly or below it."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += t.numel() * t.element_size()
    return total


class Backend:
    """Base class. Subclasses set `name` and implement `apply`.

    `targets` chooses what is transformed: prefix_mlp (default), expert_mlp, attn, vision, all.
    """

    name: str = "base"
    # The precision class the fidelity gate budgets this backend by (evalkit.fidelity.budgets): "16-bit", "8-bit",
    # "4-bit", "fp4" or "sparse". None: read from the name, else judged as 16-bit (the strictest budgets).
    precision_class: str | None = None
    # Requirements checked before anything runs; e.g. {"min_compute_capability": (8, 9), "packages": ["torchao"]}
    requires: dict[str, Any] = {}

    # The `backend.options` keys this backend reads. Any other key is a BadInput that lists these (a typo such as
    # `fuse_norm=true` must not run silently without the option). None: any key (custom backends from outside).
    known_options: tuple[str, ...] | None = None

    def __init__(self, targets: str = "prefix_mlp", **options: Any) -> None:
        self.targets = targets
        self.options = options
        unknown = sorted(set(options) - set(self.known_options)) if self.known_options is not None else []
        if unknown:
            from evalkit.errors import BadInput

            raise BadInput(f"backend '{self.name}' has no option {', '.join(map(repr, unknown))}; "
                           f"valid: {', '.join(self.known_options) if self.known_options else '(none)'}")

    def check_requirements(self, device: torch.device) -> None:
        req = self.requires or {}
        for pkg in req.get("packages", []):
            try:
                __import__(pkg)
            except ImportError as e:
                raise CapabilityError(
                    f"backend '{self.name}' needs the package '{pkg}' ({e}); install it or pick another backend"
                ) from None
        cc = req.get("min_compute_capability")
        if cc is not None:
            if device.type != "cuda":
                raise CapabilityError(
                    f"backend '{self.name}' needs a CUDA GPU with compute capability >= {cc[0]}.{cc[1]}; device is {device}"
                )
            have = torch.cuda.get_device_capability(device)
            if tuple(have) < tuple(cc):
                raise CapabilityError(
                    f"backend '{self.name}' needs compute capability >= {cc[0]}.{cc[1]}; "
                    f"{torch.cuda.get_device_name(device)} has {have[0]}.{have[1]}"
                )

    def apply(self, model: torch.nn.Module, calib: Iterable[Any] | None = None) -> BackendReport:
        raise NotImplementedError
