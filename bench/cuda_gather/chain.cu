// Run 20 (docs/gpu-notes.md): is the ~3-5 us per-launch cost of a single-token GEMV (runs 17-19)
// the ramp and tail of each launch, i.e. would a persistent kernel that runs a CHAIN of dependent
// GEMVs (y_m = x_m W_m, x_{m+1} = y_m) overlap one matrix's tail with the next one's weight stream?
//
// One launch walks the work items of every matrix of the chain: item = (matrix m, column block of
// 256, K-chunk), numbered matrix by matrix, column-block-major inside a matrix; block b takes items
// b, b + G, ... in increasing order (G = the grid, all resident: an item only waits on items with
// lower numbers, which are held by running blocks, so there is no deadlock). An item
//   1. prefetches its weight rows into L2 (static data: no need to wait for anything),
//   2. waits for the column blocks of y_{m-1} that make up its K-chunk of x_m (flags),
//   3. streams the rows as run 17's dense gather (8 warps, 16-byte loads, U rows in flight),
//   4. writes its partial sums; the last of a column block's K-chunks (a counter) adds them in
//      order, writes y_m's 256 columns in bf16 and raises the column block's flag.
// With `m_count = 1` and the flags of the previous matrix already raised, the same kernel is one
// ordinary launch per matrix: the baseline with identical code.
#include <cuda_bf16.h>

struct Mat {
    const __nv_bfloat16* W;      // [K, N], input-channel-major
    const __nv_bfloat16* x;      // [K]: y of the previous matrix (or the chain's input)
    __nv_bfloat16* y;            // [N]
    float* part;                 // [n_split, N]
    int* cnt;                    // [n_blocks] arrivals (reset by the finishing block)
    const int* flag_in;          // [K / 256] column-block flags of the previous matrix (nullptr: none)
    int* flag_out;               // [n_blocks]
    int K, N, kps, n_split, n_blocks, item0;
    const float* c;              // [K] score scales (sparse chain: keep x_i where |x_i| * c_i > thr)
    float thr;
    int pad;
};

__device__ __forceinline__ int ld_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_release(int* p, int v) {
    asm volatile("st.release.gpu.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// wait until the column blocks of y_{m-1} that make up x_m[k_lo, k_lo + count) are written (their
// flags); a bug, or blocks that are not all resident, must fail (trap), not hang the device
__device__ __forceinline__ void wait_chunk(const Mat& mt, int k_lo, int count) {
    if (mt.flag_in == nullptr) return;           // the chain's first matrix: its input is there
    const int f0 = k_lo / 256, f1 = (k_lo + count + 255) / 256;
    if ((int)threadIdx.x < f1 - f0) {
        int spins = 0;
        while (ld_acquire(mt.flag_in + f0 + threadIdx.x) == 0) {
            __nanosleep(32);
            if (++spins > (1 << 22)) __trap();
        }
    }
    __syncthreads();
}

// the rows i_r (lane r of ri, r < nrow) times their inputs (lane r of rv) into acc: U rows' loads first
template <int U>
__device__ __forceinline__ void rows_fma(int ri, float rv, int nrow, const __nv_bfloat16* wcol, int N, float* acc) {
#pragma unroll 1
    for (int j0 = 0; j0 < nrow; j0 += U) {
        uint4 w[U];
        float xs[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int row = __shfl_sync(0xffffffffu, ri, j0 + u);
            w[u] = j0 + u < nrow ? __ldcs(reinterpret_cast<const uint4*>(wcol + (size_t)row * N))
                                 : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) xs[u] = __shfl_sync(0xffffffffu, rv, j0 + u);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&w[u]);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float2 f = __bfloat1622float2(h[q]);
                acc[2 * q] = fmaf(xs[u], f.x, acc[2 * q]);
                acc[2 * q + 1] = fmaf(xs[u], f.y, acc[2 * q + 1]);
            }
        }
    }
}

