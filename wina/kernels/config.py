"""GEMV launch configs: the tuned tables (exact shape, decode-step role, default) and the plan of one
launch (block sizes and K split).

A launch's config comes from, in order: an entry for its exact (K, N[, sparse]) (:func:`set_config`),
the entry for its role in the decode step (:func:`set_role_config`; the engine names the role), the
default. The defaults are the H200 runs' winners (docs/gpu-notes.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import InvalidArgument


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


def config_ints(cfg: GemvConfig) -> list[int]:
    """A GemvConfig as the int list the custom ops take (torch.library has no dataclass arguments);
    ``GemvConfig(*ints)`` gives it back."""
    return [int(v) for v in dataclasses.astuple(cfg)]


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


def clear_shape_configs(sparse: Optional[bool] = None) -> None:
    """Forget the exact-shape entries (:func:`set_config` and the tuned ones above) that are keyed
    for the sparse or the dense variant only, per ``sparse``; None: every exact-shape entry. Such
    launches then take their role's config (a probe that times role configs on those shapes)."""
    for key in [k for k in _CONFIGS if sparse is None or (len(k) == 3 and k[2] == bool(sparse))]:
        del _CONFIGS[key]


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


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def plan_gemv(m: int, k: int, n: int, bounds: Sequence[int], cfg: GemvConfig, sparse: bool = False):
    """Block sizes and K split of one launch:
    (block_m, block_n, block_k, n_blocks, split, k_per_split).

    Single-row sparse launches split K into power-of-two chunks (``k_per_split``), each compacted
    before its weight rows are streamed."""
    block_n = cfg.block_n
    while block_n > 16 and any(b % block_n for b in bounds):
        block_n //= 2
    if any(b % block_n for b in bounds):
        raise InvalidArgument(f"segment bounds {list(bounds)} are not multiples of 16")
    n_blocks = -(-n // block_n)
    block_m = 1 if m == 1 else next_pow2(m)
    block_k = cfg.block_k if block_m == 1 else max(8, min(cfg.block_k, 2048 // (block_m * block_n) * 8))
    if block_m == 1 and sparse:
        want = -(-k * n_blocks // max(1, cfg.programs))
        kps = min(4096, max(64, block_k, next_pow2(want)))
        return block_m, block_n, block_k, n_blocks, -(-k // kps), kps
    max_split = -(-k // block_k)
    split = max(1, min(max_split, round(cfg.programs / n_blocks)))
    k_per_split = -(-(-(-k // split)) // block_k) * block_k
    split = -(-k // k_per_split)
    return block_m, block_n, block_k, n_blocks, split, k_per_split


def rope_fuses(m: int, k: int, n: int, bounds: Sequence[int], cfg: GemvConfig, sparse: bool,
               head_dim: int) -> bool:
    """Whether RoPE can be fused into this GEMV launch (one row, output blocks holding whole heads;
    see :func:`wina.kernels.gemv_rope`)."""
    return m == 1 and plan_gemv(m, k, n, bounds, cfg, sparse)[1] % head_dim == 0
