"""Chat sessions: a conversation with one model, dense or sparse, on the GPU engine or on the CPU.

>>> dense, sparse = ChatSession.pair(model, tokenizer, max_new_tokens=200)   # side by side
>>> for s in (dense, sparse):
...     s.warm_up(on_event=print)              # engine: copy weights, compile, capture (stage "warm-up")
>>> r = sparse.send("Hello!", on_text=print)   # streams; returns a Reply
>>> r.ttft_s, r.decode_tokens_per_s, r.sparsity, r.prefill_tokens, r.stopped

Rules, the same on both backends:

* the KV cache is kept across turns: a turn prefills only the tokens that the cache does not hold
  yet (the longest common prefix of the cached ids and the new conversation's ids is reused);
  :meth:`ChatSession.reset` clears it; when a conversation outgrows the context, the oldest turns
  are dropped (``Reply.truncated``) and the cache is rebuilt from there;
* time to first token (``ttft_s``: template, tokenization and prefill of the new tokens) and decode
  tokens/s (``decode_tokens_per_s``: the tokens after the first over the time after it) are
  reported apart;
* side by side, the session that answers second makes the message's ids while the first one
  decodes (``send(..., prepare_next=other)``; ``Reply.ahead_s``), so that its time to first token
  holds no tokenizing that nobody waited for;
* the measured sparsity comes from the generation itself, never from a second forward: on the
  engine the sparse step counts its gates on the device (the prompt and every
  ``count_every``-th decode step, read once per reply); on the transformers path the sparsifier's
  gates count as they gate.

Backends: ``"engine"`` (:mod:`wina.engine`: CUDA, bf16/fp16, threshold gating; decode steps are
replayed CUDA graphs, prompts are one masked cuBLAS matmul per projection) or ``"transformers"``
(any model, any device; ``past_key_values`` kept across turns). Dense and sparse sessions of one
model share one engine (one copy of its weights; dense = the same engine with gating off), each
with its own KV cache. With ``one_copy=True`` the model's own copies of the layer weights leave the
GPU while the engine holds them (each layer as soon as the engine has copied it): GPU memory is
then about one copy of the weights plus the KV caches. Those weights come back on the first forward
of the module that owns them, or with :func:`release_engine`, which also frees the engine; call it
before anything reads the model's weights directly (calibration, the transform).
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .collector import no_full_collection, settle, thaw
from .errors import InvalidArgument
from .events import CancelToken, Progress
from .generate import (COUNT_EVERY, ConversationIds, Generation, TextStream, _eos_ids, _sample,
                       engine_available, engine_for, gating_of)
from .sampling import check_sampling


@dataclass
class Reply(Generation):
    """One reply. ``seconds`` (of :class:`wina.generate.Generation`) = ``ttft_s + decode_s``."""
    ttft_s: float = 0.0               # send() → first token: template, tokenization, prefill, first pick
    prepare_s: float = 0.0            # of which send() → the prompt's ids (template, tokenization, cache match)
    ahead_s: float = 0.0              # the prompt's ids made before send(), by prepare(): not in ttft_s
    decode_s: float = 0.0             # the rest of the reply
    context_tokens: int = 0           # conversation tokens before the reply (the prompt)
    prefill_tokens: int = 0           # of which prefilled in this turn (the rest came from the cache)
    sparsity: Optional[float] = None  # measured: fraction of the sparsifiable weight bytes skipped
    counted_tokens: int = 0           # token positions the sparsity was counted on
    backend: str = ""                 # "engine" or "transformers"
    sparse: bool = False
    truncated: bool = False           # older turns were dropped to fit the context

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists (binary search on C-level list compares:
    ~20 slices instead of a Python loop over a conversation of thousands of ids)."""
    a, b = list(a), list(b)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ------------------------------------------------------------------------------------------------
# one copy of the weights: the model's layer weights leave the GPU while the engine holds them
# ------------------------------------------------------------------------------------------------
def _restore_hook(module, args):
    home = getattr(module, "_wina_home", None)
    if home is not None and module.weight.device != home:
        module.weight.data = module.weight.data.to(home)
    return None


