"""Blackwell-class 4-bit backends: `nvfp4` (W4A4, e2m1 values in blocks of 16 with e4m3 block scales and an
fp32 per-tensor scale) and `w4a8` (int4 weights, group 128, with fp8 e4m3 per-token activations).

Their native kernels need compute capability >= 10.0: on older GPUs and on CPUs `engine=native` fails up
front with one line. No native kernel is built in evalkit yet, so even a 10.x GPU gets a clear error for
`engine=native`. `engine=emulated` is a faithful emulation for accuracy studies: the codes and scales are
really stored in their formats (uint8 nibbles, float8_e4m3fn block scales), and every forward quantizes the
activations the same way, then multiplies the dequantized tensors in fp32.
"""

from __future__ import annotations

import torch
from evalkit.backends.quant import (
    FP8_MAX,
    QuantBackend,
    QuantLinear,
    capability_line,
    check_group,
    fake_quant_fp8_rows,
    linear_fp32,
    pack_nibbles,
    unpack_nibbles,
)
from torch import nn

from evalkit.errors import CapabilityError

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MID = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2
NVFP4_BLOCK = 16


def nvfp4_quant(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t [R, C] -> (codes uint8 [R, C] = sign<<3 | e2m1 index, block scales e4m3 [R, C/16], global fp32 scalar)."""
    r, c = t.shape
    t32 = t.float()
    gscale = (t32.abs().amax() / (6.0 * FP8_MAX)).clamp(min=1e-12)
    blocks = t32.reshape(r, c // NVFP4_BLOCK, NVFP4_BLOCK)
    bscale = (blocks.abs().amax(-1) / 6.0 / gscale).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    denom = (bscale.float() * gscale)[..., None]
    scaled = torch.where(denom > 0, blocks / denom.clamp(min=1e-30), torch.zeros_like(blocks)).clamp(-6.0, 6.0)
    idx = torch.bucketize(scaled.abs(), _E2M1_MID.to(t.device))
    codes = ((scaled < 0).to(torch.uint8) << 3) | idx.to(torch.uint8)
    return codes.reshape(r, c), bscale, gscale


def nvfp4_dequant(codes: torch.Tensor, bscale: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    r, c = codes.shape
    mag = E2M1_GRID.to(codes.device)[(codes & 0x7).long()]
    val = torch.where((codes >> 3).bool(), -mag, mag).reshape(r, c // NVFP4_BLOCK, NVFP4_BLOCK)
    return (val * (bscale.float() * gscale)[..., None]).reshape(r, c)


def fake_quant_nvfp4(x: torch.Tensor) -> torch.Tensor:
    return nvfp4_dequant(*nvfp4_quant(x))


class Nvfp4Linear(QuantLinear):
    weight_format = "nvfp4: e2m1 nibble-packed, block 16, e4m3 block scales + fp32 tensor scale"
    scale_buffers = ("gscale",)
    activation_precision = "nvfp4 (emulated, dynamic per-token blocks of 16)"
    kernel = "emulated: nvfp4 quant-dequant of x and w + fp32 F.linear"

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype) -> None:
        super().__init__(linear, out_dtype)
        codes, bscale, gscale = nvfp4_quant(linear.weight.detach())
        self.register_buffer("qweight", pack_nibbles(codes))
        self.register_buffer("block_scales", bscale)
        self.register_buffer("gscale", gscale.reshape(1))

    def ignore_scales(self) -> None:
        self.block_scales = torch.ones_like(self.block_scales)
        self.gscale = torch.ones_like(self.gscale)
        self.scales_ignored = True

    def dequantized_weight(self) -> torch.Tensor:
        return nvfp4_dequant(unpack_nibbles(self.qweight), self.block_scales, self.gscale[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = linear_fp32(fake_quant_nvfp4(x.reshape(-1, self.in_features)), self.dequantized_weight())
        return self._finish(y, shape)


class W4A8Linear(QuantLinear):
    scale_buffers = ("scales",)
    activation_precision = "fp8_e4m3 (emulated, dynamic per-token)"
    kernel = "emulated: int4 dequant (group) x fp8 fake-quant activations, fp32 F.linear"

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype, group: int) -> None:
        super().__init__(linear, out_dtype)
        self.group = group
        self.weight_format = f"int4 symmetric nibble-packed (q+8), group {group}, bf16 scales"
        w = linear.weight.detach().float()
        n, k = w.shape
        g = w.reshape(n, k // group, group)
        s = (g.abs().amax(-1) / 7.0).clamp(min=1e-8).to(torch.bfloat16)
        q = torch.round(g / s.float()[..., None]).clamp(-8, 7).to(torch.int16) + 8
        self.register_buffer("qweight", pack_nibbles(q.reshape(n, k).to(torch.uint8)))
        self.register_buffer("scales", s)

    def dequantized_weight(self) -> torch.Tensor:
        q = unpack_nibbles(self.qweight).float() - 8.0
        n = q.shape[0]
        return (q.reshape(n, -1, self.group) * self.scales.float()[..., None]).reshape(n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = linear_fp32(fake_quant_fp8_rows(x.reshape(-1, self.in_features)), self.dequantized_weight())
        return self._finish(y, shape)


class _Fp4ClassBackend(QuantBackend):
    engines = ("native", "emulated")
    known_options: tuple[str, ...] = ()

    def check_engine(self, device: torch.device) -> None:
        if self.engine == "emulated":
            self.capability_notes.append(capability_line(True, f"emulated {self.name} runs anywhere (accuracy only, not latency)"))
            return
        self.require_cuda_cc(device, (10, 0), f"{self.name} tensor-core kernels (Blackwell)")
        raise CapabilityError(f"backend '{self.name}': no native kernel is built in evalkit yet; use backend.engine=emulated")


class NVFP4Backend(_Fp4ClassBackend):
    name = "nvfp4"
    precision_class = "fp4"  # block size fixed at 16 by the format: no options

    def make_module(self, name: str, linear: nn.Linear, device: torch.device) -> nn.Module:
        check_group(name, linear.in_features, NVFP4_BLOCK)
        return Nvfp4Linear(linear, self.base_dtype)


class W4A8Backend(_Fp4ClassBackend):
    name = "w4a8"
    precision_class = "4-bit"
    known_options = ("group_size",)

    def make_module(self, name: str, linear: nn.Linear, device: torch.device) -> nn.Module:
        group = int(self.options.get("group_size", 128))
        check_group(name, linear.in_features, group)
        return W4A8Linear(linear, self.base_dtype, group)
