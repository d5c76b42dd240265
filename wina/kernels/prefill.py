"""The prefill's elementwise work around its cuBLAS matmuls, one launch each on the GPU.

A prompt of T > 1 rows runs every projection as a (masked) cuBLAS matmul in the model's dtype. What
surrounds each matmul used to be a dozen small eager torch ops (the input as the kernels load it, the
gate's product, comparison and select, the gate counts, the cast; then bias, residual, cast and the
next RMSNorm's sums of squares); at a chat turn's few hundred tokens their launches cost more than
their bytes. Here they are two passes:

* :func:`prefill_input` — the matmul's input for each of the S segments (q/k/v, gate/up) in one
  pass: SiLU·up for down_proj and the RMSNorm's 1/RMS (:func:`.scoring.load_input_rows`, the decode
  kernels' own loading), the gate ``|x_i|·c_i > t`` per segment, the dense prefix, the cast to the
  model's dtype, and optionally the kept counts (rows from ``count_from`` on) added to a device
  counter. Returns [S, T, K] (S = 1 without gating).
* :func:`prefill_output` — bias and residual added in fp32, the cast, and the sums of squares of the
  cast rows that the next RMSNorm needs.

On a CPU (and for dtypes Triton does not serve) both run their ``*_reference``: the plain-torch rule,
which the Triton kernels match up to fp32 rounding of SiLU and 1/RMS (tests/test_kernels.py). As
every engine kernel they launch on the current CUDA device (the engine's methods make it theirs).
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import next_pow2
from .reference import prepare_input
from .runtime import tl, triton, use_triton
from .scoring import load_input_rows, rows_rstd

if triton is not None:

    @triton.jit(do_not_specialize=["T", "dense_rows", "count_from"])
    def _prefill_input_kernel(x_ptr, out_ptr, ssq_ptr, c_ptr, t_ptr, kept_ptr, rows_ptr, T, K, x_stride, nb_in,
                              eps, dense_rows, count_from,
                              S: tl.constexpr, GATE: tl.constexpr, COUNT: tl.constexpr, ACT: tl.constexpr,
                              PRE_NORM: tl.constexpr, NB_P: tl.constexpr, ROWS_ON_DEVICE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        count_to = T
        if ROWS_ON_DEVICE:       # a captured prefill: the dense prefix and the counted rows vary per call
            dense_rows = tl.load(rows_ptr).to(tl.int32)
            count_from = tl.load(rows_ptr + 1).to(tl.int32)
            count_to = tl.load(rows_ptr + 2).to(tl.int32)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        m_ok = offs_m < T
        k_ok = offs_k < K
        mk = m_ok[:, None] & k_ok[None, :]
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
        if PRE_NORM:
            rstd = rows_rstd(ssq_ptr, offs_m, m_ok, nb_in, K, eps, NB_P)
        xv = load_input_rows(x_ptr, offs_m[:, None] * x_stride + offs_k[None, :], mk, K, rstd, ACT, PRE_NORM)
        xc = xv.to(out_ptr.dtype.element_ty)
        dst = offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        if GATE:
            a = tl.abs(xv)
            dense = (offs_m < dense_rows)[:, None]
            for s in tl.static_range(S):
                c = tl.load(c_ptr + s * K + offs_k, mask=k_ok, other=0.0)
                keep = (a * c[None, :]) > tl.load(t_ptr + s)
                if COUNT:
                    counted = keep & mk & ((offs_m >= count_from) & (offs_m < count_to))[:, None]
                    tl.atomic_add(kept_ptr + s, tl.sum(tl.sum(counted.to(tl.int64), 1), 0))
                keep = keep | dense
                seg = (s * T).to(tl.int64) * K              # segment s's [T, K] block (may pass 2^31)
                tl.store(out_ptr + seg + dst, tl.where(keep, xc, tl.zeros_like(xc)), mask=mk)
        else:
            tl.store(out_ptr + dst, xc, mask=mk)

    @triton.jit
    def _prefill_output_kernel(y_ptr, bias_ptr, res_ptr, out_ptr, ssq_ptr, N,
                               HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, WANT_SSQ: tl.constexpr,
                               BLOCK_N: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            ok = offs < N
            v = tl.load(y_ptr + row * N + offs, mask=ok, other=0.0).to(tl.float32)
            if HAS_BIAS:
                v += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if HAS_RES:
                v += tl.load(res_ptr + row * N + offs, mask=ok, other=0.0).to(tl.float32)
            o = v.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + row * N + offs, o, mask=ok)
            if WANT_SSQ:
                of = o.to(tl.float32)
                acc += of * of
        if WANT_SSQ:
            tl.store(ssq_ptr + row, tl.sum(acc, 0))


INPUT_BLOCK_M = 4
INPUT_BLOCK_K = 512
OUTPUT_BLOCK_N = 1024


def prefill_input_reference(x, k: int, ssq_in, eps: float, act: int, dtype, scales=None, thresholds=None,
                            dense_rows: int = 0, kept=None, count_from: int = 0, rows=None) -> torch.Tensor:
    """The rule of :func:`prefill_input` in plain torch."""
    count_to = x.shape[0]
    if rows is not None:
        dense_rows, count_from, count_to = (int(v) for v in rows.tolist())
    xf = prepare_input(x, k, ssq_in, eps, act)
    xc = xf.to(dtype)
    if scales is None:
        return xc.unsqueeze(0)
    keep = xf.abs().unsqueeze(0) * scales.unsqueeze(1) > thresholds.view(-1, 1, 1)
    if kept is not None:
        kept[:keep.shape[0]] += keep[:, count_from:count_to].sum((1, 2))
    if dense_rows:
        keep[:, :dense_rows] = True
    return torch.where(keep, xc, torch.zeros((), dtype=xc.dtype, device=xc.device))


def prefill_input(x: torch.Tensor, k: int, ssq_in: Optional[torch.Tensor], eps: float, act: int, dtype,
                  scales: Optional[torch.Tensor] = None, thresholds: Optional[torch.Tensor] = None,
                  dense_rows: int = 0, kept: Optional[torch.Tensor] = None, count_from: int = 0,
                  rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The matmul inputs [S, T, K] of x [T, K] (or [T, 2K] with SiLU·up): prepared as
    :func:`.reference.prepare_input`, cast to ``dtype``; with ``scales`` [S, K] and ``thresholds``
    [S], segment s keeps ``x_i`` where ``|x_i|·c_si > t_s`` or the row is before ``dense_rows`` and
    zeroes the rest. ``kept``: a device counter of S+ int64 entries to which segment s's kept inputs
    on rows ``count_from`` .. are added (before the dense prefix is applied). ``rows``: an int64 device
    tensor (dense_rows, count_from, count_to) read by the kernel instead of those arguments (a captured
    CUDA graph's prefill, padded to its bucket: only rows before count_to are counted). Without
    scales: [1, T, K]."""
    if not (use_triton(x) and dtype in (torch.bfloat16, torch.float16)):
        return prefill_input_reference(x, k, ssq_in, eps, act, dtype, scales, thresholds, dense_rows, kept,
                                       count_from, rows)
    return prefill_input_triton(x, k, ssq_in, eps, act, dtype, scales, thresholds, dense_rows, kept, count_from,
                                rows)


