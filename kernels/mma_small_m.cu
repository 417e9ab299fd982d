// W4A16 small-M GEMM on tensor cores for the denoise loop (M = horizon x batch <= 16), compiled at run time
// by NVRTC (kernels/mma_small_m.py). Written by hand because neither a library kernel nor our Triton kernel is
// fast at this M: every weight load of a warp is issued before the first use (no software-pipeline loop and
// no shared-memory layout conversion between load and MMA), and the weights are dequantized straight into
// the MMA's A-fragment registers.
//
//   y[m, n] = sum_k x[m, k] * W[n, k]            (GEGLU: y = gelu_tanh(x Wa^T) * (x Wb^T))
//
// The product is computed transposed, y^T = W x^T, with mma.sync.m16n8k16 (bf16 in, fp32 accumulate):
// A = a 16x16 tile of W (rows n, cols k), B = x^T (16 k x 8 m), one or two m-halves (MT) for M <= 8 / 16.
//
// Weight layout (kernels/mma_small_m.py:pack_mma, checked on CPU by tests/test_mma_small_m_layout.py):
//   words[n_tile][kp][lane][e], uint32, kp = K/64 "k-pairs" of two 32-k blocks, e = 2 * half + step.
//   Word (n_tile, kp, lane, e) holds the 8 nibbles this lane's A fragment needs for one m16n8k16 step.
//   Within each 32-k block the k order is permuted (the same permutation for x): lane q = lane % 4 owns real
//   k 8q..8q+7 of the block, step t the 4 of them at 8q+4t.., so its x fragment is one 16-byte load.
//   Nibble p of a word: fragment register j = p % 4, half h = p / 4 (low/high bf16 of the register):
//   row = 16 n_tile + lane/4 + 8 (j % 2), real k = 32 b + 8 q + 4 t + 2 (j / 2) + h.
// Scales: sz[n_tile][group][r][4] uint32 = bf16x2 (s, s), (z, z) of row r, then of row r + 8;
//   w = (q - 8) * s + z. Dequant: OR the nibble into the bits of bf16 128.0 (exact 128 + q), subtract 136
//   (exact), one fma.rn.bf16x2 with (s, z): one rounding, as a bf16 dequantized weight would have.
//
// Launched with programmatic dependent launch where the GPU has it (sm_90): weights and scales load before
// the kernel waits for its predecessor (griddepcontrol), so they stream in during the previous kernel's tail.
//
// Grid (N / (16 NT), SPLIT); block 32 WARPS threads. CTA (i, s) covers NT n-tiles and the K slice s; each warp
// a K/(SPLIT*WARPS) sub-slice (KP k-pairs). Warps reduce through shared memory: at SPLIT 1 in one step with the
// epilogue (reduce_store_parallel), else as a tree into warp 0; with SPLIT > 1 each CTA writes
// fp32 partials to a workspace and the CTA that arrives last at the tile's counter adds them, writes y and
// resets the counter (so the kernel is one launch and CUDA-graph replays stay correct).

typedef unsigned int u32;

struct __align__(16) u32x4 { u32 x, y, z, w; };

