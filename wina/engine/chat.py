"""Glue for ``wina chat`` and the TUI: use the engine when a GPU is present.

>>> if engine_available(model):
...     eng = engine_for(model)                    # built once per model, follows its sparsifier
...     gen = engine_stream_generate(eng, tokenizer, input_ids, on_text=print)
... else:
...     gen = wina.generate.stream_generate(model, tokenizer, input_ids, on_text=print)

``engine_stream_generate`` has the keyword arguments of :func:`wina.generate.stream_generate` and
returns the same :class:`wina.generate.Generation`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..adapters import ADAPTERS
from ..errors import InvalidArgument
from .decoder import Engine

_ATTR = "_wina_engine"


def engine_available(model) -> bool:
    """True when the fast engine applies: CUDA weights in bf16/fp16, Triton importable, a supported
    architecture, and (if a sparsifier is attached) threshold gating."""
    from ..kernels import HAS_TRITON
    try:
        p = next(model.parameters())
    except StopIteration:
        return False
    if not (HAS_TRITON and p.is_cuda and p.dtype in (torch.bfloat16, torch.float16)):
        return False
    if getattr(model.config, "model_type", None) not in ADAPTERS:
        return False
    sp = getattr(model, "_wina_sparsifier", None)
    if sp is not None and sp.enabled and sp.method != "dense" and sp.gating != "threshold":
        return False
    return True


def _gating_of(model):
    """(thresholds, scales, dense_prefix) of the model's active sparsifier, or dense."""
    sp = getattr(model, "_wina_sparsifier", None)
    if sp is None or not sp.enabled or sp.method == "dense" or not sp._handles:
        return {}, None, None
    if sp.gating != "threshold":
        raise InvalidArgument("the decode engine needs threshold gating (a calibrated plan)")
    thr = {k: g.threshold for k, g in sp.gates.items() if g.sparsity > 0 and g.threshold is not None}
    return thr, sp.scales, sp.dense_prefix


def engine_for(model, max_seq_len: int = 4096) -> Engine:
    """The engine of ``model``, built on first use (a second copy of the weights on the GPU) and
    kept on the model; its thresholds follow the model's current sparsifier."""
    eng = getattr(model, _ATTR, None)
    thr, scales, prefix = _gating_of(model)
    if eng is None or eng.max_seq_len < max_seq_len:
        eng = Engine.from_model(model, thresholds=thr, scales=scales, dense_prefix=prefix,
                                max_seq_len=max_seq_len, use_sparsifier=False)
        setattr(model, _ATTR, eng)
    else:
        eng.set_sparsity(thr, scales)
        if prefix is not None:
            eng.dense_prefix = prefix
    return eng


def engine_stream_generate(engine: Engine, tokenizer, input_ids, *, max_new_tokens: int = 256,
                           temperature: float = 0.0, top_p: float = 0.95, seed: Optional[int] = None,
                           on_text: Optional[Callable[[str], None]] = None, cancel=None):
    """Stream text through the engine; returns :class:`wina.generate.Generation`."""
    from ..generate import Generation
    ids = input_ids
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        ids = ids[0]
    ids = [int(t) for t in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    room = engine.max_seq_len - len(ids)
    if room < 1:
        raise InvalidArgument(f"the prompt ({len(ids)} tokens) fills the engine's cache of {engine.max_seq_len}")
    stops = set(engine.eos_ids)
    e = getattr(tokenizer, "eos_token_id", None)
    if isinstance(e, int):
        stops.add(e)
    new: list[int] = []
    shown = [""]

    def on_token(tok: int) -> None:
        new.append(tok)
        if on_text is None:
            return
        text = tokenizer.decode(new, skip_special_tokens=True)
        if len(text) > len(shown[0]) and not text.endswith("\ufffd"):
            on_text(text[len(shown[0]):])
            shown[0] = text

    res = engine.generate(ids, min(max_new_tokens, room), temperature=temperature, top_p=top_p,
                          seed=seed, on_token=on_token, stop=stops, cancel=cancel)
    text = tokenizer.decode(res.tokens, skip_special_tokens=True)
    if on_text is not None and len(text) > len(shown[0]):
        on_text(text[len(shown[0]):])
    stopped = {"stop": "eos"}.get(res.stopped, res.stopped)
    # prefill + decode: the one-time kernel compilation and graph capture stay out of tokens/s
    return Generation(text, len(res.tokens), res.prefill_s + res.decode_s, stopped, list(res.tokens))
