"""fp8 backends (e4m3): `fp8` W8A8 dynamic and `fp8_weight_only`.

`fp8` native: weights e4m3 per output channel (fp32 scales), activations quantized per token at run time by
our fused Triton kernel (amax + cast in one launch), matmul by `torch._scaled_mm` with row-wise scales
(cuBLASLt fp8, bf16 out). Needs sm_89+ and Triton. Under torch.compile (`policy.compile=true`) the same
quantization is written as torch ops instead, so inductor fuses it into the kernel that produces the
activation (the preceding norm or GeGLU) rather than calling our kernel as an opaque extra launch. `engine=emulated` stores the same e4m3 weights and
fake-quantizes activations per token in torch, multiplying in fp32: accuracy studies only.

At M <= 16 (the action expert's denoise GEMMs) the native engine also times our CUDA kernel
(`kernels/mma_small_m.cu:fp8_mma_gemm`: W8A8 with x quantized to e4m3 inside the kernel, one scale per token
and per warp K slice -- finer than per token, so no less accurate -- `mma.sync` e4m3 with fp32 accumulation)
against `_scaled_mm`, once per shape (each candidate checked against its own exact math), and keeps the faster; it reads a fragment-ordered copy of the weights (`mma_words`), made for the
action expert's layers (`options.mma_layers=expert`, default; `all` | `none`).
"""

from __future__ import annotations

import torch
from evalkit.backends import fused_qkv, fusions
from evalkit.backends.quant import (
    QuantBackend,
    QuantLinear,
    capability_line,
    choose_kernel,
    fake_quant_fp8_rows,
    linear_fp32,
    quant_fp8_rows,
    wants_packing,
)
from evalkit.backends.targets import is_geglu_mlp, replace_module
from evalkit.kernels import mma_small_m
from evalkit.kernels.triton_kernels import (
    geglu_quant_fp8,
    rowwise_quant,
    triton_available,
)
from torch import nn

from evalkit.errors import BadInput, CapabilityError


def quant_act_fp8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, 1]): our Triton kernel eagerly, fusable torch ops under compile."""
    if torch.compiler.is_compiling():
        q, s = quant_fp8_rows(x2)
        return q, s[:, None]
    return rowwise_quant(x2, "fp8")


@torch.library.custom_op("evalkit::geglu_quant_fp8", mutates_args=())
def _geglu_quant_fp8_op(g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return geglu_quant_fp8(g, u)


@_geglu_quant_fp8_op.register_fake
def _(g, u):
    return g.new_empty(g.shape, dtype=torch.float8_e4m3fn), g.new_empty((g.shape[0], 1), dtype=torch.float32)


def geglu_quant_act_fp8(g: torch.Tensor, u: torch.Tensor, compiled: str = "triton") -> tuple[torch.Tensor, torch.Tensor]:
    """gelu_tanh(g) * u quantized per row (h is never written). Eagerly our one-pass Triton kernel (the row in
    registers); under torch.compile the same kernel as an opaque custom op (`compiled="triton"`), or torch ops
    for inductor to fuse (`"inductor"`): inductor's version of this row reduction moves its bytes several times
    slower than ours at the prefix's M (docs/backends.md), hence the default."""
    if torch.compiler.is_compiling():
        if compiled == "triton":
            return _geglu_quant_fp8_op(g, u)
        q, s = quant_fp8_rows(torch.nn.functional.gelu(g.float(), approximate="tanh") * u.float())
        return q, s[:, None]
    return geglu_quant_fp8(g, u)


