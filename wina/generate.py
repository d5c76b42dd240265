"""Streaming text generation with any transformers causal LM (CPU or GPU, sparse or dense).

This is the portable path used by ``wina chat`` and the TUI on a CPU; on CUDA the decode engine
(:mod:`wina.engine`) is faster. Decoding: greedy when ``temperature == 0``, else temperature +
nucleus (top-p) sampling. Text is streamed as deltas of the decoded continuation, so multi-byte
characters split across tokens come out whole.
"""
from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .events import CancelToken
from .sampling import MIN_TEMPERATURE, check_sampling


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


# a new text of at least CUT_CHARS characters is tokenized in pieces of about PIECE_CHARS, in one
# batch call (the tokenizer runs a batch on its threads), each cut at a space between two letters
PIECE_CHARS = 256
CUT_CHARS = 1024
_THREADS_ENV = "TOKENIZERS_PARALLELISM"
_quiet_default = False      # True: the "false" in _THREADS_ENV was set by quiet_tokenizer_threads()
_CUT = re.compile(r"(?<=[^\W\d_]) (?=[^\W\d_])")
_PROBE_TEXT = ("Rivers, bridges & 3 cities: the café's 12,345 visitors (2024) said \"très bien\" — twice!\n"
               "  Indented    spaces\tand tabs; naïve résumé 😀 über straße. 東京 and القاهرة cities.\n\n") * 24


def quiet_tokenizer_threads() -> None:
    """Keep the fast tokenizer off its threads in this process by default, so that a process forked
    after they ran gets no warning (the command line calls this; a user's own
    ``TOKENIZERS_PARALLELISM`` is left as it is). The chat's batch call of a long message's pieces
    still uses them (:func:`_tokenizer_threads`)."""
    global _quiet_default
    if _THREADS_ENV not in os.environ:
        os.environ[_THREADS_ENV] = "false"
        _quiet_default = True


def quiet_libraries() -> None:
    """The front-ends draw progress from our events: transformers', datasets' and lm-eval's own tqdm
    bars and info logs are turned off (they would land on the command line's bars, across the TUI's
    screen, or in the shell after the TUI has ended while a model load still finishes), and the
    tokenizer stays off its threads (:func:`quiet_tokenizer_threads`)."""
    import contextlib
    import warnings
    quiet_tokenizer_threads()
    os.environ.setdefault("TQDM_DISABLE", "1")            # lm-eval's and datasets' bars, if tqdm is not
    #                                                       imported yet (the entry points set it first)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        import datasets
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


@contextmanager
def _tokenizer_threads():
    """The tokenizer's threads for one batch call, where only :func:`quiet_tokenizer_threads` turned
    them off (the variable is read at each call); set back after it, so that it stays configured
    and a later fork stays quiet. A user's own setting is kept."""
    if not (_quiet_default and os.environ.get(_THREADS_ENV) == "false"):
        yield
        return
    os.environ[_THREADS_ENV] = "true"
    try:
        yield
    finally:
        os.environ[_THREADS_ENV] = "false"


def _cuts(text: str, size: int) -> list[int]:
    """Cut points (0, ..., len(text)) of ``text`` into pieces of about ``size`` characters, each cut
    just before a space that sits between two letters."""
    cuts, at = [0], size
    while at < len(text):
        m = _CUT.search(text, at)
        if m is None:
            break
        cuts.append(m.start())
        at = m.start() + size
    cuts.append(len(text))
    return cuts


