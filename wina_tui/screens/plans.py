"""The plan browser: every saved calibration plan (the app's plan folder and ``runs/*/plans`` of the
current directory) with its model, method, transform, allocation, sparsities and date; one opens
for chat or for evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.geometry import Size
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Label

from ..state import METHOD_NAMES, PlanInfo, browse_plans

ALLOC_SHORT = {"layer": "greedy layer", "global": "greedy cross", None: "—"}
COLUMNS = ("model", "method", "sparsity", "allocation", "transform", "data", "date", "state")


def model_name(spec: str, width: int = 26) -> str:
    """How the browsers name a model: a local path by its folder's name (a hub id as it is), at
    most ``width`` characters (an ellipsis at the end)."""
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec:
        spec = Path(spec).name or spec
    return spec if len(spec) <= width else spec[:width - 1] + "…"


def list_rows(screen: Size, title: str, console, most: int, width: int = 96) -> int:
    """Rows for a browser's list (or table) on a ``screen``-sized terminal, at most ``most``: its
    dialog (``width`` wide) keeps the rest for its border, its title (``title`` wrapped), the line
    under the list (up to four rows) and the buttons, so that the whole dialog stays on screen."""
    title_rows = len(Text(title).wrap(console, max(min(width, screen.width) - 4, 10)))
    return max(3, min(most, screen.height - 10 - title_rows))


def plan_row(p: PlanInfo) -> list:
    """The cells of :data:`COLUMNS`: what tells plans apart first (model, method, sparsity), so that
    they stay in view at 80 columns; a damaged plan's reason is said under the table."""
    sparsities = "any" if p.usable_allocation == "uniform" else (
        f"≤ {p.max_sparsity:.0%}" if p.max_sparsity is not None else "any")
    state = "damaged" if p.problem else p.describe_state()
    return [Text(model_name(p.model)), METHOD_NAMES.get(p.method, p.method), sparsities,
            ALLOC_SHORT.get(p.allocation, str(p.allocation)), "yes" if p.transform else "no",
            p.source[:14], p.date,
            Text(state, style="green" if state == "ready" else "red" if p.problem else "yellow")]


class PlansScreen(ModalScreen[Optional[tuple[str, PlanInfo]]]):
    """Returns ``("chat" | "evaluate", PlanInfo)`` or None."""

    BINDINGS = [Binding("escape", "close", "Close"), Binding("c", "open('chat')", "Chat"),
                Binding("e", "open('evaluate')", "Evaluate")]

    def __init__(self, roots: list[Path], **kw) -> None:
        super().__init__(**kw)
        self.roots = roots
        self.plans: list[PlanInfo] = browse_plans(*roots)

    def compose(self) -> ComposeResult:
        where = " · ".join(str(r) for r in self.roots)
        with Vertical(id="plans", classes="modal"):
            bad = sum(1 for p in self.plans if p.problem)
            count = f"{len(self.plans) - bad}, {bad} damaged" if bad else f"{len(self.plans)}"
            yield Label(f"Saved plans ({count}) in {where}" if self.plans else
                        f"No saved plans in {where} (or runs/*/plans here): calibrate first (F3)",
                        classes="modal-title")
            table = DataTable(id="plan-table", cursor_type="row", zebra_stripes=True)
            table.add_columns(*COLUMNS)
            for p in self.plans:
                table.add_row(*plan_row(p))
            yield table
            yield Label("", id="plan-path", classes="plan-path")
            with Horizontal(classes="modal-buttons"):
                yield Button("Chat (c)", variant="primary", id="open-chat", compact=True)
                yield Button("Evaluate (e)", id="open-evaluate", compact=True)
                yield Button("Close", id="close", compact=True)

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        self._show_path()

    def on_resize(self, event: events.Resize) -> None:
        title = str(self.query_one(".modal-title", Label).render())
        self.query_one(DataTable).styles.max_height = list_rows(event.size, title, self.app.console, 18)

    @on(DataTable.RowHighlighted)
    def _show_path(self) -> None:
        p = self.selected()
        state = p.describe_state() if p else "ready"
        self.query_one("#plan-path", Label).update(
            "" if p is None else str(p.path) if state == "ready" else f"{p.path} · {state}")

    def selected(self) -> Optional[PlanInfo]:
        t = self.query_one(DataTable)
        if not self.plans or t.cursor_row is None or not (0 <= t.cursor_row < len(self.plans)):
            return None
        return self.plans[t.cursor_row]

    @on(DataTable.RowSelected)
    def _enter(self) -> None:
        self.action_open("chat")

    @on(Button.Pressed, "#open-chat")
    def _b_chat(self) -> None:
        self.action_open("chat")

    @on(Button.Pressed, "#open-evaluate")
    def _b_eval(self) -> None:
        self.action_open("evaluate")

    @on(Button.Pressed, "#close")
    def action_close(self) -> None:
        self.dismiss(None)

    def action_open(self, target: str) -> None:
        p = self.selected()
        if p is None:
            return
        if p.problem:
            self.notify(f"this plan cannot be opened ({p.problem}): delete {p.path} or calibrate again",
                        severity="warning")
            return
        if not p.complete:
            self.notify(f"this plan is partial ({p.describe_state()}): calibrate with the same settings "
                        "to finish it", severity="warning")
            return
        self.dismiss((target, p))