def _offload_linears(root: torch.nn.Module) -> int:
    """Move the weights of ``root``'s Linear modules to host memory; each comes back to its device
    at its module's next forward (a pre-hook). Returns the bytes moved."""
    moved = 0
    for mod in root.modules():
        if not isinstance(mod, torch.nn.Linear) or not mod.weight.is_cuda:
            continue
        home = mod.weight.device
        moved += mod.weight.numel() * mod.weight.element_size()
        mod.weight.data = mod.weight.data.to("cpu")
        mod._wina_home = home
        if getattr(mod, "_wina_restore", None) is None:
            mod._wina_restore = mod.register_forward_pre_hook(_restore_hook)
    return moved


def restore_weights(model) -> None:
    """Bring back to the GPU every weight that :class:`ChatSession` moved off it."""
    for mod in model.modules():
        home = getattr(mod, "_wina_home", None)
        if home is not None:
            if mod.weight.device != home:
                mod.weight.data = mod.weight.data.to(home)
            mod._wina_home = None
            h = getattr(mod, "_wina_restore", None)
            if h is not None:
                h.remove()
                mod._wina_restore = None


def release_engine(model) -> None:
    """Free the model's engine (and its KV caches) and bring the model's weights back to the GPU."""
    if getattr(model, "_wina_engine", None) is not None:
        model._wina_engine = None
    import gc
    if not thaw():                 # a thaw collects already
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    restore_weights(model)


def _shared_engine(model, max_seq_len: int, one_copy: bool, on_event=None):
    """The model's engine (built once, shared by every session of the model)."""
    eng = getattr(model, "_wina_engine", None)
    if eng is not None and eng.max_seq_len >= max_seq_len:
        return eng
    from .adapters import adapter_for, decoder_layers
    n = len(list(decoder_layers(model, adapter_for(model))))

    def on_layer(i, block):
        if one_copy:
            _offload_linears(block)
        if on_event is not None:
            on_event(Progress("warm-up", i + 1, n, message="copying the weights into the engine"))
    eng = engine_for(model, max_seq_len, follow_sparsifier=False, on_layer=on_layer)
    if one_copy:
        a = adapter_for(model)
        head = model.get_submodule(a.lm_head)
        emb = model.get_submodule(a.embed)
        if head.weight.data_ptr() != emb.weight.data_ptr():     # an untied head: the engine folded it
            _offload_linears(head)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    eng._wina_claimed = getattr(eng, "_wina_claimed", set())
    return eng


def _crop(cache, n: int) -> None:
    """Keep the first n positions of a transformers DynamicCache (either crop convention)."""
    cur = cache.get_seq_length()
    if n >= cur:
        return
    try:
        cache.crop(n - cur)          # newer transformers: a negative count removes that many
    except (ValueError, TypeError):
        cache.crop(n)                # older: the size to keep
    if cache.get_seq_length() != n:
        raise RuntimeError(f"could not crop the KV cache to {n} positions")


def _cache_kw(model) -> str:
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


WARM_UP_MESSAGES = [{"role": "user", "content": "(warm-up)"}]   # the warm-up renders the chat template with it
WARM_UP_LENGTHS = (2, 16, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)   # prompt lengths it prefills


def check_text(text: str, what: str = "the message") -> str:
    """``text`` itself, if it is a string a tokenizer can take: the bytes of a terminal or a pipe that
    are not UTF-8 reach Python as lone surrogates, which no tokenizer accepts."""
    if not isinstance(text, str):
        raise InvalidArgument(f"{what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(f"{what} is not UTF-8 text (at character {e.start}); check the "
                              "terminal's or the file's encoding") from None
    return text


@dataclass
class _Prepared:
    """A next message's ids, made by :meth:`ChatSession.prepare` for the conversation as it was then."""
    key: tuple                        # (text, max_new, system)
    messages: list                    # the conversation they were made for
    ids: list
    kept: list                        # the messages kept (the oldest dropped to fit the context)
    truncated: bool
    seconds: float


