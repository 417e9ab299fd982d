"""`int4`: W4A16 group-wise (group 128, asymmetric: bf16 scales + zeros), bf16 activations.

Kernels (CUDA), chosen per GEMM shape (N, K, M) by timing the candidates once on the first call at that
shape and caching the winner for the process (all layers of one shape share the choice):
- `tinygemm`: `torch._weight_int4pack_mm` (tensor-core int4 dequant-in-kernel GEMM; fast at small M,
  the denoise loop's M = horizon x batch);
- `dequant_cublas`: unpack to bf16 per call + cuBLAS bf16 GEMM (wins at large M, the prefill).
`backend.options.kernel=tinygemm|dequant_cublas` forces one. On CPU the native engine runs
`torch._weight_int4pack_mm_for_cpu` (a real int4 CPU kernel); `engine=emulated` dequantizes and multiplies in fp32.
Both packings are kept (the plain nibble packing also serves `dequantized_weight`), and the report's bytes count both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backends.quant import (
    QuantBackend,
    QuantLinear,
    capability_line,
    check_group,
    dequant_int4_groups,
    linear_fp32,
    pack_nibbles,
    quant_int4_groups,
    unpack_nibbles,
)
from evalkit.errors import BadInput

CANDIDATES = ("tinygemm", "dequant_cublas")
# (device index, N, K, M, group) -> chosen candidate; filled on first call at each shape.
KERNEL_CHOICE: dict[tuple, str] = {}
CHOICE_TIMES_MS: dict[tuple, dict[str, float]] = {}
INNER_K_TILES = 8


def _time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


class Int4Linear(QuantLinear):
    weight_store = "qweight"
    activation_precision = "bf16"

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype, group: int, mode: str, device: torch.device) -> None:
        super().__init__(linear, out_dtype)
        self.group = group
        self.weight_format = f"int4 x2 nibble-packed, group {group}, bf16 scales+zeros"
        q, s, z = quant_int4_groups(linear.weight.detach(), group)
        self.register_buffer("qweight", pack_nibbles(q))  # [N, K/2]
        self.register_buffer("scales_zeros", torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous())  # [K/g, N, 2]
        self.mode = mode  # "cuda", "cpu", "emulated"
        self.forced = None
        if mode == "cuda":
            self.register_buffer("tg_packed", torch.ops.aten._convert_weight_to_int4pack(self.qweight, INNER_K_TILES))
            self.kernel = "auto per shape: torch._weight_int4pack_mm (tinygemm) | unpack->bf16 + cuBLAS (timed once, cached)"
        elif mode == "cpu":
            self.register_buffer("tg_packed", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
            self.kernel = "torch._weight_int4pack_mm_for_cpu"
        else:
            self.kernel = "emulated: dequant int4 (group) + fp32 F.linear"

    def force(self, kernel: str) -> None:
        if kernel not in CANDIDATES:
            raise BadInput(f"int4 kernel '{kernel}' unknown; valid: auto, {', '.join(CANDIDATES)}")
        self.forced = kernel
        self.kernel = "torch._weight_int4pack_mm (tinygemm)" if kernel == "tinygemm" else "unpack int4->bf16 per call + cuBLAS bf16"

    def ignore_scales(self) -> None:
        sz = self.scales_zeros.clone()
        sz[..., 0] = 1.0
        sz[..., 1] = 0.0
        self.scales_zeros = sz
        self.scales_ignored = True

    def _scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scales_zeros[..., 0].t(), self.scales_zeros[..., 1].t()  # [N, K/g]

    def dequantized_weight(self) -> torch.Tensor:
        s, z = self._scales()
        return dequant_int4_groups(unpack_nibbles(self.qweight), s, z, self.group)

    def _dequant_cublas(self, x2: torch.Tensor) -> torch.Tensor:
        s, z = self._scales()
        q = unpack_nibbles(self.qweight).to(torch.bfloat16).reshape(self.out_features, -1, self.group)
        w = ((q - 8) * s[..., None] + z[..., None]).reshape(self.out_features, self.in_features)
        return F.linear(x2, w)

    def _tinygemm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x2, self.tg_packed, self.group, self.scales_zeros)

    def choose(self, x2: torch.Tensor) -> str:
        if self.forced:
            return self.forced
        key = (x2.device.index, self.out_features, self.in_features, x2.shape[0], self.group)
        choice = KERNEL_CHOICE.get(key)
        if choice is None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"int4: no kernel chosen yet for shape {key[1:]}; run one eager forward before CUDA-graph capture")
            times = {"tinygemm": _time_ms(lambda: self._tinygemm(x2)), "dequant_cublas": _time_ms(lambda: self._dequant_cublas(x2))}
            choice = min(times, key=times.get)
            KERNEL_CHOICE[key], CHOICE_TIMES_MS[key] = choice, times
        return choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.mode == "emulated":
            return self._finish(linear_fp32(x2, self.dequantized_weight()), shape)
        x2 = x2.to(torch.bfloat16).contiguous()
        if self.mode == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, self.tg_packed, self.group, self.scales_zeros)
        elif self.choose(x2) == "tinygemm":
            y = self._tinygemm(x2)
        else:
            y = self._dequant_cublas(x2)
        return self._finish(y, shape)


class Int4Backend(QuantBackend):
    name = "int4"
    engines = ("native", "emulated")

    def check_engine(self, device: torch.device) -> None:
        if self.engine == "emulated":
            self.capability_notes.append(capability_line(True, "emulated int4 runs anywhere (accuracy only)"))
        elif device.type == "cuda":
            self.require_cuda_cc(device, (8, 0), "tinygemm int4 kernel")
        else:
            self.capability_notes.append(capability_line(True, "torch._weight_int4pack_mm_for_cpu (CPU int4 kernel)"))

    @property
    def latency_representative(self) -> bool:
        return self.engine == "native"

    def make_module(self, name: str, linear: nn.Linear, device: torch.device) -> nn.Module:
        group = int(self.options.get("group_size", 128))
        check_group(name, linear.in_features, group)
        mode = "emulated" if self.engine == "emulated" else ("cuda" if device.type == "cuda" else "cpu")
        if mode == "cuda" and linear.in_features % (INNER_K_TILES * 16):
            raise BadInput(f"{name}: tinygemm needs in_features % {INNER_K_TILES * 16} == 0, got {linear.in_features}")
        mod = Int4Linear(linear.to(device), self.base_dtype, group, mode, device)
        kernel = self.options.get("kernel", "auto")
        if kernel != "auto":
            if mode != "cuda":
                raise BadInput("backend.options.kernel selects a CUDA int4 kernel; this run is not on CUDA")
            mod.force(kernel)
        return mod
