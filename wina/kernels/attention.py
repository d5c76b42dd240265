"""The decode step's attention side, one query row: RoPE on q and k with k and v written into the
static cache at the position held in a device tensor (:func:`rope_cache_triton`, which also serves a
prefill's T rows; in the decode step it runs inside the q/k/v GEMV instead, :mod:`.epilogue`), and
flash-decoding over the cache up to that position (:func:`attn_decode_triton`: split over the
sequence, the partial (max, sum, acc) rows combined in a fixed order by the last program of each KV
head); and a prompt's causal attention of T rows from a start read on the device
(:func:`attn_prefill_triton`). Positions are read on the device, so one captured CUDA graph serves
every step, and one per prompt-length bucket every chat turn."""
from __future__ import annotations

import math

import torch

from .config import next_pow2
from .runtime import ATTN_COUNTERS, HAS_TRITON, counters, n_sm, tl, triton, workspace

if HAS_TRITON:

    @triton.jit
    def _online_softmax_step(sc, v, m_i, l_i, acc):
        """One key block of flash attention: fold scores ``sc`` [R, N] (-inf where masked) and values
        ``v`` [N, D] into the running row max, sum and accumulator (a row with every key masked so
        far stays at zero)."""
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, q_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr,
                           n_heads, n_kv, s_max, rot,
                           HD: tl.constexpr, BLOCK_D: tl.constexpr):
        h = tl.program_id(0)
        row = tl.program_id(1)
        pos = tl.load(pos_ptr).to(tl.int32) + row
        qkv_ptr += row * (n_heads + 2 * n_kv) * HD
        q_ptr += row * n_heads * HD
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HD
        x = tl.load(qkv_ptr + h * HD + d, mask=d_ok, other=0.0).to(tl.float32)
        if h < n_heads + n_kv:
            half = rot // 2
            in_rot = d < rot
            partner = tl.where(d < half, d + half, d - half)
            xp = tl.load(qkv_ptr + h * HD + partner, mask=d_ok & in_rot, other=0.0).to(tl.float32)
            cs = tl.load(cos_ptr + pos * rot + d, mask=in_rot, other=1.0)
            sn = tl.load(sin_ptr + pos * rot + d, mask=in_rot, other=0.0)
            sign = tl.where(d < half, -1.0, 1.0)
            out = x * cs + sign * xp * sn
            if h < n_heads:
                tl.store(q_ptr + h * HD + d, out.to(q_ptr.dtype.element_ty), mask=d_ok)
            else:
                base = (h - n_heads) * s_max * HD + pos * HD
                tl.store(k_cache_ptr + base + d, out.to(k_cache_ptr.dtype.element_ty), mask=d_ok)
        else:
            base = (h - n_heads - n_kv) * s_max * HD + pos * HD
            tl.store(v_cache_ptr + base + d, x.to(v_cache_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _attn_decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, ws_ptr, cnt_ptr,
                            n_kv, s_max, n_split, window, scale,
                            G: tl.constexpr, G_P: tl.constexpr, HD: tl.constexpr,
                            BLOCK_S: tl.constexpr, NS_P: tl.constexpr):
        kvh = tl.program_id(0)
        sp = tl.program_id(1)
        length = tl.load(pos_ptr).to(tl.int32) + 1
        start = tl.where(window > 0, tl.maximum(length - window, 0), 0)
        span = length - start
        chunk = tl.cdiv(tl.cdiv(span, n_split), BLOCK_S) * BLOCK_S
        lo = start + sp * chunk
        hi = tl.minimum(lo + chunk, length)
        g = tl.arange(0, G_P)
        g_ok = g < G
        d = tl.arange(0, HD)
        q = tl.load(q_ptr + (kvh * G + g)[:, None] * HD + d[None, :], mask=g_ok[:, None], other=0.0)
        m_i = tl.full([G_P], float("-inf"), tl.float32)
        l_i = tl.zeros([G_P], dtype=tl.float32)
        acc = tl.zeros([G_P, HD], dtype=tl.float32)
        kbase = k_ptr + kvh * s_max * HD
        vbase = v_ptr + kvh * s_max * HD
        for j in range(lo, hi, BLOCK_S):
            offs = j + tl.arange(0, BLOCK_S)
            ok = offs < hi
            k = tl.load(kbase + offs[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k)) * scale
            sc = tl.where(ok[None, :], sc, float("-inf"))
            v = tl.load(vbase + offs[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0)
            m_i, l_i, acc = _online_softmax_step(sc, v, m_i, l_i, acc)
        n_rows = n_kv * n_split * G_P
        row = (kvh * n_split + sp) * G_P + g
        tl.store(ws_ptr + row, m_i)
        tl.store(ws_ptr + n_rows + row, l_i)
        tl.store(ws_ptr + 2 * n_rows + row[:, None] * HD + d[None, :], acc)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + kvh, 1, sem="acq_rel", scope="gpu")
        if done == n_split - 1:
            # per query row, the n_split partial (max, sum, acc) rows are loaded at once (no chain of
            # dependent loads over the splits) and combined in a fixed tree order
            offs_t = tl.arange(0, NS_P)
            t_ok = offs_t < n_split
            for gi in tl.static_range(G):
                r = (kvh * n_split + offs_t) * G_P + gi
                m_t = tl.load(ws_ptr + r, mask=t_ok, other=float("-inf"), cache_modifier=".cg")
                l_t = tl.load(ws_ptr + n_rows + r, mask=t_ok, other=0.0, cache_modifier=".cg")
                a_t = tl.load(ws_ptr + 2 * n_rows + r[:, None] * HD + d[None, :], mask=t_ok[:, None],
                              other=0.0, cache_modifier=".cg")
                m_all = tl.max(m_t, 0)
                wgt = tl.where(t_ok, tl.exp(m_t - m_all), 0.0)
                den = tl.sum(wgt * l_t, 0)
                num = tl.sum(wgt[:, None] * a_t, 0)
                tl.store(o_ptr + (kvh * G + gi) * HD + d, (num / den).to(o_ptr.dtype.element_ty))
            tl.store(cnt_ptr + kvh, 0)

    @triton.jit(do_not_specialize=["T"])
    def _attn_prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, T, n_heads, s_max, window, scale,
                             G: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # query rows m of one head at positions start + m over keys 0 .. start + m (causal, optional
        # sliding window); start is read on the device and bounds the loop: one launch (and one
        # captured graph) serves every chat turn
        mb = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // G
        start = tl.load(pos_ptr).to(tl.int32)
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        qpos = start + offs_m
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HD
        row = n_heads * HD
        q = tl.load(q_ptr + offs_m[:, None] * row + h * HD + d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                    other=0.0)
        hi = tl.minimum(start + tl.minimum((mb + 1) * BLOCK_M, T), s_max)
        lo = tl.where(window > 0, tl.maximum(start + mb * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N, 0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        kbase = k_ptr + kvh * s_max * HD
        vbase = v_ptr + kvh * s_max * HD
        for j in range(lo, hi, BLOCK_N):
            offs_n = j + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            k = tl.load(kbase + offs_n[:, None] * HD + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            sc = tl.dot(q, tl.trans(k)) * scale
            ok = n_ok[None, :] & (offs_n[None, :] <= qpos[:, None])
            if window > 0:
                ok = ok & (offs_n[None, :] > qpos[:, None] - window)
            sc = tl.where(ok, sc, float("-inf"))
            v = tl.load(vbase + offs_n[:, None] * HD + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            m_i, l_i, acc = _online_softmax_step(sc, v, m_i, l_i, acc)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + offs_m[:, None] * row + h * HD + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])


def rope_cache_triton(qkv, cos, sin, pos, k_cache, v_cache, n_heads: int, n_kv: int, head_dim: int):
    """RoPE + cache write of T rows at positions pos .. pos + T - 1 (see
    :func:`.reference.rope_cache_reference`; qkv contiguous); returns q [T, n_heads * head_dim]."""
    q = torch.empty(qkv.shape[0], n_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(n_heads + 2 * n_kv, qkv.shape[0])](
        qkv, q, k_cache, v_cache, cos, sin, pos, n_heads, n_kv, k_cache.shape[2], cos.shape[1],
        HD=head_dim, BLOCK_D=next_pow2(head_dim), num_warps=1)
    return q


def _key_block(head_dim: int) -> int:
    """Keys per loop step of the attention kernels (half for heads past 128, to bound registers)."""
    return 64 if head_dim <= 128 else 32


def attn_splits(q, k_cache) -> int:
    """The default sequence split of :func:`attn_decode_triton`: about two programs per SM, at
    least 64 positions each."""
    n_kv, s_max = k_cache.shape[1], k_cache.shape[2]
    sms = n_sm(q.device) if q.is_cuda else 132
    return max(1, min(-(-2 * sms // n_kv), -(-s_max // 64)))


def attn_decode_triton(q, k_cache, v_cache, pos, window: int, n_split: int):
    """Flash-decoding of one query row over the cache (see :func:`.reference.attention_reference`)."""
    n_kv, s_max, hd = k_cache.shape[1:]
    g = q.shape[1] // hd // n_kv
    g_p = max(16, next_pow2(g))
    o = torch.empty_like(q)
    ws = workspace(q.device, n_kv * n_split * g_p * (hd + 2), "attn")
    cnt = counters(q.device)[ATTN_COUNTERS:]
    _attn_decode_kernel[(n_kv, n_split)](
        q, k_cache, v_cache, o, pos, ws, cnt, n_kv, s_max, n_split, int(window), 1.0 / math.sqrt(hd),
        G=g, G_P=g_p, HD=hd, BLOCK_S=_key_block(hd), NS_P=next_pow2(n_split), num_warps=4)
    return o


ATTN_PREFILL_BLOCK_M = 64


def attn_prefill_triton(q, k_cache, v_cache, pos, window: int = 0):
    """Causal attention of T query rows at positions pos .. pos + T - 1 over the cache, the start read
    on the device (see :func:`.reference.attention_reference`); q [T, n_heads * head_dim] contiguous.
    Grouped-query heads read their KV head in place."""
    n_kv, s_max, hd = k_cache.shape[1:]
    t, n_heads = q.shape[0], q.shape[1] // hd
    o = torch.empty_like(q)
    _attn_prefill_kernel[(triton.cdiv(t, ATTN_PREFILL_BLOCK_M), n_heads)](
        q, k_cache, v_cache, o, pos, t, n_heads, s_max, int(window), 1.0 / math.sqrt(hd),
        G=n_heads // n_kv, HD=hd, BLOCK_D=max(16, next_pow2(hd)), BLOCK_M=ATTN_PREFILL_BLOCK_M,
        BLOCK_N=_key_block(hd), num_warps=4)
    return o
