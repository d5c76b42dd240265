"""Progress events and cancellation, shared by every long step (calibrate, allocate, evaluate, ...).

The library never renders anything: it calls ``on_event(Progress(...))``. The CLI renders the events
with rich, the TUI with widgets. Cancellation goes through a :class:`CancelToken` (or by raising
:class:`~wina.errors.Cancelled` from the callback).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import Cancelled


@dataclass
class Progress:
    stage: str                      # e.g. "load", "calibrate", "allocate", "evaluate", "ppl"
    done: int                       # units finished in this stage
    total: int                      # units in this stage (0 = unknown)
    layer: Optional[int] = None     # current layer, where the stage goes layer by layer
    n_layers: Optional[int] = None
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. {"sparsity": 0.4, "error": 1e-3}
    eta_s: Optional[float] = None   # seconds left, estimated from the rate so far

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


ProgressCallback = Callable[[Progress], None]


def format_duration(s: Optional[float]) -> str:
    """Seconds as people read them, the one rule for ETAs and wall times: ``42 s``, ``3:07``,
    ``1:02:05``; "" for an unknown, negative or infinite duration."""
    if s is None or s != s or s < 0 or s == float("inf"):
        return ""
    if s < 9.95:
        return f"{s:.1f} s"
    if s < 59.5:                    # what rounds to 60 s reads 1:00
        return f"{s:.0f} s"
    t = int(round(s))
    h, rem = divmod(t, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class CancelToken:
    """Thread-safe flag; long loops call :meth:`check` between units of work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled")


class Reporter:
    """Helper a long step uses to emit events with an ETA and to honour cancellation."""

    def __init__(self, stage: str, total: int, on_event: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None, n_layers: Optional[int] = None) -> None:
        self.stage, self.total, self.on_event, self.cancel = stage, total, on_event, cancel
        self.n_layers = n_layers
        self.done = 0
        self._t0 = time.perf_counter()

    def check(self) -> None:
        """Raise :class:`~wina.errors.Cancelled` if the cancel token is set; cheap enough for every
        unit of a fast inner loop that emits events less often."""
        if self.cancel is not None:
            self.cancel.check()

    def emit(self, done: Optional[int] = None, *, layer: Optional[int] = None, message: str = "",
             **metrics: Any) -> None:
        self.check()
        if done is not None:
            self.done = done
        eta = None
        if self.done and self.total:
            rate = (time.perf_counter() - self._t0) / self.done
            eta = rate * (self.total - self.done)
        if self.on_event is not None:
            self.on_event(Progress(self.stage, self.done, self.total, layer, self.n_layers, message,
                                   dict(metrics), eta))

    def advance(self, n: int = 1, **kw: Any) -> None:
        self.emit(self.done + n, **kw)
