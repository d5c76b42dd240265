"""The plan browser: every saved calibration plan (the app's plan folder and ``runs/*/plans`` of the
current directory) with its model, method, transform, allocation, sparsities and date; one opens
for chat or for evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Label

from ..state import METHOD_NAMES, PlanInfo, browse_plans

ALLOC_SHORT = {"layer": "greedy layer", "global": "greedy cross", None: "—"}


def plan_row(p: PlanInfo) -> list:
    sparsities = "any" if p.usable_allocation == "uniform" else (
        f"≤ {p.max_sparsity:.0%}" if p.max_sparsity is not None else "any")
    state = p.describe_state()
    return [Text(p.model[:26]), METHOD_NAMES.get(p.method, p.method), "yes" if p.transform else "no",
            ALLOC_SHORT.get(p.allocation, str(p.allocation)), sparsities, p.source[:14], p.date,
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
            table.add_columns("model", "method", "transform", "allocation", "sparsity", "data", "date",
                              "state")
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

    @on(DataTable.RowHighlighted)
    def _show_path(self) -> None:
        p = self.selected()
        self.query_one("#plan-path", Label).update(str(p.path) if p else "")

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
