"""A modal list of the results store's run files; returns the chosen paths."""
from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, SelectionList
from textual.widgets.selection_list import Selection


def describe_run_file(path: Path) -> str:
    from wina.results import load_run
    run = load_run(path)
    w = run.wina
    tasks = ",".join(run.headline) or ("ppl" if run.perplexity is not None else "—")
    s = "" if run.method == "dense" else f" {run.sparsity:.0%}"
    return f"{run.label}{s} · {w.get('model', '?')} · {tasks} · {(w.get('date') or '')[:16]}"


class LoadRunsScreen(ModalScreen[list]):
    BINDINGS = [Binding("escape", "dismiss_none", "Close"), Binding("ctrl+a", "all", "All")]

    def __init__(self, folder: Path, **kw) -> None:
        super().__init__(**kw)
        self.folder = Path(folder)

    def compose(self) -> ComposeResult:
        items = []
        files = sorted(self.folder.glob("*.json"), reverse=True) if self.folder.is_dir() else []
        for f in files:
            try:
                items.append(Selection(describe_run_file(f), str(f)))
            except Exception:
                continue
        with Vertical(id="load-runs", classes="modal"):
            yield Label(f"Runs in {self.folder}" if items else f"No run files in {self.folder}",
                        classes="modal-title")
            yield SelectionList(*items, id="run-files")
            with Horizontal(classes="modal-buttons"):
                yield Button("Load", variant="primary", id="load", compact=True)
                yield Button("All", id="all", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    @on(Button.Pressed, "#load")
    def _load(self) -> None:
        self.dismiss(list(self.query_one(SelectionList).selected))

    @on(Button.Pressed, "#all")
    def action_all(self) -> None:
        self.query_one(SelectionList).select_all()

    @on(Button.Pressed, "#cancel")
    def action_dismiss_none(self) -> None:
        self.dismiss([])