def prefill_input_triton(x, k, ssq_in, eps, act, dtype, scales=None, thresholds=None, dense_rows=0, kept=None,
                         count_from=0, rows=None) -> torch.Tensor:
    """The Triton launch of :func:`prefill_input` (any device Triton runs on, its interpreter too)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    t = x.shape[0]
    gate = scales is not None
    s = scales.shape[0] if gate else 1
    out = torch.empty(s, t, k, dtype=dtype, device=x.device)
    nb_in = ssq_in.shape[1] if ssq_in is not None else 1
    if ssq_in is not None:
        ssq_in = ssq_in.float().contiguous()
    dummy = out
    grid = (triton.cdiv(t, INPUT_BLOCK_M), triton.cdiv(k, INPUT_BLOCK_K))
    _prefill_input_kernel[grid](
        x, out, ssq_in if ssq_in is not None else dummy,
        scales.contiguous() if gate else dummy, thresholds.contiguous() if gate else dummy,
        kept if kept is not None else dummy, rows if rows is not None else dummy, t, k, x.stride(0), nb_in,
        float(eps), int(dense_rows), int(count_from), S=s, GATE=gate, COUNT=gate and kept is not None,
        ACT=int(act), PRE_NORM=ssq_in is not None, NB_P=max(2, next_pow2(nb_in)),
        ROWS_ON_DEVICE=rows is not None, BLOCK_M=INPUT_BLOCK_M,
        BLOCK_K=INPUT_BLOCK_K, num_warps=4)
    return out


def prefill_output_reference(y, bias, res, want_ssq: bool, dtype):
    """The rule of :func:`prefill_output` in plain torch."""
    if bias is not None or res is not None:
        yf = y.float()
        if bias is not None:
            yf = yf + bias.float()
        if res is not None:
            yf = yf + res.float()
        y = yf.to(dtype)
    else:
        y = y.to(dtype)
    if not want_ssq:
        return y, None
    yf = y.float()
    return y, (yf * yf).sum(-1, keepdim=True)


def prefill_output(y: torch.Tensor, bias: Optional[torch.Tensor], res: Optional[torch.Tensor], want_ssq: bool,
                   dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(y + bias + res, added in fp32 and cast to ``dtype``; its rows' sums of squares [T, 1] fp32
    when ``want_ssq``, else None)."""
    if bias is None and res is None and not want_ssq and y.dtype == dtype:
        return y, None
    if not (use_triton(y) and dtype in (torch.bfloat16, torch.float16)):
        return prefill_output_reference(y, bias, res, want_ssq, dtype)
    return prefill_output_triton(y, bias, res, want_ssq, dtype)


def prefill_output_triton(y, bias, res, want_ssq: bool, dtype):
    """The Triton launch of :func:`prefill_output`."""
    y = y.contiguous()
    t, n = y.shape
    out = torch.empty(t, n, dtype=dtype, device=y.device)
    ssq = torch.empty(t, 1, dtype=torch.float32, device=y.device) if want_ssq else out
    _prefill_output_kernel[(t,)](
        y, bias if bias is not None else y, res.contiguous() if res is not None else y, out, ssq, n,
        HAS_BIAS=bias is not None, HAS_RES=res is not None, WANT_SSQ=want_ssq, BLOCK_N=OUTPUT_BLOCK_N,
        num_warps=4)
    return out, (ssq if want_ssq else None)