__device__ __forceinline__ u32x4 ld_stream(const u32x4* p) {  // weights: read once, keep them out of L1
    u32x4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ u32x4 ld_const(const u32x4* p) {  // scales: constant, re-read by every CTA
    u32x4 v;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ u32x4 ld_l2(const u32x4* p) {  // x: written by the previous kernel; read at L2, never a stale L1 line
    u32x4 v;
    asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 fma_bf16x2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// Fragment register j (0..3) of a word: bf16x2 of (q - 8) * s + z for its two nibbles.
__device__ __forceinline__ u32 dequant_pair(u32 w, int j, u32 s2, u32 z2) {
    const u32 ONE = 0x3F803F80u;       // bf16x2 (1, 1)
    const u32 MINUS136 = 0xC308C308u;  // bf16x2 (-136, -136)
    u32 v = ((w >> (4 * j)) & 0x000F000Fu) | 0x43004300u;  // bf16x2 (128 + q_lo, 128 + q_hi), exact
    u32 d = fma_bf16x2(v, ONE, MINUS136);                  // q - 8, exact
    return fma_bf16x2(d, s2, z2);
}

// The A fragment of one m16n8k16 step from its packed word e: registers (row r, k 2q..), (r + 8, 2q..),
// (r, 2q + 8..), (r + 8, 2q + 8..); sz holds (s, z) of row r, then of row r + 8.
__device__ __forceinline__ void dequant_fragment(u32 w, const u32x4& sz, u32* a) {
    a[0] = dequant_pair(w, 0, sz.x, sz.y);
    a[1] = dequant_pair(w, 1, sz.z, sz.w);
    a[2] = dequant_pair(w, 2, sz.x, sz.y);
    a[3] = dequant_pair(w, 3, sz.z, sz.w);
}

__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 xor4(const u32x4& v) { return v.x ^ v.y ^ v.z ^ v.w; }

// ptxas sinks loads next to their first use (it issued half of a warp's weight loads after its first MMAs),
// which serializes DRAM latency. A branch on a value that needs every loaded word (`all`, an XOR of them)
// makes all loads issue before this point; the branch itself is harmless either way.
__device__ __forceinline__ void issue_loads_before_here(u32 all, u32 sentinel) {
    if (all == sentinel) __nanosleep(32);
}

// Programmatic dependent launch (sm_90): let the next kernel on the stream start its own weight loads, then
// wait until the previous kernel (which wrote x, and may still read memory this kernel writes) has completed.
// Both are no-ops when the launch did not ask for it.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// L2 prefetch of the weights the *next* GEMM on the stream will read (pf, bytes; bytes == 0: none). At M <= 16
// each GEMM waits for HBM on its critical path, because the kernels between two of ours (norms, RoPE,
// attention) are not launched as dependents; issued here, that read overlaps them and the next GEMM finds its
// weights in L2. Each CTA takes every ctas-th 16 KB chunk, one bulk prefetch instruction per chunk on sm_90.
__device__ __forceinline__ void prefetch_l2(const char* pf, int bytes) {
    constexpr int CHUNK = 16384;
    if (bytes <= 0) return;
    const int chunks = (bytes + CHUNK - 1) / CHUNK;  // compare chunk indices: c * CHUNK overflows int
    const int ctas = gridDim.x * gridDim.y, cta = blockIdx.y * gridDim.x + blockIdx.x;
    if (cta >= chunks) return;
    for (int c = cta + ctas * (int)threadIdx.x; c < chunks; c += ctas * (int)blockDim.x) {
        const int len = min(CHUNK, bytes - c * CHUNK);  // a multiple of 16: the packed tensors are
#if __CUDA_ARCH__ >= 900
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(pf + (size_t)c * CHUNK), "r"(len) : "memory");
#else
        for (int o = 0; o < len; o += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(pf + (size_t)c * CHUNK + o));
#endif
    }
}

__device__ __forceinline__ float gelu_tanh(float g) {
    return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

__device__ __forceinline__ float bf2f(unsigned short b) { return __uint_as_float((u32)b << 16); }

// two floats -> bf16x2 (lo in the low half), round to nearest even: one instruction where f2bf below takes ~6
__device__ __forceinline__ u32 bf16x2_rn(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
__device__ __forceinline__ float bf_round(float f) { return __uint_as_float(bf16x2_rn(f, 0.f) << 16); }

__device__ __forceinline__ unsigned short f2bf(float f) {  // round to nearest even
    u32 u = __float_as_uint(f);
    if ((u & 0x7F800000u) == 0x7F800000u) return (unsigned short)((u >> 16) | ((u & 0xFFFF) ? 0x40 : 0));
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// Steps shared by both kernels, after each warp holds its fp32 C fragments acc[NACC] (flat index
// ((mat * NT + t) * MT + mh) * 4 + c; c = i % 4 -> n = r + 8 (c / 2), m = 2q + c % 2; m += 8 mh, n += 16 (tile0 + t)).
// frag_m / frag_n: that row m and column n of value i (the epilogue and the loads for it use the same map).
template <int MT>
__device__ __forceinline__ int frag_m(int i, int q) { return 8 * ((i >> 2) % MT) + 2 * q + (i & 1); }
template <int MT, int NT>
__device__ __forceinline__ int frag_n(int i, int r, int tile0) { return 16 * (tile0 + (i / (4 * MT)) % NT) + r + 8 * ((i >> 1) & 1); }

// Sum the warps' accumulators into warp 0's: a tree through shared memory (WARPS a power of two), so the buffer
// holds half the warps' values and the adds run in parallel. (Shared-memory float atomicAdd compiles to a CAS
// loop on sm_90: not used.) Returns whether this warp goes on (warp 0).
template <int NACC, int WARPS>
__device__ __forceinline__ bool reduce_warps(float* acc, float (*red)[NACC][32], int warp, int lane) {
    static_assert((WARPS & (WARPS - 1)) == 0, "WARPS must be a power of two");
#pragma unroll
    for (int half = WARPS / 2; half >= 1; half /= 2) {
        if (warp >= half && warp < 2 * half) {
#pragma unroll
            for (int i = 0; i < NACC; ++i) red[warp - half][i][lane] = acc[i];
        }
        __syncthreads();
        if (warp < half) {
#pragma unroll
            for (int i = 0; i < NACC; ++i) acc[i] += red[warp][i][lane];
        }
        __syncthreads();
    }
    return warp == 0;
}

// Warp 0: optional column scales (wscale[mat * N + n] -- fp8), split-K partials (the CTA that arrives last at
// the tile's counter adds them and resets the counter), GeGLU, bf16 store. `split` is this CTA's K split and
// `ctr` its tile's counter (blockIdx.y and blockIdx.x in the one-GEMM kernels).
// With RESID (one matrix, no GeGLU), y = resid + gate * y with the roundings of the unfused layer: the projection
// rounded to bf16, times the adaRMS gate rounded to bf16, plus the residual (res[i] = resid, gat[i] = gate of
// output i, loaded by the caller: the gates before its wait, the residual right after it).
template <int NMAT, int NT, int MT, int SPLIT, bool RESID = false>
__device__ __forceinline__ void store_out(float* acc, const float* __restrict__ wscale, int wscale_n,
                                          int q, int r, int tile0, int M, int N, float* __restrict__ ws,
                                          int* __restrict__ cnt, unsigned short* __restrict__ y, int split, int ctr,
                                          const float* res = nullptr, const float* gat = nullptr) {
    constexpr int PER_MAT = NT * MT * 4, NACC = NMAT * PER_MAT;
    const int lane = threadIdx.x & 31;
    auto out_m = [&](int i) { return frag_m<MT>(i, q); };
    auto out_n = [&](int i) { return frag_n<MT, NT>(i, r, tile0); };
    if (wscale != nullptr) {
#pragma unroll
        for (int i = 0; i < NACC; ++i)
            if (out_m(i) < M) acc[i] *= wscale[(i / PER_MAT) * wscale_n + out_n(i)];
    }
    if (SPLIT > 1) {
        const size_t plane = (size_t)M * N;
        float* part = ws + (size_t)split * NMAT * plane;
#pragma unroll
        for (int i = 0; i < NACC; ++i)
            if (out_m(i) < M) part[(i / PER_MAT) * plane + (size_t)out_m(i) * N + out_n(i)] = acc[i];
        __threadfence();  // partials visible device-wide before the arrival below
        __syncwarp();
        int arrived = 0;
        if (lane == 0) arrived = atomicAdd(cnt + ctr, 1);
        arrived = __shfl_sync(0xFFFFFFFFu, arrived, 0);
        if (arrived != SPLIT - 1) return;
        __threadfence();
#pragma unroll
        for (int i = 0; i < NACC; ++i) {
            float sum = 0.f;
            if (out_m(i) < M)
                for (int sp = 0; sp < SPLIT; ++sp)
                    sum += __ldcg(ws + (sp * NMAT + i / PER_MAT) * plane + (size_t)out_m(i) * N + out_n(i));
            acc[i] = sum;
        }
        if (lane == 0) cnt[ctr] = 0;  // ready for the next launch / graph replay
    }
#pragma unroll
    for (int i = 0; i < PER_MAT; ++i) {  // GeGLU: gelu(gate) * up, gate = matrix 0, up = matrix 1
        float v = NMAT == 2 ? gelu_tanh(acc[i]) * acc[PER_MAT + i] : acc[i];
        if (RESID) v = __fadd_rn(bf_round(__fmul_rn(bf_round(v), gat[i])), res[i]);
        if (out_m(i) < M) y[(size_t)out_m(i) * N + out_n(i)] = f2bf(v);
    }
}

// The warps' reduction and the epilogue in one step, for SPLIT 1 without the residual epilogue: every warp puts its
// accumulators in shared memory at once (one barrier, where reduce_warps takes two per tree level), then each
// thread adds one output's WARPS partials in reduce_warps' tree order (so the sums are bit-identical to it) and
// runs store_out's epilogue for that output -- spread over the CTA instead of warp 0 alone, which is faster in
// chains of MLPs than the tree (docs/backends.md, the int4 ablation).
template <int NMAT, int NT, int MT, int WARPS, int SPLIT, bool RESID = false>
__device__ constexpr bool parallel_epilogue() {  // its shared buffer holds WARPS x NACC x 32 floats: at most 32 KB
    return SPLIT == 1 && !RESID && WARPS > 1 && WARPS <= 16 && WARPS * NMAT * NT * MT * 4 <= 256;  // 32 warps: p[] spills
}

template <int NMAT, int NT, int MT, int WARPS>
__device__ __forceinline__ void reduce_store_parallel(const float* acc, float (*red)[NMAT * NT * MT * 4][32],
                                                      const float* __restrict__ wscale, int wscale_n, int tile0,
                                                      int M, int N, unsigned short* __restrict__ y) {
    constexpr int PER_MAT = NT * MT * 4, NACC = NMAT * PER_MAT;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < NACC; ++i) red[warp][i][lane] = acc[i];
    __syncthreads();
    for (int j = threadIdx.x; j < PER_MAT * 32; j += WARPS * 32) {
        const int l = j & 31, i = j >> 5;  // value i of lane l's fragments
        const int m = frag_m<MT>(i, l & 3), n = frag_n<MT, NT>(i, l >> 2, tile0);
        if (m >= M) continue;
        float v[NMAT];
#pragma unroll
        for (int mat = 0; mat < NMAT; ++mat) {
            float p[WARPS];
#pragma unroll
            for (int w = 0; w < WARPS; ++w) p[w] = red[w][mat * PER_MAT + i][l];
#pragma unroll
            for (int half = WARPS / 2; half >= 1; half /= 2)
#pragma unroll
                for (int w = 0; w < half; ++w) p[w] += p[w + half];
            v[mat] = wscale != nullptr ? p[0] * wscale[mat * wscale_n + n] : p[0];
        }
        y[(size_t)m * N + n] = f2bf(NMAT == 2 ? gelu_tanh(v[0]) * v[1] : v[0]);
    }
}

template <int MT, int NMAT, int NT, int WARPS, int KP, int SPLIT, int GROUP>
__global__ void __launch_bounds__(WARPS * 32) int4_mma_gemm(
    const u32x4* __restrict__ wa, const u32x4* __restrict__ wb, const u32x4* __restrict__ sza,
    const u32x4* __restrict__ szb, const unsigned short* __restrict__ x, unsigned short* __restrict__ y,
    float* __restrict__ ws, int* __restrict__ cnt, int M, int N, int K, u32 sentinel,
    const char* pf0, int pf0_bytes, const char* pf1, int pf1_bytes) {
    static_assert(GROUP % 64 == 0, "group must be a multiple of 64 (one k-pair never spans two groups)");
    constexpr int KPG = GROUP / 64;  // k-pairs per group
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = lane >> 2, q = lane & 3;
    const int KPT = K / 64;                       // k-pairs in all of K
    const int kp0 = (blockIdx.y * WARPS + warp) * KP;  // this warp's first k-pair
    const int tile0 = blockIdx.x * NT;
    const u32x4* wmat[2] = {wa, wb};
    const u32x4* szmat[2] = {sza, szb};

    constexpr int NACC = NMAT * NT * MT * 4;
    constexpr bool PAR = parallel_epilogue<NMAT, NT, MT, WARPS, SPLIT>();
    __shared__ float red[PAR ? WARPS : WARPS > 1 ? WARPS / 2 : 1][NACC][32];  // the cross-warp reduction (step 5)

    // 1) every weight load of this warp, and its groups' (s, z) of rows r and r + 8, issued up front. They do
    //    not depend on the previous kernel, so under programmatic dependent launch they overlap its tail.
    constexpr int NG = (KP + KPG - 1) / KPG;
    u32x4 w[NMAT][NT][KP], szf[NMAT][NT][NG];
#pragma unroll
    for (int mat = 0; mat < NMAT; ++mat)
#pragma unroll
        for (int t = 0; t < NT; ++t) {
#pragma unroll
            for (int p = 0; p < KP; ++p)
                w[mat][t][p] = ld_stream(wmat[mat] + ((size_t)(tile0 + t) * KPT + kp0 + p) * 32 + lane);
#pragma unroll
            for (int g = 0; g < NG; ++g)
                szf[mat][t][g] = ld_const(szmat[mat] + ((size_t)(tile0 + t) * (K / GROUP) + kp0 / KPG + g) * 8 + r);
        }

    u32 all = 0;
#pragma unroll
    for (int mat = 0; mat < NMAT; ++mat)
#pragma unroll
        for (int t = 0; t < NT; ++t) {
#pragma unroll
            for (int p = 0; p < KP; ++p) all ^= xor4(w[mat][t][p]);
#pragma unroll
            for (int g = 0; g < NG; ++g) all ^= szf[mat][t][g].x ^ szf[mat][t][g].w;
        }
    issue_loads_before_here(all, sentinel);
    prefetch_l2(pf0, pf0_bytes);
    prefetch_l2(pf1, pf1_bytes);

    // Small per-warp work (the many-warp configs): dequantize every A fragment now, before waiting for the
    // previous kernel, so only x loads, MMAs and the reduction remain on the dependent path.
    constexpr bool PRE = NMAT * NT * KP <= 2;  // at most 32 fragment registers (4 spilled at 512 threads)
    u32 af[PRE ? NMAT : 1][PRE ? NT : 1][PRE ? KP : 1][4][4];
    if constexpr (PRE) {
#pragma unroll
        for (int mat = 0; mat < NMAT; ++mat)
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
                for (int p = 0; p < KP; ++p) {
                    const u32x4 sz = szf[mat][t][p / KPG];
                    const u32 wv[4] = {w[mat][t][p].x, w[mat][t][p].y, w[mat][t][p].z, w[mat][t][p].w};
#pragma unroll
                    for (int e = 0; e < 4; ++e) dequant_fragment(wv[e], sz, af[mat][t][p][e]);
                }
    }

    // 2) everything above overlaps the previous kernel's tail; x is its output
    wait_for_previous_kernel();

    // 3) x fragments: row m = 8 * mh + r, real k 8q..8q+7 of each 32-k block (16 bytes); rows >= M are zero
    u32x4 xf[MT][KP][2];
#pragma unroll
    for (int mh = 0; mh < MT; ++mh) {
        const int m = 8 * mh + r;
#pragma unroll
        for (int p = 0; p < KP; ++p)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int k = (kp0 + p) * 64 + 32 * h + 8 * q;
                xf[mh][p][h] = m < M ? ld_l2(reinterpret_cast<const u32x4*>(x + (size_t)m * K + k)) : u32x4{0, 0, 0, 0};
            }
    }
    u32 xall = 0;
#pragma unroll
    for (int mh = 0; mh < MT; ++mh)
#pragma unroll
        for (int p = 0; p < KP; ++p)
#pragma unroll
            for (int h = 0; h < 2; ++h) xall ^= xf[mh][p][h].x ^ xf[mh][p][h].w;
    issue_loads_before_here(xall, sentinel);

    // 4) dequantize into A fragments and multiply. acc is flat: index ((mat * NT + t) * MT + mh) * 4 + c
    float acc[NACC];
#pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = 0.f;
#pragma unroll
    for (int mat = 0; mat < NMAT; ++mat)
#pragma unroll
        for (int t = 0; t < NT; ++t) {
#pragma unroll
            for (int p = 0; p < KP; ++p) {
                const u32x4 sz = szf[mat][t][p / KPG];
                const u32 wv[4] = {w[mat][t][p].x, w[mat][t][p].y, w[mat][t][p].z, w[mat][t][p].w};
#pragma unroll
                for (int e = 0; e < 4; ++e) {  // e = 2 * half + step
                    u32 a[4];
                    if constexpr (PRE) {
#pragma unroll
                        for (int j = 0; j < 4; ++j) a[j] = af[mat][t][p][e][j];
                    } else {
                        dequant_fragment(wv[e], sz, a);
                    }
                    const int h = e >> 1, st = e & 1;
#pragma unroll
                    for (int mh = 0; mh < MT; ++mh) {
                        const u32 b0 = st ? xf[mh][p][h].z : xf[mh][p][h].x;
                        const u32 b1 = st ? xf[mh][p][h].w : xf[mh][p][h].y;
                        mma_bf16(acc + ((mat * NT + t) * MT + mh) * 4, a, b0, b1);
                    }
                }
            }
        }

    // 5) + 6): reduce the warps' K sub-slices, then split-K partials, GeGLU and the bf16 store
    if constexpr (PAR) {
        reduce_store_parallel<NMAT, NT, MT, WARPS>(acc, red, nullptr, 0, tile0, M, N, y);
        return;
    }
    if (!reduce_warps<NACC, WARPS>(acc, red, warp, lane)) return;
    store_out<NMAT, NT, MT, SPLIT>(acc, nullptr, 0, q, r, tile0, M, N, ws, cnt, y, blockIdx.y, blockIdx.x);
}

// ================================================================================================ fp8 (W8A8)
// The same structure for the fp8 backend at M <= 16: e4m3 weights (per-channel fp32 scales), activations
// quantized to e4m3 *inside* the kernel, mma.sync.m16n8k32 e4m3 with fp32 accumulate.
// Activation scales: one per token and per warp K slice (KSLICE = 32 KB values, the slice the warp multiplies),
// amax / 448 of the x values the warp already holds (two shuffles among the 4 lanes of a row). A per-token scale
// over all of K would need every CTA to read the whole rows and meet at a barrier before its first MMA; the
// slice scale keeps the dependent path to one L2 read of x. It is finer than per token (error no larger), like
// the 1 x 128 activation blocks of DeepSeek-V3's fp8 recipe. The slice's partial sums are multiplied by their
// scale before the warps' reduction; weight scales are applied in the epilogue.
// Weight layout (kernels/mma_small_m.py:pack_fp8_mma): words[n_tile][kb][lane][j], kb = K/32 blocks; register
// j of lane (r = lane/4, q = lane%4) holds 4 e4m3 bytes: row 16 n_tile + r + 8 (j % 2), real k
// 32 kb + 8 q + 4 (j / 2) + byte -- the A fragment of one m16n8k32 step, with k permuted inside each 32-k block
// (slots 4q.. <-> real 8q..8q+3, slots 16+4q.. <-> 8q+4..) so the x fragment is again one 16-byte load.

__device__ __forceinline__ void mma_fp8(float* c, const u32x4& a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float bf_lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(u32 v) { return __uint_as_float(v & 0xFFFF0000u); }

// 4 bf16 (two bf16x2 words) * inv -> 4 e4m3 bytes, element 0 in the low byte (satfinite: clamps to +-448)
__device__ __forceinline__ u32 quant4_e4m3(u32 v01, u32 v23, float inv) {
    unsigned short lo, hi;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(bf_hi(v01) * inv), "f"(bf_lo(v01) * inv));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(bf_hi(v23) * inv), "f"(bf_lo(v23) * inv));
    return (u32)lo | ((u32)hi << 16);
}

__device__ __forceinline__ float max_abs8(const u32x4& v) {  // max |.| of 8 bf16 (each half on its own)
    const u32 m = 0x7FFF7FFFu;
    const u32 a = v.x & m, b = v.y & m, c = v.z & m, d = v.w & m;
    return fmaxf(fmaxf(fmaxf(bf_lo(a), bf_hi(a)), fmaxf(bf_lo(b), bf_hi(b))),
                 fmaxf(fmaxf(bf_lo(c), bf_hi(c)), fmaxf(bf_lo(d), bf_hi(d))));
}

// Step 1 of the fp8 kernels: this warp's weights (KB 32-k blocks from kb0, n-tiles tile0..), all loads issued up
// front; `all` collects them for issue_loads_before_here.
template <int NMAT, int NT, int KB>
__device__ __forceinline__ void fp8_load_weights(u32x4 (&w)[NMAT][NT][KB], const u32x4* const* wmat, int tile0,
                                                 int KBT, int kb0, int lane, u32& all) {
#pragma unroll
    for (int mat = 0; mat < NMAT; ++mat)
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int b = 0; b < KB; ++b) {
                w[mat][t][b] = ld_stream(wmat[mat] + ((size_t)(tile0 + t) * KBT + kb0 + b) * 32 + lane);
                all ^= xor4(w[mat][t][b]);
            }
}

// The adaRMS norm of the unfused layer, on this warp's x fragments (NORM in fp8_slice_mma): y = x * rstd(row) *
// (1 + scale) + shift, rounded to bf16 as the norm's output was, before the slice's e4m3 scale is taken. rstd needs
// the whole row, so the CTA's warps must cover all of K (SPLIT 1): each warp sums its slice's squares, the CTA adds
// them through shared memory (nss[WARPS][16]). One modulation row for the whole tile (batch 1: the launcher
// checks M <= T), mod = [scale | shift | gate] of K each (AdaRMSNorm.modulation): its scale and shift are staged
// in shared memory (smod, K / 8 16-byte words each) by the whole CTA -- held in registers, 2 x 16 words per lane
// took the GeGLU kernel from 112 to 191 registers, one CTA per SM instead of two.
template <int MT, int KB, int WARPS>
__device__ __forceinline__ void adarms_norm(u32x4 (&xr)[MT][KB], const u32x4* smod, float (*nss)[16], int K, int kb0,
                                            float eps, int warp, int r, int q) {
#pragma unroll
    for (int mh = 0; mh < MT; ++mh) {
        float s = 0.f;
#pragma unroll
        for (int b = 0; b < KB; ++b) {
            const u32 v[4] = {xr[mh][b].x, xr[mh][b].y, xr[mh][b].z, xr[mh][b].w};
#pragma unroll
            for (int j = 0; j < 4; ++j) s += bf_lo(v[j]) * bf_lo(v[j]) + bf_hi(v[j]) * bf_hi(v[j]);
        }
        s += __shfl_xor_sync(0xFFFFFFFFu, s, 1);
        s += __shfl_xor_sync(0xFFFFFFFFu, s, 2);
        if (q == 0) nss[warp][8 * mh + r] = s;
    }
    __syncthreads();  // the squares and smod
    float rstd[MT];
#pragma unroll
    for (int mh = 0; mh < MT; ++mh) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) s += nss[w][8 * mh + r];
        rstd[mh] = rsqrtf(s / (float)K + eps);
    }
