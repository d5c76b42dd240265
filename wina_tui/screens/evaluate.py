"""Evaluate: choose tasks, a limit, methods and sparsities; watch progress per task; compare runs.

Each (method, sparsity) is one run of :func:`wina.evaluate.run_evaluation` on the loaded model,
written to the results store; the table and the chart come from :mod:`wina.compare` over the runs
of this session plus any earlier runs loaded from the store.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import (Button, DataTable, Footer, Header, Input, Label, SelectionList, Static,
                             TabbedContent, TabPane)
from textual.widgets.selection_list import Selection
from textual.worker import Worker, WorkerState

from wina.api import Cancelled, CancelToken, InvalidArgument, check_limit

from ..state import METHOD_NAMES, describe_error, event_dict, fmt_pct
from ..widgets.plot_view import PlotView
from ..widgets.progress_panel import ProgressPanel
from .messages import WorkerFinished
from .setup import check_sparsity

DEFAULT_TASKS = ("arc_easy",)


def parse_sparsities(text: str) -> tuple[list[float], Optional[str]]:
    out: list[float] = []
    for part in text.replace(";", ",").replace(",", " ").split():    # commas, semicolons or spaces
        v, err = check_sparsity(part)
        if err:
            return [], err
        if v not in out:
            out.append(v)
    if not out:
        return [], "give at least one sparsity, e.g. 0.25, 0.5"
    return out, None


def parse_limit(text: str) -> tuple[Optional[float], Optional[str]]:
    t = text.strip()
    if not t or t.lower() in ("all", "none"):
        return None, None
    try:
        v = int(t) if t.lstrip("+-").isdigit() else float(t)    # "-5" is said back as -5, not -5.0
    except ValueError:
        return None, f"limit must be a number of documents (or empty for all), got {t!r}"
    if math.isfinite(v) and v >= 1 and v != int(v):
        return None, f"limit must be a whole number of documents or a fraction < 1, got {t}"
    try:
        return check_limit(v), None          # the library's rule (nan, inf, 0 and negatives refused)
    except InvalidArgument as e:
        return None, str(e)


PPL_TEXT = "wikitext2/wiki.test.raw"     # the perplexity text: the data folder's, or the shipped excerpt


def parse_ppl_tokens(text: str) -> tuple[Optional[int], bool, Optional[str]]:
    """The perplexity field: (tokens, wanted, error). Empty: no perplexity; ``all``: the whole text;
    else the first N tokens (at least one window, the library's rule)."""
    from wina.api import check_max_tokens
    t = text.strip().lower()
    if not t:
        return None, False, None
    if t == "all":
        return None, True, None
    try:
        n = int(t)
    except ValueError:
        return None, False, f"perplexity: a number of tokens, 'all' or empty, got {text.strip()!r}"
    try:
        check_max_tokens(n)
    except InvalidArgument as e:
        return None, False, f"perplexity: {e}"
    return n, True, None


def metric_note(runs, short: dict) -> str:
    """Which lm-eval metric each task's column shows (acc_norm where the task has it), e.g.
    ``accuracy %: piqa acc_norm · arc-e acc_norm · boolq acc``."""
    seen: dict[str, str] = {}
    for r in runs:
        try:
            for task, h in (r.headline or {}).items():
                m = h.get("metric") if isinstance(h, dict) else None
                if m and task not in seen:
                    seen[task] = str(m)
        except Exception:
            continue
    if not seen:
        return ""
    return "accuracy %: " + " · ".join(f"{short.get(t, t)} {m}" for t, m in sorted(seen.items()))


class EvaluateScreen(Screen):
    BINDINGS = [
        Binding("ctrl+r", "run", "Run", priority=True),
        Binding("escape", "cancel", "Cancel", priority=True),
        Binding("ctrl+l", "load_runs", "Load runs", priority=True),
        Binding("ctrl+y", "cycle_metric", "Chart metric"),
    ]

    class Progressed(Message):
        def __init__(self, ev: dict) -> None:
            super().__init__()
            self.ev = ev

    class RunDone(Message):
        def __init__(self, run, index: int, total: int) -> None:
            super().__init__()
            self.run = run
            self.index = index
            self.total = total

    class Finished(WorkerFinished):
        """The evaluation worker ended."""

    def __init__(self, session, **kw) -> None:
        super().__init__(**kw)
        self.session = session
        self.runs: list = []                 # wina.results.Run: this session's and loaded ones
        self.events: list[dict] = []
        self.cancel: Optional[CancelToken] = None
        self.worker: Optional[Worker] = None
        self.state = "idle"
        self.metric = "avg"
        self._pending_preset = None
        self._restore_data: Optional[dict] = None

    def compose(self) -> ComposeResult:
        from wina.api import TASKS, known_tasks
        yield Header()
        with Horizontal(id="eval-columns"):
            with VerticalScroll(id="eval-form", classes="box", can_focus=False):   # scrolls on a short terminal
                yield Label("Tasks", classes="form-title")
                yield SelectionList(*[Selection(f"{t} ({TASKS[t].docs} docs)", t, t in DEFAULT_TASKS)
                                      for t in known_tasks()], id="tasks", compact=True)
                yield Horizontal(Label("Limit", classes="field-label"),
                                 Input("20", placeholder="docs per task; empty: all", compact=True, id="limit"),
                                 classes="field")
                yield Horizontal(Label("Perplexity", classes="field-label"),
                                 Input("", placeholder="wikitext tokens, all",
                                       compact=True, id="ppl-tokens"),
                                 classes="field")
                yield Label("Methods", classes="form-title")
                yield SelectionList(Selection("dense", "dense", True), Selection("TEAL", "teal", True),
                                    Selection("WINA", "wina", True), id="methods", compact=True)
                yield Horizontal(Label("Sparsities", classes="field-label"),
                                 Input("0.25, 0.5", placeholder="0.25, 0.5", compact=True, id="sparsities"),
                                 classes="field")
                yield Label("", id="eval-error", classes="field-error")
                with Horizontal(id="eval-buttons"):
                    yield Button("Run", id="eval-run", variant="primary", compact=True)
                    yield Button("Load runs", id="eval-load", compact=True)
            with Vertical(id="eval-right"):
                yield Static("", id="eval-what")
                yield ProgressPanel([("runs", "Runs")], id="eval-progress")
                with TabbedContent(id="eval-tabs"):
                    with TabPane("Results", id="tab-results"):
                        yield DataTable(id="results", zebra_stripes=True, cursor_type="row")
                        yield Static("", id="results-notes")
                    with TabPane("Chart", id="tab-chart"):
                        yield PlotView(self._draw_chart, empty="run or load evaluations to plot quality "
                                                                 "against sparsity", id="quality-chart")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "evaluate"
        self._describe()
        self.query_one("#results-notes", Static).update(Text(
            "No runs yet: ctrl+r runs the form, ctrl+l loads earlier runs from the results store.",
            style="dim"))
        # after the first refresh: the form's own widgets set their initial values when they mount,
        # which would undo a preset or the remembered form applied before them
        self.call_after_refresh(self._fill_pending)

    def _fill_pending(self) -> None:
        if self._restore_data is not None:
            self._fill(self._restore_data)
            self._restore_data = None
        if self._pending_preset is not None:
            self.apply_preset(self._pending_preset)
            self._pending_preset = None

    def on_screen_resume(self) -> None:
        self._describe()

    # --- what the app remembers and cancels ----------------------------------------------------
    @property
    def job_running(self) -> bool:
        return self.worker is not None and self.worker.state in (WorkerState.PENDING, WorkerState.RUNNING)

    def cancel_all(self) -> None:
        if self.cancel is not None:
            self.cancel.cancel()

    def snapshot(self) -> Optional[dict]:
        """The form as the settings file keeps it (None before the screen was shown)."""
        if not self.is_mounted:
            return self._restore_data
        return {k: self.query_one(wid, Input).value if kind is str else list(self.query_one(wid, SelectionList).selected)
                for k, (wid, kind) in self.FIELDS.items()}

    # the form's remembered fields: key → (widget, the type the settings file holds it as)
    FIELDS = {"tasks": ("#tasks", list), "methods": ("#methods", list), "limit": ("#limit", str),
              "ppl_tokens": ("#ppl-tokens", str), "sparsities": ("#sparsities", str)}

    def restore(self, data: dict) -> list[str]:
        """Fill the form from :meth:`snapshot`'s dict; returns the keys skipped for their type."""
        wrong = [k for k, (_, kind) in self.FIELDS.items() if k in data and not isinstance(data[k], kind)]
        if not self.is_mounted:
            self._restore_data = dict(data)
        else:
            self._fill(data)
        return wrong

    def _fill(self, data: dict) -> None:
        for key, (wid, kind) in self.FIELDS.items():
            val = data.get(key)
            if not isinstance(val, kind):
                continue
            if kind is str:
                self.query_one(wid, Input).value = val
            else:                                   # an empty list too: a perplexity-only form has no task
                sel = self.query_one(wid, SelectionList)
                sel.deselect_all()
                for v in val:
                    try:
                        sel.select(v)
                    except Exception:
                        pass

    def apply_preset(self, preset) -> None:
        """Fill the form from a :class:`wina.presets.Preset` (tasks, limit, methods, sparsities)."""
        if not self.is_mounted:
            self._pending_preset = preset
            return
        ev = preset.eval
        sel = self.query_one("#tasks", SelectionList)
        sel.deselect_all()                  # a preset without tasks measures perplexity alone
        for t in ev.tasks:
            try:
                sel.select(t)
            except Exception:
                pass
        self.query_one("#limit", Input).value = "" if ev.limit is None else f"{ev.limit:g}"
        wikitext = bool(ev.ppl_text) and ev.ppl_text.replace("\\", "/").endswith(PPL_TEXT)
        self.query_one("#ppl-tokens", Input).value = (
            "" if not wikitext else "all" if ev.ppl_max_tokens is None else str(ev.ppl_max_tokens))
        self.query_one("#sparsities", Input).value = ", ".join(f"{s:g}" for s in ev.sparsities)
        methods = self.query_one("#methods", SelectionList)
        methods.deselect_all()
        for v in preset.variants:
            methods.select(v.method)

    def _describe(self) -> None:
        s = self.session
        data = str(s.data_dir) if s.data_dir else "the hub (no local data folder found)"
        model = s.loaded.model_id if s.loaded else s.settings.model
        tr = " · transform" if s.settings.options.transform else ""
        self.query_one("#eval-what", Static).update(Text.assemble(
            ("model ", "dim"), (model, "bold"), (tr, ""), ("  data ", "dim"), (data, ""),
            ("\nresults → ", "dim"), (str(s.results_dir), ""), ("   state: ", "dim"), (self.state, "bold")))

    # --- form ------------------------------------------------------------------------------------
    def read_form(self) -> tuple[Optional[dict], Optional[str]]:
        tasks = list(self.query_one("#tasks", SelectionList).selected)
        ppl_tokens, ppl, err = parse_ppl_tokens(self.query_one("#ppl-tokens", Input).value)
        if err:
            return None, err
        if not tasks and not ppl:
            return None, "choose at least one task, or a perplexity (wikitext-2 tokens)"
        limit, err = parse_limit(self.query_one("#limit", Input).value)
        if err:
            return None, err
        methods = list(self.query_one("#methods", SelectionList).selected)
        if not methods:
            return None, "choose at least one method"
        sparsities: list[float] = []
        if any(m != "dense" for m in methods):
            sparsities, err = parse_sparsities(self.query_one("#sparsities", Input).value)
            if err:
                return None, err
            if any(s == 0 for s in sparsities):
                return None, "sparsity 0 is the dense run: tick dense instead"
        return {"tasks": tasks, "limit": limit, "ppl": ppl, "ppl_tokens": ppl_tokens, "methods": methods,
                "sparsities": sparsities}, None

    def show_error(self, msg: str) -> None:
        lab = self.query_one("#eval-error", Label)
        lab.update(f"⚠ {msg}" if msg else "")
        lab.set_class(bool(msg), "-shown")

    @on(Input.Changed)
    def _changed(self) -> None:
        _, err = self.read_form()
        self.show_error(err or "")

    @on(Button.Pressed, "#eval-run")
    def _b_run(self) -> None:
        self.action_run()

    @on(Button.Pressed, "#eval-load")
    def _b_load(self) -> None:
        self.action_load_runs()

    # --- actions ---------------------------------------------------------------------------------
    def action_run(self) -> bool:
        form, err = self.read_form()
        if err:
            self.show_error(err)
            self.notify(err, severity="warning")
            return False
        self.show_error("")
        if self.job_running:
            self.notify("an evaluation is running (esc cancels)", severity="warning")
            return False
        if self.session.busy:
            self.notify(f"the model is busy ({self.session.busy})", severity="warning")
            return False
        jobs = []
        for m in form["methods"]:
            if m == "dense":
                jobs.append(("dense", 0.0))
            else:
                jobs.extend((m, s) for s in form["sparsities"])
        panel = self.query_one(ProgressPanel)
        panel.clear_rows(keep=("runs",))
        panel.update_stage("runs", 0, len(jobs), message="starting")
        self.events.clear()
        self.cancel = CancelToken()
        self.state = "running"
        self._describe()
        self.worker = self.run_jobs(jobs, form, self.cancel)
        try:
            self.app.remember()
        except Exception:
            pass
        return True

    def action_cancel(self) -> None:
        if self.cancel is not None and self.state == "running":
            self.cancel.cancel()
            self.notify("cancelling after the current chunk…")

    def action_load_runs(self) -> None:
        from ..state import result_folders
        from .load_runs import LoadRunsScreen

        def loaded(paths: Optional[list[str]]) -> None:
            if paths:
                self.load_paths(paths)

        self.app.push_screen(LoadRunsScreen(result_folders(self.session.results_dir)), loaded)

    def load_paths(self, paths: list[str]) -> None:
        """Add results files to the table and the chart. A damaged file (unreadable, or read but
        holding values the table cannot show) is left out with one error notice; never a crash."""
        from wina.api import load_run
        added = []
        for p in paths:
            try:
                run = load_run(p)
            except Exception as e:
                self.notify(describe_error(e), severity="error")
                continue
            if not any(r.path is not None and run.path is not None and Path(r.path) == Path(run.path)
                       for r in self.runs + added):
                added.append(run)
        before = list(self.runs)
        self.runs = before + added
        try:
            self.refresh_results()
        except Exception:
            # one of the new files holds values the table cannot show: add them one by one
            self.runs = list(before)
            for run in list(added):
                self.runs.append(run)
                try:
                    self.refresh_results()
                except Exception as e:
                    self.runs.pop()
                    added.remove(run)
                    self.notify(f"{run.path}: damaged results file ({describe_error(e)})", severity="error")
            try:
                self.refresh_results()
            except Exception as e:       # the runs shown before are not shown now
                self.notify(f"the results table cannot be shown: {describe_error(e)}", severity="error")
        n = len(added)
        if n:
            self.notify(f"loaded {n} run{'s' if n != 1 else ''}")

    def action_cycle_metric(self) -> None:
        from wina.api import comparison_rows
        if not self.runs:
            return
        cmp = comparison_rows(self.runs)
        options = (["avg"] if cmp.acc_columns else []) + cmp.acc_columns + cmp.low_columns
        if not options:
            return
        i = options.index(self.metric) if self.metric in options else -1
        self.metric = options[(i + 1) % len(options)]
        self.query_one(PlotView).replot()
        self.query_one(TabbedContent).active = "tab-chart"

    # --- worker ------------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="evaluate")
    def run_jobs(self, jobs: list[tuple[str, float]], form: dict, cancel: CancelToken) -> None:
        from wina.api import Evaluation, data_text, evaluate
        s = self.session
        post = self.post_message
        settings = s.settings
        try:
            # checked before the model loads: tasks, limit, data, the perplexity text
            text = data_text(PPL_TEXT, s.data_dir, form["ppl_tokens"]) if form["ppl"] else None
            ev = Evaluation(tasks=tuple(form["tasks"]), limit=form["limit"], data_dir=s.data_dir or "auto",
                            ppl_text=text, ppl_max_tokens=form["ppl_tokens"]).validate()
            with s.using("evaluate"):
                loaded = s.ensure_loaded(settings.model, settings.options.transform)
                for i, (method, sparsity) in enumerate(jobs):
                    cancel.check()
                    label = "dense" if method == "dense" else f"{METHOD_NAMES[method]} {sparsity:.0%}"
                    post(self.Progressed({"stage": "runs", "done": i, "total": len(jobs), "message": label}))
                    opts = s.eval_options(method, sparsity, settings)
                    s.drop_sparsifier()          # wina.api.evaluate puts its own on, and takes it off
                    run = evaluate(loaded, opts, ev, out=s.results_dir,
                                   on_event=lambda e: post(self.Progressed(event_dict(e))), cancel=cancel)
                    post(self.RunDone(run, i, len(jobs)))
                self._restore()
            post(self.Finished(True, f"{len(jobs)} run{'s' if len(jobs) != 1 else ''} done"))
        except Cancelled:
            self._restore()
            post(self.Finished(False, "cancelled: finished runs are saved; nothing half-written", cancelled=True))
        except Exception as e:
            self._restore()
            post(self.Finished(False, describe_error(e)))

    def _restore(self) -> None:
        """Put the model back as the chat had it (the session's applied settings)."""
        s = self.session
        try:
            if s.applied is not None and s.loaded is not None:
                s.prepare(s.applied, plan_path=s.applied.options.plan, plan=s.plan if s.applied.options.plan else None)
            else:
                s.drop_sparsifier()
        except Exception:
            s.drop_sparsifier()
            s.applied = None

    # --- messages ----------------------------------------------------------------------------------
    @on(Progressed)
    def _progress(self, message: "EvaluateScreen.Progressed") -> None:
        ev = message.ev
        self.events.append(ev)
        panel = self.query_one(ProgressPanel)
        if ev["stage"] == "runs":            # a run starts: the last run's task bars go
            panel.clear_rows(keep=("runs",), reset=False)
            panel.update_stage("runs", ev["done"], ev["total"], message=ev.get("message", ""))
            return
        metrics = ev.get("metrics") or {}
        tasks = metrics.get("tasks")
        row = panel.rows.get("runs")
        if row is not None and row.is_mounted and (tasks or ev["stage"] == "ppl"):
            row.query_one(".stage-status", Label).update(row.status)   # "loading tasks" is over
        if isinstance(tasks, dict) and tasks:
            for name, dt in tasks.items():
                done, total = int(dt[0]), int(dt[1])
                panel.update_stage(f"task-{name}", done, total, title=f"  {name}",
                                   finished=bool(total) and done >= total)
        elif ev["stage"] == "ppl":
            panel.update_stage("ppl", ev["done"], ev["total"], title="  perplexity", eta=ev.get("eta_s"),
                               finished=bool(ev["total"]) and ev["done"] >= ev["total"])
        elif ev.get("message"):
            row = panel.rows.get("runs")
            if row is not None and row.is_mounted:
                row.query_one(".stage-status", Label).update(f"{row.status} · {ev['message']}")

    @on(RunDone)
    def _run_done(self, message: "EvaluateScreen.RunDone") -> None:
        self.runs.append(message.run)
        panel = self.query_one(ProgressPanel)
        panel.update_stage("runs", message.index + 1, message.total, message=message.run.label)
        self.refresh_results()

    @on(Finished)
    def _finished(self, message: "EvaluateScreen.Finished") -> None:
        self.state = "done" if message.ok else ("cancelled" if message.cancelled else "failed")
        panel = self.query_one(ProgressPanel)
        row = panel.rows.get("runs")
        if message.ok and row is not None:
            panel.update_stage("runs", row.total or 0, row.total, finished=True)
        elif row is not None:
            panel.update_stage("runs", row.done, row.total, message=message.message, failed=True)
        if message.ok:
            self.notify(f"evaluation: {message.message}")
        else:
            self.notify(message.message, severity="warning" if message.cancelled else "error", timeout=8)
        self._describe()

    # --- results -----------------------------------------------------------------------------------
    def refresh_results(self) -> None:
        from wina.api import SHORT, comparison_rows, is_best
        table = self.query_one("#results", DataTable)
        table.clear(columns=True)
        if not self.runs:
            return
        cmp = comparison_rows(self.runs)
        several = len(cmp.models) > 1                   # runs of more than one model: say whose row
        cols = (["model"] if several else []) + ["sparsity", "method"] + [SHORT.get(c, c) for c in cmp.acc_columns]
        cols += ["avg"] if cmp.acc_columns else []
        cols += [f"{c} ↓" for c in cmp.low_columns] + ["measured"]
        table.add_columns(*cols)
        for row in cmp.rows:
            def cell(c, v, pct=True):
                if v is None:
                    return Text("—", style="dim", justify="right")
                s = f"{100 * v:.1f}" if pct else (f"{v:.2f}" if v < 1000 else f"{v:.4g}")
                win = pct and is_best(cmp, row, c)          # accuracies and their average
                return Text(s, style="bold green" if win else "", justify="right")

            cells = [Text(row.model)] if several else []
            cells += [Text("0 %" if row.label == "dense" else f"{100 * row.sparsity:.0f} %", justify="right"),
                     Text(row.label, style="bold" if row.label == "dense" else "")]
            cells += [cell(c, row.values.get(c)) for c in cmp.acc_columns]
            if cmp.acc_columns:
                cells.append(cell("avg", row.average))
            cells += [cell(c, row.values.get(c), pct=False) for c in cmp.low_columns]
            cells.append(Text(fmt_pct(row.measured), style="dim", justify="right"))
            table.add_row(*cells)
        notes = [metric_note(self.runs, SHORT)] + list(cmp.notes) + list(cmp.warnings)
        notes = "; ".join(n for n in notes if n)
        self.query_one("#results-notes", Static).update(Text(notes, style="dim") if notes else "")
        self.query_one(PlotView).replot()

    def _draw_chart(self, fig, width: int, height: int) -> bool | list[str]:
        """One line per method; returns the methods, named in a legend line under the chart."""
        from wina.api import chart_series, comparison_rows
        if not self.runs:
            return False
        cmp = comparison_rows(self.runs)
        metric = self.metric
        if metric != "avg" and metric not in cmp.acc_columns + cmp.low_columns:
            metric = "avg"
        if metric == "avg" and not cmp.acc_columns:
            if not cmp.low_columns:
                return False
            metric = cmp.low_columns[0]
        series = chart_series(self.runs, metric)
        if not series:
            return False
        for pts in series.values():
            sig = fig.signal([p[0] for p in pts], [p[1] for p in pts])
            if len(pts) > 1:
                sig.lines()
            fig.draw(sig)
        what = "average accuracy (%)" if metric == "avg" else (
            f"{metric} (%)" if metric in cmp.acc_columns else f"{metric} (lower is better)")
        fig.title(f"{what} vs sparsity")
        fig.label("sparsity (%)", "x")
        return list(series)
