"""`sparse24`: 2:4 semi-structured sparsity on the targeted linears (magnitude pruning: the 2 largest of
every 4 consecutive weights along K are kept), bf16 values (`options.dtype=bf16`, default) or int8 values
(`options.dtype=int8`: W8A8 dynamic, per-channel int8 weights, per-token int8 activations).

bf16 native (CUDA sm_80+): `torch.sparse.to_sparse_semi_structured` -> cuSPARSELt (or CUTLASS when
cuSPARSELt is missing; the report names the one in use), run through `F.linear`.
int8 native (CUDA sm_80+, cuSPARSELt required): weights compressed by `torch._cslt_compress`, activations
quantized per token by our Triton kernel, `torch._cslt_sparse_mm` (int8 x int8, the per-channel weight
scale applied as cuSPARSELt's alpha vector, bf16 out), then the per-token scale.
`engine=emulated` keeps dense weights with the same 2:4 zeros (and, for int8, the same int8 values and
fake-quantized activations) and a dense fp32 matmul: same numbers, no speed (accuracy only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from evalkit.backends.quant import (
    QuantBackend,
    QuantLinear,
    capability_line,
    linear_fp32,
    quant_int8_rows,
)
from evalkit.kernels.triton_kernels import rowwise_quant, triton_available
from torch import nn

from evalkit.errors import BadInput, CapabilityError

DTYPES = ("bf16", "int8")


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude of every 4 consecutive weights along the input dimension."""
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    idx = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * mask).reshape(n, k)


class Sparse24Linear(QuantLinear):
    activation_precision = "bf16"

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype, emulated: bool) -> None:
        super().__init__(linear, out_dtype)
        if linear.in_features % 4:
            raise BadInput(f"2:4 sparsity needs in_features % 4 == 0, got {linear.in_features}")
        dense = prune_24(linear.weight.detach().to(torch.bfloat16))
        self.emulated = emulated
        if emulated:
            self.register_buffer("weight_masked", dense)
            self.weight_store = "weight_masked"
            self.weight_format = "dense bf16 with 2:4 zeros (emulated)"
            self.kernel = "emulated: dense torch F.linear on 2:4-masked weights"
            self._sp = None
        else:
            sp = torch.sparse.to_sparse_semi_structured(dense)
            self._sp = sp  # tensor subclass; its storage is registered below so the report counts real bytes
            for part in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask"):
                t = getattr(sp, part, None)
                if isinstance(t, torch.Tensor):
                    self.register_buffer(part, t)
            self.weight_store = "packed"
            lib = "cuSPARSELt" if "CUSPARSELT" in type(sp).__name__.upper() else "CUTLASS"
            self.weight_format = f"2:4 semi-structured ({lib}) values+metadata"
            self.kernel = f"torch F.linear on SparseSemiStructuredTensor ({lib})"

    def dequantized_weight(self) -> torch.Tensor:
        return (self.weight_masked if self.emulated else self._sp.to_dense()).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = F.linear(x2, self.weight_masked if self.emulated else self._sp)
        return self._finish(y, shape)