#pragma unroll
    for (int b = 0; b < KB; ++b) {
        const u32x4 sc4 = smod[(kb0 + b) * 4 + q], sh4 = smod[K / 8 + (kb0 + b) * 4 + q];
        const u32 a[4] = {sc4.x, sc4.y, sc4.z, sc4.w}, c[4] = {sh4.x, sh4.y, sh4.z, sh4.w};
#pragma unroll
        for (int mh = 0; mh < MT; ++mh) {
            u32* v = reinterpret_cast<u32*>(&xr[mh][b]);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float lo = __fadd_rn(__fmul_rn(__fmul_rn(bf_lo(v[j]), rstd[mh]), __fadd_rn(1.f, bf_lo(a[j]))), bf_lo(c[j]));
                const float hi = __fadd_rn(__fmul_rn(__fmul_rn(bf_hi(v[j]), rstd[mh]), __fadd_rn(1.f, bf_hi(a[j]))), bf_hi(c[j]));
                v[j] = bf16x2_rn(lo, hi);
            }
        }
    }
}

// Steps 2-5 of the fp8 kernels, after the wait: this warp's x slice (K values kb0*32.. of rows < M), its scale
// per row, the e4m3 fragments, the MMAs and the scales into the partial sums acc[NMAT * NT * MT * 4]; with NORM
// the slice is adaRMS-normed first (smod staged by the caller).
template <int MT, int NMAT, int NT, int KB, bool NORM = false, int WARPS = 1>
__device__ __forceinline__ void fp8_slice_mma(const u32x4 (&w)[NMAT][NT][KB], const unsigned short* __restrict__ x,
                                              int M, int K, int kb0, int r, int q, float* acc,
                                              const unsigned short* __restrict__ mod = nullptr, float eps = 0.f,
                                              u32x4* smod = nullptr, float (*nss)[16] = nullptr, int warp = 0) {
    // 2) this warp's x fragments (raw bf16; row m = 8 mh + r, real k 8q..8q+7 of each block)
    u32x4 xr[MT][KB];
#pragma unroll
    for (int mh = 0; mh < MT; ++mh)
#pragma unroll
        for (int b = 0; b < KB; ++b) {
            const int m = 8 * mh + r;
            xr[mh][b] = m < M ? ld_l2(reinterpret_cast<const u32x4*>(x + (size_t)m * K + (kb0 + b) * 32 + 8 * q)) : u32x4{0, 0, 0, 0};
        }
    if constexpr (NORM) adarms_norm<MT, KB, WARPS>(xr, smod, nss, K, kb0, eps, warp, r, q);  // 2b) (smod staged by the caller)

    // 3) scale of row 8 mh + r over this warp's K slice (its 4 lanes hold it all), and the e4m3 fragments
    float xs[MT];
    u32 xq[MT][KB][2];
#pragma unroll
    for (int mh = 0; mh < MT; ++mh) {
        float mx = 0.f;
#pragma unroll
        for (int b = 0; b < KB; ++b) mx = fmaxf(mx, max_abs8(xr[mh][b]));
        mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 2));
        xs[mh] = fmaxf(mx, 1e-12f) / 448.f;
        const float inv = 1.f / xs[mh];
