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
