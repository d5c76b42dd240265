"""The dense GEMV kernel: program (output block, K-split) multiplies every weight row of its K-range
— for one row in tiles of BLOCK_K rows into a [BLOCK_K, BLOCK_N] fp32 accumulator, for 2..8 rows
into [rows, BLOCK_N] — with the input's SiLU·up and RMSNorm applied on load (:mod:`.scoring`), then
finishes through :mod:`.epilogue`. Launched by :func:`wina.kernels.gemv_launch.launch_gemv`."""
from __future__ import annotations

from .epilogue import finish_program
from .runtime import HAS_TRITON, tl, triton
from .scoring import load_input, load_input_rows, row_rstd, rows_rstd

if HAS_TRITON:

    @triton.jit
    def _dense_tiles(x_ptr, wt_ptr, offs_n, n_ok, k_lo, k_hi, K, N, rstd, acc,
                     BLOCK_K: tl.constexpr, ACT: tl.constexpr, PRE_NORM: tl.constexpr):
        """acc += W[k_lo:k_hi, block]ᵀ·x[k_lo:k_hi] (one row), BLOCK_K input rows per step."""
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xv = load_input(x_ptr, offs_k, k_ok, K, rstd, ACT, PRE_NORM)
            w = tl.load(wt_ptr + offs_k[:, None] * N + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * xv[:, None]
        return acc

    @triton.jit
    def dense_gemv_kernel(x_ptr, wt_ptr, y_ptr, bias_ptr, res_ptr, ssq_in_ptr, ssq_out_ptr, ws_ptr, cnt_ptr,
                          q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, n_heads, n_kv, s_max, rot,
                          M, K, N, stride_xm, nb_in, nb_out, eps, k_per_split, n_split,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          NB_P: tl.constexpr, PRE_NORM: tl.constexpr, ACT: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, OUT_SSQ: tl.constexpr,
                          USE_WS: tl.constexpr, SPLIT_C: tl.constexpr, ROPE: tl.constexpr, HD: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        k_lo = pid_s * k_per_split
        k_hi = k_lo + k_per_split
        if BLOCK_M == 1:
            rstd = 1.0
            if PRE_NORM:
                rstd = row_rstd(ssq_in_ptr, nb_in, K, eps, NB_P)
            acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
            acc = _dense_tiles(x_ptr, wt_ptr, offs_n, n_ok, k_lo, k_hi, K, N, rstd, acc, BLOCK_K, ACT, PRE_NORM)
            part = tl.sum(acc, 0)[None, :]
        else:
            rstd = 1.0
            if PRE_NORM:
                rstd = rows_rstd(ssq_in_ptr, offs_m, m_ok, nb_in, K, eps, NB_P)
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                xm = offs_m[:, None] * stride_xm + offs_k[None, :]
                mk = m_ok[:, None] & k_ok[None, :]
                xv = load_input_rows(x_ptr, xm, mk, K, rstd, ACT, PRE_NORM)
                w = tl.load(wt_ptr + offs_k[:, None] * N + offs_n[None, :],
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                part += tl.sum(xv[:, :, None] * w.to(tl.float32)[None, :, :], 1)
        finish_program(part, pid_n, pid_s, offs_m, offs_n, m_ok, n_ok, M, N, nb_out, n_split,
                       ws_ptr, cnt_ptr, y_ptr, bias_ptr, res_ptr, ssq_out_ptr,
                       q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, n_heads, n_kv, s_max, rot,
                       BLOCK_M, BLOCK_N, HAS_BIAS, HAS_RES, OUT_SSQ, USE_WS, SPLIT_C, ROPE, HD)
