"""The sparse GEMV kernel: the gate ``|x_i|·c_i > t`` per output segment (q/k/v or gate/up share a
launch, each segment with its own scales and threshold), weight rows read only for kept inputs.

One row (decode): each program takes the kept list of its K-chunk — compacted by the program itself
(:func:`.scoring.compact_chunk` into its own scratch) or, with ``PRECOMP``, by the compaction launch
before it (:func:`.scoring.compact_inputs`) — and streams only those rows, in full tiles of BLOCK_K
rows (``PIPE``: two tiles in flight, the next tile's indices fetched while the current rows load), so
the loop length scales with the density. 2..8 rows: a weight row is read when some row keeps that
input (the union; each row's result uses its own mask). Finishes through :mod:`.epilogue`. Launched
by :func:`wina.kernels.gemv_launch.launch_gemv`."""
from __future__ import annotations

from .epilogue import finish_program
from .runtime import HAS_TRITON, tl, triton
from .scoring import compact_chunk, load_input_rows, row_rstd, rows_rstd

if HAS_TRITON:

    @triton.jit
    def _gather_tiles(wt_ptr, scr_ptr, base, count, offs_n, n_ok, N, acc,
                      KPS: tl.constexpr, BLOCK_K: tl.constexpr, PIPE: tl.constexpr):
        """acc += the weight rows of the ``count`` (index, value) pairs of the list at ``scr_ptr +
        base``, BLOCK_K rows per tile; the kept indices of tile j+1 are fetched while tile j's weight
        rows are in flight."""
        jj = tl.arange(0, BLOCK_K)
        j_ok = jj < count
        ks = tl.load(scr_ptr + base + jj, mask=j_ok, other=0.0).to(tl.int32)
        xs = tl.load(scr_ptr + base + KPS + jj, mask=j_ok, other=0.0)
        if PIPE:
            # two weight tiles in flight: tile j+1's rows are requested before tile j is used
            w = tl.load(wt_ptr + ks[:, None] * N + offs_n[None, :],
                        mask=j_ok[:, None] & n_ok[None, :], other=0.0)
            jn = BLOCK_K + tl.arange(0, BLOCK_K)
            jn_ok = jn < count
            ks = tl.load(scr_ptr + base + jn, mask=jn_ok, other=0.0).to(tl.int32)
            xs_n = tl.load(scr_ptr + base + KPS + jn, mask=jn_ok, other=0.0)
            for j in range(0, count, BLOCK_K):
                w_n = tl.load(wt_ptr + ks[:, None] * N + offs_n[None, :],
                              mask=jn_ok[:, None] & n_ok[None, :], other=0.0)
                j2 = j + 2 * BLOCK_K + tl.arange(0, BLOCK_K)
                j2_ok = j2 < count
                ks = tl.load(scr_ptr + base + j2, mask=j2_ok, other=0.0).to(tl.int32)
                xs_2 = tl.load(scr_ptr + base + KPS + j2, mask=j2_ok, other=0.0)
                acc += w.to(tl.float32) * xs[:, None]
                w = w_n
                xs = xs_n
                xs_n = xs_2
                jn_ok = j2_ok
        else:
            for j in range(0, count, BLOCK_K):
                w = tl.load(wt_ptr + ks[:, None] * N + offs_n[None, :],
                            mask=j_ok[:, None] & n_ok[None, :], other=0.0)
                jn = j + BLOCK_K + tl.arange(0, BLOCK_K)
                jn_ok = jn < count
                ks = tl.load(scr_ptr + base + jn, mask=jn_ok, other=0.0).to(tl.int32)
                xs_n = tl.load(scr_ptr + base + KPS + jn, mask=jn_ok, other=0.0)
                acc += w.to(tl.float32) * xs[:, None]
                xs = xs_n
                j_ok = jn_ok
        return acc

    @triton.jit
    def sparse_gemv_kernel(x_ptr, wt_ptr, y_ptr, c_ptr, t_ptr, bias_ptr, res_ptr, ssq_in_ptr, ssq_out_ptr,
                           ws_ptr, cnt_ptr, scr_ptr, kept_ptr,
                           q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, n_heads, n_kv, s_max, rot,
                           M, K, N, b1, b2, stride_xm, nb_in, nb_out, eps, k_per_split, n_split,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           NB_P: tl.constexpr, PRE_NORM: tl.constexpr, ACT: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, OUT_SSQ: tl.constexpr,
                           USE_WS: tl.constexpr, KPS: tl.constexpr, PIPE: tl.constexpr, PRECOMP: tl.constexpr,
                           SPLIT_C: tl.constexpr, ROPE: tl.constexpr, HD: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        k_lo = pid_s * k_per_split
        k_hi = k_lo + k_per_split
        # the output block's segment (bounds b1, b2): its threshold and scales
        n0 = pid_n * BLOCK_N
        seg = (n0 >= b1).to(tl.int32) + (n0 >= b2).to(tl.int32)
        thr = tl.load(t_ptr + seg)
        c_row = c_ptr + seg * K
        if BLOCK_M == 1:
            rstd = 1.0
            if PRE_NORM:
                rstd = row_rstd(ssq_in_ptr, nb_in, K, eps, NB_P)
            acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
            if PRECOMP:
                # the kept list of (segment, split), written by the compaction launch
                base = (seg * n_split + pid_s) * (2 * KPS)
                count = tl.load(kept_ptr + seg * n_split + pid_s)
            else:
                # this program's own list of its K-chunk, in its own scratch
                base = (pid_s * nb_out + pid_n) * (2 * KPS)
                count = compact_chunk(x_ptr, c_row, thr, k_lo, K, rstd, scr_ptr, base, KPS, ACT, PRE_NORM)
                tl.debug_barrier()
            acc = _gather_tiles(wt_ptr, scr_ptr, base, count, offs_n, n_ok, N, acc, KPS, BLOCK_K, PIPE)
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
                c = tl.load(c_row + offs_k, mask=k_ok, other=0.0)
                keep = (tl.abs(xv) * c[None, :] > thr) & mk
                xv = tl.where(keep, xv, 0.0)
                row_ok = k_ok & (tl.max(keep.to(tl.int32), 0) > 0)
                w = tl.load(wt_ptr + offs_k[:, None] * N + offs_n[None, :],
                            mask=row_ok[:, None] & n_ok[None, :], other=0.0)
                part += tl.sum(xv[:, :, None] * w.to(tl.float32)[None, :, :], 1)
        finish_program(part, pid_n, pid_s, offs_m, offs_n, m_ok, n_ok, M, N, nb_out, n_split,
                       ws_ptr, cnt_ptr, y_ptr, bias_ptr, res_ptr, ssq_out_ptr,
                       q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, n_heads, n_kv, s_max, rot,
                       BLOCK_M, BLOCK_N, HAS_BIAS, HAS_RES, OUT_SSQ, USE_WS, SPLIT_C, ROPE, HD)