#pragma unroll
        for (int b = 0; b < KB; ++b) {
            xq[mh][b][0] = quant4_e4m3(xr[mh][b].x, xr[mh][b].y, inv);
            xq[mh][b][1] = quant4_e4m3(xr[mh][b].z, xr[mh][b].w, inv);
        }
    }

    // 4) multiply
    constexpr int NACC = NMAT * NT * MT * 4;
#pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = 0.f;
#pragma unroll
    for (int mat = 0; mat < NMAT; ++mat)
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int b = 0; b < KB; ++b)
#pragma unroll
                for (int mh = 0; mh < MT; ++mh)
                    mma_fp8(acc + ((mat * NT + t) * MT + mh) * 4, w[mat][t][b], xq[mh][b][0], xq[mh][b][1]);

    // 5) the slice's x scales into the partial sums (C column m = 8 mh + 2q + c % 2: its scale is held by lane
    //    4 (2q + c % 2)); the column scales come in store_out
#pragma unroll
    for (int mh = 0; mh < MT; ++mh) {
        const float s_even = __shfl_sync(0xFFFFFFFFu, xs[mh], 8 * q), s_odd = __shfl_sync(0xFFFFFFFFu, xs[mh], 8 * q + 4);
#pragma unroll
        for (int mt = 0; mt < NMAT * NT; ++mt) {
            float* c = acc + (mt * MT + mh) * 4;
            c[0] *= s_even, c[1] *= s_odd, c[2] *= s_even, c[3] *= s_odd;
        }
    }
}

