// Sparse single-token GEMV, the consumer half, as a plain CUDA prototype (docs/gpu-notes.md,
// "Plan for the next device session", item 2; bench/cuda_gather/probe.py builds and times it).
//
//   part[split, n] = sum over r < kept[s, split] of v_r * W[i_r, n]      (n in this block's columns)
//
// W is the input-channel-major weight [K, N] (bf16, row i = input i's N outputs, contiguous).
// (i_r, v_r) is the kept list of K-chunk `split` under segment s (q / k / v or gate / up each have
// their own threshold), in the layout wina's Triton compaction writes:
//   scr[(s * n_split + split) * 2 * KPS + r] = float(i_r),  scr[... + KPS + r] = v_r,
//   kept[s * n_split + split] = number of kept inputs.
// What differs from the Triton kernel: a warp streams whole row segments (BN bf16 = BN * 2 bytes,
// 16 bytes per lane, one fully coalesced load per row and vector), takes its rows 32 at a time
// (indices loaded with one coalesced load a batch ahead, broadcast by shuffles), and issues U rows'
// loads before using any of them; warps of a block take interleaved batches and are summed once at
// the end. Registers stay near 8 * V accumulators + U * V * 4 load registers.
#include <cuda_bf16.h>

// rows j0 .. j0+U-1 of the current batch (index and value in lane j of ri / rv): the U rows' loads
// are issued first, then their products
template <int U, int V>
__device__ __forceinline__ void row_group(int j0, float ri, float rv, int nrow, const __nv_bfloat16* wcol, int N,
                                          float* acc) {
    uint4 w[U][V];
    float xs[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int row = (int)__shfl_sync(0xffffffffu, ri, j0 + u);
        xs[u] = __shfl_sync(0xffffffffu, rv, j0 + u);
        const uint4* p = reinterpret_cast<const uint4*>(wcol + (size_t)row * N);
#pragma unroll
        for (int v = 0; v < V; ++v) {
            if (j0 + u < nrow) {
                w[u][v] = __ldcs(p + v * 32);    // + v * 256 columns = 32 vectors
            } else {
                w[u][v] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
            const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&w[u][v]);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float2 f = __bfloat1622float2(h[q]);
                acc[v * 8 + 2 * q] = fmaf(xs[u], f.x, acc[v * 8 + 2 * q]);
                acc[v * 8 + 2 * q + 1] = fmaf(xs[u], f.y, acc[v * 8 + 2 * q + 1]);
            }
        }
    }
}

// DENSE: no lists, every input of the K-chunk (scr is then the input vector x, float32 [K]): the
// same streaming, for comparing with the dense kernels
// The epilogue of wina's GEMV (see _gemv_finish in wina/kernels/kernels.py): y = sum + bias + res,
// rounded to bf16; ssq_out[block] = sum of the rounded y's squares over the block's columns.
struct Epilogue {
    __nv_bfloat16* y;
    const __nv_bfloat16* res;
    const __nv_bfloat16* bias;
    float* ssq_out;
    int* cnt;
    int has_res, has_bias, out_ssq;
};

