"""The results browser: the run files of the results store (and ``runs/*/runs`` of the current
directory, where ``wina run`` writes), newest first, each with its method, model, tasks, average
and date; returns the chosen paths, which the evaluate screen loads into its table and chart."""
from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, SelectionList
from textual.widgets.selection_list import Selection

from .plans import list_rows, model_name


def describe_run_file(path: Path) -> str:
    """One option of the list: method and sparsity, model (a local path by its folder's name), the
    average, date and tasks, in that order, so that what tells runs apart stays in view where a long
    option is cut (at 80 columns); the line under the list says the highlighted one in full."""
    from wina.api import load_run
    run = load_run(path)
    w = run.wina
    tasks = ",".join(run.headline) or ("" if run.perplexity is not None else "—")
    s = "" if run.method == "dense" else f" {run.sparsity:.0%}"
    vals = [h.get("value") for h in run.headline.values() if isinstance(h, dict)
            and isinstance(h.get("value"), (int, float))]
    avg = f" · avg {100 * sum(vals) / len(vals):.1f}" if vals else (
        f" · ppl {run.perplexity:.2f}" if run.perplexity is not None else "")
    date = (w.get("date") or "")[:16].replace("T", " ")
    return f"{run.label}{s} · {model_name(str(w.get('model', '?')), 40)}{avg} · {date}" + (
        f" · {tasks}" if tasks else "")


def one_line(e: BaseException, path: Path, width: int = 100) -> str:
    """Why the results file ``path`` cannot be loaded, in one short line (its folder left out)."""
    from wina.api import WinaError
    msg = str(e).splitlines()[0] if str(e) else ""
    if not isinstance(e, WinaError):
        msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    msg = msg.replace(str(path), path.name)
    return msg if len(msg) <= width else msg[:width - 1] + "…"


class LoadRunsScreen(ModalScreen[list]):
    """Returns the picked paths. Holds each listed file's option text (``labels``, path -> text) for
    the line under the list, which shows the highlighted file in full (wrapped) with its path."""

    BINDINGS = [Binding("escape", "dismiss_none", "Close"), Binding("ctrl+a", "all", "All")]

    def __init__(self, folders, **kw) -> None:
        super().__init__(**kw)
        self.folders = [Path(f) for f in (folders if isinstance(folders, (list, tuple)) else [folders])]
        self.folder = self.folders[0]
        self.damaged: dict[str, str] = {}     # path -> why it cannot be loaded (listed, not pickable)
        self.labels: dict[str, str] = {}      # path -> its option's text

    def compose(self) -> ComposeResult:
        items = []
        files = []
        for folder in self.folders:
            if folder.is_dir():
                files += list(folder.glob("*.json"))
        files.sort(key=lambda f: (-f.stat().st_mtime, str(f)) if f.exists() else (0, str(f)))
        for f in files:
            try:
                label = describe_run_file(f)
            except Exception as e:
                why = one_line(e, f)
                self.damaged[str(f)] = why
                label = Text.assemble(("damaged ", "bold red"), f.name, (f" · {why}", "red"))
                self.labels[str(f)] = label.plain
                items.append(Selection(label, str(f), disabled=True))
                continue
            if len(self.folders) > 1 and f.parent != self.folder:
                label += f" · {f.parent.parent.name}"
            self.labels[str(f)] = label
            items.append(Selection(label, str(f)))
        where = " + ".join(str(f) for f in self.folders[:3]) + (" …" if len(self.folders) > 3 else "")
        with Vertical(id="load-runs", classes="modal"):
            n = len(items) - len(self.damaged)
            bad = f", {len(self.damaged)} damaged" if self.damaged else ""
            yield Label(f"Past evaluations ({n}{bad}) in {where}: space picks · ctrl+a all" if items
                        else f"No run files in {where}", classes="modal-title")
            yield SelectionList(*items, id="run-files")
            yield Label("", id="run-detail", classes="plan-path")
            with Horizontal(classes="modal-buttons"):
                yield Button("Load", variant="primary", id="load", compact=True)
                yield Button("All", id="all", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self._show_detail()

    def on_resize(self, event: events.Resize) -> None:
        title = str(self.query_one(".modal-title", Label).render())
        self.query_one(SelectionList).styles.max_height = list_rows(event.size, title, self.app.console, 14)

    @on(SelectionList.SelectionHighlighted)
    def _show_detail(self) -> None:
        sel = self.query_one(SelectionList)
        i = sel.highlighted if sel.highlighted is not None else 0
        path = sel.get_option_at_index(i).value if 0 <= i < sel.option_count else None
        self.query_one("#run-detail", Label).update(f"{self.labels[path]}\n{path}" if path else "")

    @on(Button.Pressed, "#load")
    def _load(self) -> None:
        self.dismiss([p for p in self.query_one(SelectionList).selected if p not in self.damaged])

    @on(Button.Pressed, "#all")
    def action_all(self) -> None:
        self.query_one(SelectionList).select_all()

    @on(Button.Pressed, "#cancel")
    def action_dismiss_none(self) -> None:
        self.dismiss([])
