"""Fused activation-sparse GEMV kernels (Triton) and their plain-torch references.

Layout. Every weight is stored *input-channel-major*: ``wt`` is ``W.T`` contiguous, shape [K, N]
(K inputs, N outputs), so the N weights that one input channel multiplies are one contiguous row.
Skipping an input skips a contiguous run of ``N * 2`` bytes (in a tile, ``BLOCK_N * 2`` bytes).

One kernel, :func:`gemv`, computes for an input ``x`` of M ≤ 8 rows::

    x   = silu(x[:, :K]) * x[:, K:]                        if act == ACT_SILU_MUL   (down_proj)
    x   = x * rsqrt(sum(ssq_in, -1) / K + eps)             if ssq_in is given      (RMSNorm, gains
                                                                                     folded into wt)
    keep[m, k] = |x[m, k]| * scales[seg, k] > thresholds[seg]   (sparse; seg = segment of the output
                                                                 column: q/k/v or gate/up share x)
    y[m, n] = sum_k keep[m, k] * x[m, k] * wt[k, n]  (+ bias[n]) (+ res[m, n])
    ssq_out[m, b] = sum over output block b of y[m, n]**2       (the next RMSNorm's input)

For a single token (decode) each program scores the inputs of its K-chunk, compacts the kept
ones (index and value) into a per-program scratch with a prefix sum, and then streams only their
weight rows in full tiles, so the loop length scales with the density. For 2..8 rows it reads a
weight row when some row keeps that input (the union of the per-token masks: per-token results are
exact, the bytes read are those of the union). It accumulates in fp32, splits K over programs and
reduces the partial sums *in a fixed order* in the last program to finish each output block (a
counter per block, no float atomics: results are deterministic). Segments let one
launch serve q/k/v (three thresholds, three scale vectors) and one gate/up, as the greedy plan's
per-matrix thresholds require. Above 8 rows the op falls back to a masked dense matmul (cuBLAS).

The other two kernels are the decode step's glue: :func:`rope_cache` (RoPE on q and k, k and v
written into the static cache at the position held in a device tensor) and :func:`attn_decode`
(flash-decoding over the cache up to that position, split over the sequence, combined in the last
program, again in a fixed order). Thresholds, positions and lengths are read from device memory, so
one captured CUDA graph serves every step and every sparsity level.

Fusion for the single-token decode step: :func:`gemv_rope` runs RoPE + the cache write in the q/k/v
GEMV's finishing programs. Launch configs come from :func:`config_for` (exact shape, then the
decode-step role, then the defaults; tuned on an H200, docs/gpu-notes.md).

Each op is a ``torch.library`` custom op (``wina::gemv``, ``wina::gemv_rope``, ``wina::rope_cache``,
``wina::attn_decode``) with a CPU/reference implementation, so torch.compile and CUDA graphs see
single nodes. Without CUDA or Triton everything runs through the references, which are also what the
tests compare against.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import InvalidArgument

try:  # Triton is optional: CPU installs run the torch references.
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

ACT_NONE = 0
ACT_SILU_MUL = 1
COMPACT_WARPS = 4             # warps of the pre-compaction launch (GemvConfig.precompact)
MAX_KERNEL_ROWS = 8           # above this many rows, gemv falls back to a masked cuBLAS matmul


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 128        # output columns per program (a weight row segment of 2*block_n bytes)
    block_k: int = 64         # input rows per loop iteration
    programs: int = 528       # target grid size; K is split to reach it
    num_warps: int = 4
    pipeline: int = 0         # sparse, single row: keep two weight tiles in flight
    precompact: int = 0       # sparse, single row: a separate small launch scores and compacts each
                              # (segment, K-chunk) once; the GEMV programs only read the kept lists
    min_ctas: int = 0         # programs that must fit on one SM at once: caps the registers per thread
                              # (ptxas .maxnreg) at 64K / (min_ctas * 32 * num_warps); 0: ptxas decides.
                              # ptxas's own choice moves with unrelated kernel changes (run 11: 168 ->
                              # 211 registers, 3 -> 2 programs per SM, the sparse MLP GEMVs 25 % slower)

    def launch_options(self) -> dict:
        """Triton launch options of this config (warps, register cap)."""
        opt = {"num_warps": self.num_warps}
        if self.min_ctas:
            opt["maxnreg"] = min(255, max(24, 65536 // (self.min_ctas * 32 * self.num_warps) // 8 * 8))
        return opt


# Defaults, from the H200 runs in docs/gpu-notes.md. A launch's config comes from, in order: an
# entry for its exact (K, N[, sparse]) (set_config), the entry for its role in the decode step
# (set_role_config; the engine names the role), the default.
DEFAULT_CONFIG = GemvConfig(128, 64, 528, 4)
DEFAULT_SPARSE_CONFIG = GemvConfig(256, 64, 264, 4)
ROLES = ("attn_in", "o", "mlp_in", "down", "head")
_BASE, _PIPE = DEFAULT_SPARSE_CONFIG, GemvConfig(128, 64, 264, 4, pipeline=1)
_PRE = GemvConfig(128, 64, 528, 4, pipeline=1, precompact=1, min_ctas=3)   # 3 per SM: the 168 registers of run 10
# sparse roles: run 9 timed the whole engine at 50 % on the four shapes with one role at a time
# switched (bench/config_probe.py); these won by geometric mean over the shapes
_ROLE_CONFIGS: dict[tuple[str, bool], GemvConfig] = {
    ("attn_in", False): GemvConfig(256, 32, 528, 4),     # run 3's dense sweep
    ("attn_in", True): _PIPE, ("o", True): _PIPE, ("mlp_in", True): _PRE, ("down", True): _BASE,
}
# exact shapes of the benchmarked models (sparse): run 9's best per model and role, where it
# differs from the role entry (Llama-2-7B, Llama-3-8B, Qwen-2.5-7B, Phi-4)
_CONFIGS: dict[tuple, GemvConfig] = {
    (4096, 12288, True): _BASE, (11008, 4096, True): _PRE,          # llama-2-7b q/k/v, down
    (4096, 28672, True): _BASE,                                      # llama-3-8b gate/up
    (5120, 7680, True): _BASE, (17920, 5120, True): _PRE,           # phi-4 q/k/v, down
}


def set_config(k: int, n: int, cfg: GemvConfig, sparse: Optional[bool] = None) -> None:
    """Use ``cfg`` for every GEMV with K inputs and N outputs (for the sparse or the dense variant
    only, when ``sparse`` is given), e.g. the winner of a sweep."""
    key = (int(k), int(n)) if sparse is None else (int(k), int(n), bool(sparse))
    _CONFIGS[key] = cfg


def set_role_config(role: str, cfg: GemvConfig, sparse: bool) -> None:
    """Use ``cfg`` for the decode step's ``role`` launches (one of :data:`ROLES`), dense or sparse,
    on every shape without an exact entry."""
    if role not in ROLES:
        raise InvalidArgument(f"unknown GEMV role {role!r}; one of {', '.join(ROLES)}")
    _ROLE_CONFIGS[(role, bool(sparse))] = cfg


def config_for(k: int, n: int, sparse: Optional[bool] = None, role: Optional[str] = None) -> GemvConfig:
    if sparse is not None and (int(k), int(n), bool(sparse)) in _CONFIGS:
        return _CONFIGS[(int(k), int(n), bool(sparse))]
    if (int(k), int(n)) in _CONFIGS:
        return _CONFIGS[(int(k), int(n))]
    if role is not None and (role, bool(sparse)) in _ROLE_CONFIGS:
        return _ROLE_CONFIGS[(role, bool(sparse))]
    return DEFAULT_SPARSE_CONFIG if sparse else DEFAULT_CONFIG


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def plan_gemv(m: int, k: int, n: int, bounds: Sequence[int], cfg: GemvConfig, sparse: bool = False):
    """Block sizes and K split of one launch:
    (block_m, block_n, block_k, n_blocks, split, k_per_split).

    Single-row sparse launches split K into power-of-two chunks (``k_per_split``), each compacted
    in the kernel before its weight rows are streamed."""
    block_n = cfg.block_n
    while block_n > 16 and any(b % block_n for b in bounds):
        block_n //= 2
    if any(b % block_n for b in bounds):
        raise InvalidArgument(f"segment bounds {list(bounds)} are not multiples of 16")
    n_blocks = -(-n // block_n)
    block_m = 1 if m == 1 else _next_pow2(m)
    block_k = cfg.block_k if block_m == 1 else max(8, min(cfg.block_k, 2048 // (block_m * block_n) * 8))
    if block_m == 1 and sparse:
        want = -(-k * n_blocks // max(1, cfg.programs))
        kps = min(4096, max(64, block_k, _next_pow2(want)))
        return block_m, block_n, block_k, n_blocks, -(-k // kps), kps
    max_split = -(-k // block_k)
    split = max(1, min(max_split, round(cfg.programs / n_blocks)))
    k_per_split = -(-(-(-k // split)) // block_k) * block_k
    split = -(-k // k_per_split)
    return block_m, block_n, block_k, n_blocks, split, k_per_split


# ------------------------------------------------------------------------------------------------
# references (plain torch): the semantics, the CPU path, and the test oracle
# ------------------------------------------------------------------------------------------------
def _segments(n: int, bounds: Sequence[int]) -> list[tuple[int, int]]:
    edges = [0, *[int(b) for b in bounds], n]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def _prepare_input(x: torch.Tensor, k: int, ssq_in: Optional[torch.Tensor], eps: float, act: int):
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
    """The semantics of :func:`gemv` in plain torch. Returns (y, ssq_out[M, 1]).

    ``compute_dtype=None`` does everything in fp32 (the test oracle); the engine passes the model's
    dtype so that a long prefill on the GPU runs as a bf16 cuBLAS matmul. ``dense_rows``: the first
    rows of x are never gated (the sparsifier's dense prefix)."""
    k, n = wt.shape
    xf = _prepare_input(x, k, ssq_in, eps, act)
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


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _gemv_finish(acc, offs_m, offs_n, m_ok, n_ok, pid_n, N, nb_out,
                     y_ptr, bias_ptr, res_ptr, ssq_out_ptr,
                     q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, n_heads, n_kv, s_max, rot,
                     HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, OUT_SSQ: tl.constexpr,
                     ROPE: tl.constexpr, HD: tl.constexpr):
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
    def _load_x(x_ptr, offs, k_ok, K, rstd, ACT: tl.constexpr, PRE_NORM: tl.constexpr):
        """The GEMV input at ``offs`` (one row): SiLU(gate)·up for down_proj, RMS-normalised."""
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
    def _dense_tiles(x_ptr, wt_ptr, offs_n, n_ok, k_lo, k_hi, K, N, rstd, acc,
                     BLOCK_K: tl.constexpr, ACT: tl.constexpr, PRE_NORM: tl.constexpr):
        """acc += W[k_lo:k_hi, block]ᵀ·x[k_lo:k_hi] (one row), BLOCK_K input rows per step."""
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xv = _load_x(x_ptr, offs_k, k_ok, K, rstd, ACT, PRE_NORM)
            w = tl.load(wt_ptr + offs_k[:, None] * N + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * xv[:, None]
        return acc

    @triton.jit
    def _gemv_kernel(x_ptr, wt_ptr, y_ptr, c_ptr, t_ptr, bias_ptr, res_ptr, ssq_in_ptr, ssq_out_ptr,
                     ws_ptr, cnt_ptr, scr_ptr, kept_ptr,
                     q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, n_heads, n_kv, s_max, rot,
                     M, K, N, b1, b2, stride_xm, nb_in, nb_out, eps, k_per_split, n_split,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NB_P: tl.constexpr, SPARSE: tl.constexpr, PRE_NORM: tl.constexpr,
                     ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                     OUT_SSQ: tl.constexpr, USE_WS: tl.constexpr, KPS: tl.constexpr,
                     PIPE: tl.constexpr, PRECOMP: tl.constexpr, SPLIT_C: tl.constexpr,
                     ROPE: tl.constexpr, HD: tl.constexpr):
        """One program (output block, K-split) of the GEMV; see :func:`gemv`."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        k_lo = pid_s * k_per_split
        k_hi = k_lo + k_per_split
        if SPARSE:
            n0 = pid_n * BLOCK_N
            seg = (n0 >= b1).to(tl.int32) + (n0 >= b2).to(tl.int32)
            thr = tl.load(t_ptr + seg)
            c_row = c_ptr + seg * K
        if BLOCK_M == 1:
            rstd = 1.0
            if PRE_NORM:
                offs_b = tl.arange(0, NB_P)
                ssq = tl.load(ssq_in_ptr + offs_b, mask=offs_b < nb_in, other=0.0)
                rstd = tl.rsqrt(tl.sum(ssq, 0) / K + eps)
            acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
            if SPARSE:
                if PRECOMP:
                    # the kept lists of (segment, split) were written by _compact_kernel
                    base = (seg * n_split + pid_s) * (2 * KPS)
                    count = tl.load(kept_ptr + seg * n_split + pid_s)
                else:
                    # 1) score the KPS inputs of this split, 2) compact the kept ones (index and
                    # value) into this program's scratch, 3) stream only their weight rows, in full
                    # tiles.
                    offs_c = k_lo + tl.arange(0, KPS)
                    c_ok = offs_c < K
                    xa = _load_x(x_ptr, offs_c, c_ok, K, rstd, ACT, PRE_NORM)
                    c = tl.load(c_row + offs_c, mask=c_ok, other=0.0)
                    keep = c_ok & (tl.abs(xa) * c > thr)
                    ki = keep.to(tl.int32)
                    slot = tl.cumsum(ki, 0) - 1
                    count = tl.sum(ki, 0)
                    base = (pid_s * nb_out + pid_n) * (2 * KPS)
                    tl.store(scr_ptr + base + slot, offs_c.to(tl.float32, bitcast=False), mask=keep)
                    tl.store(scr_ptr + base + KPS + slot, xa, mask=keep)
                    tl.debug_barrier()
                # the kept indices of tile j+1 are fetched while tile j's weight rows are in flight
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
                        acc2 += w.to(tl.float32) * xs[:, None]
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
                        acc2 += w.to(tl.float32) * xs[:, None]
                        xs = xs_n
                        j_ok = jn_ok
            else:
                acc2 = _dense_tiles(x_ptr, wt_ptr, offs_n, n_ok, k_lo, k_hi, K, N, rstd, acc2,
                                    BLOCK_K, ACT, PRE_NORM)
            part = tl.sum(acc2, 0)[None, :]
        else:
            if PRE_NORM:
                offs_b = tl.arange(0, NB_P)
                ssq = tl.load(ssq_in_ptr + offs_m[:, None] * nb_in + offs_b[None, :],
                              mask=m_ok[:, None] & (offs_b[None, :] < nb_in), other=0.0)
                rstd = tl.rsqrt(tl.sum(ssq, 1) / K + eps)
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                xm = offs_m[:, None] * stride_xm + offs_k[None, :]
                mk = m_ok[:, None] & k_ok[None, :]
                if ACT == 1:
                    g = tl.load(x_ptr + xm, mask=mk, other=0.0).to(tl.float32)
                    u = tl.load(x_ptr + K + xm, mask=mk, other=0.0).to(tl.float32)
                    xv = g / (1.0 + tl.exp(-g)) * u
                else:
                    xv = tl.load(x_ptr + xm, mask=mk, other=0.0).to(tl.float32)
                if PRE_NORM:
                    xv = xv * rstd[:, None]
                row_ok = k_ok
                if SPARSE:
                    c = tl.load(c_row + offs_k, mask=k_ok, other=0.0)
                    keep = (tl.abs(xv) * c[None, :] > thr) & mk
                    xv = tl.where(keep, xv, 0.0)
                    row_ok = k_ok & (tl.max(keep.to(tl.int32), 0) > 0)
                w = tl.load(wt_ptr + offs_k[:, None] * N + offs_n[None, :],
                            mask=row_ok[:, None] & n_ok[None, :], other=0.0)
                part += tl.sum(xv[:, :, None] * w.to(tl.float32)[None, :, :], 1)
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
                _gemv_finish(tot, offs_m, offs_n, m_ok, n_ok, pid_n, N, nb_out, y_ptr, bias_ptr,
                             res_ptr, ssq_out_ptr, q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr,
                             n_heads, n_kv, s_max, rot, HAS_BIAS, HAS_RES, OUT_SSQ, ROPE, HD)
                tl.store(cnt_ptr + pid_n, 0)
        else:
            _gemv_finish(part, offs_m, offs_n, m_ok, n_ok, pid_n, N, nb_out, y_ptr, bias_ptr,
                         res_ptr, ssq_out_ptr, q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr,
                         n_heads, n_kv, s_max, rot, HAS_BIAS, HAS_RES, OUT_SSQ, ROPE, HD)

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
            offs_b = tl.arange(0, NB_P)
            ssq = tl.load(ssq_in_ptr + offs_b, mask=offs_b < nb_in, other=0.0)
            rstd = tl.rsqrt(tl.sum(ssq, 0) / K + eps)
        offs_c = pid_s * KPS + tl.arange(0, KPS)
        c_ok = offs_c < K
        xa = _load_x(x_ptr, offs_c, c_ok, K, rstd, ACT, PRE_NORM)
        c = tl.load(c_ptr + seg * K + offs_c, mask=c_ok, other=0.0)
        keep = c_ok & (tl.abs(xa) * c > tl.load(t_ptr + seg))
        ki = keep.to(tl.int32)
        slot = tl.cumsum(ki, 0) - 1
        base = (seg * n_split + pid_s) * (2 * KPS)
        tl.store(scr_ptr + base + slot, offs_c.to(tl.float32, bitcast=False), mask=keep)
        tl.store(scr_ptr + base + KPS + slot, xa, mask=keep)
        tl.store(kept_ptr + seg * n_split + pid_s, tl.sum(ki, 0))

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, q_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr,
                           n_heads, n_kv, s_max, rot,
                           HD: tl.constexpr, BLOCK_D: tl.constexpr):
        h = tl.program_id(0)
        pos = tl.load(pos_ptr).to(tl.int32)
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
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vbase + offs[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
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


# ------------------------------------------------------------------------------------------------
# per-device scratch: split-K partial sums and the per-block arrival counters
# ------------------------------------------------------------------------------------------------
_SCRATCH: dict = {}
_KEEP_ALIVE: list = []        # old workspaces stay alive: captured graphs may still point at them
_N_COUNTERS = 1 << 16
_ATTN_COUNTERS = 1 << 15      # attention uses the upper half of the counter array


def _counters(device) -> torch.Tensor:
    key = ("cnt", str(device))
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.zeros(_N_COUNTERS, dtype=torch.int32, device=device)
    return _SCRATCH[key]


def _workspace(device, numel: int, tag: str = "ws", dtype=torch.float32, min_numel: int = 1 << 20) -> torch.Tensor:
    """A zeroed per-device scratch buffer of at least ``numel`` elements, kept under ``tag`` (grown,
    never shrunk; the old one stays alive for graphs captured with it)."""
    key = (tag, str(device))
    ws = _SCRATCH.get(key)
    if ws is None or ws.numel() < numel:
        if ws is not None:
            _KEEP_ALIVE.append(ws)
        ws = torch.zeros(max(numel, min_numel), dtype=dtype, device=device)
        _SCRATCH[key] = ws
    return ws


def reserve_workspace(device, numel: int, tag: str = "ws") -> None:
    """Allocate scratch ahead (before a CUDA graph capture)."""
    _workspace(device, numel, tag)
    _counters(device)


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


def _n_sm(device) -> int:
    key = ("sm", str(device))
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SCRATCH[key]


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
def _gemv_triton(x, wt, scales, thresholds, bounds, bias, res, ssq_in, eps, act, want_ssq, sparse,
                 cfg: GemvConfig, compacted: bool = False, rope=None, info: Optional[dict] = None):
    """Launch the GEMV (and the compaction pre-pass); returns (y or the rotated q, ssq). ``rope`` =
    (cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim) fuses RoPE + the KV-cache write into
    the finishing programs (one row, output blocks holding whole heads); the rotated q is then
    returned in place of y. ``compacted=True``: the pre-compacted kept lists are already there
    (benchmarks only). ``info``: a dict to receive the launch's programs, and the compiled kernel's
    registers and spills (for benchmarks: ptxas's register count decides how many programs share an
    SM, docs/gpu-notes.md run 11)."""
    m = x.shape[0]
    k, n = wt.shape
    if k * n >= 2 ** 31 or m * n * 64 >= 2 ** 31:
        raise InvalidArgument(f"gemv: {k}x{n} is too large for 32-bit offsets")
    block_m, block_n, block_k, n_blocks, split, k_per_split = plan_gemv(m, k, n, bounds, cfg, sparse)
    compact = sparse and block_m == 1
    precomp = compact and bool(cfg.precompact)
    dev = x.device
    y = torch.empty(m, n, dtype=x.dtype, device=dev)
    ssq_out = torch.empty(m, n_blocks, dtype=torch.float32, device=dev) if want_ssq else y
    ws = _workspace(dev, split * m * n, "ws") if split > 1 else y
    n_seg = len(bounds) + 1
    scr = (_workspace(dev, (n_seg if precomp else n_blocks) * split * 2 * k_per_split, "scr")
           if compact else y)
    cnt = _counters(dev)
    b = [int(v) for v in bounds] + [n, n]
    nb_in = ssq_in.shape[1] if ssq_in is not None else 1
    kept = y
    rp = (y, y, y, y, y, y, 0, 0, 0, 0)
    hd = 16
    if rope is not None:
        cos, sin, pos, k_cache, v_cache, n_heads, n_kv, hd = rope
        if m != 1 or block_n % hd:
            raise InvalidArgument("gemv: RoPE fuses only into single-row launches whose blocks hold whole heads")
        q = torch.empty(1, n_heads * hd, dtype=x.dtype, device=dev)
        rp = (q, k_cache, v_cache, cos, sin, pos, n_heads, n_kv, k_cache.shape[2], cos.shape[1])
    if precomp:
        kept = _workspace(dev, n_seg * split, "kept", torch.int32, 4096)
        if not compacted:      # compacted=True: the lists are already there (benchmarks only)
            _compact_kernel[(n_seg, split)](
                x, scales, thresholds, ssq_in if ssq_in is not None else y, scr, kept, k, nb_in,
                float(eps), split, KPS=k_per_split, NB_P=max(2, _next_pow2(nb_in)), ACT=int(act),
                PRE_NORM=ssq_in is not None, num_warps=COMPACT_WARPS)
    args = [x, wt, y, scales if sparse else y, thresholds if sparse else y,
            bias if bias is not None else y, res if res is not None else y,
            ssq_in if ssq_in is not None else y, ssq_out, ws, cnt, scr, kept, *rp,
            m, k, n, b[0], b[1], x.stride(0), nb_in, n_blocks, float(eps), k_per_split, split]
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NB_P=max(2, _next_pow2(nb_in)),
                SPARSE=bool(sparse), PRE_NORM=ssq_in is not None, ACT=int(act), HAS_BIAS=bias is not None,
                HAS_RES=res is not None, OUT_SSQ=bool(want_ssq), USE_WS=split > 1,
                KPS=k_per_split if compact else 16, PIPE=bool(compact and cfg.pipeline), PRECOMP=precomp,
                SPLIT_C=_split_rows(split, block_n), ROPE=rope is not None, HD=hd)
    grid = (n_blocks, split)
    compiled = _gemv_kernel[grid](*args, **meta, **cfg.launch_options())
    if info is not None:
        info["programs"] = int(grid[0]) * int(grid[1])
        try:
            compiled._init_handles()          # loads the binary (lazily done by Triton) and its counts
            info["regs"], info["spills"] = int(compiled.n_regs), int(compiled.n_spills)
        except Exception:                     # the interpreter, or a Triton without these fields
            pass
    if not want_ssq:
        ssq_out = torch.empty(m, 0, dtype=torch.float32, device=dev)
    return (y if rope is None else rp[0]), ssq_out


def rope_fuses(m: int, k: int, n: int, bounds: Sequence[int], cfg: GemvConfig, sparse: bool,
               head_dim: int) -> bool:
    """Whether RoPE can be fused into this GEMV launch (see :func:`gemv_rope`)."""
    return m == 1 and plan_gemv(m, k, n, bounds, cfg, sparse)[1] % head_dim == 0


def _split_rows(split: int, block_n: int) -> int:
    """Partial-sum rows the finishing program loads at once (≤ 4096 fp32 values in registers)."""
    return max(1, min(_next_pow2(split), 4096 // block_n))


def _attn_decode_triton(q, k_cache, v_cache, pos, window: int, n_split: int):
    n_kv, s_max, hd = k_cache.shape[1:]
    g = q.shape[1] // hd // n_kv
    g_p = max(16, _next_pow2(g))
    o = torch.empty_like(q)
    ws = _workspace(q.device, n_kv * n_split * g_p * (hd + 2), "attn")
    cnt = _counters(q.device)[_ATTN_COUNTERS:]
    _attn_decode_kernel[(n_kv, n_split)](
        q, k_cache, v_cache, o, pos, ws, cnt, n_kv, s_max, n_split, int(window), 1.0 / math.sqrt(hd),
        G=g, G_P=g_p, HD=hd, BLOCK_S=64 if hd <= 128 else 32, NS_P=_next_pow2(n_split), num_warps=4)
    return o


def _check_gemv_args(x, wt, scales, thresholds, bounds, act, sparse):
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
            return _gemv_triton(x, wt, scales, thresholds, bounds, bias, res, ssq_in, eps, act,
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
else:  # pragma: no cover - very old torch
    _gemv_op = None


def _config_ints(cfg: GemvConfig) -> list[int]:
    """A GemvConfig as the int list the custom ops take (torch.library has no dataclass arguments)."""
    return [int(v) for v in dataclasses.astuple(cfg)]


def gemv(x: torch.Tensor, wt: torch.Tensor, *, scales: Optional[torch.Tensor] = None,
         thresholds: Optional[torch.Tensor] = None, bounds: Sequence[int] = (),
         bias: Optional[torch.Tensor] = None, res: Optional[torch.Tensor] = None,
         ssq_in: Optional[torch.Tensor] = None, eps: float = 1e-6, act: int = ACT_NONE,
         want_ssq: bool = False, sparse: bool = False, config: Optional[GemvConfig] = None,
         role: Optional[str] = None):
    """y = W·x with optional fused RMSNorm, SiLU·up, WINA/TEAL gating, bias and residual.

    x [M, K] (or [M, 2K] with act=ACT_SILU_MUL), wt [K, N] input-channel-major (W.T contiguous),
    scales [S, K] fp32 and thresholds [S] fp32 for the S = len(bounds) + 1 output segments.
    Returns (y [M, N] in x's dtype, ssq [M, nb] fp32; nb = 0 unless want_ssq). ``config``: the
    launch's GemvConfig (default: :func:`config_for` of the shape and ``role``)."""
    sparse = bool(sparse)
    _check_gemv_args(x, wt, scales, thresholds, bounds, act, sparse)
    k, n = wt.shape
    cfg = config or config_for(k, n, sparse, role)
    return _gemv_op(x, wt, scales, thresholds, [int(b) for b in bounds], bias, res, ssq_in, float(eps),
                    int(act), bool(want_ssq), sparse, _config_ints(cfg))


if hasattr(torch.library, "custom_op"):
    @torch.library.custom_op("wina::rope_cache", mutates_args=("k_cache", "v_cache"))
    def _rope_cache_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int,
                       head_dim: int) -> torch.Tensor:
        if use_triton(qkv) and qkv.shape[0] == 1 and k_cache.shape[0] == 1:
            q = torch.empty(1, n_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
            _rope_cache_kernel[(n_heads + 2 * n_kv,)](
                qkv, q, k_cache, v_cache, cos, sin, pos, n_heads, n_kv, k_cache.shape[2], cos.shape[1],
                HD=head_dim, BLOCK_D=_next_pow2(head_dim), num_warps=1)
            return q
        return rope_cache_reference(qkv, cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim)

    @_rope_cache_op.register_fake
    def _(qkv, cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim):
        return qkv.new_empty(qkv.shape[0], n_heads * head_dim)

    @torch.library.custom_op("wina::attn_decode", mutates_args=())
    def _attn_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        pos: torch.Tensor, window: int, n_split: int) -> torch.Tensor:
        hd = k_cache.shape[3]
        if (use_triton(q) and q.shape[0] == 1 and k_cache.shape[0] == 1 and hd >= 16
                and hd == _next_pow2(hd)):
            return _attn_decode_triton(q, k_cache, v_cache, pos, window, n_split)
        return attention_reference(q, k_cache, v_cache, pos, window)

    @_attn_decode_op.register_fake
    def _(q, k_cache, v_cache, pos, window, n_split):
        return torch.empty_like(q)


if hasattr(torch.library, "custom_op"):
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
            q, _ = _gemv_triton(x, wt, scales, thresholds, bounds, bias, None, ssq_in, eps, ACT_NONE, False,
                                sparse, cfg, rope=(cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim))
            return q
        qkv, _ = _gemv_op(x, wt, scales, thresholds, bounds, bias, None, ssq_in, eps, ACT_NONE, False, sparse,
                          config)
        return _rope_cache_op(qkv, cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim)

    @_gemv_rope_op.register_fake
    def _(x, wt, scales, thresholds, bounds, bias, ssq_in, eps, sparse, cos, sin, pos, k_cache, v_cache,
          n_heads, n_kv, head_dim, config):
        return x.new_empty(x.shape[0], n_heads * head_dim)


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
    _check_gemv_args(x, wt, scales, thresholds, bounds, ACT_NONE, sparse)
    k, n = wt.shape
    if n != (n_heads + 2 * n_kv) * head_dim:
        raise InvalidArgument(f"gemv_rope: {n} outputs, expected (n_heads + 2 n_kv) * head_dim")
    cfg = config or config_for(k, n, sparse, role)
    return _gemv_rope_op(x, wt, scales, thresholds, [int(b) for b in bounds], bias, ssq_in, float(eps), sparse,
                         cos, sin, pos, k_cache, v_cache, int(n_heads), int(n_kv), int(head_dim),
                         _config_ints(cfg))


def rope_cache(qkv, cos, sin, pos, k_cache, v_cache, n_heads: int, n_kv: int, head_dim: int):
    """RoPE + KV-cache write (see :func:`rope_cache_reference`); returns the rotated q."""
    return _rope_cache_op(qkv, cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim)


def attn_decode(q, k_cache, v_cache, pos, window: int = 0, n_split: int = 0):
    """Attention of the token at position ``pos`` (device tensor) over the cache."""
    if n_split <= 0:
        n_kv, s_max = k_cache.shape[1], k_cache.shape[2]
        n_sm = _n_sm(q.device) if q.is_cuda else 132
        n_split = max(1, min(-(-2 * n_sm // n_kv), -(-s_max // 64)))
    return _attn_decode_op(q, k_cache, v_cache, pos, int(window), int(n_split))