// FINISH: the last block of a column block to write its partial sums adds all of them (split
// order: deterministic) and applies the epilogue: one launch per GEMV, as the Triton kernel does it
template <int BN, int WARPS, int U, bool FULL, bool DENSE, bool FINISH = false>
__device__ __forceinline__ void gather_body(const __nv_bfloat16* __restrict__ W, const float* __restrict__ scr,
                                            const int* __restrict__ kept, float* __restrict__ part,
                                            int N, int n_split, int KPS, int b1, int b2, int K,
                                            Epilogue ep = Epilogue{}) {
    constexpr int V = BN / 256;                  // 16-byte vectors per lane per row
    static_assert(BN % 256 == 0, "BN is a multiple of 256 columns");
    static_assert(32 % U == 0, "U divides the 32-row batch");
    __shared__ float red[WARPS][BN];
    const int nb = blockIdx.x, split = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n_lo = nb * BN;
    const int s = (n_lo >= b1) + (n_lo >= b2);
    const int list = s * n_split + split;
    const int k_lo = split * KPS;
    const int count = DENSE ? min(KPS, K - k_lo) : kept[list];
    const float* li = DENSE ? scr : scr + (size_t)list * 2 * KPS;
    const float* lv = DENSE ? scr + k_lo : li + KPS;
    const __nv_bfloat16* wcol = W + n_lo + lane * 8;

    float acc[8 * V];
#pragma unroll
    for (int q = 0; q < 8 * V; ++q) acc[q] = 0.f;

    int b = warp * 32;
    float ri = 0.f, rv = 0.f;
    if (b + lane < count) {
        ri = DENSE ? (float)(k_lo + b + lane) : __ldg(li + b + lane);
        rv = __ldg(lv + b + lane);
    }
    for (; b < count; b += WARPS * 32) {
        const int bn = b + WARPS * 32;           // the next batch's indices, in flight meanwhile
        float ni = 0.f, nv = 0.f;
        if (bn + lane < count) {
            ni = DENSE ? (float)(k_lo + bn + lane) : __ldg(li + bn + lane);
            nv = __ldg(lv + bn + lane);
        }
        const int nrow = min(32, count - b);
        if constexpr (FULL) {                    // all 32 rows unrolled: the compiler hoists every load
#pragma unroll
            for (int j0 = 0; j0 < 32; j0 += U) row_group<U, V>(j0, ri, rv, nrow, wcol, N, acc);
        } else {                                 // U rows in flight per warp at a time, few registers
#pragma unroll 1
            for (int j0 = 0; j0 < nrow; j0 += U) row_group<U, V>(j0, ri, rv, nrow, wcol, N, acc);
        }
        ri = ni;
        rv = nv;
    }
    // the block's warps, summed in a fixed order (deterministic)
#pragma unroll
    for (int v = 0; v < V; ++v)
#pragma unroll
        for (int q = 0; q < 8; ++q) red[warp][v * 256 + lane * 8 + q] = acc[v * 8 + q];
    __syncthreads();
    for (int c = threadIdx.x; c < BN; c += WARPS * 32) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < WARPS; ++k) t += red[k][c];
        part[(size_t)split * N + n_lo + c] = t;
    }
    if constexpr (FINISH) {
        __shared__ int ticket;
        __shared__ float ssq_w[WARPS];
        __threadfence();                         // this block's partial sums, visible GPU-wide ...
        __syncthreads();
        if (threadIdx.x == 0) ticket = atomicAdd(ep.cnt + nb, 1);   // ... before it is counted
        __syncthreads();
        if (ticket == n_split - 1) {
            __threadfence();
            float sq = 0.f;
            for (int c = threadIdx.x; c < BN; c += WARPS * 32) {
                const int n = n_lo + c;
                float t = 0.f;
#pragma unroll 8
                for (int k = 0; k < n_split; ++k) t += __ldcg(part + (size_t)k * N + n);
                if (ep.has_bias) t += __bfloat162float(ep.bias[n]);
                if (ep.has_res) t += __bfloat162float(ep.res[n]);
                const __nv_bfloat16 yb = __float2bfloat16(t);
                ep.y[n] = yb;
                const float yf = __bfloat162float(yb);
                sq = fmaf(yf, yf, sq);
            }
            if (ep.out_ssq) {                    // fixed-order block sum: warps by shuffles, then in order
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, o);
                if (lane == 0) ssq_w[warp] = sq;
                __syncthreads();
                if (threadIdx.x == 0) {
                    float t = 0.f;
#pragma unroll
                    for (int k = 0; k < WARPS; ++k) t += ssq_w[k];
                    ep.ssq_out[nb] = t;
                }
            }
            if (threadIdx.x == 0) ep.cnt[nb] = 0;   // ready for the next launch (graph replays)
        }
    }
}

// BN columns per block, WARPS warps, U rows' loads issued before their products (FULL: the whole
// 32-row batch unrolled), MINB blocks that must fit on one SM (caps the registers)
#define GATHER(BN, WARPS, U, FULL, MINB)                                                               \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)                                     \
        gather_gemv_##BN##_##WARPS##_##U##_##FULL##_##MINB(const __nv_bfloat16* __restrict__ W,        \
                                                  const float* __restrict__ scr,                       \
                                                  const int* __restrict__ kept, float* __restrict__ part, \
                                                  int N, int n_split, int KPS, int b1, int b2) {       \
        gather_body<BN, WARPS, U, FULL, false>(W, scr, kept, part, N, n_split, KPS, b1, b2, 0);              \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)                                     \
        dense_gemv_##BN##_##WARPS##_##U##_##FULL##_##MINB(const __nv_bfloat16* __restrict__ W,         \
                                                 const float* __restrict__ x, float* __restrict__ part, \
                                                 int N, int n_split, int KPS, int K) {                 \
        gather_body<BN, WARPS, U, FULL, true>(W, x, nullptr, part, N, n_split, KPS, N, N, K);           \
    }

