"""Static-cache decode engine over a transformers model's weights (CUDA graphs + fused sparse GEMVs
on a GPU, plain torch on a CPU). See :mod:`.decoder`. The engine knows nothing of text or chat:
:mod:`wina.generate` and :mod:`wina.chat` drive it."""
from .decoder import Engine, GenerationResult, Group, KVCache, Layer

__all__ = ["Engine", "GenerationResult", "Group", "KVCache", "Layer"]