template <int WARPS>
__device__ __forceinline__ void finish_item(const Mat& mt, int nb, int split, const float* acc, float (*red)[256],
                                            int* ticket);

// SPARSE: the block scores its K-chunk (|x_i| * c_i > thr), compacts the kept (index, value) pairs
// into shared memory (ballots, a prefix over warps) and streams only those rows: no list in global
// memory, no compaction launch
template <int WARPS, int U>
__device__ __forceinline__ void schain_item(const Mat& mt, int local, float (*red)[256], int* ticket, int* s_idx,
                                            float* s_val, int* s_wcnt) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nb = local / mt.n_split, split = local - nb * mt.n_split;
    const int N = mt.N, n_lo = nb * 256, k_lo = split * mt.kps;
    const int count = min(mt.kps, mt.K - k_lo);
    wait_chunk(mt, k_lo, count);
    int kept = 0;
    for (int r = 0; r < count; r += WARPS * 32) {
        const int k = r + (int)threadIdx.x;
        float xv = 0.f;
        bool keep = false;
        if (k < count) {
            xv = __bfloat162float(__ldcg(mt.x + k_lo + k));
            keep = fabsf(xv) * __ldg(mt.c + k_lo + k) > mt.thr;
        }
        const unsigned bal = __ballot_sync(0xffffffffu, keep);
        if (lane == 0) s_wcnt[warp] = __popc(bal);
        __syncthreads();
        int off = kept, tot = 0;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const int cw = s_wcnt[w];
            off += w < warp ? cw : 0;
            tot += cw;
        }
        if (keep) {
            const int pos = off + __popc(bal & ((1u << lane) - 1u));
            s_idx[pos] = k_lo + k;
            s_val[pos] = xv;
        }
        kept += tot;
        __syncthreads();
    }
    float acc[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) acc[q] = 0.f;
    const __nv_bfloat16* wcol = mt.W + n_lo + lane * 8;
    for (int b = warp * 32; b < kept; b += WARPS * 32) {
        const int nrow = min(32, kept - b);
        const int ri = lane < nrow ? s_idx[b + lane] : 0;
        const float rv = lane < nrow ? s_val[b + lane] : 0.f;
        rows_fma<U>(ri, rv, nrow, wcol, N, acc);
    }
    finish_item<WARPS>(mt, nb, split, acc, red, ticket);
}

template <int WARPS, int U>
__device__ __forceinline__ void chain_item(const Mat& mt, int local, float (*red)[256], int* ticket, int prefetch) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nb = local / mt.n_split, split = local - nb * mt.n_split;
    const int N = mt.N, n_lo = nb * 256, k_lo = split * mt.kps;
    const int count = min(mt.kps, mt.K - k_lo);
    const __nv_bfloat16* wcol = mt.W + n_lo + lane * 8;
    if (prefetch) {                              // this item's rows, 4 lines of 128 B each
        for (int r = threadIdx.x >> 2; r < count; r += WARPS * 8)
            prefetch_l2(mt.W + (size_t)(k_lo + r) * N + n_lo + (threadIdx.x & 3) * 64);
    }
    wait_chunk(mt, k_lo, count);
    float acc[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) acc[q] = 0.f;
    for (int b = warp * 32; b < count; b += WARPS * 32) {
        const int nrow = min(32, count - b);
        const float xv = lane < nrow ? __bfloat162float(__ldcg(mt.x + k_lo + b + lane)) : 0.f;
#pragma unroll 1
        for (int j0 = 0; j0 < nrow; j0 += U) {
            uint4 w[U];
            float xs[U];
#pragma unroll
            for (int u = 0; u < U; ++u)          // the weight loads first: they need nothing but the row
                w[u] = j0 + u < nrow ? __ldcs(reinterpret_cast<const uint4*>(wcol + (size_t)(k_lo + b + j0 + u) * N))
                                     : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
            for (int u = 0; u < U; ++u) xs[u] = __shfl_sync(0xffffffffu, xv, j0 + u);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&w[u]);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const float2 f = __bfloat1622float2(h[q]);
                    acc[2 * q] = fmaf(xs[u], f.x, acc[2 * q]);
                    acc[2 * q + 1] = fmaf(xs[u], f.y, acc[2 * q + 1]);
                }
            }
        }
    }
    finish_item<WARPS>(mt, nb, split, acc, red, ticket);
}

