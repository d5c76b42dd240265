"""Generation settings: the one rule for what a reply may be sampled with (:func:`check_sampling`),
which the chat session, the engine, the portable generator, ``wina chat`` and the TUI all apply,
and the smallest temperature a sampler divides by. Plain Python: no torch here."""
from __future__ import annotations

import math
from typing import Optional

from .errors import InvalidArgument

MIN_TEMPERATURE = 1e-6     # a smaller temperature samples as this one (the logits stay finite)


def check_sampling(max_new_tokens: Optional[int] = None, temperature: float = 0.0, top_p: float = 1.0, *,
                   options: bool = False) -> None:
    """Refuse what a reply cannot be generated with: ``max_new_tokens`` (when given) below 1, a
    ``temperature`` that is not a finite number >= 0 (0 is greedy), a ``top_p`` outside (0, 1]; a
    NaN or an infinity is refused here, never sampled with. ``options``: the
    error names them as the command line does (``--max-new-tokens``, ``--temperature``, ``--top-p``)."""
    def name(key: str) -> str:
        return "--" + key.replace("_", "-") if options else key

    def number(v) -> float:              # NaN for what is no number (a string, a bool, None)
        if isinstance(v, (bool, str)):
            return math.nan
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    if max_new_tokens is not None and not number(max_new_tokens) >= 1:
        raise InvalidArgument(f"{name('max_new_tokens')} must be at least 1, got {max_new_tokens}")
    t, p = number(temperature), number(top_p)
    if not (math.isfinite(t) and t >= 0):
        raise InvalidArgument(f"{name('temperature')} must be a finite number >= 0 (0 is greedy), got {temperature}")
    if not 0 < p <= 1:                               # NaN fails this too
        raise InvalidArgument(f"{name('top_p')} must be in (0, 1], got {top_p}")