// the same with the split reduction and wina's epilogue in the kernel (one launch); pointers whose
// flag is 0 are not read (pass any valid pointer)
#define GATHER_FIN(BN, WARPS, U, MINB)                                                                 \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)                                     \
        gather_fin_##BN##_##WARPS##_##U##_0_##MINB(const __nv_bfloat16* __restrict__ W,                \
                                                   const float* __restrict__ scr,                      \
                                                   const int* __restrict__ kept, float* __restrict__ part, \
                                                   int N, int n_split, int KPS, int b1, int b2,        \
                                                   __nv_bfloat16* y, const __nv_bfloat16* res,         \
                                                   const __nv_bfloat16* bias, float* ssq_out, int* cnt, \
                                                   int has_res, int has_bias, int out_ssq) {           \
        gather_body<BN, WARPS, U, false, false, true>(W, scr, kept, part, N, n_split, KPS, b1, b2, 0,  \
            Epilogue{y, res, bias, ssq_out, cnt, has_res, has_bias, out_ssq});                         \
    }

GATHER_FIN(256, 8, 8, 2)
GATHER_FIN(256, 4, 8, 4)
GATHER_FIN(256, 16, 8, 1)
GATHER_FIN(512, 4, 8, 4)

GATHER(256, 4, 8, 1, 1)
GATHER(256, 8, 8, 1, 1)
GATHER(256, 8, 8, 0, 2)
GATHER(256, 8, 16, 0, 2)
GATHER(256, 4, 8, 0, 4)
GATHER(256, 4, 16, 0, 4)
GATHER(256, 16, 8, 0, 1)
GATHER(512, 8, 8, 0, 2)
GATHER(512, 4, 8, 0, 4)

// y[n] = sum over splits of part[split, n], in split order (deterministic)
extern "C" __global__ void reduce_parts(const float* __restrict__ part, float* __restrict__ y, int N, int n_split) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    float t = 0.f;
    for (int s = 0; s < n_split; ++s) t += part[(size_t)s * N + n];
    y[n] = t;
}

// ------------------------------------------------------------------------------------------------
// Run 18: persistent warps. A work item is (column block of 256, K-chunk); a warp owns whole items
// (no block-level reduction, no __syncthreads), walks items gw, gw + G, ... and loads the next
// item's kept count AND its first 32 (index, value) pairs in parallel (the lists have KPS >= 32
// slots, so reading 32 is always in bounds; entries past the count are masked afterwards) while
// it streams the current item: the count -> index -> row chain is paid once per warp, not once per
// block. Each item writes its 256 partial sums; with FIN the last warp of a column block (a
// counter) adds the K-chunks in order and applies wina's epilogue (bias, residual, bf16 y,
// per-256-column ssq), else `reduce_fin` does that in a second launch.
// ------------------------------------------------------------------------------------------------
// item -> (column block, K-chunk). order 0: a column block's K-chunks are consecutive items (warps
// running together read different rows of the same columns); order 1: a K-chunk's column blocks are
// consecutive (warps running together read the same rows across all columns: whole weight rows
// stream together, as in run 17's grid where blockIdx.x is the column block)
__device__ __forceinline__ void item_coords(int item, int n_items, int n_split, int order, int& nb, int& split) {
    if (order) {
        const int n_blocks = n_items / n_split;
        split = item / n_blocks;
        nb = item - split * n_blocks;
    } else {
        nb = item / n_split;
        split = item - nb * n_split;
    }
}

template <int U, bool DENSE>
__device__ __forceinline__ void p_fetch(int item, int n_items, int n_split, int KPS, int b1, int b2, int K,
                                        const float* __restrict__ scr, const int* __restrict__ kept, int lane,
                                        int order, int& c, float& i0, float& v0) {
    c = 0; i0 = 0.f; v0 = 0.f;
    if (item >= n_items) return;
    int nb, split;
    item_coords(item, n_items, n_split, order, nb, split);
    const int k_lo = split * KPS;
    if (DENSE) {
        c = min(KPS, K - k_lo);
        i0 = (float)(k_lo + lane);
        v0 = lane < c ? __ldg(scr + k_lo + lane) : 0.f;
    } else {
        const int n_lo = nb * 256;
        const int list = ((n_lo >= b1) + (n_lo >= b2)) * n_split + split;
        const float* li = scr + (size_t)list * 2 * KPS;
        c = __ldg(kept + list);                  // these three loads are independent
        i0 = __ldg(li + lane);
        v0 = __ldg(li + KPS + lane);
    }
}

