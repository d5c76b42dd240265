"""A cancel honoured inside a forward pass, between two decoder layers.

The long steps check their :class:`wina.events.CancelToken` between units of work (a chunk of
requests, a window, a layer). One unit can be a single long forward: a wikitext document of
thousands of tokens on a CPU, a calibration batch. While :func:`cancellable` is active, a forward
pre-hook on every decoder layer raises :class:`wina.errors.Cancelled` once the token is set, so that
Esc and quitting in the TUI (and Ctrl-C's cancel in a front-end) take effect within one layer.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

from .adapters import decoder_layers
from .events import CancelToken


@contextlib.contextmanager
def cancellable(model, cancel: Optional[CancelToken]) -> Iterator[None]:
    """Within the block, every decoder layer of ``model`` checks ``cancel`` before it runs."""
    if cancel is None:
        yield
        return

    def check(module, args) -> None:
        cancel.check()

    try:
        layers = list(decoder_layers(model))
    except Exception:                   # a model without the adapter's layers: the steps' own checks
        layers = []
    handles = [layer.register_forward_pre_hook(check) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def honours_cancel(fn):
    """Decorator of a step ``fn(model, ..., cancel=None, ...)``: it runs within :func:`cancellable`."""
    @functools.wraps(fn)
    def step(model, *args, **kw):
        with cancellable(model, kw.get("cancel")):
            return fn(model, *args, **kw)
    return step