class ConversationIds:
    """Token ids of a growing conversation, tokenizing each turn's new text only.

    The rendered template of a conversation grows at its end (a new message, the reply, the
    generation prompt), and a fast tokenizer splits its input at added tokens (``<|im_start|>``,
    ``</s>``, ...) before anything else, so the text before an added token tokenizes the same whatever
    follows. A turn keeps the previous ids up to the last added token that ends inside the text both
    renderings share, and tokenizes from there. The first turn that uses this is compared with a
    whole tokenization; a tokenizer for which they differ (or a slow one, or no chat template) is
    tokenized whole every turn. ``last_chars``: how many characters the last call tokenized.

    A long new text (a pasted document) is tokenized in pieces cut between words, in one batch call
    that the tokenizer spreads over threads; :meth:`verify` checks once, on a sample of mixed text,
    that the pieces give the whole text's ids (and gives up the pieces if not, or if an added token
    holds a space, where a cut could fall inside it).
    """

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.on = bool(getattr(tokenizer, "is_fast", False) and getattr(tokenizer, "chat_template", None))
        self.checked = False
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.added = set(int(i) for i in decoder)
        # pieces only once verify() found them equal to the whole (never where an added token holds a space)
        self._may_cut = not any(" " in str(getattr(t, "content", t)) for t in decoder.values())
        self.pieces = False
        self.text, self.ids, self.starts, self.ends = "", [], [], []
        self.last_chars = 0

    def verify(self, messages: Sequence[dict]) -> None:
        """Make the one comparison with a whole tokenization now (a warm-up), on ``messages`` and a
        reply and a question after them, instead of in a user's turn."""
        probe = ConversationIds(self.tok)
        probe(messages)
        probe([*messages, {"role": "assistant", "content": "A reply."}, {"role": "user", "content": "And then?"}])
        self.on, self.checked = probe.on, probe.checked
        self.pieces = bool(self.on and self._may_cut
                           and self._encode(_PROBE_TEXT, pieces=True) == self._encode(_PROBE_TEXT, pieces=False))

    def _encode(self, text: str, pieces: Optional[bool] = None) -> tuple[list[int], list[int], list[int]]:
        """(ids, start offsets, end offsets) of ``text``, whole or in pieces (default: as verified)."""
        if not (self.pieces if pieces is None else pieces) or len(text) < CUT_CHARS:
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(enc["input_ids"]), [a for a, _ in enc["offset_mapping"]], [b for _, b in enc["offset_mapping"]]
        cuts = _cuts(text, PIECE_CHARS)
        with _tokenizer_threads():
            enc = self.tok([text[a:b] for a, b in zip(cuts, cuts[1:])], add_special_tokens=False,
                           return_offsets_mapping=True)
        ids, starts, ends = [], [], []
        for a, part, offsets in zip(cuts, enc["input_ids"], enc["offset_mapping"]):
            ids += part
            starts += [a + b for b, _ in offsets]
            ends += [a + e for _, e in offsets]
        return ids, starts, ends

    def __call__(self, messages: Sequence[dict]) -> list[int]:
        if not self.on:
            ids = [int(t) for t in chat_input_ids(self.tok, messages)[0].tolist()]
            self.last_chars = -1
            return ids
        return list(self._update(messages))

    def prime(self, messages: Sequence[dict]) -> None:
        """Tokenize ``messages`` (a conversation that ends with a reply) now, between turns, so that
        the next call, the same messages and the user's next one, tokenizes only that message."""
        if not self.on:
            return
        from jinja2 import TemplateError        # what apply_chat_template raises; loaded with it
        try:
            self._update(messages)
        except TemplateError:               # a template that wants a user's message last: the next call
            pass                            # tokenizes the reply with it, as without priming

    def _update(self, messages: Sequence[dict]) -> list[int]:
        text = self.tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        shared = _common_prefix(self.text, text)
        k = len(self.ids) - 1                       # the last added token inside the shared text
        while k > 0 and not (self.ids[k] in self.added and self.ends[k] <= shared):
            k -= 1
        k = max(k, 0)
        b = self.starts[k] if k > 0 else 0          # kept: the ids before it; tokenized: from it on
        ids, starts, ends = self._encode(text[b:])
        self.ids = self.ids[:k] + ids
        self.starts = self.starts[:k] + [b + a for a in starts]
        self.ends = self.ends[:k] + [b + e for e in ends]
        self.text, self.last_chars = text, len(text) - b
        if k > 0 and not self.checked:
            self.checked = True
            whole = self._encode(text, pieces=False)
            if whole[0] != self.ids:                  # this tokenizer does not split that way
                self.on = False
                self.ids, self.starts, self.ends = whole
        return self.ids


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings (binary search on C-level compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _eos_ids(tokenizer, model=None) -> set[int]:
    """The ids that end a reply here: the model's generation config's and the tokenizer's eos ids
    (:func:`wina.engine.decoder.eos_ids`, the one rule for reading them)."""
    from .engine.decoder import eos_ids
    return eos_ids(getattr(model, "generation_config", None), tokenizer)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: Optional[torch.Generator]) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / max(temperature, MIN_TEMPERATURE), dim=-1)
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
    check_sampling(None, temperature, top_p)
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


