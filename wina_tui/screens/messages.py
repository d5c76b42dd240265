"""Messages shared by the screens that run a worker thread (calibrate, evaluate)."""
from __future__ import annotations

from textual.message import Message


class WorkerFinished(Message):
    """The worker ended: ``ok``, a line to show, and whether it ended on a cancel.

    Each screen subclasses it (``CalibrateScreen.Finished``, ``EvaluateScreen.Finished``) so that a
    handler names its own screen's message."""

    def __init__(self, ok: bool, message: str, cancelled: bool = False) -> None:
        super().__init__()
        self.ok = ok
        self.message = message
        self.cancelled = cancelled
