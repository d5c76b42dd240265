"""Calibrate & allocate: progress per stage and per layer with an ETA from this run's own pace, a
log, and three live views: the score histogram of each matrix as its layer is calibrated (the
threshold of the target marked), the greedy trajectory of the layer being allocated, and the
allocation heat map filling in layer by layer.

Calibration writes its plan directory as layers finish (atomic files, see :mod:`wina.plan`), so a
cancelled run leaves only whole layers behind and starting again resumes at the first missing one
(the log and the progress rows say where).
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Optional

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, RichLog, Static, TabbedContent, TabPane
from textual.worker import Worker, WorkerState

from wina.api import Cancelled, CancelToken

from ..state import (ALLOCATIONS, RunEta, Settings, Throttle, describe_error, event_dict, fmt_pct,
                     read_plan_info)
from ..widgets.allocation_heatmap import AllocationHeatmap
from ..widgets.progress_panel import ProgressPanel
from ..widgets.score_histogram import ScoreHistogram
from ..widgets.trajectory_chart import TrajectoryChart
from .messages import WorkerFinished

STAGES = [("load", "Model"), ("calibrate", "Calibrate"), ("layer", "  this layer"), ("allocate", "Allocate")]


class CalibrateScreen(Screen):
    BINDINGS = [
        Binding("ctrl+r", "start", "Start/resume", priority=True),
        Binding("escape", "cancel", "Cancel", priority=True),
        Binding("ctrl+o", "open_chat", "Chat", priority=True),
        Binding("left_square_bracket", "layer(-1)", "Layer", key_display="[ ]"),   # [ and ] step
        Binding("right_square_bracket", "layer(1)", "Next layer", show=False),
        Binding("m", "next_matrix", "Matrix"),
        Binding("s", "tab('tab-scores')", "Scores", show=False),
        Binding("t", "tab('tab-trajectory')", "Trajectory", show=False),
        Binding("a", "tab('tab-allocation')", "Allocation", show=False),
    ]

    class Scores(Message):
        """The score histograms of one finished layer (read from the plan folder by the worker)."""

        def __init__(self, layer: int, n_layers: int, mats: dict) -> None:
            super().__init__()
            self.layer = layer
            self.n_layers = n_layers
            self.mats = mats

    class AllocRow(Message):
        """One allocated layer's per-matrix sparsities at the target (within-layer greedy)."""

        def __init__(self, layer: int, n_layers: int, row: dict) -> None:
            super().__init__()
            self.layer = layer
            self.n_layers = n_layers
            self.row = row

    class Progressed(Message):
        """One event (a dict) or a batch of them (a list), in order."""

        def __init__(self, evs) -> None:
            super().__init__()
            self.evs = evs

    class Finished(WorkerFinished):
        """The calibration worker ended."""

    def __init__(self, session, **kw) -> None:
        super().__init__(**kw)
        self.session = session
        self.cancel: Optional[CancelToken] = None
        self.worker: Optional[Worker] = None
        self.events: list[dict] = []          # every event the worker posted (tests read it)
        self.settings: Optional[Settings] = None
        self.state = "idle"                   # idle | running | done | cancelled | failed
        self.phase: Optional[str] = None      # loading | calibration | allocation, while running
        self.then: Optional[str] = None       # the screen to open when done ("chat" for Load & chat)
        self.thread: Optional[threading.Thread] = None
        self.resume: dict[str, int] = {}      # stage -> layers finished before this run
        self._etas: dict[str, RunEta] = {}
        self._dirty_chart = False
        self._dirty_hist = False
        self._layer_view: Optional[int] = None
        self._last_log: dict[str, float] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="cal-columns"):
            with Vertical(id="cal-left"):
                yield Static("", id="cal-what")
                yield ProgressPanel(STAGES, id="cal-progress")
                yield RichLog(id="cal-log", wrap=True, markup=False, max_lines=500, min_width=20)
            with TabbedContent(id="cal-tabs"):
                with TabPane("Scores", id="tab-scores"):
                    yield ScoreHistogram(id="scores")
                with TabPane("Trajectory", id="tab-trajectory"):
                    yield TrajectoryChart(id="trajectory")
                with TabPane("Allocation", id="tab-allocation"):
                    with VerticalScroll():
                        yield AllocationHeatmap(id="heatmap")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "calibrate & allocate"
        self.set_interval(0.2, self._flush_chart)
        self._describe()

    def on_screen_resume(self) -> None:
        self._describe()

    def _describe(self) -> None:
        s = self.settings or self.session.settings
        o = s.options
        what = Text.assemble((s.model, "bold"), " · ", (o.method.upper(), "bold"),
                             (" · transform" if o.transform else ""), (f" · target {o.sparsity:.0%}", ""),
                             ("\ncalibration ", "dim"), s.calib_source, (" · allocation ", "dim"),
                             ALLOCATIONS[s.allocation], ("\nstate ", "dim"),
                             (self.state + (f": {self.phase}" if self.state == "running" and self.phase else ""),
                              "bold"))
        self.query_one("#cal-what", Static).update(what)

    def log_line(self, text: str, style: str = "") -> None:
        self.query_one("#cal-log", RichLog).write(Text(text, style=style))

    # --- actions -----------------------------------------------------------------------------------
    @property
    def job_running(self) -> bool:
        return self.worker is not None and self.worker.state in (WorkerState.PENDING, WorkerState.RUNNING)

    def running_work(self) -> Optional[str]:
        """What runs now, in words ("calibration", "allocation", "loading the model"), or None."""
        if self.state != "running" or not self.job_running:
            return None
        return self.phase or "calibration"

    def cancel_all(self) -> None:
        if self.cancel is not None:
            self.cancel.cancel()

    def start(self, settings: Optional[Settings] = None, then: Optional[str] = None) -> bool:
        settings = settings or self.session.settings
        if settings.options.method == "dense":
            self.notify("dense needs no calibration: choose TEAL or WINA in setup", severity="warning")
            return False
        if self.job_running:
            self.notify("calibration is already running (esc cancels)", severity="warning")
            return False
        if self.session.busy:
            self.notify(f"the model is busy ({self.session.busy})", severity="warning")
            return False
        self.settings = settings
        self.then = then
        self.cancel = CancelToken()
        self.state = "running"
        self.phase = "loading"
        self.events.clear()
        self.resume.clear()
        self._etas.clear()
        panel = self.query_one(ProgressPanel)
        panel.clear_rows(keep=tuple(k for k, _ in STAGES))
        self.query_one(TrajectoryChart).reset()
        self.query_one(ScoreHistogram).reset(target=settings.options.sparsity)
        self.query_one(AllocationHeatmap).reset()
        self._layer_view = None
        self._describe()
        self.log_line(f"start: {settings.describe()} · calibration on {settings.calib_source}", "bold")
        self.worker = self.run_calibration(settings, self.cancel)
        return True

    def action_start(self) -> None:
        self.start(self.settings, then=None)

    def action_cancel(self) -> None:
        if self.cancel is not None and self.state == "running" and not self.cancel.cancelled:
            self.cancel.cancel()
            self.then = None
            self.log_line("cancelling after the current unit of work…", "yellow")

    def action_open_chat(self) -> None:
        if self.state != "done":
            why = ("no calibration has run yet: ctrl+r starts one" if self.state == "idle"
                   else "calibration is running: the chat opens when it is done" if self.state == "running"
                   else "the calibration did not finish: ctrl+r resumes it")
            self.notify(why, severity="warning")
            return
        self.app.switch_mode("chat")

    def action_layer(self, step: int) -> None:
        """``[`` / ``]``: the previous / next layer of the tab shown (scores or trajectory)."""
        tabs = self.query_one(TabbedContent)
        if tabs.active == "tab-scores":
            self.query_one(ScoreHistogram).step_layer(step)
            return
        plan = self.session.plan
        if plan is None or not any(plan.trajectories):
            return
        n = plan.n_layers
        cur = self._layer_view if self._layer_view is not None else n - 1
        self._layer_view = (cur + step) % n
        self._show_plan_trajectory(self._layer_view)

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_next_matrix(self) -> None:
        self.query_one(ScoreHistogram).next_matrix()
        self.query_one(TabbedContent).active = "tab-scores"

    def _show_plan_trajectory(self, layer: int, switch: bool = True) -> None:
        plan = self.session.plan
        rows = plan.trajectories[layer]
        steps = plan.trajectory_steps[layer] if layer < len(plan.trajectory_steps) else []
        pts = [(r.effective, r.error, (steps[i] if i < len(steps) and steps[i] else "")) for i, r in enumerate(rows)]
        chart = self.query_one(TrajectoryChart)
        chart.n_layers = plan.n_layers
        chart.set_trajectory(layer, pts)
        if switch:
            self.query_one(TabbedContent).active = "tab-trajectory"

    # --- the worker --------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="calibrate")
    def run_calibration(self, settings: Settings, cancel: CancelToken) -> None:
        from wina.api import (allocate, calibrate, is_transformed, locked, nearest_row, plan_histogram,
                              plan_trajectory)
        s = self.session
        self.thread = threading.current_thread()
        target = settings.options.sparsity
        live = {"out": None, "scores": 0, "rows": 0}

        def post(msg) -> None:
            if not isinstance(msg, self.Progressed) or isinstance(msg.evs, dict):
                batch.flush()
            self.post_message(msg)

        batch = Throttle(lambda evs: post(self.Progressed(evs)), 0.05)

        def post_scores(upto: int, n_layers: int) -> None:
            """Histograms of the layers finished since the last call (read back from the plan folder)."""
            for j in range(live["scores"], upto):
                try:
                    mats = plan_histogram(live["out"], j)
                except Exception:          # a view only: never let it stop calibration
                    continue
                batch.flush()
                self.post_message(self.Scores(j, n_layers, mats))
            live["scores"] = max(live["scores"], upto)

        def post_rows(upto: int, n_layers: int) -> None:
            """Each newly allocated layer's sparsities at the target (the trajectory row the
            within-layer mode picks), read back from the plan folder the allocation writes."""
            for j in range(live["rows"], upto):
                try:
                    rows = plan_trajectory(live["out"], j)
                    row = rows[nearest_row(rows, target)].sparsities if rows else None
                except Exception:          # a view only: never let it stop allocation
                    row = None
                if row:
                    batch.flush()
                    self.post_message(self.AllocRow(j, n_layers, row))
            live["rows"] = max(live["rows"], upto)

        def on_event(ev) -> None:
            batch.push(event_dict(ev))
            if ev.stage == "allocate" and ev.total:
                live["alloc_total"] = ev.total          # the row ends on its own count, not 1/1
            if ev.layer is None and not (ev.total and ev.done >= ev.total):
                return
            n = ev.n_layers or ev.total
            upto = ev.layer if not (ev.total and ev.done >= ev.total) else n
            if ev.stage == "calibrate" and live["out"] is not None:
                post_scores(upto, n)
            elif ev.stage == "allocate":
                post_rows(min(upto, n), n)

        try:
            # the settings and the plan folder are checked, and the folder locked, before the model
            # loads: a bad source or a second writer is told at once
            out, calib = s.calibration_for(settings)
            with s.using("calibrate"), locked(out, f"plan {out}"):
                t0 = time.perf_counter()
                post(self.Progressed({"stage": "load", "done": 0, "total": 1, "message": f"loading {settings.model}"}))
                loaded = s.load_for_calibration(settings)
                if settings.options.transform and not is_transformed(loaded.model):
                    post(self.Progressed({"stage": "load", "done": 0, "total": 1, "message": "transform"}))
                post(self.Progressed({"stage": "load", "done": 1, "total": 1, "message": s.model_summary(),
                                      "finished": True, "elapsed": time.perf_counter() - t0}))
                cancel.check()
                live["out"] = out
                damage = s.discard_damaged_plan(out)
                if damage:
                    post(self.Progressed({"stage": "note", "message": f"the saved plan {out.name} was damaged "
                                          f"({damage}); it is made again"}))
                info = read_plan_info(out)
                if info is not None:
                    post(self.Progressed({"stage": "resume", "what": "calibrate", "from": info.calibrated,
                                          "total": info.n_layers, "path": str(out)}))
                post(self.Progressed({"stage": "phase", "phase": "calibration"}))
                plan = calibrate(loaded, out, calib, on_event=on_event, cancel=cancel)
                post_scores(plan.n_layers, plan.n_layers)
                post(self.Progressed({"stage": "calibrate", "done": plan.n_layers, "total": plan.n_layers,
                                      "finished": True, "message": f"plan saved: {out.name}"}))
                alloc = s.allocation_for(settings)
                if alloc is not None:
                    if 0 < plan.n_allocated < plan.n_layers:
                        post(self.Progressed({"stage": "resume", "what": "allocate", "from": plan.n_allocated,
                                              "total": plan.n_layers, "path": str(out)}))
                    s.job = "allocate"
                    post(self.Progressed({"stage": "phase", "phase": "allocation"}))
                    plan = allocate(loaded, out, alloc, on_event=on_event, cancel=cancel)
                    post_rows(plan.n_layers, plan.n_layers)
                    n = live.get("alloc_total", 1)
                    post(self.Progressed({"stage": "allocate", "done": n, "total": n, "finished": True,
                                          "message": f"{ALLOCATIONS[settings.allocation]} allocation saved in the plan"}))
                s.adopt_plan(settings, out, plan)
            post(self.Finished(True, "done"))
        except Cancelled:
            post(self.Finished(False, "cancelled: finished layers are kept; ctrl+r resumes", cancelled=True))
        except Exception as e:  # a library error or anything else: shown, never a crash
            post(self.Finished(False, describe_error(e)))

    # --- messages from the worker ------------------------------------------------------------------
    @on(Progressed)
    def _progress(self, message: "CalibrateScreen.Progressed") -> None:
        evs = [message.evs] if isinstance(message.evs, dict) else list(message.evs)
        for i, ev in enumerate(evs):
            self._one_event(ev, last=i == len(evs) - 1)

    @on(Scores)
    def _scores(self, message: "CalibrateScreen.Scores") -> None:
        hist = self.query_one(ScoreHistogram)
        hist.set_layer(message.layer, message.n_layers, message.mats, redraw=False)
        self._dirty_hist = True

    @on(AllocRow)
    def _alloc_row(self, message: "CalibrateScreen.AllocRow") -> None:
        target = self.settings.options.sparsity if self.settings else None
        self.query_one(AllocationHeatmap).set_layer(message.layer, message.row, n_layers=message.n_layers,
                                                    target=target)

    def _eta(self, stage: str, done: int, total: Optional[int]) -> Optional[float]:
        """Seconds left from this run's pace (layers a resumed run skipped do not count)."""
        eta = self._etas.get(stage)
        if eta is None:
            eta = self._etas[stage] = RunEta(start=self.resume.get(stage, 0) if stage == "calibrate" else 0)
        return eta.update(done, total)

    def _resumed(self, ev: dict) -> None:
        what, done, n = ev["what"], int(ev.get("from") or 0), int(ev.get("total") or 0)
        self.resume[what] = done
        name = "calibration" if what == "calibrate" else "allocation"
        if done >= n > 0:
            text = f"{name}: all {n} layers are in the plan already; reused"
        elif done > 0:
            text = f"{name} resumes at layer {done + 1}/{n}: layers 1–{done} are in the plan"
        else:
            return
        self.log_line(text, "cyan")
        panel = self.query_one(ProgressPanel)
        panel.update_stage(what, done, n, message=f"resumes at layer {done + 1}" if done < n else "reused")

    def _one_event(self, ev: dict, last: bool = True) -> None:
        self.events.append(ev)
        panel = self.query_one(ProgressPanel)
        stage = ev.get("stage")
        metrics = ev.get("metrics") or {}
        if stage == "resume":
            self._resumed(ev)
            return
        if stage == "note":
            self.log_line(ev["message"], "yellow")
            return
        if stage == "phase":
            self.phase = ev["phase"]
            self._describe()
            self.query_one(TabbedContent).active = ("tab-scores" if self.phase == "calibration"
                                                    else "tab-trajectory")
            return
        if stage == "load":
            panel.update_stage("load", ev["done"], ev["total"], message=ev.get("message", ""),
                               finished=ev.get("finished", False))
            if ev.get("finished"):
                self.log_line(f"model: {ev.get('message')}")
            return
        resumed = self.resume.get(stage, 0)
        if stage == "calibrate":
            layer = ev.get("layer")
            eta = self._eta("calibrate", ev["done"], ev["total"]) if layer is not None else None
            msg = ev.get("message", "").replace("sampling calibration text: ", "sampling ")
            if layer is not None and resumed and layer < resumed:
                msg = f"resuming: layer {layer + 1} (done before) · dense pass"
            elif resumed and layer is not None:
                msg += f" · resumed at {resumed + 1}"
            panel.update_stage("calibrate", ev["done"], ev["total"], eta=eta,
                               message=msg.replace(" samples, ", " · "), finished=ev.get("finished", False))
            if layer is not None:
                n = ev.get("n_layers") or ev["total"]
                panel.update_stage("layer", 0 if ev["done"] == layer else 1, 1, count=False,
                                   message=f"layer {layer + 1}/{n}: score histograms",
                                   finished=ev["done"] > layer)
            if ev.get("message") and self._should_log("calibrate:" + ev["message"].split(",")[0]):
                self.log_line(f"calibrate: {ev['message']}")
            return
        if stage == "allocate":
            layer = ev.get("layer")
            n = ev.get("n_layers")
            eta = None if ev.get("finished") else self._eta("allocate", ev["done"], ev["total"])
            msg = ev.get("message", "") or (f"layer {layer + 1}/{n}" if layer is not None and n else "")
            if resumed and not ev.get("finished"):
                msg += f" · resumed at {resumed + 1}"
            panel.update_stage("allocate", ev["done"], ev["total"], eta=eta, message=msg,
                               finished=ev.get("finished", False))
            if "sparsity" in metrics and "error" in metrics:
                chart = self.query_one(TrajectoryChart)
                chart.add_point(layer, metrics["sparsity"], metrics["error"], str(metrics.get("matrix") or ""),
                                n_layers=n, redraw=False)
                self._dirty_chart = True
                panel.update_stage("layer", int(100 * metrics["sparsity"]), 100, count=False,
                                   message=f"layer {'all' if layer is None else layer + 1}: "
                                           f"{fmt_pct(metrics['sparsity'])} sparse, error {metrics['error']:.3g}")
            elif ev.get("message") and self._should_log("allocate:" + ev["message"]):
                self.log_line(f"allocate: {ev['message']}")
            return
        if ev.get("message") and self._should_log(f"{stage}:{ev['message']}"):
            self.log_line(f"{stage}: {ev['message']}")

    def _should_log(self, key: str) -> bool:
        if key in self._last_log:
            return False
        self._last_log[key] = 1.0
        return True

    def _flush_chart(self) -> None:
        if self._dirty_chart:
            self._dirty_chart = False
            self.query_one(TrajectoryChart).replot()
        if self._dirty_hist:
            self._dirty_hist = False
            self.query_one(ScoreHistogram).replot()

    @on(Finished)
    def _finished(self, message: "CalibrateScreen.Finished") -> None:
        self._flush_chart()
        self._last_log.clear()
        self.phase = None
        panel = self.query_one(ProgressPanel)
        if message.ok:
            self.state = "done"
            panel.update_stage("layer", 1, 1, finished=True, count=False)
            if self.settings and self.settings.allocation == "uniform":
                panel.update_stage("allocate", 0, None, message="uniform: no greedy allocation")
            self.show_allocation()
            sp = self.session.sparsifier
            extra = f" · nominal {fmt_pct(sp.nominal_sparsity())}" if sp is not None else ""
            then, self.then = self.then, None
            if then == "chat":
                self.log_line(f"done: the model is sparsified with the plan{extra}; opening the chat.", "bold green")
                self.notify("plan ready: chatting with the sparse model")
                self.app.switch_mode("chat")
            else:
                self.log_line(f"done: the model is sparsified with the plan{extra}. ctrl+o opens the chat.",
                              "bold green")
                self.notify("calibration done: ctrl+o to chat with the sparse model")
        else:
            self.then = None
            self.state = "cancelled" if message.cancelled else "failed"
            for key in ("calibrate", "allocate"):
                row = panel.rows.get(key)
                if row is not None and row.is_mounted and not row.has_class("-done"):
                    row.set(row.done, row.total, message="cancelled" if message.cancelled else "failed", failed=True)
            self.log_line(message.message, "yellow" if message.cancelled else "bold red")
            if not message.cancelled:
                self.notify(message.message, severity="error", timeout=8)
        self._describe()

    def show_allocation(self) -> None:
        plan = self.session.plan
        settings = self.settings
        if plan is None or settings is None:
            return
        mode = settings.allocation if settings.allocation != "uniform" else "uniform"
        try:
            alloc = plan.sparsities_at(settings.options.sparsity, mode)
        except Exception as e:
            self.log_line(f"allocation: {describe_error(e)}", "red")
            return
        note = {"uniform": "uniform", "layer": "greedy within-layer", "global": "greedy cross-layer"}[mode]
        self.query_one(AllocationHeatmap).show_allocation(alloc, target=settings.options.sparsity, note=note)
        try:
            eff = plan.effective_at(settings.options.sparsity, mode)
            self.log_line(f"allocation at target {settings.options.sparsity:.0%} ({mode}): effective {eff:.1%}")
        except Exception:
            pass
        # an allocation found done (nothing streamed): its last layer's trajectory, not an empty tab
        if self.query_one(TrajectoryChart).current_layer is None and any(plan.trajectories):
            last = max(i for i, t in enumerate(plan.trajectories) if t)
            with contextlib.suppress(Exception):
                self._show_plan_trajectory(last, switch=False)
        self.query_one(TabbedContent).active = "tab-allocation"
