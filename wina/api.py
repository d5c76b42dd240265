"""The public API in one import: ``from wina.api import load, transform, sparsify, perplexity``."""
from .accounting import FlopCount, SparsityReport, flops_per_token, report
from .adapters import ADAPTERS, SUPPORTED, adapter_for
from .errors import (Cancelled, DataError, InvalidArgument, ModelLoadError, PlanError,
                     TransformError, UnsupportedArchitecture, WinaError)
from .events import CancelToken, Progress, Reporter
from .models import EMBEDDED, Loaded, load
from .perplexity import PerplexityResult, perplexity, read_text
from .sparsify import GATINGS, METHODS, Sparsifier, sparsify
from .transform import is_transformed, shortcuts, transform

__all__ = [n for n in dir() if not n.startswith("_")]
from .generate import Generation, chat_input_ids, stream_generate  # noqa: E402
from .pipeline import SparseOptions, prepare  # noqa: E402
__all__ = [n for n in dir() if not n.startswith("_")]
