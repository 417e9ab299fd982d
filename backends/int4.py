"""`int4`: W4A16 group-wise (group 128, asymmetric: bf16 scales + zeros), bf16 activations.

Kernels (CUDA), chosen per GEMM shape (N, K, M) by timing the candidates once on the first call at that
shape (each candidate first checked against the dequantized reference, so a wrong kernel is never chosen)
and caching the winner for the process (all layers of one shape share the choice):
- `tinygemm`: `torch._weight_int4pack_mm` (tensor-core int4 dequant-in-kernel GEMM);
- `triton_w4a16`: our Triton kernel for M <= 64 (the denoise loop's M = horizon x batch; written here because
  no library kernel is fast at that M): weights dequantized in registers, K split across programs with an
  in-kernel reduction (one launch), tile config timed per shape; the GeGLU variant runs gate + up + gelu in
  one launch;
- `triton_w4a16` large-M tiles (M > 64, the prefill): the same kernel with 64-128-row tiles;
- `cuda_mma` (M <= 16): our CUDA kernel (`kernels/mma_small_m.cu`, compiled by NVRTC at first use): every
  weight load issued up front, nibbles dequantized straight into tensor-core fragments (`mma.sync` bf16);
  its GeGLU variant runs gate + up + gelu in one launch. It reads a third packing of the weights
  (`mma_words`/`mma_sz`), made on CUDA for the action expert's layers (`options.mma_layers=expert`, default;
  `all` | `none`) and wherever `options.kernel` forces it;
- `dequant_cublas`: unpack to bf16 per call (one Triton kernel) + cuBLAS bf16 GEMM (large M).
`backend.options.kernel=tinygemm|dequant_cublas` forces one. On CPU the native engine runs
`torch._weight_int4pack_mm_for_cpu` (a real int4 CPU kernel); `engine=emulated` dequantizes and multiplies in fp32.
All packings are kept (the plain nibble packing also serves `dequantized_weight`), and the report's bytes count
all of them; the weight-read floor counts one (`read_bytes`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from evalkit.backends import fused_qkv
from evalkit.backends.quant import (
    QuantBackend,
    QuantLinear,
    capability_line,
    check_group,
    choose_kernel,
    dequant_int4_groups,
    int4_pack,
    linear_fp32,
    unpack_nibbles,
    wants_packing,
)
from evalkit.backends.targets import is_geglu_mlp, replace_module
from evalkit.kernels import mma_small_m
from evalkit.kernels.triton_kernels import (
    W4A16_CONFIGS,
    W4A16_LARGE_M_CONFIGS,
    int4_dequant,
    triton_available,
    w4a16_config_fits,
    w4a16_geglu,
    w4a16_gemm,
)
from torch import nn

from evalkit.errors import BadInput

CANDIDATES = ("tinygemm", "dequant_cublas", "triton_w4a16", "cuda_mma")  # triton_w4a16 / cuda_mma may name a config: triton_w4a16:n32k256s4
DEFAULT_MMA_CONFIG = "t1w4s1"
DEFAULT_TRITON_CONFIG = "n16k128s1"
KERNEL_NAMES = {
    "tinygemm": "torch._weight_int4pack_mm (tinygemm)",
    "dequant_cublas": "unpack int4->bf16 per call (one Triton kernel) + cuBLAS bf16",
    "triton_w4a16": f"triton:w4a16_gemm (dequant in registers; small-M split-K tiles {'/'.join(W4A16_CONFIGS)}; "
                    f"large-M tiles {'/'.join(W4A16_LARGE_M_CONFIGS)})",
    "cuda_mma": f"cuda:int4_mma_gemm (NVRTC; loads up front, dequant into mma.sync fragments; M<={mma_small_m.MAX_M}; "
                f"configs {'/'.join(mma_small_m.CONFIGS)})",
}
TRITON_MAX_M = 64  # our Triton kernel is a small-M (denoise) kernel
INNER_K_TILES = 8


class Int4Linear(QuantLinear):
    weight_store = "qweight"
    activation_precision = "bf16"
    l2_next: tuple = (None, None)  # L2 prefetch hint cuda_mma accepts; no backend sets it (it measured slower)

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype, group: int, mode: str, device: torch.device,
                 mma_pack: bool = True) -> None:
        super().__init__(linear, out_dtype)
        self.group = group
        self.weight_format = f"int4 x2 nibble-packed, group {group}, bf16 scales+zeros"
        qweight, scales_zeros = int4_pack(linear.weight.detach(), group)
        self.register_buffer("qweight", qweight)  # [N, K/2]
        self.register_buffer("scales_zeros", scales_zeros)  # [K/g, N, 2]
        self.mode = mode  # "cuda", "cpu", "emulated"
        self.pdl = True  # cuda_mma launches with programmatic dependent launch (backend.options.pdl)
        self.forced = None
        # decided once: the one-launch Triton unpack tiles N in 32s; otherwise dequant_cublas unpacks with torch ops
        self.triton_unpack = mode == "cuda" and triton_available() is not None and self.out_features % 32 == 0
        if mode == "cuda":
            self.register_buffer("tg_packed", torch.ops.aten._convert_weight_to_int4pack(self.qweight, INNER_K_TILES))
            self.mma_ok = mma_pack and self.out_features % 16 == 0 and self.in_features % 64 == 0 and group % 64 == 0
            if self.mma_ok:
                words, sz = mma_small_m.pack_mma(self.qweight, self.scales_zeros, group)
                self.register_buffer("mma_words", words)  # [N/16, K/64, 32, 4] fragment words
                self.register_buffer("mma_sz", sz)  # [N/16, K/g, 8, 4] duplicated (s, z) pairs
            self.kernel = "auto per shape (timed once, checked, cached): " + " | ".join(self.kernel_name(k) for k in CANDIDATES)
        elif mode == "cpu":
            self.register_buffer("tg_packed", torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(qweight).to(torch.int32), 1))
            self.kernel = "torch._weight_int4pack_mm_for_cpu"
        else:
            self.kernel = "emulated: dequant int4 (group) + fp32 F.linear"

    def force(self, kernel: str) -> None:
        base, _, cfg = kernel.partition(":")
        configs = {**W4A16_CONFIGS, **W4A16_LARGE_M_CONFIGS}
        if base not in CANDIDATES or (cfg and not ((base == "triton_w4a16" and cfg in configs)
                                                   or (base == "cuda_mma" and cfg in mma_small_m.CONFIGS))):
            raise BadInput(f"int4 kernel '{kernel}' unknown; valid: auto, {', '.join(CANDIDATES)} "
                           f"(triton_w4a16:<{'|'.join(configs)}>, cuda_mma:<{'|'.join(mma_small_m.CONFIGS)}>)")
        if base == "cuda_mma" and not getattr(self, "mma_ok", False):
            raise BadInput(f"int4 kernel cuda_mma needs out_features % 16 == 0, in_features % 64 == 0 and group % 64 == 0; "
                           f"this layer is {self.out_features}x{self.in_features}, group {self.group}")
        default = {"triton_w4a16": DEFAULT_TRITON_CONFIG, "cuda_mma": DEFAULT_MMA_CONFIG}.get(base)
        self.forced = kernel if cfg or default is None else f"{base}:{default}"
        self.kernel = self.kernel_name(base) + (f" config {self.forced.partition(':')[2]}" if default else "")

    def kernel_name(self, base: str) -> str:
        if base == "dequant_cublas" and not self.triton_unpack:
            return "unpack int4->bf16 per call (torch ops) + cuBLAS bf16"
        return KERNEL_NAMES[base]

    def ignore_scales(self) -> None:
        sz = self.scales_zeros.clone()
        sz[..., 0] = 1.0
        sz[..., 1] = 0.0
        self.scales_zeros = sz
        if getattr(self, "mma_sz", None) is not None:  # every packing runs what scales_zeros holds
            self.mma_sz = mma_small_m.pack_mma(self.qweight, sz, self.group)[1]
        self.scales_ignored = True

    def read_bytes(self) -> int:
        """One packing (the nibble or the tinygemm layout, same size) plus scales and zeros: a kernel reads one."""
        return sum(t.numel() * t.element_size() for n, t in self.named_buffers() if n not in ("tg_packed", "mma_words", "mma_sz"))

    def _scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scales_zeros[..., 0].t(), self.scales_zeros[..., 1].t()  # [N, K/g]

    def dequantized_weight(self) -> torch.Tensor:
        s, z = self._scales()
        return dequant_int4_groups(unpack_nibbles(self.qweight), s, z, self.group)

    def _dequant_cublas(self, x2: torch.Tensor) -> torch.Tensor:
        if self.triton_unpack:
            return F.linear(x2, int4_dequant(self.qweight, self.scales_zeros, self.group, x2.dtype))
        s, z = self._scales()
        q = unpack_nibbles(self.qweight).to(torch.bfloat16).reshape(self.out_features, -1, self.group)
        w = ((q - 8) * s[..., None] + z[..., None]).reshape(self.out_features, self.in_features)
        return F.linear(x2, w)

    def _tinygemm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x2, self.tg_packed, self.group, self.scales_zeros)

    def run_kernel(self, name: str, x2: torch.Tensor) -> torch.Tensor:
        base, _, cfg = name.partition(":")
        if base == "tinygemm":
            return self._tinygemm(x2)
        if base == "dequant_cublas":
            return self._dequant_cublas(x2)
        if base == "cuda_mma":
            return mma_small_m.int4_mma_gemm(x2, self.mma_words, self.mma_sz, self.group, cfg or DEFAULT_MMA_CONFIG, self.pdl,
                                             self.l2_next)
        return w4a16_gemm(x2, self.qweight, self.scales_zeros, self.group, cfg or DEFAULT_TRITON_CONFIG)

    def candidates(self, x2: torch.Tensor) -> dict:
        c = {"dequant_cublas": lambda: self._dequant_cublas(x2), "tinygemm": lambda: self._tinygemm(x2)}
        if triton_available():
            for cfg in self.triton_configs(large_m=x2.shape[0] > TRITON_MAX_M):
                c[f"triton_w4a16:{cfg}"] = lambda cfg=cfg: w4a16_gemm(x2, self.qweight, self.scales_zeros, self.group, cfg)
        if x2.shape[0] <= mma_small_m.MAX_M:
            for cfg in self.mma_configs():
                c[f"cuda_mma:{cfg}"] = lambda cfg=cfg: mma_small_m.int4_mma_gemm(x2, self.mma_words, self.mma_sz, self.group, cfg, self.pdl)
        return c

    def mma_configs(self) -> list[str]:
        """The CUDA mma kernel's configs that tile this layer (none if its packing was not made)."""
        if not getattr(self, "mma_ok", False):
            return []
        return [c for c in mma_small_m.CONFIGS if mma_small_m.config_fits(c, self.out_features, self.in_features, self.group)]

    def triton_configs(self, large_m: bool = False) -> list[str]:
        """The Triton tile configs that tile this layer: split-K small-M ones, or the large-M (prefill) ones."""
        pool = W4A16_LARGE_M_CONFIGS if large_m else W4A16_CONFIGS
        return [c for c in pool if w4a16_config_fits(c, self.out_features, self.in_features, self.group)]

    def choose(self, x2: torch.Tensor) -> str:
        if self.forced:
            return self.forced
        key = ("int4", x2.device.index, self.out_features, self.in_features, x2.shape[0], self.group)
        return choose_kernel(key, self.candidates(x2), reference="dequant_cublas")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.mode == "emulated":
            return self._finish(linear_fp32(x2, self.dequantized_weight()), shape)
        x2 = x2.to(torch.bfloat16).contiguous()
        if self.mode == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, self.tg_packed, self.group, self.scales_zeros)
        else:
            y = self.run_kernel(self.choose(x2), x2)
        return self._finish(y, shape)