// EPI 0: y = x W^T. EPI 1 (NORM): y = adaRMSNorm(x) W^T, the norm with the modulation row mod (scale | shift;
// one row: batch 1) folded in (needs SPLIT 1 and the CTA's warps covering all of K). EPI 2 (RESID): y = resid +
// gate * (x W^T), gate = mod[m / T][2N + n]: the gated residual add after the projection folded in. Together
// they take the expert layer's two norm kernels out of the denoise loop (evalkit/policies/pi05/fused_layer.py).
template <int MT, int NMAT, int NT, int WARPS, int KB, int SPLIT, int EPI = 0>
__global__ void __launch_bounds__(WARPS * 32) fp8_mma_gemm(
    const u32x4* __restrict__ wa, const u32x4* __restrict__ wb, const float* __restrict__ wscale,
    const unsigned short* __restrict__ x, unsigned short* __restrict__ y, float* __restrict__ ws,
    int* __restrict__ cnt, int M, int N, int K, u32 sentinel, const char* pf0, int pf0_bytes, const char* pf1,
    int pf1_bytes, const unsigned short* __restrict__ mod, int mod_stride, int T, double eps,
    const unsigned short* __restrict__ resid) {
    constexpr bool NORM = EPI == 1, RESID = EPI == 2;
    static_assert(!NORM || SPLIT == 1, "the fused norm needs each CTA to cover all of K");
    static_assert(!RESID || NMAT == 1, "the residual epilogue is for one projection, not GeGLU");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = lane >> 2, q = lane & 3;
    const int kb0 = (blockIdx.y * WARPS + warp) * KB;
    const int tile0 = blockIdx.x * NT;
    const u32x4* wmat[2] = {wa, wb};
    constexpr int NACC = NMAT * NT * MT * 4;
    constexpr bool PAR = parallel_epilogue<NMAT, NT, MT, WARPS, SPLIT, RESID>();
    __shared__ float red[PAR ? WARPS : WARPS > 1 ? WARPS / 2 : 1][NACC][32];

    // 1) weights, all up front (see int4_mma_gemm for why the branch)
    u32x4 w[NMAT][NT][KB];
    u32 all = 0;
    fp8_load_weights<NMAT, NT, KB>(w, wmat, tile0, K / 32, kb0, lane, all);
    issue_loads_before_here(all, sentinel);
    prefetch_l2(pf0, pf0_bytes);
    prefetch_l2(pf1, pf1_bytes);
    // The adaRMS modulation (NORM: scale | shift, K / 4 16-byte words for the CTA; RESID: warp 0's gates) is
    // loaded before the wait, like the weights: it was written before the denoise loop began (the launcher's
    // contract: not by the kernels of the PDL chain before this one) and by then the weight stream has evicted it from L2,
    // so after the wait its HBM latency would sit on the dependent path.
    constexpr int PER_MAT = NT * MT * 4, SMW = (KB * 8 + 31) / 32;  // smod words per thread
    u32x4 smod_r[NORM ? SMW : 1];
    float res[RESID ? PER_MAT : 1], gat[RESID ? PER_MAT : 1];
    if (NORM) {
#pragma unroll
        for (int j = 0; j < SMW; ++j) {
            const int i = threadIdx.x + j * WARPS * 32;
            if (i < WARPS * KB * 8) smod_r[NORM ? j : 0] = ld_l2(reinterpret_cast<const u32x4*>(mod) + i);
        }
    }
    if (RESID && warp == 0) {
#pragma unroll
        for (int i = 0; i < PER_MAT; ++i) {
            const int m = frag_m<MT>(i, q), n = frag_n<MT, NT>(i, r, tile0);
            gat[i] = m < M ? bf2f(__ldcg(mod + (size_t)(m / T) * mod_stride + 2 * N + n)) : 0.f;
        }
    }
    wait_for_previous_kernel();
    // the residual of warp 0's outputs (RESID; the previous kernels wrote it), loaded now so the MMAs hide its latency
    if (RESID && warp == 0) {
#pragma unroll
        for (int i = 0; i < PER_MAT; ++i) {
            const int m = frag_m<MT>(i, q), n = frag_n<MT, NT>(i, r, tile0);
            res[i] = m < M ? bf2f(__ldcg(resid + (size_t)m * N + n)) : 0.f;
        }
    }
    __shared__ float nss[NORM ? WARPS : 1][16];
    __shared__ u32x4 smod[NORM ? WARPS * KB * 8 : 1];  // scale | shift, K / 8 words each (K = WARPS * KB * 32)
    if (NORM) {  // visible to the whole CTA after adarms_norm's barrier
#pragma unroll
        for (int j = 0; j < SMW; ++j) {
            const int i = threadIdx.x + j * WARPS * 32;
            if (i < WARPS * KB * 8) smod[i] = smod_r[NORM ? j : 0];
        }
    }
    // 2) - 5)
    float acc[NACC];
    fp8_slice_mma<MT, NMAT, NT, KB, NORM, WARPS>(w, x, M, K, kb0, r, q, acc, mod, (float)eps, smod, nss, warp);
    if constexpr (PAR) {
        reduce_store_parallel<NMAT, NT, MT, WARPS>(acc, red, wscale, N, tile0, M, N, y);
        return;
    }
    if (!reduce_warps<NACC, WARPS>(acc, red, warp, lane)) return;
    store_out<NMAT, NT, MT, SPLIT, RESID>(acc, wscale, N, q, r, tile0, M, N, ws, cnt, y, blockIdx.y, blockIdx.x, res, gat);
}