# ------------------------------------------------------------------------------------------------
# the CUDA decode engine as a generation backend
# ------------------------------------------------------------------------------------------------
_ENGINE_ATTR = "_wina_engine"


def engine_available(model) -> bool:
    """True when the fast engine applies: CUDA weights in bf16/fp16, Triton importable, a supported
    architecture, and (if a sparsifier is attached) threshold gating."""
    from .adapters import ADAPTERS
    from .kernels import HAS_TRITON
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


def gating_of(model):
    """(thresholds, scales, dense_prefix) of the model's active sparsifier, or ({}, None, None)."""
    from .errors import InvalidArgument
    sp = getattr(model, "_wina_sparsifier", None)
    if sp is None or not sp.enabled or sp.method == "dense" or not sp._handles:
        return {}, None, None
    if sp.gating != "threshold":
        raise InvalidArgument("the decode engine needs threshold gating (a calibrated plan)")
    thr = {k: g.threshold for k, g in sp.gates.items() if g.sparsity > 0 and g.threshold is not None}
    return thr, sp.scales, sp.dense_prefix


def engine_for(model, max_seq_len: int = 4096, *, follow_sparsifier: bool = True,
               on_layer: Optional[Callable] = None):
    """The engine of ``model``, built on first use and kept on the model (every caller shares it:
    one copy of the engine's weights, whatever the number of chat panes). With
    ``follow_sparsifier`` its thresholds follow the model's current sparsifier (paused: dense).
    ``on_layer(i, block)``: called while it is built (see :meth:`wina.engine.Engine.from_model`)."""
    from .engine import Engine
    eng = getattr(model, _ENGINE_ATTR, None)
    thr, scales, prefix = gating_of(model)
    if eng is None or eng.max_seq_len < max_seq_len:
        if eng is not None:
            setattr(model, _ENGINE_ATTR, None)
            del eng
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        eng = Engine.from_model(model, thresholds=thr, scales=scales, dense_prefix=prefix,
                                max_seq_len=max_seq_len, use_sparsifier=False, on_layer=on_layer)
        setattr(model, _ENGINE_ATTR, eng)
    elif follow_sparsifier:
        eng.set_sparsity(thr, scales)
        if prefix is not None:
            eng.dense_prefix = prefix
    return eng


