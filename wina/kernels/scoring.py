"""Gating and scoring: the GEMV input as the kernels load it (SiLU(gate)·up for down_proj, scaled by
the RMSNorm's 1/RMS from the producer's per-block sums of squares), the gate ``|x_i|·c_i > t``, and
the compaction of a K-chunk's kept inputs into an (index, value) list — inside a sparse GEMV's
programs, or as a small launch of its own before it (``GemvConfig.precompact``).

A kept list of KPS inputs takes 2·KPS fp32 slots: the indices (as floats) in the first KPS, the
values in the second; its length is a separate int32 count.
"""
from __future__ import annotations

import torch

from .config import next_pow2
from .runtime import HAS_TRITON, tl, triton, workspace

COMPACT_WARPS = 4             # warps of the pre-compaction launch (run 14: 2-16 within 0.3 µs)

if HAS_TRITON:

    @triton.jit
    def row_rstd(ssq_in_ptr, nb_in, K, eps, NB_P: tl.constexpr):
        """1/RMS of a single row from its producer's nb_in per-block sums of squares."""
        offs_b = tl.arange(0, NB_P)
        ssq = tl.load(ssq_in_ptr + offs_b, mask=offs_b < nb_in, other=0.0)
        return tl.rsqrt(tl.sum(ssq, 0) / K + eps)

    @triton.jit
    def rows_rstd(ssq_in_ptr, offs_m, m_ok, nb_in, K, eps, NB_P: tl.constexpr):
        """1/RMS of rows ``offs_m`` (as :func:`row_rstd`, one value per row)."""
        offs_b = tl.arange(0, NB_P)
        ssq = tl.load(ssq_in_ptr + offs_m[:, None] * nb_in + offs_b[None, :],
                      mask=m_ok[:, None] & (offs_b[None, :] < nb_in), other=0.0)
        return tl.rsqrt(tl.sum(ssq, 1) / K + eps)

    @triton.jit
    def load_input(x_ptr, offs, k_ok, K, rstd, ACT: tl.constexpr, PRE_NORM: tl.constexpr):
        """The GEMV input at ``offs`` (one row): SiLU·up for down_proj, RMS-normalised."""
        if ACT == 1:
            g = tl.load(x_ptr + offs, mask=k_ok, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + K + offs, mask=k_ok, other=0.0).to(tl.float32)
            xv = g / (1.0 + tl.exp(-g)) * u
        else:
            xv = tl.load(x_ptr + offs, mask=k_ok, other=0.0).to(tl.float32)
        if PRE_NORM:
            xv = xv * rstd
        return xv

    @triton.jit
    def load_input_rows(x_ptr, xm, mk, K, rstd, ACT: tl.constexpr, PRE_NORM: tl.constexpr):
        """The GEMV input at the [rows, inputs] offsets ``xm`` (as :func:`load_input`, 2..8 rows)."""
        if ACT == 1:
            g = tl.load(x_ptr + xm, mask=mk, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + K + xm, mask=mk, other=0.0).to(tl.float32)
            xv = g / (1.0 + tl.exp(-g)) * u
        else:
            xv = tl.load(x_ptr + xm, mask=mk, other=0.0).to(tl.float32)
        if PRE_NORM:
            xv = xv * rstd[:, None]
        return xv

    @triton.jit
    def compact_chunk(x_ptr, c_row, thr, k_lo, K, rstd, scr_ptr, base,
                      KPS: tl.constexpr, ACT: tl.constexpr, PRE_NORM: tl.constexpr):
        """Score the KPS inputs from ``k_lo`` (|x|·c > thr) and write the kept ones' indices and
        values, in order, to the list at ``scr_ptr + base``; returns how many were kept."""
        offs_c = k_lo + tl.arange(0, KPS)
        c_ok = offs_c < K
        xa = load_input(x_ptr, offs_c, c_ok, K, rstd, ACT, PRE_NORM)
        c = tl.load(c_row + offs_c, mask=c_ok, other=0.0)
        keep = c_ok & (tl.abs(xa) * c > thr)
        ki = keep.to(tl.int32)
        slot = tl.cumsum(ki, 0) - 1
        count = tl.sum(ki, 0)
        tl.store(scr_ptr + base + slot, offs_c.to(tl.float32, bitcast=False), mask=keep)
        tl.store(scr_ptr + base + KPS + slot, xa, mask=keep)
        return count

    @triton.jit
    def _compact_kernel(x_ptr, c_ptr, t_ptr, ssq_in_ptr, scr_ptr, kept_ptr, K, nb_in, eps, n_split,
                        KPS: tl.constexpr, NB_P: tl.constexpr, ACT: tl.constexpr,
                        PRE_NORM: tl.constexpr):
        """Program (segment, split): the kept inputs of K-chunk ``split`` under the segment's
        scale and threshold, compacted (index, value) into scratch; their number into kept."""
        seg = tl.program_id(0)
        pid_s = tl.program_id(1)
        rstd = 1.0
        if PRE_NORM:
            rstd = row_rstd(ssq_in_ptr, nb_in, K, eps, NB_P)
        thr = tl.load(t_ptr + seg)
        base = (seg * n_split + pid_s) * (2 * KPS)
        count = compact_chunk(x_ptr, c_ptr + seg * K, thr, pid_s * KPS, K, rstd, scr_ptr, base,
                              KPS, ACT, PRE_NORM)
        tl.store(kept_ptr + seg * n_split + pid_s, count)


def compact_inputs(x, scales, thresholds, ssq_in, eps: float, act: int, split: int, kps: int):
    """Launch the compaction of one row's input: per (segment, K-chunk of ``kps`` inputs, ``split``
    of them) the kept list and its length. Returns (lists, counts), the device's "scr" and "kept"
    scratch, laid out as a sparse GEMV launch with ``GemvConfig.precompact`` reads them."""
    n_seg, k = scales.shape
    dev = x.device
    scr = workspace(dev, n_seg * split * 2 * kps, "scr")
    kept = workspace(dev, n_seg * split, "kept", torch.int32, 4096)
    nb_in = ssq_in.shape[1] if ssq_in is not None else 1
    _compact_kernel[(n_seg, split)](
        x, scales, thresholds, ssq_in if ssq_in is not None else x, scr, kept, k, nb_in, float(eps), split,
        KPS=kps, NB_P=max(2, next_pow2(nb_in)), ACT=int(act), PRE_NORM=ssq_in is not None,
        num_warps=COMPACT_WARPS)
    return scr, kept