class Int4GemmaMLP(nn.Module):
    """GeGLU MLP over three CUDA Int4Linear children. Per M, the fastest (timed once, checked, cached) of:
    `fused_triton` (gate + up + gelu*up in one Triton launch, M <= 64; then down_proj's own chosen kernel),
    `fused_mma` (the same in one launch of our CUDA mma kernel, M <= 16) and `per_linear` (each projection's
    own chosen kernel, torch gelu/mul)."""

    l2_next: tuple = (None, None)  # L2 prefetch hint (unset, as Int4Linear.l2_next)

    def __init__(self, gate_proj: Int4Linear, up_proj: Int4Linear, down_proj: Int4Linear) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        for p in (gate_proj, up_proj):
            p.kernel = (f"auto per M (timed once, checked, cached): triton:w4a16_geglu (gate+up+gelu fused, M<={TRITON_MAX_M}) | "
                        f"cuda:int4_mma_gemm GeGLU (gate+up+gelu fused, M<={mma_small_m.MAX_M}) | per-linear: {p.kernel}")

    def _per_linear(self, x2: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x2), approximate="tanh") * self.up_proj(x2))

    def _fused_triton(self, x2: torch.Tensor, cfg: str = DEFAULT_TRITON_CONFIG) -> torch.Tensor:
        g, u = self.gate_proj, self.up_proj
        return self.down_proj(w4a16_geglu(x2, g.qweight, u.qweight, g.scales_zeros, u.scales_zeros, g.group, cfg))

    def _fused_mma(self, x2: torch.Tensor, cfg: str = DEFAULT_MMA_CONFIG, prefetch: tuple = (None, None)) -> torch.Tensor:
        g, u = self.gate_proj, self.up_proj
        return self.down_proj(mma_small_m.int4_mma_geglu(x2, g.mma_words, u.mma_words, g.mma_sz, u.mma_sz, g.group, cfg,
                                                         g.pdl, prefetch))

    def _run(self, choice: str, x2: torch.Tensor) -> torch.Tensor:
        base, _, cfg = choice.partition(":")
        if base == "fused_triton":
            return self._fused_triton(x2, cfg)
        if base == "fused_mma":
            return self._fused_mma(x2, cfg, self.l2_next)
        return self._per_linear(x2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
        choice = "per_linear"
        if x2.shape[0] <= TRITON_MAX_M and self.gate_proj.forced is None:
            key = ("int4mlp", x2.device.index, self.gate_proj.out_features, self.gate_proj.in_features, x2.shape[0], self.gate_proj.group)
            cands = {"per_linear": lambda: self._per_linear(x2)}
            for cfg in self.gate_proj.triton_configs():
                cands[f"fused_triton:{cfg}"] = lambda cfg=cfg: self._fused_triton(x2, cfg)
            if x2.shape[0] <= mma_small_m.MAX_M and self.up_proj.mma_configs():
                for cfg in self.gate_proj.mma_configs():
                    cands[f"fused_mma:{cfg}"] = lambda cfg=cfg: self._fused_mma(x2, cfg)
            choice = choose_kernel(key, cands, reference="per_linear", tol=2e-2)
        y = self._run(choice, x2)
        return y.reshape(*shape[:-1], y.shape[-1])


class Int4Backend(QuantBackend):
    name = "int4"
    precision_class = "4-bit"
    engines = ("native", "emulated")
    known_options = ("group_size", "kernel", "pdl", "mma_layers", "fuse_qkv", "fuse_mlp")

    def post_replace(self, model: nn.Module) -> None:
        """Wrap each GemmaMLP whose three projections are CUDA Int4Linear (options.fuse_mlp, default true); stack
        q|k|v where they carry the mma packing (options.fuse_qkv, default true; backends/fused_qkv.py)."""
        self._fused = self._fused_qkv = 0
        if self.engine != "native":
            return
        if self.options.get("fuse_qkv", True):
            self._fused_qkv = fused_qkv.install(model, "int4", lambda p: isinstance(p, Int4Linear) and p.mode == "cuda")
        if self.options.get("fuse_mlp", True) and triton_available():
            for name, mod in list(model.named_modules()):
                if not is_geglu_mlp(mod):
                    continue
                parts = [getattr(mod, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
                if all(isinstance(p, Int4Linear) and p.mode == "cuda" for p in parts):
                    replace_module(model, name, Int4GemmaMLP(*parts))
                    self._fused += 1

    def extra_notes(self) -> list[str]:
        n, nq = getattr(self, "_fused", 0), getattr(self, "_fused_qkv", 0)
        return ([f"{n} GeGLU MLPs may run gate+up+gelu as one Triton kernel where it is faster (M <= {TRITON_MAX_M})"] if n else []) + (
            [f"{nq} attention layers may run q|k|v as one mma launch where it is faster (M <= {mma_small_m.MAX_M})"] if nq else [])

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
        # the mma kernel's packing is one more copy of the weights: only where M <= 16 is expected
        mma_pack = wants_packing(name, self.options.get("mma_layers", "expert"),
                                             forced=str(self.options.get("kernel", "auto")).startswith("cuda_mma"))
        mod = Int4Linear(linear.to(device), self.base_dtype, group, mode, device, mma_pack=mma_pack)
        mod.pdl = bool(self.options.get("pdl", True))
        kernel = self.options.get("kernel", "auto")
        if kernel != "auto":
            if mode != "cuda":
                raise BadInput("backend.options.kernel selects a CUDA int4 kernel; this run is not on CUDA")
            mod.force(kernel)
            base, _, cfg = mod.forced.partition(":")
            fitting = mod.mma_configs() if base == "cuda_mma" else mod.triton_configs() + mod.triton_configs(large_m=True)
            if cfg and cfg not in fitting:
                raise BadInput(f"{name}: int4 kernel {kernel} does not tile N={linear.out_features}, K={linear.in_features}, "
                               f"group {group}; configs that do: {', '.join(fitting) or 'none'}")
        return mod