def engine_stream_generate(engine, tokenizer, input_ids, *, max_new_tokens: int = 256,
                           temperature: float = 0.0, top_p: float = 0.95, seed: Optional[int] = None,
                           on_text: Optional[Callable[[str], None]] = None, cancel=None,
                           start: int = 0, count_every: int = 0):
    """Stream text through ``engine`` (keywords of :func:`stream_generate`; ``start`` and
    ``count_every`` as :meth:`wina.engine.Engine.generate`). Returns (:class:`Generation`, the
    engine's :class:`wina.engine.GenerationResult`)."""
    from .errors import InvalidArgument
    ids = input_ids
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        ids = ids[0]
    ids = [int(t) for t in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    room = engine.max_seq_len - start - len(ids)
    if room < 1:
        raise InvalidArgument(f"the prompt ({start + len(ids)} tokens) fills the engine's cache of "
                              f"{engine.max_seq_len}")
    stops = set(engine.eos_ids) | _eos_ids(tokenizer, None)
    stream = TextStream(tokenizer, on_text)
    res = engine.generate(ids, min(max_new_tokens, room), temperature=temperature, top_p=top_p,
                          seed=seed, on_token=stream.push, stop=stops, cancel=cancel, start=start,
                          count_every=count_every)
    text = stream.finish(res.tokens)
    stopped = {"stop": "eos"}.get(res.stopped, res.stopped)
    # prefill + decode: the one-time kernel compilation and graph capture stay out of tokens/s
    return Generation(text, len(res.tokens), res.prefill_s + res.decode_s, stopped, list(res.tokens)), res


class TextStream:
    """Token ids in, text deltas out (multi-byte characters split across tokens come out whole).
    ``after_first``: called once, after the first token has been passed on."""

    def __init__(self, tokenizer, on_text: Optional[Callable[[str], None]],
                 after_first: Optional[Callable[[], None]] = None) -> None:
        self.tokenizer, self.on_text, self.after_first = tokenizer, on_text, after_first
        self.ids: list[int] = []
        self.shown = ""

    def push(self, tok: int) -> None:
        self.ids.append(int(tok))
        if self.on_text is not None:
            self._show()
        if self.after_first is not None:
            first, self.after_first = self.after_first, None
            first()

    def _show(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.shown) and not text.endswith("\ufffd"):
            self.on_text(text[len(self.shown):])
            self.shown = text

    def finish(self, ids: Optional[Sequence[int]] = None) -> str:
        text = self.tokenizer.decode(list(self.ids if ids is None else ids), skip_special_tokens=True)
        if self.on_text is not None and len(text) > len(self.shown) and text.startswith(self.shown):
            self.on_text(text[len(self.shown):])
        self.shown = text
        return text


def generation_backend(model) -> str:
    """"engine" when the CUDA decode engine applies to this model (CUDA, bf16/fp16, Triton,
    threshold gating if sparsified), else "transformers" (the portable loop above)."""
    try:
        return "engine" if engine_available(model) else "transformers"
    except Exception:          # no triton / no CUDA build
        return "transformers"


def warm_up(model, *, sampled: bool = False) -> bool:
    """Build the decode engine and capture its step now (the first use compiles the kernels, seconds
    on a fresh machine), so that the first reply streams at once. True when the engine applies;
    a no-op (False) on the transformers path. (:class:`wina.chat.ChatSession` does this and more.)"""
    if generation_backend(model) != "engine":
        return False
    eng = engine_for(model)
    eng.capture(sampled=sampled, count=True)
    return True


def stream_reply(model, tokenizer, input_ids: torch.Tensor, **kw) -> Generation:
    """:func:`stream_generate` through the fastest backend available (same keywords, same result).
    Stateless: every call prefills the whole conversation (:class:`wina.chat.ChatSession` keeps
    the KV cache across turns). On the engine the gates are counted on the device and the counts
    are handed to the model's sparsifier, so ``sp.measured_sparsity()`` reads them as after a
    portable reply (no second forward)."""
    if generation_backend(model) == "engine":
        eng = engine_for(model)
        eng.bind(eng.cache)
        eng.reset_counts()
        g, _ = engine_stream_generate(eng, tokenizer, input_ids, count_every=COUNT_EVERY, **kw)
        give_counts_to_sparsifier(model, eng)
        return g
    return stream_generate(model, tokenizer, input_ids, **kw)


COUNT_EVERY = 32       # engine replies: the gates are counted on the prompt and every 32nd decode step


def give_counts_to_sparsifier(model, engine) -> None:
    """Hand the engine's device counts (since its last reset) to the model's sparsifier gates, so
    that ``measured()`` / ``measured_sparsity()`` report them. Nothing when no sparsifier is
    active."""
    sp = getattr(model, "_wina_sparsifier", None)
    if sp is None or not sp.enabled or sp.method == "dense":
        return
    c = engine.gate_counts()
    if not c["rows"]:
        return
    for key, frac in c["per_matrix"].items():
        g = sp.gates.get(key)
        if g is None:
            continue
        _set_gate_counts(g, frac, c["rows"])


def _set_gate_counts(gate, skipped_fraction: float, rows: int) -> None:
    """Write counts into a sparsifier gate as if it had seen ``rows`` tokens."""
    total = rows * int(gate.in_features)
    gate.dropped = torch.tensor(int(round(skipped_fraction * total)), dtype=torch.int64)
    gate.seen = torch.tensor(total, dtype=torch.int64)
