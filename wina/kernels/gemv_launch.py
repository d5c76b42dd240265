"""GEMV launches: the plan of a launch (:func:`.config.plan_gemv`), its output and scratch buffers,
which kernel runs it (:mod:`.dense_gemv` or :mod:`.sparse_gemv`), the compaction launch in front of a
sparse one that reads pre-compacted lists (:func:`.scoring.compact_inputs`), and, for benchmarks,
the compiled kernel's registers."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import InvalidArgument
from .config import GemvConfig, next_pow2, plan_gemv
from .runtime import HAS_TRITON, counters, workspace
from .scoring import compact_inputs

if HAS_TRITON:  # the kernels exist only where Triton does (launch_gemv is called only there)
    from .dense_gemv import dense_gemv_kernel
    from .sparse_gemv import sparse_gemv_kernel


def split_rows(split: int, block_n: int) -> int:
    """Partial-sum rows the finishing program loads at once (≤ 4096 fp32 values in registers)."""
    return max(1, min(next_pow2(split), 4096 // block_n))


def kept_lists(x, wt, scales, thresholds, bounds, ssq_in, eps: float, act: int, cfg: GemvConfig):
    """The compaction launch alone for a single-row sparse GEMV with config ``cfg``: its kept lists
    (see :func:`.scoring.compact_inputs`), to pass to :func:`launch_gemv` as ``lists``."""
    k, n = wt.shape
    _, _, _, _, split, kps = plan_gemv(1, k, n, bounds, cfg, True)
    return compact_inputs(x, scales, thresholds, ssq_in, eps, act, split, kps)


def launch_gemv(x, wt, scales, thresholds, bounds, bias, res, ssq_in, eps, act, want_ssq, sparse,
                cfg: GemvConfig, rope=None, lists=None, info: Optional[dict] = None):
    """Launch one GEMV (Triton; the arguments as :func:`wina.kernels.gemv`'s); returns (y or the
    rotated q, ssq). ``rope`` = (cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim) fuses
    RoPE + the KV-cache write into the finishing programs (one row, output blocks holding whole
    heads); the rotated q is then returned in place of y. A single-row sparse launch whose config
    pre-compacts runs the compaction launch first, unless ``lists`` (from :func:`kept_lists`) are
    given: then it reads those. ``info``: a dict to receive the launch's programs, and the compiled
    kernel's registers and spills (for benchmarks: ptxas's register count decides how many programs
    share an SM, docs/gpu-notes.md run 11)."""
    m = x.shape[0]
    k, n = wt.shape
    if k * n >= 2 ** 31 or m * n * 64 >= 2 ** 31:
        raise InvalidArgument(f"gemv: {k}x{n} is too large for 32-bit offsets")
    block_m, block_n, block_k, n_blocks, split, k_per_split = plan_gemv(m, k, n, bounds, cfg, sparse)
    dev = x.device
    y = torch.empty(m, n, dtype=x.dtype, device=dev)
    ssq_out = torch.empty(m, n_blocks, dtype=torch.float32, device=dev) if want_ssq else y
    ws = workspace(dev, split * m * n, "ws") if split > 1 else y
    cnt = counters(dev)
    nb_in = ssq_in.shape[1] if ssq_in is not None else 1
    rp = (y, y, y, y, y, y, 0, 0, 0, 0)
    hd = 16
    if rope is not None:
        cos, sin, pos, k_cache, v_cache, n_heads, n_kv, hd = rope
        if m != 1 or block_n % hd:
            raise InvalidArgument("gemv: RoPE fuses only into single-row launches whose blocks hold whole heads")
        q = torch.empty(1, n_heads * hd, dtype=x.dtype, device=dev)
        rp = (q, k_cache, v_cache, cos, sin, pos, n_heads, n_kv, k_cache.shape[2], cos.shape[1])
    vec = (bias if bias is not None else y, res if res is not None else y, ssq_in if ssq_in is not None else y,
           ssq_out, ws, cnt)
    shape = (m, k, n)
    plan = (x.stride(0), nb_in, n_blocks, float(eps), k_per_split, split)
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NB_P=max(2, next_pow2(nb_in)),
                PRE_NORM=ssq_in is not None, ACT=int(act), HAS_BIAS=bias is not None, HAS_RES=res is not None,
                OUT_SSQ=bool(want_ssq), USE_WS=split > 1, SPLIT_C=split_rows(split, block_n),
                ROPE=rope is not None, HD=hd)
    grid = (n_blocks, split)
    if sparse:
        compact = block_m == 1
        precomp = compact and (bool(cfg.precompact) or lists is not None)
        scr = kept = y
        if precomp:
            scr, kept = lists if lists is not None else compact_inputs(
                x, scales, thresholds, ssq_in, eps, act, split, k_per_split)
        elif compact:
            scr = workspace(dev, n_blocks * split * 2 * k_per_split, "scr")
        b = [int(v) for v in bounds] + [n, n]
        compiled = sparse_gemv_kernel[grid](
            x, wt, y, scales, thresholds, *vec, scr, kept, *rp, *shape, b[0], b[1], *plan,
            **meta, KPS=k_per_split if compact else 16, PIPE=bool(compact and cfg.pipeline), PRECOMP=precomp,
            **cfg.launch_options())
    else:
        compiled = dense_gemv_kernel[grid](x, wt, y, *vec, *rp, *shape, *plan, **meta, **cfg.launch_options())
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
