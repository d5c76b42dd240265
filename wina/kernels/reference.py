"""The kernels' semantics in plain torch: the CPU path, the engine's prefill, and the test oracle.

:func:`gemv_reference` is what :func:`wina.kernels.gemv` computes (its docstring has the formula),
:func:`rope_cache_reference` and :func:`attention_reference` what the decode step's RoPE + cache
write and flash-decoding compute. :func:`prepare_input` is the GEMV input as every path sees it
(SiLU(gate)·up for down_proj, the RMSNorm scale from the sums of squares), in fp32.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import InvalidArgument

ACT_NONE = 0
ACT_SILU_MUL = 1


def _segments(n: int, bounds: Sequence[int]) -> list[tuple[int, int]]:
    edges = [0, *[int(b) for b in bounds], n]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def prepare_input(x: torch.Tensor, k: int, ssq_in: Optional[torch.Tensor], eps: float, act: int) -> torch.Tensor:
    """The GEMV input in fp32: SiLU(x[:, :k])·x[:, k:] for ``act == ACT_SILU_MUL``, scaled by
    rsqrt(sum(ssq_in) / k + eps) when the sums of squares are given (the RMSNorm, gains folded into
    the weights). The gate scores |x_i|·c_i of every path are taken on this."""
    xf = x.float()
    if act == ACT_SILU_MUL:
        g, u = xf[:, :k], xf[:, k:2 * k]
        xf = torch.nn.functional.silu(g) * u
    elif xf.shape[1] != k:
        raise InvalidArgument(f"gemv: x has {xf.shape[1]} columns, the weight has {k} input rows")
    if ssq_in is not None:
        xf = xf * torch.rsqrt(ssq_in.float().sum(-1, keepdim=True) / k + eps)
    return xf


def gemv_reference(x, wt, scales=None, thresholds=None, bounds: Sequence[int] = (), bias=None, res=None,
                   ssq_in=None, eps: float = 1e-6, act: int = ACT_NONE, sparse: bool = False,
                   compute_dtype: Optional[torch.dtype] = None, dense_rows: int = 0):
    """The semantics of :func:`wina.kernels.gemv` in plain torch. Returns (y, ssq_out[M, 1]).

    ``compute_dtype=None`` does everything in fp32 (the test oracle); the engine passes the model's
    dtype so that a long prefill on the GPU runs as a bf16 cuBLAS matmul. ``dense_rows``: the first
    rows of x are never gated (the sparsifier's dense prefix)."""
    k, n = wt.shape
    xf = prepare_input(x, k, ssq_in, eps, act)
    cd = torch.float32 if compute_dtype is None else compute_dtype
    w = wt if wt.dtype == cd else wt.to(cd)
    if sparse:
        outs = []
        for s, (a, b) in enumerate(_segments(n, bounds)):
            keep = xf.abs() * scales[s].float() > thresholds[s].float()
            if dense_rows:
                keep[:dense_rows] = True
            outs.append((xf * keep).to(cd) @ w[:, a:b])
        y = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
    else:
        y = xf.to(cd) @ w
    y = y.float()
    if bias is not None:
        y = y + bias.float()
    if res is not None:
        y = y + res.float()
    y = y.to(x.dtype)
    yf = y.float()
    return y, (yf * yf).sum(-1, keepdim=True)


def rope_cache_reference(qkv, cos, sin, pos, k_cache, v_cache, n_heads: int, n_kv: int, head_dim: int):
    """RoPE on the q and k heads of ``qkv`` [T, (n_heads + 2 n_kv) * head_dim] at positions
    ``pos`` .. ``pos + T - 1`` (pos: a 1-element int tensor); k and v are written into the caches
    [1, n_kv, S, head_dim]. Returns q [T, n_heads * head_dim]."""
    t = qkv.shape[0]
    p0 = int(pos.reshape(-1)[0])
    positions = torch.arange(p0, p0 + t, device=qkv.device)
    hd = head_dim
    q = qkv[:, :n_heads * hd].reshape(t, n_heads, hd)
    k = qkv[:, n_heads * hd:(n_heads + n_kv) * hd].reshape(t, n_kv, hd)
    v = qkv[:, (n_heads + n_kv) * hd:].reshape(t, n_kv, hd)
    c = cos[positions].to(qkv.dtype)[:, None, :]
    s = sin[positions].to(qkv.dtype)[:, None, :]
    q, k = _apply_rope(q, c, s), _apply_rope(k, c, s)
    k_cache[0, :, p0:p0 + t] = k.transpose(0, 1)
    v_cache[0, :, p0:p0 + t] = v.transpose(0, 1)
    return q.reshape(t, n_heads * hd)


def _apply_rope(x, cos, sin):
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    h = rot // 2
    rotated = torch.cat((-xr[..., h:], xr[..., :h]), dim=-1)
    out = xr * cos + rotated * sin
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out


def attention_reference(q, k_cache, v_cache, pos, window: int = 0):
    """Attention of T query rows at positions pos .. pos+T-1 over the cache (causal, optional
    sliding window). q [T, n_heads * hd]; returns [T, n_heads * hd]."""
    t = q.shape[0]
    n_kv, s_max, hd = k_cache.shape[1:]
    n_heads = q.shape[1] // hd
    p0 = int(pos.reshape(-1)[0])
    length = p0 + t
    qh = q.reshape(t, n_heads, hd).transpose(0, 1).unsqueeze(0)           # [1, H, T, hd]
    k = k_cache[:, :, :length]
    v = v_cache[:, :, :length]
    qpos = torch.arange(p0, p0 + t, device=q.device)[:, None]
    kpos = torch.arange(length, device=q.device)[None, :]
    allowed = kpos <= qpos
    if window:
        allowed = allowed & (kpos > qpos - window)
    if n_heads != n_kv:
        rep = n_heads // n_kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(qh, k, v, attn_mask=allowed[None, None])
    return out[0].transpose(0, 1).reshape(t, n_heads * hd)
