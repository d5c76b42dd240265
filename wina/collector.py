"""Python's cyclic garbage collector around the chat: no full collection inside a reply.

A full (oldest-generation) collection walks every tracked object: with torch, transformers and the
app loaded that is 0.5–0.6 million objects and 180–200 ms on a 2-core VM, ~400 ms on a GPU host,
all of it holding the interpreter's lock. In the TUI's side-by-side chat on an H100 one of them
landed in about every second turn: a 390 ms wait before a first token, a 7B reply decoded at 0.59
of the engine's rate (docs/gpu-notes.md run 46). Two rules keep them out of replies:

* :func:`settle` (after a chat's warm-up): collect once, then move every object alive into the
  permanent generation (``gc.freeze``), so that a later full collection walks only what was made
  since (the libraries' modules and the model's objects are never walked again); a frozen object
  that dies in a cycle waits for the next settle or thaw;
* :func:`no_full_collection` (around a reply): the oldest generation is not collected automatically
  while a reply runs; the young ones still are (a few thousand objects, well under a millisecond).

:func:`thaw` undoes :func:`settle` and collects: before a model loads, and when an engine is
released, so that the cycles of a model dropped since are freed (a frozen object is never
collected, and a dropped model's tensors would otherwise stay in memory).
"""
from __future__ import annotations

import gc
import threading
from contextlib import contextmanager

_NEVER = 2**31 - 1          # a threshold no count of young collections reaches
_lock = threading.Lock()
_depth = 0
_saved: tuple[int, ...] = ()


def settle() -> None:
    """Collect (what an earlier settle froze too: a frozen object that died since is freed now),
    then freeze every object alive out of later collections' walks."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def thaw() -> bool:
    """Undo :func:`settle` and collect what became garbage since (a dropped model, say); nothing
    when nothing is frozen. Whether it collected."""
    if not gc.get_freeze_count():
        return False
    gc.unfreeze()
    gc.collect()
    return True


@contextmanager
def no_full_collection():
    """No automatic full collection while the block runs (in any thread; nested and concurrent
    blocks keep it off until the last one ends); the thresholds are put back after it."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = gc.get_threshold()
            gc.set_threshold(_saved[0], _saved[1] if len(_saved) > 1 else 10, _NEVER)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.set_threshold(*_saved)


__all__ = ["settle", "thaw", "no_full_collection"]
