"""Perplexity on a text, fast: token-level, fixed non-overlapping windows.

The text is tokenised once (no BOS added), cut to ``max_tokens``, split into windows of
``context`` tokens with stride = context (a last partial window is dropped), and every window is
scored independently: each token but a window's first is predicted from the tokens before it in
its window. Perplexity = exp(mean NLL over all predicted tokens). Defaults: context 512, all tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import DataError, InvalidArgument
from .events import CancelToken, ProgressCallback, Reporter


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float            # mean negative log-likelihood (nats per token)
    tokens: int           # tokens predicted
    windows: int
    context: int


def read_text(path: Union[str, Path]) -> str:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file not found: {path}")
    return p.read_text(encoding="utf-8", errors="replace")


@torch.no_grad()
def perplexity(model, tokenizer, text: str, *, context: int = 512, max_tokens: Optional[int] = None,
               batch_size: int = 1, on_event: Optional[ProgressCallback] = None,
               cancel: Optional[CancelToken] = None) -> PerplexityResult:
    if context < 2:
        raise InvalidArgument(f"context must be at least 2 tokens, got {context}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = ids.numel() // context
    if n_windows == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of {context}")
    windows = ids[: n_windows * context].view(n_windows, context)
    device = next(model.parameters()).device
    from .distributed import all_reduce_sum, shard
    mine = list(shard(n_windows))                      # all windows, unless data-parallel
    rep = Reporter("ppl", len(mine), on_event, cancel)
    rep.emit(0)
    total_nll, total_tok = 0.0, 0
    for start in range(0, len(mine), batch_size):
        batch = windows[mine[start:start + batch_size]].to(device)
        logits = model(batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        total_nll += float(nll.double().sum())          # float64 sum: float32 hides 1e-5 changes
        total_tok += batch[:, 1:].numel()
        rep.emit(min(start + batch_size, len(mine)), ppl=math.exp(total_nll / total_tok))
    total_nll, total_tok = all_reduce_sum([total_nll, total_tok])
    mean = total_nll / total_tok
    return PerplexityResult(math.exp(mean), mean, int(total_tok), n_windows, context)
