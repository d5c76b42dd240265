"""The public ops: :func:`gemv`, :func:`gemv_rope`, :func:`rope_cache` and :func:`attn_decode`, each a
``torch.library`` custom op (``wina::gemv``, ``wina::gemv_rope``, ``wina::rope_cache``,
``wina::attn_decode``) so that torch.compile and CUDA graphs see single nodes. On CUDA with Triton
they launch the kernels; elsewhere (and above :data:`MAX_KERNEL_ROWS` rows) they run the references
of :mod:`.reference`, which are also what the tests compare against.

Layout. Every weight is stored *input-channel-major*: ``wt`` is ``W.T`` contiguous, shape [K, N]
(K inputs, N outputs), so the N weights that one input channel multiplies are one contiguous row.
Skipping an input skips a contiguous run of ``N * 2`` bytes (in a tile, ``BLOCK_N * 2`` bytes).

:func:`gemv` computes for an input ``x`` of M rows::

    x   = silu(x[:, :K]) * x[:, K:]                        if act == ACT_SILU_MUL   (down_proj)
    x   = x * rsqrt(sum(ssq_in, -1) / K + eps)             if ssq_in is given      (RMSNorm, gains
                                                                                     folded into wt)
    keep[m, k] = |x[m, k]| * scales[seg, k] > thresholds[seg]   (sparse; seg = segment of the output
                                                                 column: q/k/v or gate/up share x)
    y[m, n] = sum_k keep[m, k] * x[m, k] * wt[k, n]  (+ bias[n]) (+ res[m, n])
    ssq_out[m, b] = sum over output block b of y[m, n]**2       (the next RMSNorm's input)

Segments let one launch serve q/k/v (three thresholds, three scale vectors) and one gate/up, as the
greedy plan's per-matrix thresholds require. The kernels accumulate in fp32, split K over programs
and reduce the partial sums in a fixed order (deterministic); a sparse single-row launch reads only
the kept inputs' weight rows (:mod:`.sparse_gemv`). Thresholds, positions and lengths are read from
device memory, so one captured CUDA graph serves every step and every sparsity level. Launch configs
come from :func:`.config.config_for` (exact shape, then the decode-step role, then the defaults;
tuned on an H200, docs/gpu-notes.md).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import InvalidArgument
from .attention import attn_decode_triton, attn_splits, rope_cache_triton
from .config import GemvConfig, config_for, config_ints, next_pow2, rope_fuses
from .gemv_launch import launch_gemv
from .reference import ACT_NONE, ACT_SILU_MUL, attention_reference, gemv_reference, rope_cache_reference
from .runtime import use_triton

MAX_KERNEL_ROWS = 8           # above this many rows, gemv falls back to a masked cuBLAS matmul


def check_gemv_args(x, wt, scales, thresholds, bounds, act, sparse) -> None:
    if x.dim() != 2 or wt.dim() != 2:
        raise InvalidArgument("gemv: x must be [M, K] and wt [K, N]")
    k, n = wt.shape
    want = 2 * k if act == ACT_SILU_MUL else k
    if x.shape[1] != want:
        raise InvalidArgument(f"gemv: x has {x.shape[1]} columns, expected {want}")
    if sparse:
        n_seg = len(bounds) + 1
        if len(bounds) > 2:
            raise InvalidArgument("gemv: at most three segments (q/k/v)")
        if scales is None or thresholds is None:
            raise InvalidArgument("gemv: sparse needs scales and thresholds")
        if tuple(scales.shape) != (n_seg, k) or thresholds.numel() != n_seg:
            raise InvalidArgument(f"gemv: scales must be [{n_seg}, {k}] and thresholds [{n_seg}]")
        if list(bounds) != sorted(bounds) or (bounds and (bounds[0] <= 0 or bounds[-1] >= n)):
            raise InvalidArgument(f"gemv: bad segment bounds {list(bounds)} for {n} outputs")


if hasattr(torch.library, "custom_op"):
    @torch.library.custom_op("wina::gemv", mutates_args=())
    def _gemv_op(x: torch.Tensor, wt: torch.Tensor, scales: Optional[torch.Tensor],
                 thresholds: Optional[torch.Tensor], bounds: list[int], bias: Optional[torch.Tensor],
                 res: Optional[torch.Tensor], ssq_in: Optional[torch.Tensor], eps: float, act: int,
                 want_ssq: bool, sparse: bool, config: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if use_triton(x) and x.shape[0] <= MAX_KERNEL_ROWS:
            cfg = GemvConfig(*config)
            return launch_gemv(x, wt, scales, thresholds, bounds, bias, res, ssq_in, eps, act,
                               want_ssq, sparse, cfg)
        cd = x.dtype if x.is_cuda else None
        y, ssq = gemv_reference(x, wt, scales, thresholds, bounds, bias, res, ssq_in, eps, act, sparse,
                                compute_dtype=cd)
        return y, (ssq if want_ssq else ssq[:, :0]).contiguous()

    @_gemv_op.register_fake
    def _(x, wt, scales, thresholds, bounds, bias, res, ssq_in, eps, act, want_ssq, sparse, config):
        m, n = x.shape[0], wt.shape[1]
        nb = -(-n // GemvConfig(*config).block_n) if want_ssq else 0
        return x.new_empty(m, n), x.new_empty(m, nb, dtype=torch.float32)

    @torch.library.custom_op("wina::rope_cache", mutates_args=("k_cache", "v_cache"))
    def _rope_cache_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int,
                       head_dim: int) -> torch.Tensor:
        if use_triton(qkv) and qkv.shape[0] == 1 and k_cache.shape[0] == 1:
            return rope_cache_triton(qkv, cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim)
        return rope_cache_reference(qkv, cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim)

    @_rope_cache_op.register_fake
    def _(qkv, cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim):
        return qkv.new_empty(qkv.shape[0], n_heads * head_dim)

    @torch.library.custom_op("wina::attn_decode", mutates_args=())
    def _attn_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        pos: torch.Tensor, window: int, n_split: int) -> torch.Tensor:
        hd = k_cache.shape[3]
        if (use_triton(q) and q.shape[0] == 1 and k_cache.shape[0] == 1 and hd >= 16
                and hd == next_pow2(hd)):
            return attn_decode_triton(q, k_cache, v_cache, pos, window, n_split)
        return attention_reference(q, k_cache, v_cache, pos, window)

    @_attn_decode_op.register_fake
    def _(q, k_cache, v_cache, pos, window, n_split):
        return torch.empty_like(q)

    @torch.library.custom_op("wina::gemv_rope", mutates_args=("k_cache", "v_cache"))
    def _gemv_rope_op(x: torch.Tensor, wt: torch.Tensor, scales: Optional[torch.Tensor],
                      thresholds: Optional[torch.Tensor], bounds: list[int], bias: Optional[torch.Tensor],
                      ssq_in: Optional[torch.Tensor], eps: float, sparse: bool, cos: torch.Tensor,
                      sin: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      n_heads: int, n_kv: int, head_dim: int, config: list[int]) -> torch.Tensor:
        cfg = GemvConfig(*config)
        k, n = wt.shape
        if (use_triton(x) and k_cache.shape[0] == 1
                and rope_fuses(x.shape[0], k, n, bounds, cfg, sparse, head_dim)):
            q, _ = launch_gemv(x, wt, scales, thresholds, bounds, bias, None, ssq_in, eps, ACT_NONE, False,
                               sparse, cfg, rope=(cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim))
            return q
        qkv, _ = _gemv_op(x, wt, scales, thresholds, bounds, bias, None, ssq_in, eps, ACT_NONE, False, sparse,
                          config)
        return _rope_cache_op(qkv, cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim)

    @_gemv_rope_op.register_fake
    def _(x, wt, scales, thresholds, bounds, bias, ssq_in, eps, sparse, cos, sin, pos, k_cache, v_cache,
          n_heads, n_kv, head_dim, config):
        return x.new_empty(x.shape[0], n_heads * head_dim)
else:  # pragma: no cover - very old torch
    _gemv_op = _rope_cache_op = _attn_decode_op = _gemv_rope_op = None


def gemv(x: torch.Tensor, wt: torch.Tensor, *, scales: Optional[torch.Tensor] = None,
         thresholds: Optional[torch.Tensor] = None, bounds: Sequence[int] = (),
         bias: Optional[torch.Tensor] = None, res: Optional[torch.Tensor] = None,
         ssq_in: Optional[torch.Tensor] = None, eps: float = 1e-6, act: int = ACT_NONE,
         want_ssq: bool = False, sparse: bool = False, config: Optional[GemvConfig] = None,
         role: Optional[str] = None):
    """y = W·x with optional fused RMSNorm, SiLU·up, WINA/TEAL gating, bias and residual (the
    formula in this module's docstring).

    x [M, K] (or [M, 2K] with act=ACT_SILU_MUL), wt [K, N] input-channel-major (W.T contiguous),
    scales [S, K] fp32 and thresholds [S] fp32 for the S = len(bounds) + 1 output segments.
    Returns (y [M, N] in x's dtype, ssq [M, nb] fp32; nb = 0 unless want_ssq). ``config``: the
    launch's GemvConfig (default: :func:`.config.config_for` of the shape and ``role``)."""
    sparse = bool(sparse)
    check_gemv_args(x, wt, scales, thresholds, bounds, act, sparse)
    k, n = wt.shape
    cfg = config or config_for(k, n, sparse, role)
    return _gemv_op(x, wt, scales, thresholds, [int(b) for b in bounds], bias, res, ssq_in, float(eps),
                    int(act), bool(want_ssq), sparse, config_ints(cfg))


def gemv_rope(x: torch.Tensor, wt: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
              k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, *,
              scales: Optional[torch.Tensor] = None, thresholds: Optional[torch.Tensor] = None,
              bounds: Sequence[int] = (), bias: Optional[torch.Tensor] = None,
              ssq_in: Optional[torch.Tensor] = None, eps: float = 1e-6, sparse: bool = False,
              config: Optional[GemvConfig] = None, role: Optional[str] = "attn_in") -> torch.Tensor:
    """The q/k/v GEMV followed by :func:`rope_cache`, in one launch where it can be (a single row on
    the GPU with output blocks holding whole heads: the finishing program of each block rotates it
    and writes k and v into the caches). Returns the rotated q [M, n_heads * head_dim]."""
    sparse = bool(sparse)
    check_gemv_args(x, wt, scales, thresholds, bounds, ACT_NONE, sparse)
    k, n = wt.shape
    if n != (n_heads + 2 * n_kv) * head_dim:
        raise InvalidArgument(f"gemv_rope: {n} outputs, expected (n_heads + 2 n_kv) * head_dim")
    cfg = config or config_for(k, n, sparse, role)
    return _gemv_rope_op(x, wt, scales, thresholds, [int(b) for b in bounds], bias, ssq_in, float(eps), sparse,
                         cos, sin, pos, k_cache, v_cache, int(n_heads), int(n_kv), int(head_dim),
                         config_ints(cfg))


def rope_cache(qkv, cos, sin, pos, k_cache, v_cache, n_heads: int, n_kv: int, head_dim: int):
    """RoPE + KV-cache write (see :func:`.reference.rope_cache_reference`); returns the rotated q."""
    return _rope_cache_op(qkv, cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim)


def attn_decode(q, k_cache, v_cache, pos, window: int = 0, n_split: int = 0):
    """Attention of the token at position ``pos`` (device tensor) over the cache; ``n_split``:
    sequence splits (0: :func:`.attention.attn_splits`)."""
    if n_split <= 0:
        n_split = attn_splits(q, k_cache)
    return _attn_decode_op(q, k_cache, v_cache, pos, int(window), int(n_split))
