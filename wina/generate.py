"""Streaming text generation with any transformers causal LM (CPU or GPU, sparse or dense).

This is the portable path used by ``wina chat`` and the TUI on a CPU; on CUDA the decode engine
(:mod:`wina.engine`) is faster. Decoding: greedy when ``temperature == 0``, else temperature +
nucleus (top-p) sampling. Text is streamed as deltas of the decoded continuation, so multi-byte
characters split across tokens come out whole.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .events import CancelToken


@dataclass
class Generation:
    text: str
    tokens: int            # new tokens generated
    seconds: float         # wall time of the decode loop (prefill included)
    stopped: str           # "eos", "length" or "cancelled"
    ids: Optional[list[int]] = None   # the new token ids, where the backend gives them

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def chat_input_ids(tokenizer, messages: Sequence[dict]) -> torch.Tensor:
    """Token ids of a conversation, through the model's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        return ids
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return tokenizer(text, return_tensors="pt").input_ids


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: Optional[torch.Generator]) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def stream_generate(model, tokenizer, input_ids: torch.Tensor, *, max_new_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 0.95, seed: Optional[int] = None,
                    on_text: Optional[Callable[[str], None]] = None,
                    cancel: Optional[CancelToken] = None) -> Generation:
    from transformers import DynamicCache
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    if ids.dim() == 1:
        ids = ids[None]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = _eos_ids(tokenizer, model)
    cache = DynamicCache()
    import inspect
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    new: list[int] = []
    shown = ""
    stopped = "length"
    t0 = time.perf_counter()
    step_input = ids
    for _ in range(max_new_tokens):
        if cancel is not None and cancel.cancelled:
            stopped = "cancelled"
            break
        logits = model(step_input, use_cache=True, **{cache_kw: cache}).logits[0, -1]
        tok = _sample(logits, temperature, top_p, gen)
        if tok in eos:
            stopped = "eos"
            break
        new.append(tok)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if on_text is not None and len(text) > len(shown) and not text.endswith("\ufffd"):
            on_text(text[len(shown):])
            shown = text
        step_input = torch.tensor([[tok]], device=device)
    text = tokenizer.decode(new, skip_special_tokens=True)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown):])
    return Generation(text, len(new), time.perf_counter() - t0, stopped, list(new))


def generation_backend(model) -> str:
    """"engine" when the CUDA decode engine applies to this model (CUDA, bf16/fp16, Triton,
    threshold gating if sparsified), else "transformers" (the portable loop above)."""
    try:
        from .engine import engine_available
    except Exception:          # no triton / no CUDA build
        return "transformers"
    return "engine" if engine_available(model) else "transformers"


def warm_up(model, *, sampled: bool = False) -> bool:
    """Build the decode engine and capture its step now (the first use compiles the kernels, seconds
    on a fresh machine), so that the first reply streams at once. True when the engine applies;
    a no-op (False) on the transformers path."""
    if generation_backend(model) != "engine":
        return False
    from .engine import engine_for
    engine_for(model).capture(sampled=sampled)
    return True


def stream_reply(model, tokenizer, input_ids: torch.Tensor, **kw) -> Generation:
    """:func:`stream_generate` through the fastest backend available (same keywords, same result)."""
    if generation_backend(model) == "engine":
        from .engine import engine_for, engine_stream_generate
        g = engine_stream_generate(engine_for(model), tokenizer, input_ids, **kw)
        count_gates(model, input_ids, g)
        return g
    return stream_generate(model, tokenizer, input_ids, **kw)


@torch.no_grad()
def count_gates(model, input_ids: torch.Tensor, g: Generation) -> None:
    """Measured sparsity for a reply that the engine generated: its kernels keep no counts, so the
    conversation's positions (the prompt and every fed-back token) go once through the model, whose
    sparsifier gates (the same thresholds and scores) count what they drop, as they do on the
    portable path. One forward pass; nothing when no sparsifier is active."""
    sp = getattr(model, "_wina_sparsifier", None)
    if sp is None or not sp.enabled or sp.method == "dense" or not g.ids:
        return
    ids = input_ids[0] if input_ids.dim() == 2 else input_ids
    fed = torch.cat([ids.cpu(), torch.tensor(g.ids[:-1], dtype=ids.dtype)])
    model(fed[None].to(next(model.parameters()).device), use_cache=False)