// the item's partial sums into part[split]; the column block's last K-chunk (a counter) adds them in
// order, writes y's 256 columns in bf16 and raises the column block's flag
template <int WARPS>
__device__ __forceinline__ void finish_item(const Mat& mt, int nb, int split, const float* acc, float (*red)[256],
                                            int* ticket) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int N = mt.N, n_lo = nb * 256;
#pragma unroll
    for (int q = 0; q < 8; ++q) red[warp][lane * 8 + q] = acc[q];
    __syncthreads();
    for (int c = threadIdx.x; c < 256; c += WARPS * 32) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < WARPS; ++k) t += red[k][c];
        mt.part[(size_t)split * N + n_lo + c] = t;
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) *ticket = atomicAdd(mt.cnt + nb, 1);
    __syncthreads();
    if (*ticket == mt.n_split - 1) {             // the column block's last K-chunk: finish it
        __threadfence();
        for (int c = threadIdx.x; c < 256; c += WARPS * 32) {
            float t = 0.f;
#pragma unroll 8
            for (int k = 0; k < mt.n_split; ++k) t += __ldcg(mt.part + (size_t)k * N + n_lo + c);
            mt.y[n_lo + c] = __float2bfloat16(t);
        }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            mt.cnt[nb] = 0;
            st_release(mt.flag_out + nb, 1);
        }
    }
    __syncthreads();                             // red[] and ticket are reused by the next item
}

#define CHAIN(WARPS, U, MINB)                                                                          \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)                                     \
        chain_##WARPS##_##U##_##MINB(const Mat* __restrict__ mats, int m_count, int total, int prefetch) { \
        __shared__ float red[WARPS][256];                                                              \
        __shared__ int ticket;                                                                         \
        int m = 0;                                                                                     \
        for (int item = blockIdx.x; item < total; item += gridDim.x) {                                 \
            while (m + 1 < m_count && item >= mats[m + 1].item0) ++m;                                  \
            const Mat mt = mats[m];                                                                    \
            chain_item<WARPS, U>(mt, item - mt.item0, red, &ticket, prefetch);                         \
        }                                                                                              \
    }

#define SCHAIN(WARPS, U, MINB)                                                                         \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)                                     \
        schain_##WARPS##_##U##_##MINB(const Mat* __restrict__ mats, int m_count, int total) {          \
        __shared__ float red[WARPS][256];                                                              \
        __shared__ int s_idx[1024];                                                                    \
        __shared__ float s_val[1024];                                                                  \
        __shared__ int s_wcnt[WARPS];                                                                  \
        __shared__ int ticket;                                                                         \
        int m = 0;                                                                                     \
        for (int item = blockIdx.x; item < total; item += gridDim.x) {                                 \
            while (m + 1 < m_count && item >= mats[m + 1].item0) ++m;                                  \
            const Mat mt = mats[m];                                                                    \
            schain_item<WARPS, U>(mt, item - mt.item0, red, &ticket, s_idx, s_val, s_wcnt);            \
        }                                                                                              \
    }

CHAIN(8, 8, 2)
CHAIN(8, 16, 2)
CHAIN(4, 8, 4)
CHAIN(4, 16, 3)
CHAIN(4, 16, 4)
CHAIN(4, 32, 2)
CHAIN(2, 16, 6)
SCHAIN(8, 8, 2)
SCHAIN(8, 16, 2)
SCHAIN(4, 8, 4)
SCHAIN(4, 16, 3)
SCHAIN(4, 32, 2)
