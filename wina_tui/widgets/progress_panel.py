"""Progress bars, one row per stage (or task), each with a count, an ETA and a short message."""
from __future__ import annotations

from typing import Optional

from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar

from ..state import fmt_eta


class StageRow(Horizontal):
    DEFAULT_CSS = """
    StageRow { height: 1; }
    StageRow > .stage-title { width: 16; text-style: bold; }
    StageRow > ProgressBar { width: 32; }
    StageRow > ProgressBar > Bar { width: 22; }
    StageRow > .stage-status { width: 1fr; color: $text-muted; }
    StageRow.-done > .stage-title { color: $success; }
    StageRow.-failed > .stage-title { color: $error; }
    """

    def __init__(self, key: str, title: str) -> None:
        super().__init__(id=f"stage-{key}")
        self.key = key
        self.title = title
        self.done = 0
        self.pending: Optional[tuple] = None     # the latest update made before the row was mounted
        self.total: Optional[int] = None
        self.status = ""

    def compose(self):
        yield Label(self.title, classes="stage-title")
        yield ProgressBar(total=1, show_eta=False, show_percentage=True)
        yield Label("waiting", classes="stage-status")

    def set(self, done: int, total: Optional[int], *, eta: Optional[float] = None, message: str = "",
            finished: bool = False, failed: bool = False, count: bool = True) -> None:
        self.done, self.total = done, total
        bar = self.query_one(ProgressBar)
        if total:
            bar.update(total=total, progress=done)
        if finished:
            self.add_class("-done")
            if total:
                bar.update(total=total, progress=total)
            else:
                bar.update(total=1, progress=1)
        if failed:
            self.add_class("-failed")
        count = (f"{done}/{total}" if total else (str(done) if done else "")) if count else ""
        if finished:
            status = f"{count} · done" if count else "done"
        elif failed:
            status = f"{count} · {message or 'stopped'}" if count else (message or "stopped")
        else:
            show_eta = count and total and done and eta is not None
            status = " · ".join(p for p in (count, fmt_eta(eta) if show_eta else "", message) if p)
        self.status = status
        self.query_one(".stage-status", Label).update(status)

    def reset(self) -> None:
        self.remove_class("-done", "-failed")
        self.done, self.total = 0, None
        self.query_one(ProgressBar).update(total=1, progress=0)
        self.status = "waiting"
        self.query_one(".stage-status", Label).update("waiting")


class ProgressPanel(Vertical):
    """A column of :class:`StageRow`; rows are added on first use."""

    DEFAULT_CSS = """
    ProgressPanel { height: auto; }
    """

    def __init__(self, stages: Optional[list[tuple[str, str]]] = None, **kw) -> None:
        super().__init__(**kw)
        self._initial = stages or []
        self.rows: dict[str, StageRow] = {}

    def compose(self):
        for key, title in self._initial:
            row = StageRow(key, title)
            self.rows[key] = row
            yield row

    def row(self, key: str, title: Optional[str] = None) -> StageRow:
        r = self.rows.get(key)
        if r is None:
            r = StageRow(key, title or key)
            self.rows[key] = r
            self.mount(r)
        return r

    def update_stage(self, key: str, done: int, total: Optional[int], *, title: Optional[str] = None,
                     eta: Optional[float] = None, message: str = "", finished: bool = False,
                     failed: bool = False, count: bool = True) -> None:
        r = self.row(key, title)
        kw = dict(eta=eta, message=message, finished=finished, failed=failed, count=count)
        if r.is_mounted and r.pending is None:
            r.set(done, total, **kw)
        else:                       # a row still mounting shows the latest update once it can, not an older one
            first = r.pending is None
            r.pending = (done, total, kw)
            if first:
                self.call_after_refresh(self._show_pending, r)

    @staticmethod
    def _show_pending(r: "StageRow") -> None:
        if r.pending is not None:
            (done, total, kw), r.pending = r.pending, None
            r.set(done, total, **kw)

    def clear_rows(self, keep: tuple[str, ...] = (), reset: bool = True) -> None:
        """Remove every row but those in ``keep`` (which are reset, unless ``reset`` is False)."""
        for key in list(self.rows):
            if key in keep:
                if reset:
                    self.rows[key].reset()
            else:
                self.rows.pop(key).remove()
