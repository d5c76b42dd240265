"""The threshold gate over whole activation tensors, in one pass: the allocation's trials gate every
projection input of a layer this way (a greedy row gates hundreds of megabytes of activations, and
the eager gate's five elementwise passes cost more than the GEMM they feed on an H100).

``gate_rows`` keeps ``x[r, i]`` where ``|x[r, i]|·c_i > t`` (the score rounded to x's dtype, as the
eager product is), column ``i`` is live, or the row's position in its sequence is before ``start``
(the dense prefix); it zeroes the rest. The rows are ``n`` stacked copies of a batch of sequences of
``seq_len`` positions, copy ``j`` gated at threshold ``thresholds[j]``. On CUDA (bf16/fp16/fp32) one
Triton launch; elsewhere :func:`gate_rows_reference`, the same rule in torch, which it matches bit
for bit (tests/test_kernels.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from .runtime import HAS_TRITON, tl, triton

BLOCK = 1024

if HAS_TRITON:

    @triton.jit
    def _gate_rows_kernel(x_ptr, out_ptr, scale_ptr, live_ptr, thr_ptr, K, seq_len, rows_per_copy, start,
                          HAS_SCALE: tl.constexpr, HAS_LIVE: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = offs < K
        base = row.to(tl.int64) * K
        x = tl.load(x_ptr + base + offs, mask=ok, other=0.0)
        s = tl.abs(x)
        if HAS_SCALE:
            c = tl.load(scale_ptr + offs, mask=ok, other=0.0)
            s = (s.to(tl.float32) * c.to(tl.float32)).to(x.dtype)
        t = tl.load(thr_ptr + row // rows_per_copy)
        keep = s > t
        if HAS_LIVE:
            keep = keep & (tl.load(live_ptr + offs, mask=ok, other=0) != 0)
        keep = keep | ((row % seq_len) < start)
        tl.store(out_ptr + base + offs, tl.where(keep, x, tl.zeros_like(x)), mask=ok)


def gate_rows_reference(x: torch.Tensor, thresholds: torch.Tensor, scale: Optional[torch.Tensor],
                        live: Optional[torch.Tensor], start: int) -> torch.Tensor:
    """x: (n·b, L, K) or (..., L, K) with n = thresholds.numel() copies; the rule of the module docstring."""
    n = thresholds.numel()
    L, K = x.shape[-2], x.shape[-1]
    xs = x.reshape(n, -1, L, K)
    score = xs.abs()
    if scale is not None:
        score = score * scale.to(dtype=score.dtype, device=score.device)
    mask = score > thresholds.to(device=x.device, dtype=score.dtype).view(n, 1, 1, 1)
    if live is not None:
        mask &= live.to(mask.device)
    if start > 0:
        mask[:, :, :start] = True
    return (xs * mask.to(xs.dtype)).reshape(x.shape)


def gate_rows(x: torch.Tensor, thresholds: torch.Tensor, scale: Optional[torch.Tensor] = None,
              live: Optional[torch.Tensor] = None, start: int = 0) -> torch.Tensor:
    """The gate of the module docstring; a new tensor of x's shape."""
    if not (HAS_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)):
        return gate_rows_reference(x, thresholds, scale, live, start)
    x = x.contiguous()
    K, L = x.shape[-1], x.shape[-2]
    rows = x.numel() // K
    n = thresholds.numel()
    out = torch.empty_like(x)
    thr = thresholds.to(device=x.device, dtype=x.dtype).contiguous()
    sc = scale.to(device=x.device, dtype=x.dtype).contiguous() if scale is not None else thr
    lv = live.to(device=x.device, dtype=torch.int8).contiguous() if live is not None else thr
    grid = (rows, triton.cdiv(K, BLOCK))
    with torch.cuda.device(x.device):              # Triton launches on the current device
        _gate_rows_kernel[grid](x, out, sc, lv, thr, K, L, rows // n, int(start),
                                HAS_SCALE=scale is not None, HAS_LIVE=live is not None, BLOCK_K=BLOCK)
    return out