template <int U, int WARPS, bool DENSE, bool FIN>
__device__ __forceinline__ void pgather_body(const __nv_bfloat16* __restrict__ W, const float* __restrict__ scr,
                                             const int* __restrict__ kept, float* __restrict__ part, int N,
                                             int n_split, int KPS, int b1, int b2, int K, Epilogue ep, int order) {
    const int lane = threadIdx.x & 31;
    const int G = gridDim.x * WARPS;
    const int n_items = (N / 256) * n_split;
    int it = blockIdx.x * WARPS + (threadIdx.x >> 5);
    int c; float i0, v0;
    p_fetch<U, DENSE>(it, n_items, n_split, KPS, b1, b2, K, scr, kept, lane, order, c, i0, v0);
    while (it < n_items) {
        int nc; float ni0, nv0;                  // the next item's count and first pairs, in flight
        p_fetch<U, DENSE>(it + G, n_items, n_split, KPS, b1, b2, K, scr, kept, lane, order, nc, ni0, nv0);
        int nb, split;
        item_coords(it, n_items, n_split, order, nb, split);
        const int n_lo = nb * 256;
        const int k_lo = split * KPS;
        const float* li;
        const float* lv;
        if (DENSE) {
            li = nullptr;
            lv = scr + k_lo;
        } else {
            const int list = ((n_lo >= b1) + (n_lo >= b2)) * n_split + split;
            li = scr + (size_t)list * 2 * KPS;
            lv = li + KPS;
        }
        const __nv_bfloat16* wcol = W + n_lo + lane * 8;
        float acc[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[q] = 0.f;
        float ri = lane < c ? i0 : 0.f, rv = lane < c ? v0 : 0.f;
        for (int b = 0; b < c; b += 32) {
            const int bn = b + 32;
            float ni = 0.f, nv = 0.f;
            if (bn + lane < c) {
                ni = DENSE ? (float)(k_lo + bn + lane) : __ldg(li + bn + lane);
                nv = __ldg(lv + bn + lane);
            }
            const int nrow = min(32, c - b);
#pragma unroll 1
            for (int j0 = 0; j0 < nrow; j0 += U) row_group<U, 1>(j0, ri, rv, nrow, wcol, N, acc);
            ri = ni;
            rv = nv;
        }
        float4* pp = reinterpret_cast<float4*>(part + (size_t)split * N + n_lo + lane * 8);
        pp[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        pp[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
        if constexpr (FIN) {
            __threadfence();
            __syncwarp();
            int t = 0;
            if (lane == 0) t = atomicAdd(ep.cnt + nb, 1);
            t = __shfl_sync(0xffffffffu, t, 0);
            if (t == n_split - 1) {              // the column block's last item: sum, epilogue
                __threadfence();
                float s8[8];
#pragma unroll
                for (int q = 0; q < 8; ++q) s8[q] = 0.f;
                const float* pc = part + n_lo + lane * 8;
#pragma unroll 8
                for (int k = 0; k < n_split; ++k) {
                    const float4 a = __ldcg(reinterpret_cast<const float4*>(pc + (size_t)k * N));
                    const float4 b = __ldcg(reinterpret_cast<const float4*>(pc + (size_t)k * N + 4));
                    s8[0] += a.x; s8[1] += a.y; s8[2] += a.z; s8[3] += a.w;
                    s8[4] += b.x; s8[5] += b.y; s8[6] += b.z; s8[7] += b.w;
                }
                const int n = n_lo + lane * 8;
                float sq = 0.f;
                uint4 out;
                __nv_bfloat16* ob = reinterpret_cast<__nv_bfloat16*>(&out);
#pragma unroll
                for (int q = 0; q < 8; ++q) {
                    float t2 = s8[q];
                    if (ep.has_bias) t2 += __bfloat162float(ep.bias[n + q]);
                    if (ep.has_res) t2 += __bfloat162float(ep.res[n + q]);
                    ob[q] = __float2bfloat16(t2);
                    const float yf = __bfloat162float(ob[q]);
                    sq = fmaf(yf, yf, sq);
                }
                *reinterpret_cast<uint4*>(ep.y + n) = out;
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, o);
                if (lane == 0) {
                    if (ep.out_ssq) ep.ssq_out[nb] = sq;
                    ep.cnt[nb] = 0;              // ready for the next launch (graph replays)
                }
            }
        }
        it += G;
        c = nc; i0 = ni0; v0 = nv0;
    }
}

#define PGATHER(U, WARPS, MINB)                                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)                                     \
        pgather_##U##_##WARPS##_##MINB(const __nv_bfloat16* __restrict__ W, const float* __restrict__ scr, \
                                      const int* __restrict__ kept, float* __restrict__ part, int N,   \
                                      int n_split, int KPS, int b1, int b2, __nv_bfloat16* y,          \
                                      const __nv_bfloat16* res, const __nv_bfloat16* bias, float* ssq_out, \
                                      int* cnt, int has_res, int has_bias, int out_ssq, int fin, int order) { \
        const Epilogue ep{y, res, bias, ssq_out, cnt, has_res, has_bias, out_ssq};                    \
        if (fin) pgather_body<U, WARPS, false, true>(W, scr, kept, part, N, n_split, KPS, b1, b2, 0, ep, order); \
        else pgather_body<U, WARPS, false, false>(W, scr, kept, part, N, n_split, KPS, b1, b2, 0, ep, order); \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)                                     \
        pdense_##U##_##WARPS##_##MINB(const __nv_bfloat16* __restrict__ W, const float* __restrict__ x, \
                                     float* __restrict__ part, int N, int n_split, int KPS, int K,     \
                                     __nv_bfloat16* y, const __nv_bfloat16* res, const __nv_bfloat16* bias, \
                                     float* ssq_out, int* cnt, int has_res, int has_bias, int out_ssq, int fin, int order) { \
        const Epilogue ep{y, res, bias, ssq_out, cnt, has_res, has_bias, out_ssq};                    \
        if (fin) pgather_body<U, WARPS, true, true>(W, x, nullptr, part, N, n_split, KPS, N, N, K, ep, order); \
        else pgather_body<U, WARPS, true, false>(W, x, nullptr, part, N, n_split, KPS, N, N, K, ep, order);   \
    }