class Sparse24Int8Linear(QuantLinear):
    """2:4 sparse int8 weights (per-channel scales) x dynamic per-token int8 activations."""

    scale_buffers = ("wscale",)
    activation_precision = "int8 (dynamic per-token)"

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype, emulated: bool) -> None:
        super().__init__(linear, out_dtype)
        q, s = quant_int8_rows(prune_24(linear.weight.detach().float()))  # pruned zeros stay exactly 0
        self.emulated = emulated
        self.register_buffer("wscale", s.contiguous())  # [N] fp32: cuSPARSELt's alpha vector
        if emulated:
            self.register_buffer("qweight", q)
            self.weight_format = "dense int8 with 2:4 zeros (emulated), per-channel fp32 scales"
            self.kernel = "emulated: int8 2:4 weights, fake-quant int8 activations, dense fp32 F.linear"
        else:
            self.register_buffer("packed", torch._cslt_compress(q))  # int8 values + 2:4 metadata, one buffer
            self.weight_store = "packed"
            self.weight_format = "int8 2:4 semi-structured (cuSPARSELt) values+metadata, per-channel fp32 scales"
            self.kernel = "triton:rowwise_quant_int8 + torch._cslt_sparse_mm (int8 2:4, alpha = w scale, bf16 out) + x scale"

    def stored_int8(self) -> torch.Tensor:
        """The int8 weights [N, K] as the kernel sees them: read back through the sparse kernel itself
        (compressed weights x identity, in column blocks), so a wrong compression shows here."""
        if self.emulated:
            return self.qweight
        k = self.in_features
        cols = []
        for c0 in range(0, k, 1024):
            eye = torch.zeros(k, min(1024, k - c0), device=self.packed.device, dtype=torch.int8)
            eye[c0 : c0 + eye.shape[1]] = torch.eye(eye.shape[1], device=eye.device, dtype=torch.int8)
            cols.append(torch._cslt_sparse_mm(self.packed, eye.t().contiguous().t(), out_dtype=torch.bfloat16))
        return torch.cat(cols, dim=1).round().to(torch.int8)

    def dequantized_weight(self) -> torch.Tensor:
        return self.stored_int8().float() * self.wscale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.emulated:
            xq, xs = quant_int8_rows(x2)
            y = linear_fp32(xq.float() * xs[:, None], self.dequantized_weight())
            return self._finish(y, shape)
        xq, xs = rowwise_quant(x2.to(torch.bfloat16), "int8")
        m = xq.shape[0]
        if m % 16:  # cuSPARSELt int8 wants the dense operand's dims in multiples of 16
            xq = F.pad(xq, (0, 0, 0, 16 - m % 16))
        y = torch._cslt_sparse_mm(self.packed, xq.t(), alpha=self.wscale, out_dtype=torch.bfloat16, transpose_result=True)
        return self._finish(y[:m] * xs, shape)


class Sparse24Backend(QuantBackend):
    name = "sparse24"
    precision_class = "sparse"
    engines = ("native", "emulated")
    known_options = ("dtype",)

    @property
    def values(self) -> str:
        v = str(self.options.get("dtype", "bf16"))
        if v not in DTYPES:
            raise BadInput(f"sparse24 dtype '{v}' unknown; valid: {', '.join(DTYPES)}")
        return v

    def check_engine(self, device: torch.device) -> None:
        values = self.values
        if self.engine == "emulated":
            self.capability_notes.append(capability_line(True, f"emulated 2:4 {values} runs anywhere (accuracy only)"))
            return
        self.require_cuda_cc(device, (8, 0), "2:4 sparse tensor cores")
        has_cslt = torch.backends.cusparselt.is_available()
        if values == "int8":
            if not has_cslt:
                raise CapabilityError("sparse24 dtype=int8 needs cuSPARSELt (torch.backends.cusparselt); this torch has none")
            if triton_available() is None:
                raise CapabilityError("sparse24 dtype=int8 needs Triton for its per-token activation quantization")
        lib = "cuSPARSELt" if has_cslt else "CUTLASS (cuSPARSELt not available)"
        self.capability_notes.append(capability_line(True, f"semi-structured sparse kernels: {lib}, {values} values"))

    def make_module(self, name: str, linear: nn.Linear, device: torch.device) -> nn.Module:
        if self.engine == "native" and (linear.in_features % 64 or linear.out_features % 32):
            raise BadInput(f"{name}: 2:4 sparsity needs in_features % 64 == 0 and out_features % 32 == 0")
        if self.values == "int8":
            return Sparse24Int8Linear(linear.to(device), self.base_dtype, emulated=self.engine == "emulated")
        return Sparse24Linear(linear, self.base_dtype, emulated=self.engine == "emulated")
