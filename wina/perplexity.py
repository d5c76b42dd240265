"""Perplexity on a text, fast: token-level, fixed non-overlapping windows.

Protocol ``"windows"`` (the default): the text is tokenised once (no BOS added), cut to
``max_tokens``, split into windows of ``context`` tokens with stride = context (a last partial window
is dropped), and every window is scored independently: each token but a window's first is predicted
from the tokens before it in its window. Perplexity = exp(mean NLL over all predicted tokens).
Defaults: context 512, all tokens.

Protocol ``"seed"`` (the official wina/ppl_test.py + utils/eval_ppl.py, microsoft/wina @8153dbf):
the text is read as wikitext rows (one per line, blank lines empty), the rows are shuffled with
numpy's ``default_rng(42).permutation`` (what ``datasets.Dataset.shuffle(seed=42)`` does) and the
first 1000 kept; each row plus ``"\n\n"`` is concatenated and tokenised with the tokenizer's
special tokens (BOS for Llama), cut to ``max_tokens``; windows of 2048 context + 512 scored tokens
slide with stride 512 over the first multiple of 512 tokens (the first window scores tokens
2048-2559), and the perplexity is exp of the mean of the windows' mean NLLs. The official script
also runs the model in bfloat16 on a GPU: that is the loader's dtype here, not part of the protocol.
See docs/seed-fidelity.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from . import files
from .errors import DataError, InvalidArgument
from .events import CancelToken, ProgressCallback, Reporter
from .interrupt import honours_cancel


PROTOCOLS = ("windows", "seed")
SEED_ROWS = 1000            # ppl_test.py --sample_size default
SEED_SHUFFLE = 42           # ppl_test.py --seed default
SEED_CONTEXT = 2048         # eval_ppl.py context_size
SEED_STRIDE = 512           # eval_ppl.py window_size (scored tokens per window, and the stride)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float            # mean negative log-likelihood (nats per token)
    tokens: int           # tokens predicted
    windows: int
    context: int
    protocol: str = "windows"


CONTEXT = 512               # the windows protocol's default window


def max_tokens_problem(max_tokens, protocol: str = "windows", context: int = CONTEXT) -> Optional[str]:
    """Why a token budget cannot give one scored window under ``protocol`` (None: it can). None (the
    whole text) is always fine; otherwise an integer of at least one window (``context`` tokens with
    "windows", more than the 512 scored tokens of a window with "seed")."""
    if max_tokens is None:
        return None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        return f"must be an integer, got {max_tokens!r}"
    if protocol == "seed":
        need, what = SEED_STRIDE + 1, f"more than the {SEED_STRIDE} scored tokens of one window of the seed protocol"
    else:
        need, what = max(int(context), 2), f"one window of {context} tokens; or give a shorter context"
    if max_tokens < need:
        return f"must be at least {need} ({what}), got {max_tokens}"
    return None


def check_options(max_tokens=None, protocol: str = "windows", context: int = CONTEXT, *,
                  name: str = "max_tokens") -> None:
    """The one check of perplexity settings, before any model is loaded: the protocol, the window,
    and a token budget (``name`` says what the caller calls it) that holds at least one window."""
    if protocol not in PROTOCOLS:
        raise InvalidArgument(f"unknown perplexity protocol {protocol!r}; choose {' or '.join(PROTOCOLS)}")
    if protocol == "windows" and (isinstance(context, bool) or not isinstance(context, int) or context < 2):
        raise InvalidArgument(f"context must be an integer of at least 2 tokens, got {context!r}")
    problem = max_tokens_problem(max_tokens, protocol, context)
    if problem is not None:
        raise InvalidArgument(f"{name} {problem}")


def check_max_tokens(max_tokens, protocol: str = "windows", context: int = CONTEXT) -> None:
    """None (the whole text) or an integer of at least one window (:func:`check_options`)."""
    check_options(max_tokens, protocol, context)


def read_text(path: Union[str, Path]) -> str:
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{path} is a folder, not a text file")
    if not p.is_file():
        raise DataError(f"text file not found: {path}")
    return files.read_text(p)


def seed_rows(text: str, rows: int = SEED_ROWS, seed: int = SEED_SHUFFLE) -> list[str]:
    """The official script's sample of wikitext rows: every line of the raw file is a row (with its
    newline; blank lines are empty rows), shuffled as ``datasets`` does with ``seed``, first ``rows``."""
    import numpy as np
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()                                  # the file's final newline ends the last row
    all_rows = [ln + "\n" if ln.strip() else "" for ln in lines]
    perm = np.random.default_rng(seed).permutation(len(all_rows))
    return [all_rows[int(i)] for i in perm[:rows]]


def seed_windows(n_tokens: int, context: int = SEED_CONTEXT, stride: int = SEED_STRIDE) -> list[tuple[int, int]]:
    """(begin, end) of the official sliding windows over ``n_tokens`` ids; the last ``stride``
    tokens of each window are scored (eval_ppl.py's loop, including its stop rule)."""
    seq_len = n_tokens - n_tokens % stride
    out = []
    for begin in range(0, seq_len, stride):
        end = begin + context + stride
        out.append((begin, min(end, n_tokens)))
        if end >= seq_len:
            break
    return out


@honours_cancel
def perplexity(model, tokenizer, text: str, *, context: int = CONTEXT, max_tokens: Optional[int] = None,
               batch_size: int = 1, on_event: Optional[ProgressCallback] = None,
               cancel: Optional[CancelToken] = None, protocol: str = "windows") -> PerplexityResult:
    """Perplexity of ``text`` (module docstring). ``protocol``: "windows" (default) or "seed"; with
    "seed", ``context`` and ``batch_size`` are the official script's (2048 + 512, one window a batch)."""
    import torch
    check_options(max_tokens, protocol, context)
    with torch.no_grad():
        if protocol == "seed":
            return _seed_perplexity(model, tokenizer, text, max_tokens=max_tokens, on_event=on_event,
                                    cancel=cancel)
        return _windows_perplexity(model, tokenizer, text, context=context, max_tokens=max_tokens,
                                   batch_size=batch_size, on_event=on_event, cancel=cancel)


def _windows_perplexity(model, tokenizer, text: str, *, context: int, max_tokens: Optional[int],
                        batch_size: int, on_event: Optional[ProgressCallback],
                        cancel: Optional[CancelToken]) -> PerplexityResult:
    import torch
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


def _seed_perplexity(model, tokenizer, text: str, *, max_tokens: Optional[int] = None,
                     on_event: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelToken] = None) -> PerplexityResult:
    import torch
    body = "".join(r + "\n\n" for r in seed_rows(text))
    ids = tokenizer(body, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() <= SEED_STRIDE:
        raise DataError(f"the text has {ids.numel()} tokens, too few for one window of {SEED_STRIDE} scored tokens")
    wins = seed_windows(ids.numel())
    device = next(model.parameters()).device
    from .distributed import all_reduce_sum, shard
    mine = list(shard(len(wins)))
    rep = Reporter("ppl", len(mine), on_event, cancel)
    rep.emit(0)
    sum_means, n_tok = 0.0, 0
    for j, w in enumerate(mine):
        b, e = wins[w]
        x = ids[b:e].unsqueeze(0).to(device)
        logits = model(x, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, -SEED_STRIDE - 1:-1], x[0, -SEED_STRIDE:],
                                                reduction="none")
        sum_means += float(nll.double().mean())        # the mean of each window, as outputs.loss
        n_tok += SEED_STRIDE
        rep.emit(j + 1, ppl=math.exp(sum_means / (j + 1)))
    sum_means, n_tok = all_reduce_sum([sum_means, n_tok])
    mean = sum_means / len(wins)
    return PerplexityResult(math.exp(mean), mean, int(n_tok), len(wins), SEED_CONTEXT + SEED_STRIDE, "seed")