class ChatSession:
    """A multi-turn conversation with ``model`` (see the module docstring).

    ``sparse``: gate with the model's sparsifier (no active sparsifier: dense). ``backend``:
    "auto" (the engine when :func:`wina.generate.engine_available`), "engine" or "transformers".
    ``max_seq_len``: the context (engine cache size; default min(4096, the model's limit)).
    ``count_every``: on the engine, count the gates on every N-th decode step (and the prompt).
    ``one_copy``: see the module docstring (engine only). ``ignore_eos``: replies always run to
    ``max_new_tokens`` (benchmarks)."""

    def __init__(self, model, tokenizer, *, sparse: bool = True, system: Optional[str] = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.95,
                 seed: Optional[int] = None, backend: str = "auto", max_seq_len: Optional[int] = None,
                 count_every: int = COUNT_EVERY, one_copy: bool = False, ignore_eos: bool = False) -> None:
        check_sampling(max_new_tokens, temperature, top_p)
        if backend not in ("auto", "engine", "transformers"):
            raise InvalidArgument(f"backend must be auto, engine or transformers, got {backend!r}")
        self.model, self.tokenizer = model, tokenizer
        self.want_sparse = bool(sparse)
        self.system = None if system is None else check_text(system, "the system prompt")
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.backend = ("engine" if engine_available(model) else "transformers") if backend == "auto" else backend
        limit = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
        self.max_seq_len = int(max_seq_len or min(limit, 4096))
        self.count_every = max(0, int(count_every))
        self.one_copy = bool(one_copy) and self.backend == "engine"
        self.ignore_eos = bool(ignore_eos)
        self.messages: list[dict] = []
        self.engine = None
        self._cache = None                  # engine: this session's KVCache; transformers: DynamicCache
        self._cached: list[int] = []        # the ids whose keys/values the cache holds
        self._gating_key = None
        self._ids = ConversationIds(tokenizer)     # each turn tokenizes its new text only
        self._prepared: Optional[_Prepared] = None  # the next message's ids, made by prepare()
        self._preparing: Optional[threading.Thread] = None
        self.warm = False

    @classmethod
    def pair(cls, model, tokenizer, **kw) -> tuple["ChatSession", Optional["ChatSession"]]:
        """(dense, sparse) sessions of one model for a side-by-side chat: one engine, one copy of the
        weights, two KV caches. ``sparse`` is None when the model has no active sparsifier."""
        kw.pop("sparse", None)
        dense = cls(model, tokenizer, sparse=False, **kw)
        sp = getattr(model, "_wina_sparsifier", None)
        active = sp is not None and sp.enabled and sp.method != "dense"
        return dense, (cls(model, tokenizer, sparse=True, **kw) if active else None)

    # --- state ------------------------------------------------------------------------------------
    @property
    def sparsifier(self):
        sp = getattr(self.model, "_wina_sparsifier", None)
        return sp if (sp is not None and sp.method != "dense" and sp._handles) else None

    @property
    def sparse(self) -> bool:
        """Whether this session's replies are gated."""
        return self.want_sparse and self.sparsifier is not None

    @property
    def context_tokens(self) -> int:
        """Tokens the cache holds now."""
        return len(self._cached)

    def context_ids(self) -> list[int]:
        """The token ids the cache holds now: the conversation's template and text up to the last
        reply's last token (which is not yet fed back)."""
        return list(self._cached)

    def reset(self) -> None:
        """A new conversation (the cache is cleared; the system prompt stays)."""
        self._forget_prepared()
        self.messages = []
        self._cached = []
        if self.backend == "transformers":
            self._cache = None
        elif self._cache is not None:
            self._cache.used = 0            # nothing in it is a conversation to keep any more

    def close(self) -> None:
        """Give the KV cache back; with ``one_copy`` the engine is released and the model's
        weights return to the GPU once no session of the model is left open."""
        self._forget_prepared()
        if self.engine is not None and self._cache is not None:
            self.engine.drop_cache(self._cache)
            claimed = getattr(self.engine, "_wina_claimed", set())
            claimed.discard(self._cache.id)
            if self.one_copy and not claimed:
                release_engine(self.model)
        self.engine, self._cache, self._cached, self.warm = None, None, [], False

    # --- warm-up ----------------------------------------------------------------------------------
    def warm_up(self, on_event: Optional[Callable[[Progress], None]] = None) -> None:
        """Everything a first reply would otherwise pay once: on the engine, build it (shared by the
        model's sessions), compile the kernels and capture this session's decode step(s), and run
        the prefill path once; on any backend, compile the chat template, and settle the objects
        alive out of later full collections (:func:`wina.collector.settle`). Progress events have
        stage "warm-up"."""
        emit = on_event or (lambda ev: None)
        # the chat template is compiled on its first use (tens of ms), and the incremental tokenizing
        # is checked against a whole tokenization once: here, not in the first replies
        self._ids.verify(WARM_UP_MESSAGES)
        if self.backend != "engine":
            settle()
            self.warm = True
            emit(Progress("warm-up", 1, 1, message="the chat template (transformers: nothing else to prepare)"))
            return
        self._ensure_engine(emit)
        eng = self.engine
        emit(Progress("warm-up", 0, 3, message="compiling and capturing the decode step"))
        eng.bind(self._cache)
        sampled = self.temperature > 0
        eng.capture(self.sparse, sampled, count=self.count_every > 0)
        emit(Progress("warm-up", 1, 3, message="capturing and warming up the prefill"))
        # prompts of up to 768 tokens replay a graph captured per bucket of lengths (the host's
        # launches would cost more than the GPU's work); longer ones run eagerly, warmed up below
        eng.capture_prefill(self.sparse, count=self.sparse and self.count_every > 0)
        # the prefill path (cuBLAS, attention, counting) at the end of the cache (a later turn's
        # form), at lengths from 2 to half the cache: cuBLAS picks a GEMM kernel per range of prompt
        # lengths and loads each on its first use (a new range cost a dense turn ~45 ms on an H100,
        # run 32); and once from position 0 (a first prompt's causal form) while the cache holds no
        # conversation: positions are written before they are ever read
        counts, rows, used = eng._kept.clone(), eng._count_rows, eng.cache.used
        runs = [(t, None) for t in WARM_UP_LENGTHS if t <= eng.max_seq_len // 2] or [(2, None)]
        if not self._cached:
            runs.append((min(32, eng.max_seq_len // 2), 0))
        for t, start in runs:
            eng.prefill([0] * t, self.sparse, start=eng.max_seq_len - t if start is None else start,
                        count=self.sparse and self.count_every > 0, last_only=True)
        eng._kept.copy_(counts)
        eng._count_rows = rows
        eng.cache.used = used              # what the warm-up wrote is no conversation to keep
        if eng.device.type == "cuda":
            torch.cuda.synchronize(eng.device)
        settle()          # what is alive now (libraries, model, engine) is never walked again (wina.collector)
        self.warm = True
        emit(Progress("warm-up", 3, 3, message="ready"))

    def _ensure_engine(self, emit) -> None:
        if self.engine is not None:
            self._sync_gating()
            return
        eng = _shared_engine(self.model, self.max_seq_len, self.one_copy, emit)
        claimed = eng._wina_claimed
        # the engine's first cache goes to the first session, later sessions get their own
        cache = eng.cache if (eng.cache.id == 0 and 0 not in claimed) else eng.new_cache()
        claimed.add(cache.id)
        self.engine, self._cache = eng, cache
        self.max_seq_len = eng.max_seq_len
        self._sync_gating()

    def _sync_gating(self) -> None:
        """The engine's thresholds follow the model's sparsifier (a sparse session sets them when
        they changed; a dense session runs the same engine with gating off)."""
        if not self.sparse:
            return
        thr, scales, prefix = gating_of(self.model)
        key = (id(self.sparsifier), tuple(sorted(thr.items())), prefix)
        if key != self._gating_key or not self.engine.sparse:
            self.engine.set_sparsity(thr, scales)
            if prefix is not None:
                self.engine.dense_prefix = prefix
            self._gating_key = key

    # --- a turn -----------------------------------------------------------------------------------
    def prepare(self, text: str, max_new_tokens: Optional[int] = None) -> float:
        """Make the ids of ``text`` as the next message now (the template, the tokenization, the fit
        into the context), for a :meth:`send` of the same text with the conversation, the system
        prompt and ``max_new_tokens`` unchanged: that send then does no tokenizing in its time to
        first token (``Reply.ahead_s`` says what it took here). Anything else, send() does itself, as
        without this. Returns the seconds taken (0: nothing prepared, e.g. a message send() refuses,
        which send() reports)."""
        t0 = time.perf_counter()
        self._prepared = None
        try:
            max_new = int(max_new_tokens or self.max_new_tokens)
            if max_new < 1:
                return 0.0
            key = (check_text(text), max_new, self.system)
            messages = list(self.messages)
            ids, kept, truncated = self._fit(messages + [{"role": "user", "content": text}], max_new)
        except InvalidArgument:
            return 0.0
        dt = time.perf_counter() - t0
        self._prepared = _Prepared(key, messages, ids, kept, truncated, dt)
        return dt

    def prepare_in_background(self, text: str, max_new_tokens: Optional[int] = None) -> None:
        """:meth:`prepare` on a thread of its own (while another session's reply decodes: the GPU works
        and the CPU is free); this session's next send(), reset() or close() waits for it. A failure
        there leaves nothing prepared, and send() does the work itself. The caller never waits: the
        new thread waits for one still running (a user typing faster than a long message tokenizes)."""
        before = self._preparing

        def run() -> None:
            if before is not None:
                before.join()
            try:
                self.prepare(text, max_new_tokens)
            except Exception:                   # noqa: BLE001 (send() redoes it and reports)
                self._prepared = None
        self._preparing = threading.Thread(target=run, name="wina-chat-prepare", daemon=True)
        self._preparing.start()

    def _join_preparing(self) -> None:
        t, self._preparing = self._preparing, None
        if t is not None and t is not threading.current_thread():
            t.join()

    def _forget_prepared(self) -> None:
        self._join_preparing()
        self._prepared = None

    def _take_prepared(self, text: str, max_new: int) -> Optional[_Prepared]:
        """The prepared ids if they were made for this message and this conversation, else None."""
        self._join_preparing()
        p, self._prepared = self._prepared, None
        if p is None or p.key != (text, max_new, self.system) or p.messages != self.messages:
            return None
        return p

    def _with_system(self, messages: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def _fit(self, messages: list[dict], max_new: int) -> tuple[list[int], list[dict], bool]:
        """The conversation's ids, dropping the oldest turns until they and ``max_new`` tokens fit."""
        truncated = False
        while True:
            ids = self._ids(self._with_system(messages))
            if len(ids) + max_new <= self.max_seq_len or len(messages) <= 1:
                break
            # drop the oldest exchange (a user message and the reply after it)
            messages = messages[2:] if len(messages) > 2 else messages[1:]
            truncated = True
        if len(ids) >= self.max_seq_len:
            raise InvalidArgument(f"the message ({len(ids)} tokens with the template) does not fit the "
                                  f"context of {self.max_seq_len} tokens")
        return ids, messages, truncated

    @torch.no_grad()
    def send(self, text: str, *, on_text: Optional[Callable[[str], None]] = None,
             cancel: Optional[CancelToken] = None, max_new_tokens: Optional[int] = None,
             prepare_next: Optional["ChatSession"] = None) -> Reply:
        """Answer ``text`` (streamed through ``on_text`` deltas); the exchange joins the conversation.

        ``prepare_next``: the session that answers the same message after this one (side by side);
        once this reply's first token is out, that session prepares the message on a thread
        (:meth:`prepare_in_background`) while this one decodes."""
        if prepare_next is self:
            raise InvalidArgument("prepare_next must be another session")
        then = None if prepare_next is None else (lambda: prepare_next.prepare_in_background(text, max_new_tokens))
        with no_full_collection():       # a full collection would stall the reply (wina.collector)
            return self._send(text, on_text, cancel, max_new_tokens, then)

    def _send(self, text, on_text, cancel, max_new_tokens, then) -> Reply:
        t0 = time.perf_counter()
        check_text(text)
        max_new = int(max_new_tokens or self.max_new_tokens)
        if max_new < 1:
            raise InvalidArgument(f"max_new_tokens must be at least 1, got {max_new}")
        p = self._take_prepared(text, max_new)
        if p is not None:
            ids, kept_msgs, truncated = p.ids, p.kept, p.truncated
        else:
            ids, kept_msgs, truncated = self._fit(self.messages + [{"role": "user", "content": text}], max_new)
        max_new = max(1, min(max_new, self.max_seq_len - len(ids)))
        n = min(_lcp(self._cached, ids), len(ids) - 1)
        prepare_s = time.perf_counter() - t0
        if self.backend == "engine":
            r = self._send_engine(ids, n, max_new, TextStream(self.tokenizer, on_text, then), cancel, t0)
        else:
            r = self._send_transformers(ids, n, max_new, TextStream(self.tokenizer, on_text, then), cancel, t0)
        r.truncated, r.prepare_s, r.ahead_s = truncated, prepare_s, (p.seconds if p is not None else 0.0)
        self.messages = kept_msgs + [{"role": "assistant", "content": r.text}]
        # the reply's text is tokenized now, not in the next turn's time to first token
        self._ids.prime(self._with_system(self.messages))
        return r

    def _send_engine(self, ids, n, max_new, stream, cancel, t0) -> Reply:
        if self.engine is None:
            self._ensure_engine(lambda ev: None)
        else:
            self._sync_gating()
        eng = self.engine
        eng.bind(self._cache)
        sparse = self.sparse
        counting = sparse and self.count_every > 0
        if counting:
            eng.reset_counts()
        stops = set() if self.ignore_eos else set(eng.eos_ids) | _eos_ids(self.tokenizer)
        self._cached = self._cached[:n]            # what stays valid whatever happens below
        t_pre = time.perf_counter() - t0           # template + tokenization
        res = eng.generate(ids[n:], max_new, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                           on_token=stream.push, stop=stops, sparse=sparse, cancel=cancel, start=n,
                           count_every=self.count_every if counting else 0)
        text = stream.finish(res.tokens)
        # the cache now holds the prompt and every reply token but (at most) the last one
        self._cached = list(ids) + list(res.tokens[:-1])
        sparsity, rows = (0.0, 0) if not sparse else (None, 0)
        if counting:
            c = eng.gate_counts()
            sparsity, rows = c["sparsity"], c["rows"]
            from .generate import give_counts_to_sparsifier
            give_counts_to_sparsifier(self.model, eng)
        stopped = {"stop": "eos"}.get(res.stopped, res.stopped)
        return Reply(text, len(res.tokens), t_pre + res.prefill_s + res.decode_s, stopped, list(res.tokens),
                     ttft_s=t_pre + res.prefill_s, decode_s=res.decode_s, context_tokens=len(ids),
                     prefill_tokens=len(ids) - n, sparsity=sparsity, counted_tokens=rows, backend="engine",
                     sparse=sparse)

    def _send_transformers(self, ids, n, max_new, stream, cancel, t0) -> Reply:
        from transformers import DynamicCache
        model = self.model
        device = next(model.parameters()).device
        sp = self.sparsifier
        sparse = self.sparse
        if self._cache is None:
            self._cache = DynamicCache()
            self._cached = []
            n = 0
        cache = self._cache
        if cache.get_seq_length() != len(self._cached):      # a cancelled turn, say: trust nothing
            self._cache, self._cached, n = DynamicCache(), [], 0
            cache = self._cache
        if n < len(self._cached):
            if n == 0:
                self._cache = cache = DynamicCache()
            else:
                _crop(cache, n)
        self._cached = self._cached[:n]
        gen = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        eos = set() if self.ignore_eos else _eos_ids(self.tokenizer, model)
        ctx = sp.paused() if (sp is not None and not sparse) else contextlib.nullcontext()
        if sparse:
            sp.reset_counters()
        new: list[int] = []
        stopped = "length"
        step = torch.tensor([ids[n:]], device=device)
        fed = list(ids[n:])
        t1 = None
        with ctx:
            for i in range(max_new):
                if cancel is not None and cancel.cancelled:
                    stopped = "cancelled"
                    break
                logits = model(step, use_cache=True, **{_cache_kw(model): cache}).logits[0, -1]
                self._cached.extend(fed)
                tok = _sample(logits, self.temperature, self.top_p, gen)
                if t1 is None:
                    t1 = time.perf_counter()
                if tok in eos:
                    stopped = "eos"
                    break
                new.append(tok)
                stream.push(tok)
                step = torch.tensor([[tok]], device=device)
                fed = [tok]
        t2 = time.perf_counter()
        t1 = t1 or t2
        text = stream.finish(new)
        sparsity = 0.0 if not sparse else sp.measured_sparsity()
        if sparsity is not None and sparsity != sparsity:      # NaN: nothing counted
            sparsity = None
        return Reply(text, len(new), t2 - t0, stopped, new, ttft_s=t1 - t0, decode_s=t2 - t1,
                     context_tokens=len(ids), prefill_tokens=len(ids) - n, sparsity=sparsity,
                     counted_tokens=len(self._cached) - n if sparse else 0, backend="transformers",
                     sparse=sparse)
