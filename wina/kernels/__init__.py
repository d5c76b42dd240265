"""Fused activation-sparse GEMV kernels (Triton on CUDA, plain torch elsewhere) for the decode engine.

Modules, one role each:

* :mod:`.ops` — the public ops (:func:`gemv`, :func:`gemv_rope`, :func:`rope_cache`,
  :func:`attn_decode`) as ``torch.library`` custom ops, dispatching to Triton or the references;
* :mod:`.reference` — the semantics in plain torch (CPU path, prefill, test oracle);
* :mod:`.config` — launch configs (exact shape, decode-step role, default) and the plan of a launch;
* :mod:`.gemv_launch` — a GEMV launch: buffers, which kernel, the pre-compaction launch;
* :mod:`.scoring` — the input as loaded (SiLU·up, RMSNorm), the gate, the compaction of kept inputs;
* :mod:`.dense_gemv`, :mod:`.sparse_gemv` — the two GEMV kernels;
* :mod:`.epilogue` — split-K reduction, bias, residual, sums of squares, fused RoPE of a GEMV program;
* :mod:`.attention` — RoPE + cache write and flash-decoding of one query row;
* :mod:`.masking` — the threshold gate over whole activation tensors (the allocation's trials);
* :mod:`.prefill` — a prompt's passes around its cuBLAS matmuls (gated input, bias + residual);
* :mod:`.runtime` — Triton availability, per-device scratch and arrival counters.
"""
from .config import DEFAULT_CONFIG, GemvConfig, config_for, plan_gemv, set_config, set_role_config
from .ops import MAX_KERNEL_ROWS, attn_decode, gemv, gemv_rope, rope_cache
from .reference import (ACT_NONE, ACT_SILU_MUL, attention_reference, gemv_reference, prepare_input,
                        rope_cache_reference)
from .runtime import HAS_TRITON, reserve_workspace, use_triton

__all__ = ["ACT_NONE", "ACT_SILU_MUL", "DEFAULT_CONFIG", "HAS_TRITON", "MAX_KERNEL_ROWS", "GemvConfig",
           "attention_reference", "attn_decode", "config_for", "gemv", "gemv_reference", "gemv_rope",
           "plan_gemv", "prepare_input", "reserve_workspace", "rope_cache", "rope_cache_reference",
           "set_config", "set_role_config", "use_triton"]
