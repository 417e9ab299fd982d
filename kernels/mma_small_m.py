"""Our CUDA kernels for M <= 16 (the denoise loop): `mma_small_m.cu`, compiled at run time with NVRTC --
`int4_mma_gemm` (W4A16, below), `fp8_mma_gemm` (W8A8: x quantized to e4m3 inside the kernel, one scale per token and
warp K slice) and `fp8_mma_mlp` (a whole fp8 GeGLU MLP in one launch, with a grid barrier; end of file).

Why our own: at M = 10 the expert's int4 GEMMs are bound by latency, not bytes. Library kernels (tinygemm)
and our Triton kernel pipeline a K loop whose loads wait behind shared-memory layout conversions; this
kernel issues every weight load of a warp up front, dequantizes straight into tensor-core fragments and
needs no shared memory until the final cross-warp reduction (see the .cu header for the layout).

Pieces:
- `pack_mma`: re-lays the int4 backend's storage (nibble-packed [N, K/2] + scales/zeros [K/g, N, 2]) into
  per-lane fragment words and duplicated (s, z) pairs. Pure torch; the layout is checked on CPU by emulating
  the kernel's fragment reads (`emulate_mma_gemm`, tests/test_mma_small_m_layout.py).
- `int4_mma_gemm`: the launch (a `torch.library` custom op, so `torch.compile` treats it as one opaque call;
  CUDA-graph capturable), by default with programmatic dependent launch on sm_90+ (`cuLaunchKernelEx`):
  the kernel's weight loads start while the previous kernel on the stream finishes. Configs `t{NT}w{WARPS}s{SPLIT}` (n-tiles per CTA, warps per CTA, CTAs along K);
  the int4 backend times the ones that tile a shape and keeps the fastest.
Needs compute capability >= 8.0 (mma.sync bf16) and NVRTC (PyTorch's CUDA wheels ship it).
"""

from __future__ import annotations

import ctypes
import functools
import re
from pathlib import Path

import torch
from evalkit.kernels.formats import fake_quant_fp8_rows, unpack_nibbles

SOURCE = Path(__file__).with_name("mma_small_m.cu")
MAX_M = 16
MAX_KP = 8  # k-pairs (64 k each) per warp: 2 x 8 x 4 weight registers at most, no spills (ptxas -v)
CONFIGS = ("t1w4s1", "t1w8s1", "t1w16s1", "t1w32s1", "t2w8s1", "t1w8s2", "t1w16s2", "t1w4s4", "t1w8s4", "t1w4s8")
_SENTINEL = 0x5EED1234  # the kernel's load-ordering branch compares against this; any value is correct
_KERNELS: dict[tuple, object] = {}


def parse_config(cfg: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"t(\d+)w(\d+)s(\d+)", cfg)
    if not m:
        raise ValueError(f"mma config '{cfg}' is not t<n-tiles>w<warps>s<split>; int4: {', '.join(CONFIGS)}; "
                         f"fp8: {', '.join(FP8_CONFIGS)}")
    return int(m[1]), int(m[2]), int(m[3])


def config_fits(cfg: str, n: int, k: int, group: int) -> bool:
    """Whether cfg tiles [N, K] with group `group`: whole 16-row tiles, 1..MAX_KP k-pairs per warp, groups
    aligned with each warp's k range."""
    nt, warps, split = parse_config(cfg)
    if n % (16 * nt) or k % 64 or group % 64 or k % (64 * warps * split):
        return False
    kp = k // (64 * warps * split)
    kpg = group // 64
    return 1 <= kp <= MAX_KP and (kp % kpg == 0 or kpg % kp == 0)


