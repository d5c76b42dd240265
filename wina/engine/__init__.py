"""Static-cache decode engine over a transformers model's weights (CUDA graphs + fused sparse GEMVs
on a GPU, plain torch on a CPU). See :mod:`.decoder`."""
from .decoder import Engine, GenerationResult, Group, Layer
from .chat import engine_available, engine_for, engine_stream_generate

__all__ = ["Engine", "GenerationResult", "Group", "Layer", "engine_available", "engine_for",
           "engine_stream_generate"]
