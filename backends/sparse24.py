"""`sparse24`: 2:4 semi-structured sparsity on the targeted linears (magnitude pruning: the 2 largest of
every 4 consecutive weights along K are kept), bf16 values.

native (CUDA sm_80+): `torch.sparse.to_sparse_semi_structured` -> cuSPARSELt (or CUTLASS when cuSPARSELt
is missing; the report names the one in use), run through `F.linear`. `engine=emulated` keeps a dense bf16
weight with the same 2:4 zeros and a dense matmul: same numbers, no speed (accuracy only).
The int8 variant of 2:4 is not built: `backend.options.dtype=int8` fails with a clear message.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backends.quant import QuantBackend, QuantLinear, capability_line
from evalkit.errors import BadInput


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


class Sparse24Backend(QuantBackend):
    name = "sparse24"
    engines = ("native", "emulated")

    def check_engine(self, device: torch.device) -> None:
        if self.options.get("dtype", "bf16") != "bf16":
            raise BadInput(f"sparse24 dtype '{self.options.get('dtype')}' is not built; only bf16 values are supported")
        if self.engine == "emulated":
            self.capability_notes.append(capability_line(True, "emulated 2:4 mask runs anywhere (accuracy only)"))
            return
        self.require_cuda_cc(device, (8, 0), "2:4 sparse tensor cores")
        lib = "cuSPARSELt" if torch.backends.cusparselt.is_available() else "CUTLASS (cuSPARSELt not available)"
        self.capability_notes.append(capability_line(True, f"semi-structured sparse kernels: {lib}"))

    def make_module(self, name: str, linear: nn.Linear, device: torch.device) -> nn.Module:
        if self.engine == "native" and (linear.in_features % 64 or linear.out_features % 32):
            raise BadInput(f"{name}: 2:4 sparsity needs in_features % 64 == 0 and out_features % 32 == 0")
        return Sparse24Linear(linear, self.base_dtype, emulated=self.engine == "emulated")
