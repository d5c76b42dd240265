"""The end of every GEMV program (dense or sparse): the partial sums of the K-splits reduced in a
fixed order by the last program to finish each output block (an int arrival counter, acq_rel, reset
by that program for the next launch or graph replay: deterministic, no float atomics), then bias,
residual, the store, the per-block sum of squares that the next RMSNorm reads, and — in the q/k/v
launch of a decode step — RoPE and the KV-cache write (:func:`wina.kernels.gemv_rope`)."""
from __future__ import annotations

from .runtime import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _rope_block(yv, offs_n, n_ok, y_ptr, q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr,
                    n_heads, n_kv, s_max, rot, HD: tl.constexpr):
        """RoPE + KV-cache write on the finished q/k/v columns ``offs_n`` of a single row (the block
        holds whole heads: a column's rotation partner is in it, read back from y after a barrier).
        Rotated q goes to ``q_ptr``, k and v into the caches at the position held at ``pos_ptr``."""
        pos = tl.load(pos_ptr).to(tl.int32)
        tl.debug_barrier()                     # y of this block is written: partners can be read
        n = offs_n
        head = n // HD
        d = n % HD
        half = rot // 2
        in_rot = (d < rot) & (head < n_heads + n_kv)
        partner = tl.where(d < half, n + half, n - half)
        x = yv.to(tl.float32).reshape([yv.shape[1]])
        xp = tl.load(y_ptr + partner, mask=n_ok & in_rot, other=0.0).to(tl.float32)
        cs = tl.load(cos_ptr + pos * rot + d, mask=n_ok & in_rot, other=1.0)
        sn = tl.load(sin_ptr + pos * rot + d, mask=n_ok & in_rot, other=0.0)
        sign = tl.where(d < half, -1.0, 1.0)
        out = tl.where(in_rot, x * cs + sign * xp * sn, x)
        is_q = head < n_heads
        is_k = (head >= n_heads) & (head < n_heads + n_kv)
        is_v = head >= n_heads + n_kv
        tl.store(q_ptr + n, out.to(q_ptr.dtype.element_ty), mask=n_ok & is_q)
        kv_off = pos * HD + d
        tl.store(kc_ptr + (head - n_heads) * s_max * HD + kv_off, out.to(kc_ptr.dtype.element_ty),
                 mask=n_ok & is_k)
        tl.store(vc_ptr + (head - n_heads - n_kv) * s_max * HD + kv_off, out.to(vc_ptr.dtype.element_ty),
                 mask=n_ok & is_v)

    @triton.jit
    def _finish_block(acc, offs_m, offs_n, m_ok, n_ok, pid_n, N, nb_out,
                      y_ptr, bias_ptr, res_ptr, ssq_out_ptr,
                      q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, n_heads, n_kv, s_max, rot,
                      HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, OUT_SSQ: tl.constexpr,
                      ROPE: tl.constexpr, HD: tl.constexpr):
        """y of one output block from its summed partials: + bias, + residual, stored; its sum of
        squares; RoPE + cache write."""
        mn_ok = m_ok[:, None] & n_ok[None, :]
        offs_y = offs_m[:, None] * N + offs_n[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            acc += tl.load(res_ptr + offs_y, mask=mn_ok, other=0.0).to(tl.float32)
        yv = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_y, yv, mask=mn_ok)
        if OUT_SSQ:
            yf = tl.where(mn_ok, yv.to(tl.float32), 0.0)
            tl.store(ssq_out_ptr + offs_m * nb_out + pid_n, tl.sum(yf * yf, 1), mask=m_ok)
        if ROPE:
            _rope_block(yv, offs_n, n_ok, y_ptr, q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr,
                        n_heads, n_kv, s_max, rot, HD)

    @triton.jit
    def finish_program(part, pid_n, pid_s, offs_m, offs_n, m_ok, n_ok, M, N, nb_out, n_split,
                       ws_ptr, cnt_ptr, y_ptr, bias_ptr, res_ptr, ssq_out_ptr,
                       q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, n_heads, n_kv, s_max, rot,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_RES: tl.constexpr, OUT_SSQ: tl.constexpr, USE_WS: tl.constexpr,
                       SPLIT_C: tl.constexpr, ROPE: tl.constexpr, HD: tl.constexpr):
        """Program (pid_n, pid_s) is done with its partial sums ``part`` [BLOCK_M, BLOCK_N]: without
        a K split it finishes its block; with one (USE_WS) it leaves them in the workspace and the
        last of the block's n_split programs sums them all and finishes the block."""
        if USE_WS:
            mn_ok = m_ok[:, None] & n_ok[None, :]
            offs_y = offs_m[:, None] * N + offs_n[None, :]
            tl.store(ws_ptr + pid_s * (M * N) + offs_y, part, mask=mn_ok)
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if done == n_split - 1:
                if BLOCK_M == 1:
                    # SPLIT_C partial rows per load, all in flight at once (a loop of single-row loads
                    # pays one dependent L2 round trip per split); fixed tree order: deterministic
                    offs_s = tl.arange(0, SPLIT_C)
                    tot1 = tl.zeros([BLOCK_N], dtype=tl.float32)
                    for s0 in range(0, n_split, SPLIT_C):
                        s_ok = (s0 + offs_s) < n_split
                        parts = tl.load(ws_ptr + (s0 + offs_s)[:, None] * N + offs_n[None, :],
                                        mask=s_ok[:, None] & n_ok[None, :], other=0.0, cache_modifier=".cg")
                        tot1 += tl.sum(parts, 0)
                    tot = tot1[None, :]
                else:
                    tot = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                    for s in range(0, n_split):
                        tot += tl.load(ws_ptr + s * (M * N) + offs_y, mask=mn_ok, other=0.0,
                                       cache_modifier=".cg")
                _finish_block(tot, offs_m, offs_n, m_ok, n_ok, pid_n, N, nb_out, y_ptr, bias_ptr,
                              res_ptr, ssq_out_ptr, q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr,
                              n_heads, n_kv, s_max, rot, HAS_BIAS, HAS_RES, OUT_SSQ, ROPE, HD)
                tl.store(cnt_ptr + pid_n, 0)
        else:
            _finish_block(part, offs_m, offs_n, m_ok, n_ok, pid_n, N, nb_out, y_ptr, bias_ptr,
                          res_ptr, ssq_out_ptr, q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr,
                          n_heads, n_kv, s_max, rot, HAS_BIAS, HAS_RES, OUT_SSQ, ROPE, HD)