# ------------------------------------------------------------------------------------------------ packing
def _as_int32_words(w: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the same bits as int32 (the kernels read them as u32)."""
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)


def _fragment_index(n_tiles: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, k) of every nibble of every word: shape [n_tiles, K/64, 32 lanes, 4 words, 8 nibbles]."""
    ar = functools.partial(torch.arange, device=device)
    i = ar(n_tiles).view(-1, 1, 1, 1, 1)
    kp = ar(k // 64).view(1, -1, 1, 1, 1)
    lane = ar(32).view(1, 1, -1, 1, 1)
    e = ar(4).view(1, 1, 1, -1, 1)
    p = ar(8).view(1, 1, 1, 1, -1)
    r, q = lane // 4, lane % 4
    half, step = e // 2, e % 2
    j, hi = p % 4, p // 4  # fragment register, low/high bf16 in it
    row = 16 * i + r + 8 * (j % 2)
    col = 32 * (2 * kp + half) + 8 * q + 4 * step + 2 * (j // 2) + hi
    return row, col


def pack_mma(qweight: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 backend storage -> (words int32 [N/16, K/64, 32, 4], sz int32 [N/16, K/g, 8, 4]) for mma_small_m.cu."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if n % 16 or k % 64 or group % 64:
        raise ValueError(f"int4 mma kernel needs N % 16 == 0, K % 64 == 0, group % 64 == 0; got N={n}, K={k}, group={group}")
    q = unpack_nibbles(qweight)  # uint8 [N, K], values 0..15
    shifts = (4 * torch.arange(8, device=q.device, dtype=torch.int64))
    words = torch.empty((n // 16, k // 64, 32, 4), dtype=torch.int32, device=q.device)
    step = max(1, (1 << 22) // (k // 64 * 32 * 4 * 8))  # n-tiles per chunk: bounds the index tensors' memory
    for t0 in range(0, n // 16, step):
        tiles = min(step, n // 16 - t0)
        row, col = _fragment_index(tiles, k, q.device)
        w = (q[row + 16 * t0, col].to(torch.int64) << shifts).sum(-1)
        words[t0:t0 + tiles] = _as_int32_words(w)
    s, z = scales_zeros[..., 0], scales_zeros[..., 1]  # [G, N] bf16
    g = s.shape[0]

    def rows(v: torch.Tensor) -> torch.Tensor:  # [G, N] -> [N/16, G, 8 (r), 2 (row r, row r + 8)]
        return v.t().reshape(n // 16, 2, 8, g).permute(0, 3, 2, 1)

    rs, rz = rows(s), rows(z)
    four = torch.stack([rs[..., 0], rz[..., 0], rs[..., 1], rz[..., 1]], dim=-1)  # [N/16, G, 8, 4]
    sz = torch.stack([four, four], dim=-1).to(torch.bfloat16).contiguous().view(torch.int32).squeeze(-1)
    return words.contiguous(), sz.contiguous()


def emulate_mma_gemm(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """y [M, N] fp32 computed the way mma_small_m.cu reads its operands: per lane, per fragment register, with
    the PTX ISA's m16n8k16 fragment positions (A: a0/a1 row r, a2/a3 row r+8, a4..a7 the same at k+8;
    B: k slots 2q, 2q+1 | 2q+8, 2q+9 at column r; C: rows r, r+8, columns 2q, 2q+1). A CPU check of
    pack_mma and of the kernel's index arithmetic."""
    m_rows, k = x.shape
    n_tiles = words.shape[0]
    y = torch.zeros(m_rows, n_tiles * 16, dtype=torch.float64)
    wv = words.to(torch.int64) & 0xFFFFFFFF
    szb = sz.contiguous().view(torch.bfloat16).reshape(*sz.shape, 2)[..., 0].double()  # [tiles, G, 8, 4]
    xd = torch.zeros(16, k, dtype=torch.float64)
    xd[:m_rows] = x.double()
    lane = torch.arange(32)
    r, q = lane // 4, lane % 4
    for kp in range(k // 64):
        grp = kp * 64 // group
        for e in range(4):
            half, step = e // 2, e % 2
            base = 32 * (2 * kp + half) + 8 * q + 4 * step  # real k of this lane's x fragment, per lane
            for i in range(n_tiles):
                a = torch.zeros(16, 16, dtype=torch.float64)  # A[row, slot]
                w = wv[i, kp, :, e]
                for j in range(4):
                    srow = szb[i, grp, r, 2 * (j % 2)]  # s of row r (j even) or r + 8 (j odd)
                    zrow = szb[i, grp, r, 2 * (j % 2) + 1]
                    for hi in range(2):
                        nib = ((w >> (4 * j + 16 * hi)) & 0xF).double()
                        slot = 2 * q + 8 * (j // 2) + hi
                        a[r + 8 * (j % 2), slot] = ((nib - 8) * srow + zrow).to(torch.bfloat16).double()  # one rounding, as fma.rn.bf16x2
                b = torch.zeros(16, 16, dtype=torch.float64)  # B[slot, m]; b0 slots 2q,2q+1 <- x[m, base+0,1]; b1 slots 2q+8,2q+9 <- x[m, base+2,3]
                for mh in range(2):
                    m = 8 * mh + r
                    for s_off, k_off in ((0, 0), (1, 1), (8, 2), (9, 3)):
                        b[2 * q + s_off, m] = xd[m, base + k_off]
                c = a @ b  # [16 n, 16 m]
                y[:, 16 * i:16 * i + 16] += c.t()[:m_rows]
    return y.float()


# ------------------------------------------------------------------------------------------------ compile
@functools.lru_cache(maxsize=1)
def _nvrtc() -> ctypes.CDLL:
    """libnvrtc: the one PyTorch loads, else the nvidia-cuda-nvrtc wheel's copy."""
    import glob
    import site

    major = (torch.version.cuda or "0").split(".")[0]
    tried = [f"libnvrtc.so.{major}", "libnvrtc.so"]
    for d in site.getsitepackages() + [site.getusersitepackages()]:
        tried += sorted(glob.glob(f"{d}/nvidia/*/lib/libnvrtc.so*")) + sorted(glob.glob(f"{d}/nvidia/cuda_nvrtc/lib/libnvrtc.so*"))
    for name in tried:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        # NVRTC dlopens its builtins library by name at compile time: from a wheel's directory (not on the
        # loader's path) preload it, or every compile fails with "failed to open libnvrtc-builtins"
        for builtins in sorted(glob.glob(str(Path(name).parent / "libnvrtc-builtins.so*"))) if "/" in name else []:
            try:
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
                break
            except OSError:
                continue
        return lib
    raise RuntimeError(f"NVRTC not found (tried {', '.join(tried[:4])}, ...): our M <= 16 kernels compile with it; "
                       "install nvidia-cuda-nvrtc or set backend.options.mma_layers=none")


def compile_cubin(instance: str, arch: str) -> tuple[bytes, str]:
    """NVRTC-compile one kernel instantiation, e.g. 'int4_mma_gemm<2,2,1,16,1,1,128>', for arch (e.g. 'sm_90'):
    (cubin, lowered name). Needs no GPU: the CPU tests compile every config this way (tests/test_kernels_compile.py)."""
    lib = _nvrtc()
    name = instance.encode()
    prog = ctypes.c_void_p()

    def check(res: int, what: str) -> None:
        if res != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"NVRTC {what} failed: {lib.nvrtcGetErrorString(res).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.read_bytes(), b"mma_small_m.cu", 0, None, None), "create")
    try:
        check(lib.nvrtcAddNameExpression(prog, name), "add name")
        opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        if lib.nvrtcCompileProgram(prog, len(opts), arr) != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile {name.decode()} from {SOURCE}:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        lowered = ctypes.c_char_p()
        check(lib.nvrtcGetLoweredName(prog, name, ctypes.byref(lowered)), "lowered name")
        return cubin.raw, lowered.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _compile(instance: str, device: torch.device):
    """Compile (once per process and device) one kernel instantiation to a cubin for this GPU and load it."""
    cc = torch.cuda.get_device_capability(device)
    key = (instance, cc, device.index)
    kern = _KERNELS.get(key)
    if kern is not None:
        return kern
    from torch.cuda._utils import _cuda_load_module

    cubin, mangled = compile_cubin(instance, f"sm_{cc[0]}{cc[1]}")
    with torch.cuda.device(device):
        kern = _cuda_load_module(cubin, [mangled])[mangled]
    _KERNELS[key] = kern
    return kern


# ------------------------------------------------------------------------------------------------ launch
class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_PDL_ATTR = _LaunchAttr(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
_PDL_ATTR.value[0] = 1


@functools.lru_cache(maxsize=1)
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _launch_pdl(kern, grid: tuple[int, int, int], block: tuple[int, int, int], args: list) -> None:
    """cuLaunchKernelEx with programmatic stream serialization (the kernel may start while its predecessor
    on the stream finishes; it waits for it with griddepcontrol.wait before touching its output)."""
    keep, ptrs = [], []
    for a in args:
        # as torch's kernel launcher passes them: pointers, C int, C double
        v = (ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_double(a) if isinstance(a, float)
             else ctypes.c_int(a))
        keep.append(v)
        ptrs.append(ctypes.cast(ctypes.byref(v), ctypes.c_void_p))
    params = (ctypes.c_void_p * len(ptrs))(*ptrs)
    cfg = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), 0,
                        ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), ctypes.pointer(_PDL_ATTR), 1)
    res = _libcuda().cuLaunchKernelEx(ctypes.byref(cfg), kern.func, params, None)
    if res != 0:
        raise RuntimeError(f"cuLaunchKernelEx (programmatic dependent launch) failed with CUresult {res}")


def _rows(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x [M, K] as the kernels read it: 1 <= M <= MAX_M, bf16, contiguous 16-byte aligned rows (16-byte loads)."""
    m, k = x.shape
    if not 1 <= m <= MAX_M:
        raise ValueError(f"{kind} mma kernel is for 1 <= M <= {MAX_M}, got M={m}")
    if x.dtype != torch.bfloat16 or x.stride(-1) != 1 or x.stride(0) != k or x.data_ptr() % 16:
        x = x.to(torch.bfloat16).contiguous().clone()
    return x


def _prefetch_args(x: torch.Tensor, pf0: torch.Tensor | None, pf1: torch.Tensor | None) -> list:
    """(pointer, bytes) twice for the kernels' L2 prefetch of the next GEMM's weights; x with 0 bytes: none."""
    out = []
    for t in (pf0, pf1):
        if t is None:
            out += [x, 0]
        else:
            if not t.is_contiguous() or t.device != x.device or t.data_ptr() % 16:
                raise ValueError("L2 prefetch regions must be contiguous, 16-byte aligned tensors on the kernel's device")
            out += [t, min(t.numel() * t.element_size(), 2**31 - 16) // 16 * 16]
    return out


def _launch(x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor | None, sza: torch.Tensor, szb: torch.Tensor | None,
            group: int, config: str, pdl: bool, pf0: torch.Tensor | None = None, pf1: torch.Tensor | None = None) -> torch.Tensor:
    m, k = x.shape
    n = wa.shape[0] * 16
    if not config_fits(config, n, k, group):
        raise ValueError(f"int4 mma config {config} does not tile N={n}, K={k}, group={group}")
    x = _rows(x, "int4")
    nmat = 1 if wb is None else 2
    kern = _compile(int4_instance(m, nmat, config, k, group), x.device)
    return _run(kern, x, n, nmat, config, pdl, lambda y, ws, cnt: [
        wa, wb if wb is not None else wa, sza, szb if szb is not None else sza, x, y, ws, cnt, m, n, k, _SENTINEL,
        *_prefetch_args(x, pf0, pf1)])


def int4_instance(m: int, nmat: int, config: str, k: int, group: int) -> str:
    """The int4_mma_gemm template instance a launch at M = m under config compiles (nmat 2: GeGLU)."""
    nt, warps, split = parse_config(config)
    return f"int4_mma_gemm<{1 if m <= 8 else 2},{nmat},{nt},{warps},{k // (64 * warps * split)},{split},{group}>"


def _run(kern, x: torch.Tensor, n: int, nmat: int, config: str, pdl: bool, make_args) -> torch.Tensor:
    """Allocate y (and the split-K workspace and counters), launch kern on the current stream."""
    from evalkit.kernels.triton_kernels import _counters

    m = x.shape[0]
    nt, warps, split = parse_config(config)
    y = torch.empty((m, n), device=x.device, dtype=torch.bfloat16)
    grid_x = n // (16 * nt)
    if split > 1:
        ws = torch.empty((split, nmat, m, n), device=x.device, dtype=torch.float32)
        cnt = _counters(x.device, grid_x)
    else:
        ws, cnt = y, y  # unused by the kernel
    args = make_args(y, ws, cnt)
    if pdl and torch.cuda.get_device_capability(x.device) >= (9, 0):
        _launch_pdl(kern, (grid_x, split, 1), (32 * warps, 1, 1), args)
    else:
        kern(grid=(grid_x, split, 1), block=(32 * warps, 1, 1), args=args)
    return y


@torch.library.custom_op("evalkit::int4_mma_gemm", mutates_args=())
def _int4_mma_op(x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, sza: torch.Tensor, szb: torch.Tensor,
                 geglu: bool, group: int, config: str, pdl: bool, pf0: torch.Tensor | None = None,
                 pf1: torch.Tensor | None = None) -> torch.Tensor:
    return _launch(x, wa, wb if geglu else None, sza, szb if geglu else None, group, config, pdl, pf0, pf1)


@_int4_mma_op.register_fake
def _(x, wa, wb, sza, szb, geglu, group, config, pdl, pf0=None, pf1=None):
    return x.new_empty((x.shape[0], wa.shape[0] * 16), dtype=torch.bfloat16)


def int4_mma_gemm(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int, config: str, pdl: bool = True,
                  prefetch: tuple = (None, None)) -> torch.Tensor:
    """y [M, N] bf16 = x [M, K] @ W^T for W packed by pack_mma (M <= 16). pdl: programmatic dependent
    launch on sm_90+ (ignored below). prefetch: up to two tensors (the next GEMM's weights) to pull into L2."""
    return _int4_mma_op(x, words, words, sz, sz, False, group, config, pdl, *prefetch)


def int4_mma_geglu(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, szg: torch.Tensor, szu: torch.Tensor,
                   group: int, config: str, pdl: bool = True, prefetch: tuple = (None, None)) -> torch.Tensor:
    """gelu_tanh(x Wg^T) * (x Wu^T) in one launch (M <= 16)."""
    return _int4_mma_op(x, wg, wu, szg, szu, True, group, config, pdl, *prefetch)


# ------------------------------------------------------------------------------------------------ fp8 (W8A8)
FP8_CONFIGS = ("t1w4s1", "t1w8s1", "t1w16s1", "t2w8s1", "t1w8s2", "t1w16s2", "t1w4s4", "t1w8s4")
FP8_MAX_KB = 8  # 32-k blocks per warp: at most 2 x 8 x 4 weight registers


def fp8_kslice(cfg: str, k: int) -> int:
    """The K span that shares one activation scale in fp8_mma_gemm under cfg: the warp's slice, 32 KB values."""
    _, warps, split = parse_config(cfg)
    return k // (warps * split)


def fp8_config_fits(cfg: str, n: int, k: int) -> bool:
    """Whether cfg tiles [N, K] for fp8_mma_gemm: whole 16-row tiles, 1..FP8_MAX_KB blocks of 32 k per warp."""
    nt, warps, split = parse_config(cfg)
    if n % (16 * nt) or k % (32 * warps * split):
        return False
    return 1 <= fp8_kslice(cfg, k) // 32 <= FP8_MAX_KB


def pack_fp8_mma(qweight: torch.Tensor) -> torch.Tensor:
    """e4m3 weights [N, K] -> int32 words [N/16, K/32, 32, 4]: each lane's m16n8k32 A fragment per 32-k block."""
    n, k = qweight.shape
    if n % 16 or k % 32:
        raise ValueError(f"fp8 mma kernel needs N % 16 == 0 and K % 32 == 0; got N={n}, K={k}")
    qb = qweight.contiguous().view(torch.uint8)
    ar = functools.partial(torch.arange, device=qb.device)
    i, b = ar(n // 16).view(-1, 1, 1, 1, 1), ar(k // 32).view(1, -1, 1, 1, 1)
    lane, j, e = ar(32).view(1, 1, -1, 1, 1), ar(4).view(1, 1, 1, -1, 1), ar(4).view(1, 1, 1, 1, -1)
    row = 16 * i + lane // 4 + 8 * (j % 2)
    col = 32 * b + 8 * (lane % 4) + 4 * (j // 2) + e
    w = (qb[row, col].to(torch.int64) << (8 * e)).sum(-1)
    return _as_int32_words(w).contiguous()


def fake_quant_fp8_slices(x: torch.Tensor, kslice: int) -> torch.Tensor:
    """x [M, K] -> fp32 values fp8_mma_gemm multiplies: e4m3 with one scale per token and per kslice of K."""
    m, k = x.shape
    return fake_quant_fp8_rows(x.float().reshape(m, k // kslice, kslice)).reshape(m, k)


def emulate_fp8_mma_gemm(x: torch.Tensor, words: torch.Tensor, wscale: torch.Tensor, kslice: int) -> torch.Tensor:
    """y [M, N] fp32 computed the way fp8_mma_gemm reads its operands (PTX ISA m16n8k32 fragments: A regs
    j = 0..3 at (row r, k 4q..) (r + 8, 4q..) (r, 16 + 4q..) (r + 8, 16 + 4q..); B regs at k 4q.., 16 + 4q..,
    column r), with x quantized to e4m3 per token and kslice as the kernel does. A CPU check of pack_fp8_mma."""
    m_rows, k = x.shape
    n_tiles = words.shape[0]
    xq = torch.zeros(16, k, dtype=torch.float64)  # e4m3 values times their slice scale (exact in fp64)
    xq[:m_rows] = fake_quant_fp8_slices(x, kslice).double()
    wb = (words.to(torch.int64) & 0xFFFFFFFF)
    e4 = lambda v: v.to(torch.uint8).view(torch.float8_e4m3fn).double()  # noqa: E731
    lane = torch.arange(32)
    r, q = lane // 4, lane % 4
    acc = torch.zeros(16, n_tiles * 16, dtype=torch.float64)
    for blk in range(k // 32):
        for i in range(n_tiles):
            a = torch.zeros(16, 32, dtype=torch.float64)
            for j in range(4):
                for byte in range(4):
                    a[r + 8 * (j % 2), 4 * q + 16 * (j // 2) + byte] = e4((wb[i, blk, :, j] >> (8 * byte)) & 0xFF)
            bm = torch.zeros(32, 16, dtype=torch.float64)
            for mh in range(2):
                for reg in range(2):
                    for byte in range(4):
                        bm[4 * q + 16 * reg + byte, 8 * mh + r] = xq[8 * mh + r, 32 * blk + 8 * q + 4 * reg + byte]
            acc[:, 16 * i:16 * i + 16] += (a @ bm).t()
    return (acc[:m_rows] * wscale.reshape(1, -1).double()).float()


EPI_PLAIN, EPI_NORM, EPI_RESID = 0, 1, 2  # fp8_mma_gemm's fused prologue/epilogue (mma_small_m.cu)


def fp8_instance(m: int, nmat: int, config: str, k: int, epi: int = EPI_PLAIN) -> str:
    """The fp8_mma_gemm template instance a launch at M = m under config compiles (nmat 2: GeGLU; epi: EPI_*)."""
    nt, warps, split = parse_config(config)
    return f"fp8_mma_gemm<{1 if m <= 8 else 2},{nmat},{nt},{warps},{fp8_kslice(config, k) // 32},{split},{epi}>"


def fp8_norm_fits(config: str, k: int) -> bool:
    """Whether cfg can fold the adaRMS norm in (EPI_NORM): one CTA's warps cover all of K."""
    _, warps, split = parse_config(config)
    return split == 1 and fp8_kslice(config, k) * warps == k


def _launch_fp8(x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor | None, wscale: torch.Tensor, config: str,
                pdl: bool, pf0: torch.Tensor | None = None, pf1: torch.Tensor | None = None,
                mod: torch.Tensor | None = None, resid: torch.Tensor | None = None, rows_per_mod: int = 1,
                eps: float = 0.0) -> torch.Tensor:
    m, k = x.shape
    n = wa.shape[0] * 16
    if not fp8_config_fits(config, n, k):
        raise ValueError(f"fp8 mma config {config} does not tile N={n}, K={k}")
    x = _rows(x, "fp8")
    nmat = 1 if wb is None else 2
    epi = EPI_PLAIN if mod is None else EPI_RESID if resid is not None else EPI_NORM
    if epi != EPI_PLAIN:
        width = k if epi == EPI_NORM else n
        if mod.dtype != torch.bfloat16 or not mod.is_contiguous() or mod.shape[-1] != 3 * width or mod.data_ptr() % 16:
            raise ValueError(f"fp8 mma fused adaRMS: mod must be a contiguous, 16-byte aligned bf16 [B, 3*{width}], "
                             f"got {mod.dtype} {tuple(mod.shape)}")
        mod_rows = mod.numel() // (3 * width)
        if mod_rows * rows_per_mod < m:
            raise ValueError(f"fp8 mma fused adaRMS: {mod_rows} modulation rows x {rows_per_mod} < M={m}")
        if epi == EPI_NORM and not fp8_norm_fits(config, k):
            raise ValueError(f"fp8 mma config {config} cannot fold the norm in: its CTAs do not cover all of K={k}")
        if epi == EPI_NORM and rows_per_mod < m:  # the kernel stages one modulation row in shared memory
            raise ValueError(f"fp8 mma fused adaRMS norm takes one modulation row (batch 1): M={m} > rows per row {rows_per_mod}")
        if epi == EPI_RESID and (nmat != 1 or resid.shape != (m, n) or resid.dtype != torch.bfloat16 or not resid.is_contiguous()):
            raise ValueError(f"fp8 mma residual epilogue: one projection and a contiguous bf16 resid [{m}, {n}], got {tuple(resid.shape)}")
    kern = _compile(fp8_instance(m, nmat, config, k, epi), x.device)
    ws_ = wscale.reshape(-1).float().contiguous()
    fused = [x, 0, 1, 0.0, x] if epi == EPI_PLAIN else [mod, 3 * (k if epi == EPI_NORM else n), rows_per_mod, float(eps),
                                                         resid if resid is not None else x]
    return _run(kern, x, n, nmat, config, pdl, lambda y, ws, cnt: [
        wa, wb if wb is not None else wa, ws_, x, y, ws, cnt, m, n, k, _SENTINEL, *_prefetch_args(x, pf0, pf1), *fused])


@torch.library.custom_op("evalkit::fp8_mma_gemm", mutates_args=())
def _fp8_mma_op(x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, wscale: torch.Tensor, geglu: bool, config: str,
                pdl: bool, pf0: torch.Tensor | None = None, pf1: torch.Tensor | None = None,
                mod: torch.Tensor | None = None, resid: torch.Tensor | None = None, rows_per_mod: int = 1,
                eps: float = 0.0) -> torch.Tensor:
    return _launch_fp8(x, wa, wb if geglu else None, wscale, config, pdl, pf0, pf1, mod, resid, rows_per_mod, eps)


@_fp8_mma_op.register_fake
def _(x, wa, wb, wscale, geglu, config, pdl, pf0=None, pf1=None, mod=None, resid=None, rows_per_mod=1, eps=0.0):
    return x.new_empty((x.shape[0], wa.shape[0] * 16), dtype=torch.bfloat16)


def fp8_mma_gemm(x: torch.Tensor, words: torch.Tensor, wscale: torch.Tensor, config: str, pdl: bool = True,
                 prefetch: tuple = (None, None), norm: tuple | None = None, residual: tuple | None = None) -> torch.Tensor:
    """y [M, N] bf16 = (x quantized to e4m3 per token and fp8_kslice(config, K)) @ W^T, W e4m3 packed by
    pack_fp8_mma with per-channel scales wscale [N] (M <= 16).

    norm = (mod, rows_per_mod, eps): x is first adaRMS-normed in the kernel with mod [1, 3K] (scale | shift |
    gate; one row: batch 1, M <= rows_per_mod), as AdaRMSNorm computes it (layers.ada_rms_norm).
    residual = (resid [M, N], mod [B, 3N], rows_per_mod): y = resid + gate * y, gate = mod[..., 2N:].
    The kernel reads mod before it waits for the previous kernel on the stream (programmatic dependent launch):
    mod must not be written by that kernel, nor by any mma launch in the PDL chain before it (π0.5's modulations
    are made before the denoise loop, by ordinary launches)."""
    if norm is not None and residual is not None:
        raise ValueError("fp8_mma_gemm folds in a norm or a residual add, not both")
    mod, rows, eps, resid = None, 1, 0.0, None
    if norm is not None:
        mod, rows, eps = norm
    elif residual is not None:
        resid, mod, rows = residual
    return _fp8_mma_op(x, words, words, wscale, False, config, pdl, *prefetch, mod, resid, rows, eps)


def fp8_mma_geglu(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wscale_gu: torch.Tensor, config: str,
                  pdl: bool = True, prefetch: tuple = (None, None), norm: tuple | None = None) -> torch.Tensor:
    """gelu_tanh(x Wg^T) * (x Wu^T), one launch; wscale_gu = [gate scales | up scales] (2N, contiguous).
    norm: as fp8_mma_gemm's (the adaRMS norm before the MLP folded in)."""
    mod, rows, eps = norm if norm is not None else (None, 1, 0.0)
    return _fp8_mma_op(x, wg, wu, wscale_gu, True, config, pdl, *prefetch, mod, None, rows, eps)


# ------------------------------------------------------------------------------------------------ fused fp8 MLP
FP8_MLP_CONFIGS = ("w4s4", "w8s2", "w8s4", "w16s1", "w16s2")  # warps per CTA, K splits of the down phase
_BARRIERS: dict[tuple[str, int], torch.Tensor] = {}


def fp8_mlp_plan(d: int, f: int, cfg: str) -> tuple[int, int, int, int] | None:
    """(warps, KB1, KB2, SPLIT2) of fp8_mma_mlp under cfg 'w{warps}s{split}' for width d and MLP width f, or
    None when it does not tile: grid F/16 CTAs (one 16-row tile of F each in phase 1), of which the first
    D/16 x SPLIT2 run the down phase; 1..FP8_MAX_KB blocks of 32 k per warp in both phases."""
    m = re.fullmatch(r"w(\d+)s(\d+)", cfg)
    if not m:
        raise ValueError(f"fp8 fused MLP config '{cfg}' is not w<warps>s<split>; e.g. {', '.join(FP8_MLP_CONFIGS)}")
    warps, split2 = int(m[1]), int(m[2])
    if d % 16 or f % 16 or (d // 16) * split2 > f // 16 or d % (32 * warps) or f % (32 * warps * split2):
        return None
    kb1, kb2 = d // (32 * warps), f // (32 * warps * split2)
    return (warps, kb1, kb2, split2) if 1 <= kb1 <= FP8_MAX_KB and 1 <= kb2 <= FP8_MAX_KB else None


def fp8_mlp_configs(d: int, f: int, cfg: str) -> tuple[str, str]:
    """The one-GEMM configs whose math the fused MLP reproduces (same K slices, same split-K sum order):
    (GeGLU config, down config), for the references and the choice log."""
    warps, _, _, split2 = fp8_mlp_plan(d, f, cfg)
    return f"t1w{warps}s1", f"t1w{warps}s{split2}"


def fp8_mlp_instance(m: int, d: int, f: int, config: str, sms: int) -> str:
    """The fp8_mma_mlp template instance for M = m on a GPU with `sms` SMs (it asks ptxas for enough CTAs per
    SM to hold the whole grid at once)."""
    warps, kb1, kb2, split2 = fp8_mlp_plan(d, f, config)
    return f"fp8_mma_mlp<{1 if m <= 8 else 2},{warps},{kb1},{kb2},{split2},{-(-(f // 16) // sms)}>"


def _barrier(device: torch.device, grid: int) -> torch.Tensor:
    """The grid barrier's 64-bit arrival count, one per device and grid size (the count waits for the next
    multiple of the grid size, so launches of two sizes must not share one); allocated on the first (eager) call."""
    key = (str(device), grid)
    buf = _BARRIERS.get(key)
    if buf is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fp8 fused MLP barrier not allocated; run one eager forward before CUDA-graph capture")
        buf = _BARRIERS[key] = torch.zeros(1, device=device, dtype=torch.int64)
    return buf


@functools.lru_cache(maxsize=None)
def _resident_ctas(kern, threads: int, device_index: int) -> int:
    """How many CTAs of kern can be resident at once on the GPU (occupancy API x SMs); cached per kernel."""
    n = ctypes.c_int()
    res = _libcuda().cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(n), kern.func, threads, ctypes.c_size_t(0))
    if res != 0:
        raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed with CUresult {res}")
    return n.value * torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_fp8_mlp(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wscale_gu: torch.Tensor, wd: torch.Tensor,
                    wscale_d: torch.Tensor, config: str, pdl: bool) -> torch.Tensor:
    from evalkit.kernels.triton_kernels import _counters

    m, d = x.shape
    f = wg.shape[0] * 16
    plan = fp8_mlp_plan(d, f, config)
    if plan is None or wd.shape[0] * 16 != d:
        raise ValueError(f"fp8 fused MLP config {config} does not tile D={d}, F={f}")
    warps, _, _, split2 = plan
    x = _rows(x, "fp8")
    grid = f // 16
    kern = _compile(fp8_mlp_instance(m, d, f, config, torch.cuda.get_device_properties(x.device).multi_processor_count), x.device)
    with torch.cuda.device(x.device):
        resident = _resident_ctas(kern, 32 * warps, x.device.index)
    if resident < grid:  # a grid barrier over CTAs that cannot all be resident would never open
        raise RuntimeError(f"fp8 fused MLP needs {grid} resident CTAs of {32 * warps} threads; this GPU holds {resident}")
    h = torch.empty((m, f), device=x.device, dtype=torch.bfloat16)
    y = torch.empty((m, d), device=x.device, dtype=torch.bfloat16)
    ws = torch.empty((split2, 1, m, d), device=x.device, dtype=torch.float32)
    args = [wg, wu, wscale_gu.reshape(-1).float().contiguous(), wd, wscale_d.reshape(-1).float().contiguous(), x, h, y,
            ws, _counters(x.device, d // 16), _barrier(x.device, grid), m, d, f, _SENTINEL]
    if pdl and torch.cuda.get_device_capability(x.device) >= (9, 0):
        _launch_pdl(kern, (grid, 1, 1), (32 * warps, 1, 1), args)
    else:
        kern(grid=(grid, 1, 1), block=(32 * warps, 1, 1), args=args)
    return y


@torch.library.custom_op("evalkit::fp8_mma_mlp", mutates_args=())
def _fp8_mma_mlp_op(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wscale_gu: torch.Tensor, wd: torch.Tensor,
                    wscale_d: torch.Tensor, config: str, pdl: bool) -> torch.Tensor:
    return _launch_fp8_mlp(x, wg, wu, wscale_gu, wd, wscale_d, config, pdl)


@_fp8_mma_mlp_op.register_fake
def _(x, wg, wu, wscale_gu, wd, wscale_d, config, pdl):
    return x.new_empty((x.shape[0], wd.shape[0] * 16), dtype=torch.bfloat16)


def fp8_mma_mlp(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wscale_gu: torch.Tensor, wd: torch.Tensor,
                wscale_d: torch.Tensor, config: str = "w8s2", pdl: bool = True) -> torch.Tensor:
    """down(gelu_tanh(x Wg^T) * (x Wu^T)) at M <= 16 in one launch (fp8_mma_mlp in mma_small_m.cu): the same math
    as fp8_mma_geglu under fp8_mlp_configs(...)[0] followed by fp8_mma_gemm under [1]."""
    return _fp8_mma_mlp_op(x, wg, wu, wscale_gu, wd, wscale_d, config, pdl)
