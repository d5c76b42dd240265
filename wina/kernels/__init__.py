"""Fused activation-sparse GEMV kernels (Triton on CUDA, plain torch elsewhere). See :mod:`.kernels`."""
from .kernels import (ACT_NONE, ACT_SILU_MUL, DEFAULT_CONFIG, HAS_TRITON, MAX_KERNEL_ROWS, GemvConfig,
                      attention_reference, attn_decode, config_for, gemv, gemv_reference, gemv_rope,
                      plan_gemv, reserve_workspace, rope_cache, rope_cache_reference, set_config, set_role_config,
                      use_triton)

__all__ = ["ACT_NONE", "ACT_SILU_MUL", "DEFAULT_CONFIG", "HAS_TRITON", "MAX_KERNEL_ROWS", "GemvConfig",
           "attention_reference", "attn_decode", "config_for", "gemv", "gemv_reference", "gemv_rope",
           "plan_gemv", "reserve_workspace", "rope_cache", "rope_cache_reference", "set_config",
           "set_role_config", "use_triton"]
