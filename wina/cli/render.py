"""Progress events drawn with rich: one bar per stage, an overall bar for ``wina run``."""
from __future__ import annotations

import math
from typing import Any, Optional

from rich.console import Console
from rich.markup import escape

from ..events import format_duration

from .app import err

# --- progress rendering -----------------------------------------------------------------------------

def _fmt_metric(v: Any) -> Optional[str]:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    if isinstance(v, str):
        return v if len(v) <= 40 else v[:39] + "…"
    return None          # nested structures are for the TUI


def _fmt_eta(s: Optional[float]) -> str:
    d = format_duration(s)
    return f"eta {d}" if d else ""


class ProgressRenderer:
    """Draws library :class:`~wina.events.Progress` events as rich progress bars, one bar per stage.

    Use as a context manager and pass the instance as ``on_event``. ``steps`` (optional) adds an
    overall bar for multi-step commands (``wina run``). Writes to stderr, so that stdout stays clean
    for ``--json`` output.
    """

    def __init__(self, console: Optional[Console] = None, steps: Optional[int] = None,
                 transient: bool = False) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)
        self.console = console or err
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("[cyan]{task.fields[eta]}"), TextColumn("[dim]{task.fields[info]}"),
                                 console=self.console, transient=transient, refresh_per_second=8)
        self.tasks: dict[str, Any] = {}
        self.steps_task = None
        if steps is not None:
            self.steps_task = self.progress.add_task("[bold]steps", total=steps, eta="", info="")

    def __enter__(self) -> "ProgressRenderer":
        self.progress.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:             # an error: leave only its one red line on the screen
            self.progress.live.transient = True
            self.progress.live.stop()        # not Progress.stop: off a terminal it adds an empty line
            return
        self.progress.stop()

    def __call__(self, ev) -> None:
        tid = self.tasks.get(ev.stage)
        if tid is None:
            tid = self.progress.add_task(ev.stage, total=ev.total or None, eta="", info="")
            self.tasks[ev.stage] = tid
        desc = ev.stage
        if ev.layer is not None and ev.n_layers:
            desc += f" [dim]layer {ev.layer + 1}/{ev.n_layers}[/]"
        parts = [escape(ev.message)] if ev.message else []
        for k, v in (ev.metrics or {}).items():
            f = _fmt_metric(v)
            if f is not None and k not in ("task",):
                parts.append(f"{k}={escape(f)}")
        self.progress.update(tid, completed=ev.done, total=ev.total or None, description=desc,
                             eta=_fmt_eta(ev.eta_s), info=" ".join(parts))

    def note(self, stage: str, message: str = "") -> None:
        """An indeterminate bar (a spinner) for work without events, e.g. loading a model."""
        tid = self.tasks.get(stage)
        if tid is None:
            self.tasks[stage] = self.progress.add_task(stage, total=None, eta="", info=escape(message))
        else:
            self.progress.update(tid, info=escape(message))

    def done(self, stage: str, message: str = "", keep: bool = True) -> None:
        """Mark a stage's bar finished (``keep=False``: remove it)."""
        tid = self.tasks.pop(stage, None)
        if tid is not None and not keep:
            self.progress.remove_task(tid)
        elif tid is not None:
            t = self.progress.tasks[[x.id for x in self.progress.tasks].index(tid)]
            total = t.total if t.total is not None else 1
            self.progress.update(tid, total=total, completed=total, eta="", info=escape(message))
            self.progress.stop_task(tid)

    def step(self, title: str, advance: bool = False) -> None:
        if self.steps_task is not None:
            self.progress.update(self.steps_task, description=f"[bold]steps[/] {escape(title)}",
                                 advance=1 if advance else 0)

    def print(self, *a, **kw) -> None:
        self.progress.console.print(*a, **kw)