class Fp8Linear(QuantLinear):
    l2_next: tuple = (None, None)  # L2 prefetch hint the mma kernel accepts; no backend sets it (it measured slower)
    weight_format = "e4m3, per-channel fp32 scales"
    scale_buffers = ("wscale",)
    activation_precision = "fp8_e4m3 (dynamic per-token)"

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype, emulated: bool, fast_accum: bool = True,
                 mma_pack: bool = False) -> None:
        super().__init__(linear, out_dtype)
        q, s = quant_fp8_rows(linear.weight.detach())
        self.register_buffer("qweight", q)  # [N, K] row-major: .t() is the column-major operand _scaled_mm wants
        self.register_buffer("wscale", s.reshape(1, -1).contiguous())  # [1, N]
        self.emulated = emulated
        self.fast_accum = fast_accum
        self.pdl = True
        self.mma_configs = [c for c in mma_small_m.FP8_CONFIGS if mma_small_m.fp8_config_fits(c, self.out_features, self.in_features)]
        if mma_pack and not emulated and q.is_cuda and self.mma_configs:
            self.register_buffer("mma_words", mma_small_m.pack_fp8_mma(q))  # the M <= 16 kernel's fragment order
            self.activation_precision = "fp8_e4m3 (dynamic per-token; M<=16 mma kernel: per token and K slice)"
        else:
            self.mma_configs = []
        self.kernel = (
            "emulated: fake-quant e4m3 (x per-token, w per-channel) + fp32 F.linear"
            if emulated
            else f"triton:rowwise_quant_fp8 (inductor-fused under compile) + torch._scaled_mm(rowwise{', fast_accum' if fast_accum else ''})"
            + self.mma_note()
        )

    def mma_note(self) -> str:
        return (f"; M<={mma_small_m.MAX_M}: the faster (timed once, checked, cached) of that and cuda:fp8_mma_gemm "
                "(x quantized in the kernel per token and warp K slice of K/(warps*split), mma.sync e4m3)") if self.mma_configs else ""

    def read_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for n, t in self.named_buffers() if n != "mma_words")

    def small_m_choice(self, x2: torch.Tensor, scaled_mm) -> str:
        """'scaled_mm' or 'cuda_mma:<cfg>' for this shape at M <= 16 (timed once per process, checked)."""
        if not self.mma_configs or x2.shape[0] > mma_small_m.MAX_M:
            return "scaled_mm"
        key = ("fp8", x2.device.index, self.out_features, self.in_features, x2.shape[0])
        cands, refs = {"scaled_mm": scaled_mm}, {}
        for cfg in self.mma_configs:
            cands[f"cuda_mma:{cfg}"] = lambda cfg=cfg: mma_small_m.fp8_mma_gemm(x2, self.mma_words, self.wscale, cfg, self.pdl)
            refs[f"cuda_mma:{cfg}"] = lambda cfg=cfg: self.mma_reference(x2, cfg)
        return choose_kernel(key, cands, reference="scaled_mm", own_refs=refs)

    def mma_reference(self, x2: torch.Tensor, cfg: str) -> torch.Tensor:
        """What fp8_mma_gemm under cfg computes, in fp32 torch: x scaled per token and per warp K slice."""
        xq = mma_small_m.fake_quant_fp8_slices(x2, mma_small_m.fp8_kslice(cfg, self.in_features))
        return torch.nn.functional.linear(xq, self.dequantized_weight())

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.wscale.reshape(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.emulated:
            y = linear_fp32(fake_quant_fp8_rows(x2), self.dequantized_weight())
            return self._finish(y, shape)
        x2 = x2.to(torch.bfloat16)
        choice = self.small_m_choice(x2, lambda: self._scaled_mm(x2))
        if choice == "scaled_mm":
            y = self._scaled_mm(x2)
        else:
            y = mma_small_m.fp8_mma_gemm(x2, self.mma_words, self.wscale, choice.partition(":")[2], self.pdl, self.l2_next)
        return self._finish(y, shape)

    def _scaled_mm(self, x2: torch.Tensor) -> torch.Tensor:
        xq, xs = quant_act_fp8(x2)
        return torch._scaled_mm(xq, self.qweight.t(), scale_a=xs, scale_b=self.wscale, out_dtype=torch.bfloat16,
                                use_fast_accum=self.fast_accum)


class Fp8WeightOnlyLinear(QuantLinear):
    weight_format = "e4m3, per-channel fp32 scales"
    scale_buffers = ("wscale",)

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype) -> None:
        super().__init__(linear, out_dtype)
        q, s = quant_fp8_rows(linear.weight.detach())
        self.register_buffer("qweight", q)
        self.register_buffer("wscale", s.reshape(-1, 1).to(torch.bfloat16))
        self.activation_precision = "bf16" if out_dtype == torch.bfloat16 else str(out_dtype)
        self.kernel = "dequant e4m3->bf16 per call + torch F.linear (bf16)"

    def dequantized_weight(self) -> torch.Tensor:
        return (self.qweight.to(torch.bfloat16) * self.wscale).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        w = self.qweight.to(torch.bfloat16) * self.wscale
        y = torch.nn.functional.linear(x.reshape(-1, self.in_features).to(torch.bfloat16), w)
        return self._finish(y, shape)