// ================================================================================================ fused fp8 MLP
// A whole GeGLU MLP, y = down(gelu_tanh(x Wg^T) * (x Wu^T)), in one launch: two kernel boundaries per MLP cost
// more than the bytes at M = 10 (docs/backends.md). Phase 1 is fp8_mma_gemm's GeGLU with one 16-row tile of F
// per CTA (grid F / 16); it writes h (bf16, as the two-launch path does). A grid barrier follows; phase 2 is
// the down projection with CTA = (tile of D, K split) on the first D / 16 tiles x SPLIT2 splits CTAs. Phase 2's
// weights are loaded with phase 1's, before the wait, so the barrier finds them in registers. The barrier needs
// every CTA resident at once: the launcher checks the occupancy first (MINB CTAs per SM asked of ptxas).
__device__ __forceinline__ unsigned long long ld_acquire(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

// A 64-bit arrival count that only grows (it never wraps in practice): each launch adds one per CTA, so a CTA
// that arrives as number `old` waits until the count reaches the next multiple of the grid size. No reset, so
// launches and CUDA-graph replays follow one another without re-zeroing. Thread 0 fences and arrives for the
// CTA after a CTA barrier (the pattern of cooperative groups' grid sync).
// A CTA that only arrives (`wait` false) leaves at once; returns `wait`. The count must only ever see launches
// of one grid size (the launcher keeps one counter per grid size).
__device__ __forceinline__ bool grid_barrier(unsigned long long* bar, bool wait) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned long long n = gridDim.x * gridDim.y;
        __threadfence();  // the CTA's writes (h) visible device-wide before the arrival
        const unsigned long long old = atomicAdd(bar, 1ull);
        const unsigned long long target = old - old % n + n;
        while (wait && ld_acquire(bar) < target) {
        }
        __threadfence();
    }
    __syncthreads();
    return wait;
}

