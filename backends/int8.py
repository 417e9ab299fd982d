"""int8 backends: `int8` (W8A8 dynamic: per-token int8 activations, per-channel int8 weights) and
`int8_weight_only` (int8 weights per channel, bf16 activations).

int8 W8A8: activation quantization by our Triton kernel on CUDA (torch ops on CPU), then `torch._int_mm`
(cuBLASLt int8 on CUDA, oneDNN/reference int8 GEMM on CPU: both real int8 kernels), int32 accumulators
rescaled by x_scale * w_scale. cuBLAS `_int_mm` needs M > 16, so smaller M is zero-padded to 32 rows.
int8 weight-only: `torch._weight_int8pack_mm` where this torch has it for the device (checked by a probe
up front), otherwise dequantize-per-call + bf16 F.linear; the report says which.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from evalkit.backends.quant import (
    QuantBackend,
    QuantLinear,
    capability_line,
    choose_kernel,
    quant_int8_rows,
)
from evalkit.kernels.triton_kernels import rowwise_quant, triton_available
from torch import nn

from evalkit.errors import CapabilityError


class Int8Linear(QuantLinear):
    weight_format = "int8, per-channel fp32 scales"
    scale_buffers = ("wscale",)
    activation_precision = "int8 (dynamic per-token)"

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype, use_triton: bool) -> None:
        super().__init__(linear, out_dtype)
        q, s = quant_int8_rows(linear.weight.detach())
        self.register_buffer("qweight", q)  # [N, K]
        self.register_buffer("wscale", s.reshape(1, -1).contiguous())
        self.use_triton = use_triton
        self.kernel = ("triton:rowwise_quant_int8" if use_triton else "torch:rowwise_quant_int8") + " + torch._int_mm (int32 acc) + rescale"

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.wscale.reshape(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.use_triton:
            xq, xs = rowwise_quant(x2, "int8")
        else:
            xq, xs1 = quant_int8_rows(x2)
            xs = xs1.reshape(-1, 1)
        m = xq.shape[0]
        if x2.is_cuda and m <= 16:  # cuBLAS int8 GEMM needs M > 16
            xq = F.pad(xq, (0, 0, 0, 32 - m))
        acc = torch._int_mm(xq, self.qweight.t())[:m]
        y = acc.float() * xs * self.wscale
        return self._finish(y, shape)


def _int8pack_available(device: torch.device) -> bool:
    try:
        x = torch.randn(2, 32, device=device, dtype=torch.bfloat16)
        w = torch.randint(-127, 127, (16, 32), device=device, dtype=torch.int8)
        torch._weight_int8pack_mm(x, w, torch.ones(16, device=device, dtype=torch.bfloat16))
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


class Int8WeightOnlyLinear(QuantLinear):
    weight_format = "int8, per-channel bf16 scales"
    scale_buffers = ("wscale",)
    activation_precision = "bf16"

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype, packed_kernel: bool, cuda: bool) -> None:
        super().__init__(linear, out_dtype)
        q, s = quant_int8_rows(linear.weight.detach())
        self.register_buffer("qweight", q)
        self.register_buffer("wscale", s.to(torch.bfloat16))
        self.packed_kernel = packed_kernel
        self.cuda_choice = cuda and packed_kernel
        if self.cuda_choice:
            self.kernel = ("auto per shape (timed once, checked, cached): torch._weight_int8pack_mm | "
                           "dequant int8->bf16 per call + cuBLAS bf16")
        else:
            self.kernel = "torch._weight_int8pack_mm" if packed_kernel else "dequant int8->bf16 per call + torch F.linear (bf16)"

    def dequantized_weight(self) -> torch.Tensor:
        return (self.qweight.to(torch.bfloat16) * self.wscale[:, None]).float()

    def _packed(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x2, self.qweight, self.wscale)

    def _dequant_cublas(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2, self.qweight.to(torch.bfloat16) * self.wscale[:, None])

    def choose(self, x2: torch.Tensor) -> str:
        key = ("int8wo", x2.device.index, self.out_features, self.in_features, x2.shape[0])
        return choose_kernel(key, {"dequant_cublas": lambda: self._dequant_cublas(x2), "packed": lambda: self._packed(x2)},
                             reference="dequant_cublas")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if self.cuda_choice:
            y = getattr(self, "_" + self.choose(x2))(x2)
        elif self.packed_kernel:
            y = self._packed(x2)
        else:
            y = self._dequant_cublas(x2)
        return self._finish(y, shape)


class Int8Backend(QuantBackend):
    name = "int8"
    precision_class = "8-bit"

    def check_engine(self, device: torch.device) -> None:
        if device.type == "cuda":
            ver = triton_available()
            if ver is None:
                raise CapabilityError("backend 'int8' on CUDA needs Triton for its fused activation quantization")
            self.capability_notes.append(capability_line(True, f"triton {ver}; torch._int_mm (cuBLASLt int8)"))
        else:
            self.capability_notes.append(capability_line(True, f"torch._int_mm int8 GEMM on {device.type}"))

    def make_module(self, name: str, linear: nn.Linear, device: torch.device) -> nn.Module:
        return Int8Linear(linear, self.base_dtype, use_triton=device.type == "cuda")


class Int8WeightOnlyBackend(QuantBackend):
    name = "int8_weight_only"
    precision_class = "8-bit"

    def check_engine(self, device: torch.device) -> None:
        self._packed = _int8pack_available(device)
        self.capability_notes.append(
            capability_line(
                True,
                f"torch._weight_int8pack_mm on {device.type}"
                if self._packed
                else f"torch._weight_int8pack_mm not available on {device.type}: kernel is dequant-per-call + bf16 F.linear",
            )
        )

    def make_module(self, name: str, linear: nn.Linear, device: torch.device) -> nn.Module:
        return Int8WeightOnlyLinear(linear, self.base_dtype, packed_kernel=self._packed, cuda=device.type == "cuda")