class Fp8GemmaMLP(nn.Module):
    """GeGLU MLP (π0.5's GemmaMLP: down(gelu_tanh(gate(x)) * up(x))) over three native Fp8Linear children:
    gate and up run as one `_scaled_mm` over their stacked weights (N = 2I: one launch, fuller waves; x is
    quantized once), and gelu*up is fused with the per-token quantization that feeds down_proj (one Triton
    kernel; the bf16 product h is never written).

    The children's `qweight`/`wscale` become views of the stacked tensors, so the report counts each byte
    once; if a child's tensor is replaced (fault injection, `ignore_scales`), the stack is rebuilt from the
    children on the next call, so what runs is always what the children hold."""

    l2_next: tuple = (None, None)  # L2 prefetch hint (unset, as Fp8Linear.l2_next)

    def __init__(self, gate_proj: Fp8Linear, up_proj: Fp8Linear, down_proj: Fp8Linear) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        acc = ", fast_accum)" if gate_proj.fast_accum else ")"
        self.mma = bool(gate_proj.mma_configs and up_proj.mma_configs)
        self.compiled_geglu_quant = "triton"  # or "inductor" (backend.options.compiled_geglu_quant)
        gate_proj.kernel = up_proj.kernel = ("triton:rowwise_quant_fp8 (x quantized once) + torch._scaled_mm(rowwise" + acc
                                             + " over stacked gate|up weights"
                                             + (f"; M<={mma_small_m.MAX_M}: the faster (timed once, checked, cached) of that and "
                                                "cuda:fp8_mma_gemm GeGLU (gate+up+gelu in one launch, x quantized in the kernel per token and K slice)"
                                                if self.mma else ""))
        down_proj.kernel = "triton:geglu_quant_fp8 (gelu_tanh(gate)*up fused with per-token quant) + torch._scaled_mm(rowwise" + acc + down_proj.mma_note()
        self._stack_gate_up()

    def _children(self) -> tuple[torch.Tensor, ...]:
        g, u = self.gate_proj, self.up_proj
        return g.qweight, u.qweight, g.wscale, u.wscale

    def _stack_gate_up(self) -> None:
        g, u = self.gate_proj, self.up_proj
        n = g.out_features
        w, s = torch.cat([g.qweight, u.qweight]), torch.cat([g.wscale, u.wscale], dim=1)  # [2I, K], [1, 2I]
        g.qweight, u.qweight, g.wscale, u.wscale = w[:n], w[n:], s[:, :n], s[:, n:]
        self._gu = (w, s)  # not buffers: the children's views are what the report and state_dict see
        self._gu_from = self._children()

    def current_gu(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked gate|up (weights, scales), rebuilt first if a child's tensor was replaced."""
        if any(a is not b for a, b in zip(self._children(), self._gu_from)):
            self._stack_gate_up()
        return self._gu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.current_gu()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        choice = self._small_m_choice(x2)
        if choice != "scaled_mm":
            h = mma_small_m.fp8_mma_geglu(x2, self.gate_proj.mma_words, self.up_proj.mma_words, self._gu[1],
                                          choice.partition(":")[2], self.gate_proj.pdl, self.l2_next)
            return self.down_proj(h).reshape(*shape[:-1], self.down_proj.out_features)
        return self._scaled_mm_mlp(x2, shape)

    def _small_m_choice(self, x2: torch.Tensor) -> str:
        g = self.gate_proj
        if not self.mma or x2.shape[0] > mma_small_m.MAX_M or g.bias is not None or self.up_proj.bias is not None:
            return "scaled_mm"
        key = ("fp8mlp", x2.device.index, g.out_features, g.in_features, x2.shape[0])
        cands, refs = {"scaled_mm": lambda: self._scaled_mm_mlp(x2, x2.shape)}, {}
        for cfg in g.mma_configs:
            cands[f"fused_mma:{cfg}"] = lambda cfg=cfg: self.down_proj(mma_small_m.fp8_mma_geglu(
                x2, g.mma_words, self.up_proj.mma_words, self._gu[1], cfg, g.pdl))
            refs[f"fused_mma:{cfg}"] = lambda cfg=cfg: self.down_proj(self._geglu_reference(x2, cfg))
        # Each fused candidate against its own math (x scaled per K slice, h rounded to bf16, then the same
        # down_proj): 2e-2 leaves room for fp32 summation order and tanh, while a dropped scale or wrong
        # layout is off by ~100 %. The GPU tests check both paths against fp32 math.
        return choose_kernel(key, cands, reference="scaled_mm", tol=2e-2, own_refs=refs)

    def _geglu_reference(self, x2: torch.Tensor, cfg: str) -> torch.Tensor:
        """h as fp8_mma_geglu under cfg computes it (x scaled per token and K slice), rounded to bf16."""
        g, u = self.gate_proj, self.up_proj
        return torch.nn.functional.gelu(g.mma_reference(x2, cfg), approximate="tanh").mul(u.mma_reference(x2, cfg)).to(torch.bfloat16)

    def _scaled_mm_mlp(self, x2: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        xq, xs = quant_act_fp8(x2)
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        w, s = self._gu
        gu = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s, out_dtype=torch.bfloat16, use_fast_accum=g.fast_accum)
        n = g.out_features
        gy, uy = gu[:, :n], gu[:, n:]
        if g.bias is not None:
            gy = gy + g.bias
        if u.bias is not None:
            uy = uy + u.bias
        hq, hs = geglu_quant_act_fp8(gy, uy, self.compiled_geglu_quant)
        y = torch._scaled_mm(hq, d.qweight.t(), scale_a=hs, scale_b=d.wscale, out_dtype=torch.bfloat16, use_fast_accum=d.fast_accum)
        return d._finish(y, shape)


class FP8Backend(QuantBackend):
    name = "fp8"
    precision_class = "8-bit"
    engines = ("native", "emulated")
    known_options = ("fast_accum", "pdl", "mma_layers", "fuse_qkv", "fuse_mlp", "compiled_geglu_quant",
                     "fuse_norms")

    def post_replace(self, model: nn.Module) -> None:
        """Fuse each GemmaMLP whose three projections are native Fp8Linear (options.fuse_mlp, default true); stack
        q|k|v where they carry the mma packing (options.fuse_qkv, default true; backends/fused_qkv.py)."""
        self._fused = self._fused_qkv = self._fused_norms = 0
        if self.engine != "native":
            return
        if self.options.get("fuse_qkv", True):
            self._fused_qkv = fused_qkv.install(model, "fp8", lambda p: isinstance(p, Fp8Linear) and not p.emulated)
        if self.options.get("fuse_mlp", True):
            self._fuse_mlps(model)
        # after both fusions above (it needs the stacked q|k|v and gate|up); on by default because, with the expert's
        # attention launched as a programmatic dependent too, the whole layer is one PDL chain and faster (docs/backends.md)
        if self.options.get("fuse_norms", True):  # the policy's own fusions (π0.5: norms into the expert's mma launches)
            self._fused_norms = fusions.apply("fp8", model)

    def _fuse_mlps(self, model: nn.Module) -> None:
        for name, mod in list(model.named_modules()):
            if not is_geglu_mlp(mod):
                continue
            parts = [getattr(mod, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
            if all(isinstance(p, Fp8Linear) and not p.emulated for p in parts):
                fused = Fp8GemmaMLP(*parts)
                fused.compiled_geglu_quant = self.options.get("compiled_geglu_quant", "triton")
                if fused.compiled_geglu_quant not in ("triton", "inductor"):
                    raise BadInput(f"fp8 options.compiled_geglu_quant={fused.compiled_geglu_quant!r}; valid: triton, inductor")
                replace_module(model, name, fused)
                self._fused += 1

    def extra_notes(self) -> list[str]:
        n, nq = getattr(self, "_fused", 0), getattr(self, "_fused_qkv", 0)
        return ([f"fused {n} GeGLU MLPs (gate+up as one fp8 GEMM; gelu*up fused with the down_proj input quantization)"] if n else []) + (
            [f"{nq} attention layers may run q|k|v as one mma launch where it is faster (M <= {mma_small_m.MAX_M})"] if nq else []) + (
            [f"{self._fused_norms} expert layers may run with their adaRMS norms and gated residual adds folded into the mma launches "
             f"(M <= {mma_small_m.MAX_M}, batch 1, where checked and faster: evalkit/policies/pi05/fused_layer.py)"] if getattr(self, "_fused_norms", 0) else [])

    def check_engine(self, device: torch.device) -> None:
        if self.engine == "emulated":
            self.capability_notes.append(capability_line(True, "emulated fp8 runs anywhere (accuracy only, not latency)"))
            return
        self.require_cuda_cc(device, (8, 9), "fp8 tensor cores for torch._scaled_mm")
        ver = triton_available()
        if ver is None:
            raise CapabilityError("backend 'fp8' needs Triton for its fused activation quantization; install triton")
        self.capability_notes.append(capability_line(True, f"triton {ver} (fused per-token fp8 quantization)"))

    def make_module(self, name: str, linear: nn.Linear, device: torch.device) -> nn.Module:
        mma_pack = wants_packing(name, self.options.get("mma_layers", "expert"))
        mod = Fp8Linear(linear.to(device), self.base_dtype, emulated=self.engine == "emulated",
                        fast_accum=bool(self.options.get("fast_accum", True)), mma_pack=mma_pack)
        mod.pdl = bool(self.options.get("pdl", True))
        return mod


class FP8WeightOnlyBackend(QuantBackend):
    name = "fp8_weight_only"
    precision_class = "8-bit"

    def check_engine(self, device: torch.device) -> None:
        self.capability_notes.append(capability_line(True, f"e4m3 storage + dequant to bf16 runs on {device.type} (no fp8 tensor cores used)"))

    def make_module(self, name: str, linear: nn.Linear, device: torch.device) -> nn.Module:
        return Fp8WeightOnlyLinear(linear, self.base_dtype)