PGATHER(8, 4, 6)
PGATHER(16, 4, 4)
PGATHER(16, 8, 2)
PGATHER(32, 4, 2)

// the second launch of the non-FIN form: y = sum of the K-chunks' partials (in a fixed order) + bias
// + res, bf16; ssq_out[block of 256 columns]. 1024 threads per block: 256 columns x 4 groups of
// K-chunks (group g sums chunks g, g + 4, ...; the groups are then added in order), so that a long
// split list is read with many loads in flight
extern "C" __global__ void __launch_bounds__(1024) reduce_fin(const float* __restrict__ part, int N, int n_split,
                                                             __nv_bfloat16* y, const __nv_bfloat16* res,
                                                             const __nv_bfloat16* bias, float* ssq_out,
                                                             int has_res, int has_bias, int out_ssq) {
    __shared__ float grp[4][256];
    __shared__ float ws[8];
    const int col = threadIdx.x & 255, g = threadIdx.x >> 8;
    const int n = blockIdx.x * 256 + col;
    float t = 0.f;
#pragma unroll 8
    for (int s = g; s < n_split; s += 4) t += __ldcg(part + (size_t)s * N + n);
    grp[g][col] = t;
    __syncthreads();
    if (g != 0) return;
    t = ((grp[0][col] + grp[1][col]) + grp[2][col]) + grp[3][col];
    if (has_bias) t += __bfloat162float(bias[n]);
    if (has_res) t += __bfloat162float(res[n]);
    const __nv_bfloat16 yb = __float2bfloat16(t);
    y[n] = yb;
    float sq = __bfloat162float(yb);
    sq *= sq;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, o);
    if ((col & 31) == 0) ws[col >> 5] = sq;
    asm volatile("bar.sync 1, 256;");           // the 256 threads of group 0 only
    if (col == 0 && out_ssq) {
        float a = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) a += ws[k];
        ssq_out[blockIdx.x] = a;
    }
}