template <int MT, int WARPS, int KB1, int KB2, int SPLIT2, int MINB>
__global__ void __launch_bounds__(WARPS * 32, MINB) fp8_mma_mlp(
    const u32x4* __restrict__ wg, const u32x4* __restrict__ wu, const float* __restrict__ wscale_gu,
    const u32x4* __restrict__ wd, const float* __restrict__ wscale_d, const unsigned short* __restrict__ x,
    unsigned short* __restrict__ h, unsigned short* __restrict__ y, float* __restrict__ ws, int* __restrict__ cnt,
    unsigned long long* __restrict__ bar, int M, int D, int F, u32 sentinel) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = lane >> 2, q = lane & 3;
    const int tile1 = blockIdx.x, tile2 = blockIdx.x % (D / 16), split2 = blockIdx.x / (D / 16);
    const bool down_cta = split2 < SPLIT2;  // phase 2 takes the first (D / 16) x SPLIT2 CTAs; the rest only arrive
    const int kb1 = warp * KB1, kb2 = (split2 * WARPS + warp) * KB2;
    constexpr int NACC1 = 2 * MT * 4, NACC2 = MT * 4;
    __shared__ float red[WARPS > 1 ? WARPS / 2 : 1][NACC1][32];

    const u32x4* m1[2] = {wg, wu};
    const u32x4* m2[1] = {wd};
    u32x4 w1[2][1][KB1], w2[1][1][KB2];
    u32 all = 0;
    fp8_load_weights<2, 1, KB1>(w1, m1, tile1, D / 32, kb1, lane, all);
    if (down_cta) fp8_load_weights<1, 1, KB2>(w2, m2, tile2, F / 32, kb2, lane, all);
    issue_loads_before_here(all, sentinel);
    wait_for_previous_kernel();

    float acc1[NACC1];
    fp8_slice_mma<MT, 2, 1, KB1>(w1, x, M, D, kb1, r, q, acc1);
    if (reduce_warps<NACC1, WARPS>(acc1, red, warp, lane))
        store_out<2, 1, MT, 1>(acc1, wscale_gu, F, q, r, tile1, M, F, nullptr, nullptr, h, 0, 0);
    if (!grid_barrier(bar, down_cta)) return;

    float acc2[NACC2];
    fp8_slice_mma<MT, 1, 1, KB2>(w2, h, M, F, kb2, r, q, acc2);
    if (!reduce_warps<NACC2, WARPS>(acc2, reinterpret_cast<float(*)[NACC2][32]>(red), warp, lane)) return;
    store_out<1, 1, MT, SPLIT2>(acc2, wscale_d, D, q, r, tile2, M, D, ws, cnt, y, split2, tile2);
}
