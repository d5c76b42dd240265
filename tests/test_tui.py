"""Pilot tests of the Textual app on a tiny random model: every screen, for real.

pick → calibrate (greedy) → chat one message → evaluate with a limit, asserting on widget state and on
what the workers posted; invalid input; cancel and resume; a key press handled while a calibration
worker runs. Torch runs single-threaded here: on a small shared CPU, intra-op threads make tiny
models tens of times slower.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from conftest import DATA_DIR
from test_tui_support import (SIZE, set_greedy, signal_child, start_calibration, tiny_app, tiny_loaded,
                               wait_for)

from textual.widgets import (Button, Checkbox, DataTable, Footer, Input, Label, Select, SelectionList,
                             TabbedContent)

from wina_tui.app import WinaApp
from wina_tui.screens.help import HelpScreen
from wina_tui.widgets.allocation_heatmap import AllocationHeatmap
from textual.containers import VerticalScroll
from wina_tui.widgets.chat_pane import ChatPane, ReplyStats
from wina_tui.widgets.plot_view import SERIES_COLORS, PlotView
from wina_tui.widgets.score_histogram import ScoreHistogram
from wina_tui.widgets.trajectory_chart import TrajectoryChart

pytestmark = pytest.mark.usefixtures("one_thread", "empty_cwd")   # conftest: one thread; no ./runs


def make_app(tmp_path: Path, **kw) -> WinaApp:
    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("data_dir", DATA_DIR if DATA_DIR.is_dir() else None)
    return tiny_app(tmp_path, results_dir=tmp_path / "runs", **kw)


# --- setup ---------------------------------------------------------------------------------------

async def test_setup_invalid_inputs_show_inline_messages(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        setup = app.setup_screen
        sparsity = setup.query_one("#sparsity", Input)
        sparsity.value = "1.2"
        await pilot.pause()
        err = setup.query_one("#err-sparsity", Label)
        assert err.has_class("-shown") and "[0, 1)" in str(err.render())
        assert sparsity.has_class("-invalid")
        await pilot.press("ctrl+g")                       # refused: nothing loads
        await pilot.pause()
        assert app.session.loaded is None and app.screen is setup
        sparsity.value = "40%"
        await pilot.pause()
        assert not setup.query_one("#err-sparsity", Label).has_class("-shown")
        assert setup.read(show=False)[0].options.sparsity == pytest.approx(0.4)

        setup.query_one("#model", Select).value = "__other__"
        await pilot.pause()
        setup.query_one("#model-path", Input).value = "./no/such/model/dir"
        await pilot.pause()
        assert "not found" in str(setup.query_one("#err-model-path", Label).render())

        setup.query_one("#model", Select).value = "smollm2-135m"
        set_greedy(app, source=str(tmp_path / "missing.txt"))
        await pilot.pause()
        assert "not found" in str(setup.query_one("#err-calib-source", Label).render())
        await pilot.press("ctrl+b")
        await pilot.pause()
        assert app.screen is setup and app.calibrate_screen.state == "idle"


# --- the whole path ------------------------------------------------------------------------------

async def test_pick_calibrate_chat_evaluate(tmp_path):
    if not (DATA_DIR / "arc_easy").is_dir():
        pytest.skip(f"evaluation data not found at {DATA_DIR}")
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        # pick: WINA, greedy within-layer, calibration on random tokens
        set_greedy(app)
        await pilot.pause()
        await pilot.press("ctrl+g")                      # needs a plan: builds it, then opens the chat
        cal = app.calibrate_screen
        await wait_for(pilot, lambda: cal.state in ("done", "failed", "cancelled"))
        assert cal.state == "done", cal.query_one("#cal-log").lines[-3:]
        await wait_for(pilot, lambda: app.screen is app.chat_screen)
        stages = {e["stage"] for e in cal.events}
        assert {"load", "calibrate", "allocate"} <= stages
        steps = [e for e in cal.events if e["stage"] == "allocate" and "error" in e.get("metrics", {})]
        assert steps and all(0.0 <= e["metrics"]["sparsity"] < 1.0 for e in steps)
        assert {e["layer"] for e in steps} == {0, 1}
        chart = cal.query_one(TrajectoryChart)
        assert len(chart.points[1]) == len([e for e in steps if e["layer"] == 1])
        heat = cal.query_one(AllocationHeatmap)
        assert len(heat.allocation) == 2 * 7 and max(heat.allocation.values()) > 0
        hist = cal.query_one(ScoreHistogram)
        assert sorted(hist.hists) == [0, 1] and hist.threshold() > 0
        assert app.session.sparsifier is not None and app.session.applied.options.plan
        assert (Path(app.session.applied.options.plan) / "plan.json").exists()
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen is cal)
        await pilot.press("right_square_bracket")       # browse the layers' trajectories
        await pilot.pause()
        assert chart.current_layer == 0

        # chat: one prompt, both panes
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: app.screen is app.chat_screen)
        chat = app.chat_screen
        await pilot.pause()
        assert app.focused is chat.query_one("#prompt", Input)
        await pilot.press(*"hello", "enter")
        dense, sparse = chat.query_one("#dense", ChatPane), chat.query_one("#sparse", ChatPane)
        await wait_for(pilot, lambda: sparse.stats is not None and not sparse.streaming)
        assert dense.stats.tokens > 0 and dense.stats.sparsity == 0.0 and dense.stats.flops == pytest.approx(1.0)
        assert sparse.stats.tokens > 0 and 0.2 < sparse.stats.sparsity < 0.8
        assert sparse.stats.flops < 1.0
        assert [m["role"] for m in dense.history] == ["user", "assistant"]
        assert dense.history[0]["content"] == "hello"
        assert dense.replies[0] == dense.history[1]["content"]
        assert "sparse" in str(sparse.border_subtitle) and "tok/s" in str(sparse.border_subtitle)

        # evaluate: dense and WINA at 50 % on two arc_easy documents
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.screen is app.evaluate_screen)
        ev = app.evaluate_screen
        ev.query_one("#limit", Input).value = "2"
        ev.query_one("#sparsities", Input).value = "0.5"
        methods = ev.query_one("#methods", SelectionList)
        methods.deselect("teal")
        await pilot.pause()
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: ev.state in ("done", "failed", "cancelled"), timeout=120)
        assert ev.state == "done"
        assert len(ev.runs) == 2
        assert any(e["stage"] == "evaluate" for e in ev.events)
        table = ev.query_one("#results", DataTable)
        assert table.row_count == 2
        labels = [str(table.get_row_at(i)[1]) for i in range(2)]
        assert labels[0] == "dense" and labels[1].startswith("WINA")
        files = sorted((tmp_path / "runs").glob("*.json"))
        assert len(files) == 2
        # the chat's sparsifier is back after evaluating
        assert app.session.sparsifier is not None and app.session.applied.options.plan

        # earlier runs: load them from the store into a fresh table
        ev.runs.clear()
        ev.refresh_results()
        ev.load_paths([str(f) for f in files])
        await pilot.pause()
        assert table.row_count == 2
        # a run of another model gets its own row, and a model column says whose row is whose
        other = json.loads(files[0].read_text())
        other["wina"]["model"] = "another-model"
        (tmp_path / "other.json").write_text(json.dumps(other))
        ev.load_paths([str(tmp_path / "other.json")])
        await pilot.pause()
        assert table.row_count == 3
        assert str(table.ordered_columns[0].label) == "model"
        assert "another-model" in {str(table.get_row_at(i)[0]) for i in range(3)}


# --- responsiveness, cancel and resume -----------------------------------------------------------

async def test_key_press_handled_while_calibration_runs(tmp_path, monkeypatch):
    import wina.calibrate as calmod
    real = calmod.calibrate
    entered, release = threading.Event(), threading.Event()

    def gated(*a, **kw):
        on_event = kw["on_event"]

        def ev(e):
            on_event(e)
            if e.layer == 0:                # hold the worker inside calibration, mid-run
                entered.set()
                release.wait(30)
        kw["on_event"] = ev
        return real(*a, **kw)

    monkeypatch.setattr(calmod, "calibrate", gated)
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        cal = await start_calibration(app, pilot)
        await wait_for(pilot, entered.is_set)
        assert cal.state == "running" and cal.worker.is_running
        handled: list[float] = []
        toggle = app.action_toggle_dark
        app.action_toggle_dark = lambda: (handled.append(time.perf_counter()), toggle())
        dark = app.current_theme.dark
        t0 = time.perf_counter()
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: bool(handled), timeout=5, step=0.002)
        assert handled[0] - t0 < 1.0                    # the measured figure is in bench/tui_latency.py
        assert app.current_theme.dark != dark
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), timeout=10)
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is cal, timeout=5)
        assert cal.state == "running" and cal.worker.is_running
        release.set()
        await wait_for(pilot, lambda: cal.state != "running")
        assert cal.state == "done"


async def test_cancel_then_resume(tmp_path, monkeypatch):
    import wina.calibrate as calmod
    real = calmod.calibrate
    app = make_app(tmp_path)
    seen = {"calls": 0}

    def cancelling(*a, **kw):
        on_event, seen["calls"] = kw["on_event"], seen["calls"] + 1

        def ev(e):
            on_event(e)
            if seen["calls"] == 1 and e.layer == 1:
                app.calibrate_screen.cancel.cancel()    # as esc does: layer 1 stops inside its forward
        kw["on_event"] = ev
        return real(*a, **kw)

    monkeypatch.setattr(calmod, "calibrate", cancelling)
    async with app.run_test(size=SIZE) as pilot:
        cal = await start_calibration(app, pilot)
        await wait_for(pilot, lambda: cal.state not in ("idle", "running"))
        assert cal.state == "cancelled"
        plan_dir = app.session.plan_dir_for(app.session.settings)
        from wina.plan import Plan
        partial = Plan.load(plan_dir, allow_partial=True)
        assert partial.n_calibrated == 1                # whole layers only, nothing half-written
        assert app.session.sparsifier is None
        await pilot.press("ctrl+r")                     # resume
        await wait_for(pilot, lambda: cal.state not in ("idle", "running"))
        assert cal.state == "done"
        layers = [e["layer"] for e in cal.events if e["stage"] == "calibrate" and e.get("layer") is not None]
        assert Plan.load(plan_dir).calibrated and app.session.sparsifier is not None
        assert seen["calls"] == 2 and 1 in layers


async def test_an_allocation_found_done_still_shows_a_trajectory(tmp_path):
    """Run again with the same settings, calibration and allocation are found done and nothing
    streams: the trajectory tab shows the plan's last layer, not its empty placeholder."""
    from wina_tui.widgets.trajectory_chart import TrajectoryChart
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        cal = await start_calibration(app, pilot)
        await wait_for(pilot, lambda: cal.state not in ("idle", "running"))
        chart = cal.query_one(TrajectoryChart)
        cal.action_start()                                  # as ctrl+r: the views start empty
        assert cal.state == "running" and chart.current_layer is None
        await wait_for(pilot, lambda: cal.state not in ("idle", "running"))
        assert cal.state == "done"
        n = app.session.plan.n_layers
        assert chart.current_layer == n - 1 and chart.points[n - 1]


# --- smaller things ----------------------------------------------------------------------------------

async def load_and_chat(app, pilot, method: str) -> None:
    """Pick ``method`` on the setup screen, load with uniform sparsity (ctrl+g), land on the chat."""
    app.setup_screen.query_one("#method", Select).value = method
    await pilot.pause()
    await pilot.press("ctrl+g")
    await wait_for(pilot, lambda: app.screen is app.chat_screen)

async def test_uniform_load_and_chat_stop_and_new_chat(tmp_path):
    app = make_app(tmp_path, max_new_tokens=400)
    async with app.run_test(size=SIZE) as pilot:
        await load_and_chat(app, pilot, "teal")
        assert app.session.sparsifier.method == "teal"
        chat = app.chat_screen
        dense = chat.query_one("#dense", ChatPane)
        await pilot.pause()
        assert chat.send("a long answer please")
        await wait_for(pilot, lambda: len(dense._buffer) > 0)
        await pilot.press("escape")                      # stop
        await wait_for(pilot, lambda: not chat.worker.is_running)
        await pilot.pause(0.2)
        assert dense.stats.stopped == "cancelled" and dense.stats.tokens < 400
        sparse = chat.query_one("#sparse", ChatPane)
        await wait_for(pilot, lambda: sparse.stats is not None)
        for _ in range(2):                               # enough text to scroll both panes
            assert chat.send("and another long one")
            await wait_for(pilot, lambda: not chat.is_generating and not sparse.streaming)
        await pilot.pause(0.2)
        assert all(p.query_one(VerticalScroll).max_scroll_y > 0 for p in (dense, sparse))
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert dense.history == [] and dense.stats is None
        for pane in (dense, sparse):                     # the placeholder back at the top, not the bottom
            scroll, ph = pane.query_one(VerticalScroll), pane.query_one(".placeholder")
            assert scroll.scroll_y == 0 and ph.region.y - scroll.region.y <= 1


async def test_dense_method_and_transform(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        app.setup_screen.query_one("#method", Select).value = "dense"
        app.setup_screen.query_one("#transform", Checkbox).value = True
        await pilot.pause()
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.screen is app.chat_screen)
        from wina.transform import is_transformed
        assert app.session.sparsifier is None and is_transformed(app.session.loaded.model)
        assert "none" in app.chat_screen.query_one("#sparse", ChatPane).title


async def test_palette_commands_theme_and_help(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for t in ("Setup", "Load & chat", "Calibrate", "Chat", "Evaluate", "Run evaluation",
                  "Load earlier runs", "Light / dark", "Help"):
            assert t in titles
        dark = app.current_theme.dark
        await pilot.press("ctrl+t")
        assert app.current_theme.dark != dark
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("f4")
        await pilot.pause()
        assert app.screen is app.chat_screen
        assert not app.chat_screen.send("hi")            # no model yet: refused with a message


async def test_load_runs_modal(tmp_path):
    from wina.results import make_record, make_wina_block, write_run
    store = tmp_path / "runs"
    for method, s, v in (("dense", 0.0, 0.6), ("wina", 0.5, 0.55)):
        w = make_wina_block(model_id="tiny", method=method, sparsity=s, measured=s,
                            headline={"piqa": {"metric": "acc_norm", "filter": "none", "value": v,
                                               "stderr": 0.01, "higher_is_better": True}})
        write_run(make_record(None, w), store / f"{method}.json")
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.screen is app.evaluate_screen)
        await pilot.press("ctrl+l")
        from wina_tui.screens.load_runs import LoadRunsScreen
        await wait_for(pilot, lambda: isinstance(app.screen, LoadRunsScreen))
        await pilot.press("ctrl+a")
        await pilot.click("#load")
        await wait_for(pilot, lambda: app.screen is app.evaluate_screen)
        ev = app.evaluate_screen
        assert len(ev.runs) == 2 and ev.query_one("#results", DataTable).row_count == 2


async def test_chat_sessions_warm_up_in_the_worker_before_the_first_reply(tmp_path, monkeypatch):
    """Each pane's ChatSession is warmed up once (on the GPU engine: weights copied, kernels
    compiled, the decode step captured) in the chat worker before its first reply, the status line
    saying so; the second turn reuses the warm sessions."""
    from wina.chat import ChatSession
    from wina.events import Progress
    calls, statuses = [], []
    real = ChatSession.warm_up

    def warm_up(self, on_event=None):
        calls.append((self.want_sparse, threading.current_thread() is threading.main_thread()))
        on_event(Progress("warm-up", 0, 3, message="compiling and capturing the decode step"))
        return real(self, on_event)
    monkeypatch.setattr(ChatSession, "warm_up", warm_up)
    app = make_app(tmp_path, max_new_tokens=4)
    async with app.run_test(size=SIZE) as pilot:
        await load_and_chat(app, pilot, "teal")
        chat = app.chat_screen
        orig = chat.set_status
        monkeypatch.setattr(chat, "set_status", lambda text: (statuses.append(str(text)), orig(text)))
        for prompt in ("hi", "again"):
            assert chat.send(prompt)
            await wait_for(pilot, lambda: not chat.is_generating)
        await pilot.pause(0.2)
        assert all(s.warm for s in chat.sessions.values())
    assert sorted(calls) == [(False, False), (True, False)]     # once per session, never on the UI thread
    warm = [i for i, t in enumerate(statuses) if "warming up" in t]
    assert warm and any("compiling" in statuses[i] for i in warm)
    streaming = [i for i, t in enumerate(statuses) if "reply streaming" in t]
    assert max(warm) < min(streaming)                          # before the first reply
    assert "warming up" not in statuses[-1]                    # the usual status line is back


# --- quitting ----------------------------------------------------------------------------------------

def slow_text(monkeypatch, delay: float = 0.05):
    """The chat's real generation (tiny model), each streamed piece delayed: a reply that streams for
    seconds and honours its cancel token between tokens, as a real model on a slow CPU does."""
    from wina.chat import ChatSession
    real = ChatSession.send

    def slow(self, text, *, on_text=None, **kw):
        def on(t):
            time.sleep(delay)
            on_text(t)
        return real(self, text, on_text=on, **kw)
    monkeypatch.setattr(ChatSession, "send", slow)


def hold_calibration(monkeypatch, at_layer: int = 0, stage: str = "calibrate"):
    """Hold the calibration worker inside layer ``at_layer`` (a long layer) until its cancel token is
    set; returns the Event set when it is held."""
    import wina.calibrate as calmod
    real = calmod.calibrate
    held = threading.Event()

    def gated(*a, **kw):
        on_event, cancel = kw["on_event"], kw["cancel"]

        def ev(e):
            on_event(e)
            if e.stage == stage and e.layer == at_layer:
                held.set()
                t0 = time.monotonic()
                while not cancel.cancelled and time.monotonic() - t0 < 30:
                    time.sleep(0.01)
        kw["on_event"] = ev
        return real(*a, **kw)
    monkeypatch.setattr(calmod, "calibrate", gated)
    return held


async def test_quit_while_streaming_exits_within_2s(tmp_path, monkeypatch):
    slow_text(monkeypatch)
    app = make_app(tmp_path, max_new_tokens=400)
    async with app.run_test(size=SIZE) as pilot:
        await load_and_chat(app, pilot, "wina")
        chat = app.chat_screen
        dense = chat.query_one("#dense", ChatPane)
        assert chat.send("a long answer please")
        await wait_for(pilot, lambda: len(dense._buffer) > 2)
        assert chat.is_generating and app.session.busy == "chat"
        t0 = time.perf_counter()
        await pilot.press("ctrl+q")                     # a streaming reply does not ask
    assert app.wait_idle(2.0), "the chat worker still holds the model"
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, elapsed
    assert all(t.cancelled for t in chat.cancels.values())
    assert json.loads((tmp_path / "config" / "settings.json").read_text())["setup"]["method"] == "wina"


async def test_quit_while_calibrating_asks_then_exits_within_2s(tmp_path, monkeypatch):
    from wina_tui.screens.confirm import ConfirmScreen
    held = hold_calibration(monkeypatch)
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        cal = await start_calibration(app, pilot)
        await wait_for(pilot, held.is_set)
        await pilot.press("ctrl+q")                     # asks first
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), timeout=5)
        assert "calibration running: quit anyway?" in app.screen.question
        assert "Finished layers are kept" in app.screen.detail
        await pilot.press("n")                          # stay: nothing cancelled
        await wait_for(pilot, lambda: app.screen is cal, timeout=5)
        assert cal.state == "running" and not cal.cancel.cancelled
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), timeout=5)
        t0 = time.perf_counter()
        await pilot.press("ctrl+q")                     # a second ctrl+q answers yes
    assert app.wait_idle(2.0), "the calibration worker still holds the model"
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, elapsed
    from wina.plan import Plan
    plan = Plan.load(app.session.plan_dir_for(app.session.settings), allow_partial=True)
    assert plan.n_calibrated <= 1                       # whole layers only: nothing half-written


CHILD = r"""
import sys, time
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import wina.calibrate as calmod
from test_tui_support import tiny_app
from wina_tui.app import run_app

def stuck(*a, **kw):                       # a layer that never reaches a cancel check
    Path({ready!r}).write_text("held")
    time.sleep(600)
calmod.calibrate = stuck

app = tiny_app(Path({tmp!r}), handle_signals=True, start="calibrate")
def go():
    s = app.session.settings
    app.calibrate_screen.start(replace(s, allocation="layer", calib_source="random"))
app.call_later(lambda: app.set_timer(0.3, go))
code = run_app(app, headless=True)
print("exited", code, flush=True)
"""


def test_sigterm_ends_the_process_within_2s(tmp_path):
    """The real process (headless), calibration stuck in a long op that never checks its token:
    SIGTERM cancels, the app exits and the process ends within 2 s anyway."""
    import signal
    code = CHILD.format(tests=str(Path(__file__).parent), ready=str(tmp_path / "ready"), tmp=str(tmp_path))
    elapsed, rc, out, err = signal_child(code, tmp_path, signal.SIGTERM, "calibration")
    assert elapsed < 2.0, (elapsed, err[-2000:])
    assert rc == 0, err[-2000:]
    assert "exited" not in out                          # ended by run_app without waiting for the worker
    assert (tmp_path / "config" / "settings.json").exists()


# --- chat like a chat app --------------------------------------------------------------------------

async def test_chat_commands_are_not_sent_to_the_model(tmp_path, monkeypatch):
    import wina.chat as chat_lib
    seen: list[list[dict]] = []
    real = chat_lib.ConversationIds.__call__
    warm = list(chat_lib.WARM_UP_MESSAGES)

    def tokenized(conv, msgs):                                # what reaches the template (not the warm-up's)
        if list(msgs[:len(warm)]) != warm:
            seen.append(list(msgs))
        return real(conv, msgs)

    monkeypatch.setattr(chat_lib.ConversationIds, "__call__", tokenized)
    app = make_app(tmp_path, max_new_tokens=4)
    async with app.run_test(size=SIZE) as pilot:
        await load_and_chat(app, pilot, "teal")
        chat = app.chat_screen
        dense, sparse = chat.query_one("#dense", ChatPane), chat.query_one("#sparse", ChatPane)
        prompt = chat.query_one("#prompt", Input)

        async def type_line(text):
            prompt.value = text
            await pilot.press("enter")
            await pilot.pause()

        await type_line("/bogus")                       # unknown: a message, nothing sent, line kept
        assert chat.worker is None and prompt.value == "/bogus" and not seen
        assert prompt.selected_text == "/bogus"         # selected: what is typed next replaces it
        await pilot.press("x")
        assert prompt.value == "x"
        await type_line(f"/save {tmp_path / 'no-such-folder' / 'chat.json'}")
        assert not (tmp_path / "no-such-folder").exists() and prompt.value.startswith("/save")
        await type_line("/system You are terse.")
        assert chat.system == "You are terse." and chat.worker is None and not seen
        await type_line("hi")
        await wait_for(pilot, lambda: not chat.is_generating and sparse.stats is not None)
        assert [m["role"] for m in seen[0]] == ["system", "user"] and seen[0][0]["content"] == "You are terse."
        await type_line("//slash")                      # // sends a line that starts with /
        await wait_for(pilot, lambda: not chat.is_generating and len(sparse.replies) == 2)
        assert seen[-1][-1] == {"role": "user", "content": "/slash"}
        n_sent = len(seen)

        await type_line(f"/save {tmp_path / 'chat.json'}")
        doc = json.loads((tmp_path / "chat.json").read_text())
        assert doc["system"] == "You are terse." and [p["pane"] for p in doc["panes"]] == ["dense", "sparse"]
        kept = [m for m in doc["panes"][1]["messages"] if m["role"] == "assistant"]
        assert len(doc["panes"][1]["replies"]) == len(kept) and all(r["ttft"] is not None
                                                                    for r in doc["panes"][1]["replies"])
        await type_line(f"/save {tmp_path / 'chat.md'}")
        md = (tmp_path / "chat.md").read_text()
        assert md.startswith("# Chat · ") and "**User:** hi" in md and "**System:** You are terse." in md

        await type_line("/reset")
        assert dense.history == [] and sparse.history == [] and len(seen) == n_sent
        assert chat.system == "You are terse."        # a new conversation keeps the system prompt
        for sess in chat.sessions.values():           # /reset and /system are the sessions' own state
            assert sess.messages == [] and sess.context_tokens == 0 and sess.system == "You are terse."
        await type_line("/system")
        assert all(sess.system is None for sess in chat.sessions.values())


async def test_reply_stats_show_ttft_and_decode_rate(tmp_path):
    app = make_app(tmp_path, max_new_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await load_and_chat(app, pilot, "wina")
        chat = app.chat_screen
        assert chat.send("hello")
        panes = [chat.query_one("#dense", ChatPane), chat.query_one("#sparse", ChatPane)]
        await wait_for(pilot, lambda: not chat.is_generating and all(p.stats for p in panes))
        await pilot.pause(0.1)
        for pane in panes:
            st = pane.stats
            assert st.tokens > 1 and st.stopped in ("eos", "length")
            assert st.ttft is not None and 0 < st.ttft < st.seconds
            assert st.decode_tps is not None and st.decode_tps > 0
            line = str(pane.query(".reply-stats").last().render())
            assert "first token" in line and "tok/s decode" in line and "sparse" in line
            assert ("max tokens" in line) or ("end of reply" in line)
        assert "sparse" in str(panes[1].border_subtitle) and "tok/s" in str(panes[1].border_subtitle)
        status = str(chat.query_one("#chat-status").render())
        assert "streaming" not in status and status.startswith("greedy")   # the busy line is gone


def test_a_one_token_reply_shows_no_rate_mixing_prefill_and_decode():
    """A reply stopped after its first token has no decode rate: the border and the line under it
    both say so, never tokens over prefill and decode together."""
    st = ReplyStats(tokens=1, seconds=0.28, stopped="cancelled", sparsity=0.49, flops=0.6, ttft=0.28,
                    decode_tps=None)
    assert ChatPane.format_stats(st).startswith("— tok/s")
    assert "— tok/s decode" in ChatPane.format_reply(st)
    st.decode_tps = 12.34
    assert ChatPane.format_stats(st).startswith("12.3 tok/s") and "12.3 tok/s decode" in ChatPane.format_reply(st)


async def test_a_reply_starts_once_its_pane_is_painted_even_behind_another_screen(tmp_path, monkeypatch):
    """The worker starts each reply once its pane has painted the prompt (and the reply before it):
    the pane says so after the screen's refresh, also when the user has moved to another screen
    meanwhile, so the worker never waits out its timeout."""
    from wina_tui.screens.chat import ChatScreen
    waits: list[bool] = []
    real = ChatScreen._wait_shown

    def wait_shown(self, shown, cancel):
        real(self, shown, cancel)
        waits.append(shown.is_set())
    monkeypatch.setattr(ChatScreen, "_wait_shown", wait_shown)
    monkeypatch.setattr("wina_tui.screens.chat.SHOWN_TIMEOUT", 30.0)   # a missed signal would show as a hang
    app = make_app(tmp_path, max_new_tokens=6)
    async with app.run_test(size=SIZE) as pilot:
        await load_and_chat(app, pilot, "wina")
        chat = app.chat_screen
        panes = [chat.query_one(f"#{pid}", ChatPane) for pid in ("dense", "sparse")]
        assert chat.send("hello there")
        await pilot.press("f5")                                   # away while the replies run
        await wait_for(pilot, lambda: not chat.is_generating and all(len(p.replies) == 1 for p in panes))
        assert app.screen is app.evaluate_screen
        await pilot.press("f4")
        assert chat.send("and then?")
        await wait_for(pilot, lambda: not chat.is_generating and all(len(p.replies) == 2 for p in panes))
    assert waits == [True] * 8                                    # prompt and reply, two panes, two turns


def _replies_of_send(monkeypatch, before=None) -> list:
    """(sparse?, text, Reply) of every ChatSession.send, in order; ``before(text)`` runs first."""
    from wina.chat import ChatSession
    replies: list = []
    real = ChatSession.send

    def send(self, text, **kw):
        if before is not None:
            before(text)
        r = real(self, text, **kw)
        replies.append((self.want_sparse, text, r))
        return r
    monkeypatch.setattr(ChatSession, "send", send)
    return replies


async def test_chat_two_turns_keep_the_kv_cache_and_show_ttft_and_decode_rate(tmp_path, monkeypatch):
    """Each pane is one ChatSession kept across turns: the second turn prefills only the new tokens
    (the rest comes from the KV cache), and both panes show the time to first token and the decode
    rate of each reply."""
    replies = _replies_of_send(monkeypatch)
    app = make_app(tmp_path, max_new_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await load_and_chat(app, pilot, "wina")
        chat = app.chat_screen
        panes = {pid: chat.query_one(f"#{pid}", ChatPane) for pid in ("dense", "sparse")}
        made = None
        for n, prompt in enumerate(("hello there", "and then?"), 1):
            assert chat.send(prompt)
            await wait_for(pilot, lambda: not chat.is_generating and all(len(p.replies) == n for p in panes.values()))
            await pilot.pause(0.1)
            made = made or dict(chat.sessions)
            assert chat.sessions == made                   # the same sessions, turn after turn
            for pid, pane in panes.items():
                st = pane.stats
                assert st.tokens > 1 and st.ttft is not None and st.ttft > 0
                assert st.decode_tps is not None and st.decode_tps > 0
                line = str(pane.query(".reply-stats").last().render())
                assert "first token" in line and "tok/s decode" in line
                assert pane.history == chat.sessions[pid].messages   # the session holds the conversation
        assert [sp for sp, _, _ in replies] == [False, True, False, True]
        assert made["sparse"].sparse and not made["dense"].sparse
        # the sparse pane's prompt was tokenized while the dense pane decoded, not in its own TTFT
        assert all(r.ahead_s > 0 for sparse, _, r in replies if sparse)
        assert all(r.ahead_s == 0 for sparse, _, r in replies if not sparse)
        for sparse, _, r in replies[:2]:                      # turn 1: everything prefilled
            assert r.prefill_tokens == r.context_tokens > 0
        for sparse, _, r in replies[2:]:                   # turn 2: only the new tokens
            assert 0 < r.prefill_tokens < r.context_tokens
            assert r.ttft_s > 0 and r.decode_tokens_per_s > 0
        for pid, pane in panes.items():
            st = pane.stats
            assert 0 < st.prefill_tokens < st.context_tokens
            assert [m["role"] for m in pane.history] == ["user", "assistant"] * 2
        sp = replies[3][2]
        assert sp.sparsity is not None and panes["sparse"].stats.sparsity == pytest.approx(sp.sparsity)
        assert panes["dense"].stats.sparsity == 0.0


async def test_a_typed_message_is_tokenized_before_it_is_sent(tmp_path, monkeypatch):
    """Once the sessions exist, the first pane's session makes the ids of what the user types (on a
    thread) and its send uses them if the message goes as typed; the second pane's session makes
    them while the first decodes. A command is not prepared; a message typed while the replies
    stream is prepared once they end."""
    import threading
    from textual.widgets import Input
    hold = threading.Event()
    # "one more" streams until the test lets it end
    replies = _replies_of_send(monkeypatch, before=lambda text: text == "one more" and hold.wait(30))
    app = make_app(tmp_path, max_new_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await load_and_chat(app, pilot, "wina")
        chat = app.chat_screen
        box = chat.query_one("#prompt", Input)
        panes = [chat.query_one(f"#{pid}", ChatPane) for pid in ("dense", "sparse")]

        async def turn(n):
            await pilot.press("enter")
            await wait_for(pilot, lambda: not chat.is_generating and all(len(p.replies) == n for p in panes))
            await pilot.pause(0.1)

        box.value = "hello there"                  # no sessions yet: nothing to prepare with
        await pilot.pause()
        await turn(1)
        dense = chat.sessions["dense"]
        assert [(sp, r.ahead_s > 0) for sp, _, r in replies] == [(False, False), (True, True)]
        box.value = "/help"                        # a command: nothing prepared
        await pilot.pause()
        dense._join_preparing()
        assert dense._prepared is None
        box.value = "and then"
        await pilot.pause()
        box.value = "and then?"                    # edited: the last text is the one prepared
        await pilot.pause()
        dense._join_preparing()
        assert dense._prepared is not None and dense._prepared.key[0] == "and then?"
        await turn(2)
        assert [(sp, t, r.ahead_s > 0) for sp, t, r in replies[2:]] == [(False, "and then?", True),
                                                                       (True, "and then?", True)]
        assert panes[0].history[-2] == {"role": "user", "content": "and then?"}
        # typed while the replies stream: prepared when they end
        assert chat.send("one more")
        box.value = "and the last one"
        await pilot.pause(0.2)
        assert chat.is_generating and dense._prepared is None      # not while the sessions are in use
        hold.set()
        await wait_for(pilot, lambda: not chat.is_generating and all(len(p.replies) == 3 for p in panes))
        await pilot.pause(0.1)
        dense._join_preparing()
        assert dense._prepared is not None and dense._prepared.key[0] == "and the last one"
        await turn(4)
        assert replies[-2][1] == "and the last one" and replies[-2][2].ahead_s > 0


async def test_chat_a_new_setup_closes_the_sessions_and_starts_a_new_conversation(tmp_path, monkeypatch):
    """Another sparse setup (here: WINA after TEAL, on the same model) ends the conversation: the
    panes are cleared with a note when the chat is shown again, the old sessions are closed, and the
    new ones start empty, so that no model continues what another one wrote."""
    from wina.chat import ChatSession
    closed: list[ChatSession] = []
    real = ChatSession.close
    monkeypatch.setattr(ChatSession, "close", lambda self: (closed.append(self), real(self))[1])
    app = make_app(tmp_path, max_new_tokens=4)
    async with app.run_test(size=SIZE) as pilot:
        await load_and_chat(app, pilot, "teal")
        chat = app.chat_screen
        dense, sparse = chat.query_one("#dense", ChatPane), chat.query_one("#sparse", ChatPane)
        assert chat.send("hi")
        await wait_for(pilot, lambda: not chat.is_generating and len(sparse.replies) == 1)
        assert len(dense.history) == len(sparse.history) == 2
        old = dict(chat.sessions)
        await pilot.press("f2")
        await wait_for(pilot, lambda: app.screen is app.setup_screen)
        app.setup_screen.query_one("#sparsity", Input).value = "0.3"
        await load_and_chat(app, pilot, "wina")          # a new sparsifier on the same model
        await wait_for(pilot, lambda: app.session.applied.options.method == "wina" and app.screen is chat)
        await wait_for(pilot, lambda: dense.history == [] and sparse.history == [])
        assert chat.turns == 0 and not dense.replies and not sparse.replies
        notes = [str(w.render()) for w in sparse.query(".system-msg")]
        assert any("a new conversation" in n for n in notes)
        assert chat.send("more")
        await wait_for(pilot, lambda: not chat.is_generating and len(sparse.replies) == 1)
        assert set(closed) == set(old.values())
        assert all(chat.sessions[pid] is not old[pid] for pid in old)
        for pid, sess in chat.sessions.items():        # only the new turn, in the session and the pane
            assert [m["role"] for m in sess.messages] == ["user", "assistant"]
            assert sess.messages[0]["content"] == "more"
            assert chat.query_one(f"#{pid}", ChatPane).history == sess.messages
        assert chat.send("again")                      # the same setup: the conversation goes on
        await wait_for(pilot, lambda: not chat.is_generating and len(sparse.replies) == 2)
        assert len(sparse.history) == 4


async def test_esc_stops_only_the_pane_that_generates(tmp_path, monkeypatch):
    slow_text(monkeypatch, delay=0.03)
    app = make_app(tmp_path, max_new_tokens=30)
    async with app.run_test(size=SIZE) as pilot:
        await load_and_chat(app, pilot, "teal")
        chat = app.chat_screen
        dense, sparse = chat.query_one("#dense", ChatPane), chat.query_one("#sparse", ChatPane)
        assert chat.send("tell me more")
        await wait_for(pilot, lambda: len(dense._buffer) > 1)
        assert "dense reply streaming" in str(chat.query_one("#chat-status").render())
        await pilot.press("escape")
        await wait_for(pilot, lambda: not chat.is_generating, timeout=60)
        await pilot.pause(0.2)
        assert dense.stats.stopped == "cancelled" and sparse.stats.stopped != "cancelled"
        assert sparse.stats.tokens > dense.stats.tokens
        assert len(dense.history) == 2 and len(sparse.history) == 2   # partial text is a kept turn


async def test_a_reply_stopped_before_any_text_leaves_no_empty_turn(tmp_path, monkeypatch):
    from wina.chat import ChatSession
    real = ChatSession.send

    def send(self, text, *, cancel=None, **kw):
        if not self.want_sparse:                      # the dense pane: stopped before any text
            cancel.cancel()
        return real(self, text, cancel=cancel, **kw)
    monkeypatch.setattr(ChatSession, "send", send)
    app = make_app(tmp_path, max_new_tokens=4)
    async with app.run_test(size=SIZE) as pilot:
        await load_and_chat(app, pilot, "teal")
        chat = app.chat_screen
        dense, sparse = chat.query_one("#dense", ChatPane), chat.query_one("#sparse", ChatPane)
        assert chat.send("hi")
        await wait_for(pilot, lambda: not chat.is_generating and sparse.stats is not None)
        await pilot.pause(0.1)
        assert dense.history == [] and dense.reply_stats == []
        assert dense.stats.stopped == "cancelled"
        assert chat.sessions["dense"].messages == []   # ChatSession.send kept an empty answer: dropped
        assert [m["role"] for m in sparse.history] == ["user", "assistant"]
        assert sparse.history == chat.sessions["sparse"].messages
        assert "not kept" in str(dense.query(".stopped").last().render())


async def test_chat_says_calibration_is_running(tmp_path, monkeypatch):
    held = hold_calibration(monkeypatch)
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        set_greedy(app)
        await pilot.pause()
        await pilot.press("ctrl+b")
        await wait_for(pilot, held.is_set)
        await pilot.press("f4")
        await wait_for(pilot, lambda: app.screen is app.chat_screen)
        await pilot.pause(0.2)
        chat = app.chat_screen
        pane = chat.query_one("#dense", ChatPane)
        text = str(pane.query_one(".placeholder").render())
        assert "Calibration running (F3)" in text and "No model loaded" not in text
        assert "calibration running" in str(chat.query_one("#chat-status").render())
        assert not chat.send("hi")
        app.calibrate_screen.action_cancel()
        await wait_for(pilot, lambda: app.calibrate_screen.state == "cancelled")


# --- the calibrate screen shows what it promises --------------------------------------------------

async def test_histogram_and_heatmap_update_while_running(tmp_path, monkeypatch):
    """The score histogram shows layer 1's matrices while layer 2 is calibrated, the threshold of the
    target marked; the heat map has layer 1's row while layer 2 is allocated."""
    import wina.allocate as allocmod
    import wina.calibrate as calmod
    gates = {"calibrate": (threading.Event(), threading.Event()),
             "allocate": (threading.Event(), threading.Event())}

    def gate(module, name):
        real = getattr(module, name)

        def wrapped(*a, **kw):
            on_event = kw["on_event"]
            entered, release = gates[name]

            def ev(e):
                on_event(e)
                if e.stage == name and e.layer == 1 and not entered.is_set():
                    entered.set()
                    release.wait(30)
            kw["on_event"] = ev
            return real(*a, **kw)
        monkeypatch.setattr(module, name, wrapped)

    gate(calmod, "calibrate")
    gate(allocmod, "allocate")
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        cal = await start_calibration(app, pilot)
        hist, heat = cal.query_one(ScoreHistogram), cal.query_one(AllocationHeatmap)
        await wait_for(pilot, gates["calibrate"][0].is_set)
        await wait_for(pilot, lambda: 0 in hist.hists, timeout=10)
        # the chart is redrawn at most every 0.2 s: wait for the redraw (a loaded machine is slower)
        await wait_for(pilot, lambda: "layer 1/2 · q_proj" in str(hist.render()), timeout=10)
        assert cal.state == "running" and cal.phase == "calibration" and sorted(hist.hists) == [0]
        assert cal.query_one(TabbedContent).active == "tab-scores"
        shown = str(hist.render())
        assert "layer 1/2 · q_proj" in shown and "threshold" in shown and "│" in shown
        await pilot.press("m")                           # the next matrix
        await pilot.pause()
        assert hist.cur_matrix == "k_proj" and "k_proj" in str(hist.render())
        assert not heat.allocation                       # no earlier plan's table
        gates["calibrate"][1].set()

        await wait_for(pilot, gates["allocate"][0].is_set)
        await wait_for(pilot, lambda: bool(heat.allocation), timeout=10)
        assert cal.state == "running" and cal.phase == "allocation"
        assert {k[0] for k in heat.allocation} == {0} and len(heat.allocation) == 7
        assert heat.note == "1/2 layers"
        gates["allocate"][1].set()
        await wait_for(pilot, lambda: cal.state != "running")
        assert cal.state == "done" and {k[0] for k in heat.allocation} == {0, 1}


async def test_resume_says_where_and_eta_counts_this_run(tmp_path, monkeypatch):
    import wina.calibrate as calmod
    real = calmod.calibrate
    app = make_app(tmp_path)
    calls = {"n": 0}

    def cancelling(*a, **kw):
        on_event = kw["on_event"]
        calls["n"] += 1

        def ev(e):
            on_event(e)
            if calls["n"] == 1 and e.layer == 1:        # cancelled in layer 2: layer 1 is finished, not 2
                app.calibrate_screen.cancel.cancel()
        kw["on_event"] = ev
        return real(*a, **kw)
    monkeypatch.setattr(calmod, "calibrate", cancelling)
    async with app.run_test(size=SIZE) as pilot:
        set_greedy(app, allocation="uniform")
        app.setup_screen.query_one("#gating", Select).value = "threshold"
        await pilot.pause()
        await pilot.press("ctrl+b")
        cal = app.calibrate_screen
        await wait_for(pilot, lambda: cal.state not in ("idle", "running"))
        assert cal.state == "cancelled"
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: cal.state not in ("idle", "running"))
        assert cal.state == "done"
        log = "\n".join(line.text for line in cal.query_one("#cal-log").lines)
        assert "calibration resumes at layer 2/2" in log.replace("\n", " ").replace("  ", " ")
        assert cal.resume == {"calibrate": 1}


def test_run_eta_ignores_what_a_resume_skipped():
    from wina_tui.state import RunEta
    clock = [0.0]
    eta = RunEta(start=10)
    eta._time = type("T", (), {"perf_counter": staticmethod(lambda: clock[0])})
    for done in range(10):                              # skipped layers go by at once
        assert eta.update(done, 30) is None
    assert eta.update(10, 30) is None                   # this run starts here
    clock[0] = 20.0
    assert eta.update(12, 30) == pytest.approx(10.0 * 18)   # 10 s per layer, 18 layers left


async def test_a_perplexity_preset_fills_the_form_with_its_perplexity_and_runs_it(tmp_path):
    """smollm2-quick measures wikitext-2 perplexity on its first 2048 tokens and no lm-eval task: the
    evaluate form says so (no task ticked, perplexity 2048) and runs that, not lm-eval's wikitext
    documents; a bad perplexity field is an inline message."""
    app = make_app(tmp_path, preset="smollm2-quick")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("ctrl+e")
        await wait_for(pilot, lambda: app.screen is app.evaluate_screen)
        await pilot.pause()
        ev = app.evaluate_screen
        assert list(ev.query_one("#tasks", SelectionList).selected) == []
        ppl = ev.query_one("#ppl-tokens", Input)
        assert ppl.value == "2048"
        for bad, words in (("many", "a number of tokens"), ("0", "perplexity")):
            ppl.value = bad
            await pilot.pause()
            form, err = ev.read_form()
            assert form is None and words in err, (bad, err)
        ppl.value = ""
        await pilot.pause()
        assert "perplexity" in ev.read_form()[1]            # nothing to measure
        ppl.value = "512"
        methods = ev.query_one("#methods", SelectionList)
        methods.deselect("teal")
        methods.deselect("wina")
        await pilot.pause()
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: ev.state in ("done", "failed", "cancelled"), timeout=120)
        assert ev.state == "done", ev.events[-3:]
        [run] = ev.runs
        assert run.perplexity is not None and run.wina["perplexity"]["max_tokens"] == 512
        assert run.wina["eval"]["tasks"] == []
        assert any(e["stage"] == "ppl" for e in ev.events)
        from wina_tui.widgets.progress_panel import ProgressPanel
        await pilot.pause()
        row = ev.query_one(ProgressPanel).rows["ppl"]
        assert row.status.endswith("done") and "ETA" not in row.status, row.status   # as task rows end
        await pilot.press("ctrl+q")
    saved = json.loads((tmp_path / "config" / "settings.json").read_text())
    assert saved["evaluate"]["ppl_tokens"] == "512"


async def test_a_preset_fills_the_evaluate_form_on_the_first_visit_and_a_bad_limit_is_refused(tmp_path):
    """``--preset``: the evaluate form shows the preset's limit and sparsities the first time it is
    opened (not only the second); a limit of nan / inf / 0 is an inline message, not a crash."""
    src = (Path(__file__).parents[1] / "presets" / "smollm2-tasks.toml").read_text()
    p = tmp_path / "mini.toml"
    p.write_text(src.replace("limit = 100", "limit = 10").replace("sparsities = [0.50]", "sparsities = [0.4]"))
    app = make_app(tmp_path, preset=str(p))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("ctrl+e")
        await wait_for(pilot, lambda: app.screen is app.evaluate_screen)
        await pilot.pause()
        ev = app.evaluate_screen
        assert ev.query_one("#limit", Input).value == "10"
        assert ev.query_one("#sparsities", Input).value == "0.4"
        for bad, words in (("nan", "finite"), ("1e400", "finite"), ("0", "at least 1"), ("2.5", "whole number")):
            ev.query_one("#limit", Input).value = bad
            await pilot.pause()
            form, err = ev.read_form()
            assert form is None and words in err, (bad, err)
        assert app.is_running


# --- the app remembers --------------------------------------------------------------------------------

async def test_last_settings_come_back_at_launch(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        s = app.setup_screen
        s.query_one("#method", Select).value = "teal"
        s.query_one("#sparsity", Input).value = "0.3"
        set_greedy(app, source="random", allocation="global")
        await pilot.pause()
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.screen is app.evaluate_screen)
        app.evaluate_screen.query_one("#limit", Input).value = "7"
        app.chat_screen.system = "Be brief."
        await pilot.pause()
        await pilot.press("ctrl+q")
    path = tmp_path / "config" / "settings.json"
    saved = json.loads(path.read_text())
    assert saved["setup"]["sparsity"] == pytest.approx(0.3) and saved["evaluate"]["limit"] == "7"
    assert not list(path.parent.glob("*.tmp"))            # written atomically

    app2 = make_app(tmp_path)
    async with app2.run_test(size=SIZE) as pilot:
        s = app2.setup_screen
        await pilot.pause()
        assert s.query_one("#method", Select).value == "teal"
        assert s.query_one("#sparsity", Input).value == "0.3"
        assert s.query_one("#allocation", Select).value == "global"
        assert s.query_one("#calib-source", Input).value == "random"
        await pilot.press("f5")
        await wait_for(pilot, lambda: app2.screen is app2.evaluate_screen)
        await pilot.pause()
        assert app2.evaluate_screen.query_one("#limit", Input).value == "7"
        assert app2.chat_screen.system == "Be brief."
        app2.evaluate_screen.query_one("#tasks", SelectionList).deselect_all()   # perplexity only
        app2.evaluate_screen.query_one("#ppl-tokens", Input).value = "512"
        await pilot.pause()
        await pilot.press("ctrl+q")
    assert json.loads(path.read_text())["evaluate"]["tasks"] == []
    app2b = make_app(tmp_path)
    async with app2b.run_test(size=SIZE) as pilot:
        await pilot.press("f5")
        await wait_for(pilot, lambda: app2b.screen is app2b.evaluate_screen)
        await pilot.pause()
        assert list(app2b.evaluate_screen.query_one("#tasks", SelectionList).selected) == []
        assert app2b.evaluate_screen.query_one("#ppl-tokens", Input).value == "512"

    path.write_text('{"setup": {"sparsity": 7, "method": "magic", "model": 3}, '     # odd values: ignored,
                    '"evaluate": {"limit": -3, "tasks": ["piqa"]}, "chat": {"system": 12}}')   # and named
    app3 = make_app(tmp_path)
    async with app3.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert set(app3.settings_ignored) == {"sparsity", "method", "model", "evaluate.limit", "chat.system"}
        assert app3.setup_screen.query_one("#sparsity", Input).value == "0.5"

    good = {"setup": {"model": "tiny", "method": "teal", "sparsity": 0.3, "preset": "smollm2-quick"}}
    path.write_text(json.dumps(good))
    app4 = make_app(tmp_path, model=str(tmp_path / "no-such-model"))     # a one-off, mistyped --model
    async with app4.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.pause()
        assert app4.setup_screen.read(show=False)[0] is None
        # the saved preset does not come back with another model: its label would describe another setup
        from wina_tui.screens.setup import NO_PRESET
        assert app4.setup_screen.query_one("#preset", Select).value == NO_PRESET
        assert app4.session.settings.preset is None
        await pilot.press("ctrl+q")
    assert json.loads(path.read_text())["setup"] == good["setup"]      # the last good setup stays


async def test_plan_browser_opens_a_saved_plan_for_chat_and_evaluation(tmp_path):
    from wina_tui.screens.plans import PlansScreen
    plans = tmp_path / "plans"
    app = make_app(tmp_path, plans_dir=plans)
    async with app.run_test(size=SIZE) as pilot:           # make a plan
        plan_dir = (await calibrate_a_plan(app, pilot)).resolve()

    app2 = make_app(tmp_path, plans_dir=plans)             # a new launch
    async with app2.run_test(size=(110, 32)) as pilot:
        app2.setup_screen.query_one("#method", Select).value = "teal"   # the plan's own settings win
        await pilot.pause()
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app2.screen, PlansScreen))
        browser = app2.screen
        assert len(browser.plans) == 1 and browser.plans[0].path == plan_dir.resolve()
        row = [str(c) for c in browser.query_one(DataTable).get_row_at(0)]
        assert row[1] == "WINA" and row[3] == "greedy layer" and row[-1] == "ready" and row[6]
        await pilot.press("c")
        await wait_for(pilot, lambda: app2.screen is app2.chat_screen)
        s = app2.session
        assert s.applied.options.method == "wina" and s.applied.allocation == "layer"
        assert Path(s.applied.options.plan).resolve() == plan_dir.resolve() and s.sparsifier is not None
        assert app2.setup_screen.query_one("#method", Select).value == "wina"
        await pilot.press("f2")
        await wait_for(pilot, lambda: app2.screen is app2.setup_screen)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app2.screen, PlansScreen))
        await pilot.press("e")
        await wait_for(pilot, lambda: app2.screen is app2.evaluate_screen)
        assert s.plan is not None and s.plan_path.resolve() == plan_dir.resolve()

    # damaged copies: one with a listed file missing, one whose plan.json is cut short; both are
    # listed as damaged (counted in the title) and neither opens
    import shutil
    missing, cut = plans / "missing", plans / "cut"
    shutil.copytree(plan_dir, missing)
    shutil.copytree(plan_dir, cut)
    next(missing.glob("histograms/*.safetensors")).unlink()
    text = (cut / "plan.json").read_text()
    (cut / "plan.json").write_text(text[: len(text) // 3])
    app3 = make_app(tmp_path, plans_dir=plans)
    async with app3.run_test(size=(110, 32)) as pilot:
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app3.screen, PlansScreen))
        browser = app3.screen
        states = {p.path.name: p.describe_state() for p in browser.plans}
        assert states[plan_dir.name] == "ready", states
        assert states["missing"].startswith("damaged:") and "missing" in states["missing"], states
        assert states["cut"].startswith("damaged:"), states
        assert "(1, 2 damaged)" in str(browser.query_one(".modal-title").render())
        table = browser.query_one(DataTable)
        table.move_cursor(row=[p.path.name for p in browser.plans].index("missing"))
        await pilot.press("c")
        await pilot.pause()
        assert isinstance(app3.screen, PlansScreen)            # refused, with a message


# --- small things -------------------------------------------------------------------------------------

async def test_setup_error_next_to_the_buttons_goes_when_fixed(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        s = app.setup_screen
        s.query_one("#sparsity", Input).value = "2"
        await pilot.pause()
        await pilot.press("ctrl+g")
        await pilot.pause()
        assert "⚠" in str(s.query_one("#setup-status").render())
        s.query_one("#sparsity", Input).value = "0.4"
        await pilot.pause()
        assert "⚠" not in str(s.query_one("#setup-status").render())


async def test_small_terminal_keeps_the_buttons_on_screen(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        for bid in ("#go-chat", "#go-calibrate", "#go-evaluate", "#go-plans"):
            b = app.setup_screen.query_one(bid)
            r = b.region
            assert r.height > 0 and r.bottom <= 24 and r.right <= 80, (bid, r)


# --- layout at 80×24 (a common terminal) as at 100×30 (the documented one) ----------------------------

def screen_rows(app) -> list[str]:
    """What the terminal shows, one string per row (the screen as Textual's compositor draws it)."""
    return ["".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips()]


def tab_rows(app) -> list[str]:
    return [r for r in screen_rows(app) if "Results" in r and "Chart" in r]


@pytest.mark.parametrize("size", [(80, 24), SIZE])
async def test_the_evaluate_tab_row_is_drawn_once(tmp_path, size):
    """One row of tabs on the evaluate screen, on the first visit, after another screen and after
    a resize (a probe saw it twice until the terminal was resized)."""
    app = make_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        for key in ("f5", "f3", "f5"):
            await pilot.press(key)
            await pilot.pause(0.2)
            if key == "f5":
                assert len(tab_rows(app)) == 1, screen_rows(app)
        assert len(app.evaluate_screen.query("ContentTabs")) == 1
        await pilot.resize_terminal(*((80, 24) if size == SIZE else SIZE))
        await pilot.pause(0.2)
        assert len(tab_rows(app)) == 1, screen_rows(app)


async def test_the_evaluate_form_scrolls_to_its_buttons_at_80x24(tmp_path):
    """At 80×24 the evaluate form is taller than its box: it scrolls, so Sparsities and the Run and
    Load runs buttons can be reached (at 100×30 it fits, with nothing to scroll)."""
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.screen is app.evaluate_screen)
        await pilot.pause()
        form = app.evaluate_screen.query_one("#eval-form")
        run = app.evaluate_screen.query_one("#eval-run", Button)
        assert form.max_scroll_y > 0 and not form.region.contains_region(run.region)
        form.scroll_end(animate=False)
        await pilot.pause()
        assert form.region.contains_region(run.region)
        await pilot.resize_terminal(*SIZE)
        await pilot.pause()
        assert form.max_scroll_y == 0 and form.region.contains_region(run.region)


@pytest.mark.parametrize("width", [60, 80, 100])
async def test_the_footer_ends_with_the_palette_key(tmp_path, width):
    """The compact footer's palette key ends the row: no letter of the keys scrolled under it after."""
    app = make_app(tmp_path)
    async with app.run_test(size=(width, 24)) as pilot:
        for key in ("f2", "f5"):
            await pilot.press(key)
            await pilot.pause(0.2)
            palette = app.screen.query_one(Footer).query_one(".-command-palette")
            assert palette.region.right == width
            assert screen_rows(app)[-1].endswith("▏^p palette"), screen_rows(app)[-1]


async def test_the_heat_map_narrows_its_cells_then_scrolls_to_every_column(tmp_path):
    """A 30-layer, 7-matrix allocation: full cells at 100×30, two-digit ones that all fit at 80×24,
    and narrower still the tab scrolls sideways to the last column."""
    from wina_tui.widgets.allocation_heatmap import heatmap_table, table_width
    projs = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    alloc = {(layer, p): 0.2 + 0.02 * (layer % 10 + i) for layer in range(30) for i, p in enumerate(projs)}
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        cal = app.calibrate_screen
        heat = cal.query_one(AllocationHeatmap)
        heat.show_allocation(alloc, target=0.5)
        cal.query_one(TabbedContent).active = "tab-allocation"
        await pilot.pause(0.2)
        scroll = heat.parent

        def header() -> list[str]:
            return next(r for r in screen_rows(app) if r.rstrip().endswith("mean")).split()[-9:]
        assert not heat.compact and header() == ["layer", "q", "k", "v", "o", "gate", "up", "down", "mean"]
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.2)
        assert heat.compact and scroll.max_scroll_x == 0                  # every column shown
        assert header() == ["L", "q", "k", "v", "o", "ga", "up", "do", "mean"]
        await pilot.resize_terminal(64, 20)
        await pilot.pause(0.2)
        assert heat.compact and scroll.max_scroll_x > 0                   # or reachable sideways
        assert heat.size.width >= table_width(heat, heatmap_table(alloc, target=0.5, compact=True))
        scroll.scroll_to(x=scroll.max_scroll_x, animate=False)
        await pilot.pause(0.2)
        assert any(r.rstrip().endswith("mean") for r in screen_rows(app))
        await pilot.resize_terminal(*SIZE)
        await pilot.pause(0.2)
        assert not heat.compact and scroll.max_scroll_x == 0


async def test_the_quality_chart_names_its_lines_under_the_plot(tmp_path):
    """The legend is a line under the plot in the lines' colours, not a box drawn over them."""
    from rich.style import Style
    from wina.results import make_record, make_wina_block, write_run
    files = []
    for method, s, v in (("dense", 0.0, 0.62), ("teal", 0.25, 0.6), ("teal", 0.5, 0.55), ("wina", 0.25, 0.61),
                         ("wina", 0.5, 0.58)):
        w = make_wina_block(model_id="tiny", method=method, sparsity=s, measured=s,
                            headline={"piqa": {"metric": "acc_norm", "filter": "none", "value": v,
                                               "stderr": 0.01, "higher_is_better": True}})
        files.append(str(tmp_path / "store" / f"{method}-{s}.json"))
        write_run(make_record(None, w), files[-1])
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f5")
        ev = app.evaluate_screen
        await wait_for(pilot, lambda: app.screen is ev)
        ev.load_paths(files)
        assert len(ev.runs) == len(files)
        ev.query_one(TabbedContent).active = "tab-chart"
        await pilot.pause(0.3)
        chart = ev.query_one("#quality-chart", PlotView)
        text = chart.content
        lines = text.plain.splitlines()
        assert len(lines) == chart.content_region.height                 # the legend line is not cut
        assert lines[-1].split() == ["━━", "dense", "━━", "TEAL", "━━", "WINA"]
        assert not any(name in line for line in lines[:-1] for name in ("dense", "TEAL", "WINA"))
        assert "dense" in screen_rows(app)[chart.content_region.bottom - 1]
        start = len(text.plain) - len(lines[-1])
        legend = [Style.parse(str(sp.style)).color for sp in text.spans if sp.start >= start]
        plot = {Style.parse(str(sp.style)).color for sp in text.spans if sp.end <= start}
        assert legend == [Style.parse(f"color({c})").color for c in SERIES_COLORS[:3]]
        assert set(legend) <= plot                                         # the colours of the lines


LONG_MODEL = "/home/someone/models/Meta-Llama-3.1-8B-Instruct"


async def test_the_plan_browser_keeps_model_method_and_sparsity_in_view_at_80_columns(tmp_path):
    """The dialog on screen whole; a local model path named by its folder; model, method and sparsity
    in view, the other columns a scroll away; the buttons on screen with more plans than rows."""
    import shutil
    from wina import api
    from wina_tui.screens.plans import PlansScreen
    plans = tmp_path / "plans"
    api.calibrate(tiny_loaded(LONG_MODEL), plans / "llama", api.Calibration(method="wina", source="random",
                                                                            samples=2, seq_len=32))
    for i in range(20):                                   # more than the table shows at 24 rows
        shutil.copytree(plans / "llama", plans / f"copy-{i}")
    app = make_app(tmp_path, plans_dir=plans)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, PlansScreen))
        await pilot.pause(0.2)
        browser = app.screen
        box = browser.query_one("#plans").region
        assert box.x >= 0 and box.right <= 80 and box.bottom <= 24       # the whole dialog on screen
        table = browser.query_one(DataTable)
        names = [str(c.label) for c in table.ordered_columns]
        widths = [c.get_render_width(table) for c in table.ordered_columns]
        assert names[:3] == ["model", "method", "sparsity"]
        assert sum(widths[:3]) <= table.scrollable_content_region.width
        assert str(table.get_row_at(0)[0]) == "Meta-Llama-3.1-8B-Instruct"    # a path by its folder's name
        assert any("Meta-Llama-3.1-8B-Instruct" in r and "WINA" in r and "any" in r for r in screen_rows(app))
        assert table.max_scroll_x > 0 and table.virtual_size.width >= sum(widths)   # the rest sideways
        assert str(browser.query_one("#plan-path", Label).render()).startswith(str(plans.resolve()))
        for b in browser.query(Button):                   # the table scrolls; the buttons stay on screen
            assert b.region.height and b.region.bottom <= box.bottom - 1, (b.id, b.region, box)


async def test_the_results_browser_keeps_method_sparsity_and_model_in_view_at_80_columns(tmp_path):
    """The dialog on screen whole; each option starts with method, sparsity and model; the line under
    the list shows the highlighted file in full (wrapped) with its path; the buttons stay on screen."""
    from wina.results import make_record, make_wina_block, write_run
    from wina_tui.screens.load_runs import LoadRunsScreen
    tasks = ("arc_challenge", "arc_easy", "boolq", "piqa", "hellaswag", "winogrande")
    w = make_wina_block(model_id=LONG_MODEL, method="wina", sparsity=0.5, measured=0.5,
                        headline={t: {"metric": "acc", "filter": "none", "value": 0.5, "stderr": 0.01,
                                      "higher_is_better": True} for t in tasks})
    path = tmp_path / "runs" / "wina-50.json"
    write_run(make_record(None, w), path)
    for i in range(20):                                   # more than the list shows at 24 rows
        (tmp_path / "runs" / f"old-{i}.json").write_bytes(path.read_bytes())
        os.utime(tmp_path / "runs" / f"old-{i}.json", (1e9, 1e9))      # older: the first one stays on top
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f5")
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, LoadRunsScreen))
        await pilot.pause(0.2)
        browser = app.screen
        box = browser.query_one("#load-runs").region
        assert box.x >= 0 and box.right <= 80 and box.bottom <= 24
        label = browser.labels[str(path)]
        assert label.startswith("WINA 50% · Meta-Llama-3.1-8B-Instruct · avg 50.0 · ")
        assert any("WINA 50% · Meta-Llama-3.1-8B-Instruct · avg 50.0" in r for r in screen_rows(app))
        detail = browser.query_one("#run-detail", Label)          # the highlighted file in full, wrapped
        r = detail.region
        assert r.right <= box.right and r.height >= 3
        shown = "".join(row[r.x:r.right].strip() for row in screen_rows(app)[r.y:r.bottom])
        assert "winogrande" in shown and path.name in shown
        for b in browser.query(Button):
            assert b.region.height and b.region.bottom <= box.bottom - 1, (b.id, b.region, box)


async def test_every_offered_calibration_source_works(tmp_path):
    """The setup form offers self, wikitext and a file: wikitext calibrates (from the data folder)."""
    if not (DATA_DIR / "wikitext2").is_dir():
        pytest.skip(f"wikitext-2 not found at {DATA_DIR}")
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        set_greedy(app, source="wikitext", allocation="uniform")
        app.setup_screen.query_one("#gating", Select).value = "threshold"
        await pilot.pause()
        await pilot.press("ctrl+b")
        cal = app.calibrate_screen
        await wait_for(pilot, lambda: cal.state not in ("idle", "running"), timeout=120)
        assert cal.state == "done", [line.text for line in cal.query_one("#cal-log").lines[-3:]]
        assert app.session.plan_path.name.endswith("-wikitext-2x32")


async def calibrate_a_plan(app, pilot) -> Path:
    """Setup's greedy settings calibrated and allocated into the app's saved plan (ctrl+b); its folder."""
    cal = await start_calibration(app, pilot)
    await wait_for(pilot, lambda: cal.state in ("done", "failed", "cancelled"))
    assert cal.state == "done", [line.text for line in cal.query_one("#cal-log").lines[-3:]]
    return app.session.plan_dir_for(app.setup_screen.read(show=False)[0])


async def test_a_damaged_saved_plan_is_made_again(tmp_path):
    """The app's own saved plan for these settings, damaged (plan.json cut short): calibrate says so
    in its log and makes it again, instead of failing on it every time."""
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        out = await calibrate_a_plan(app, pilot)
        cal = app.calibrate_screen
        text = (out / "plan.json").read_text()
        (out / "plan.json").write_text(text[: len(text) // 2])
        await pilot.press("f2")
        await wait_for(pilot, lambda: app.screen is app.setup_screen)
        await pilot.press("ctrl+b")

        def new_log() -> str:        # the whole log (it is wrapped again at times: no line count holds)
            return " ".join(" ".join(line.text for line in cal.query_one("#cal-log").lines).split())
        await wait_for(pilot, lambda: "was damaged" in new_log() or cal.state == "failed", timeout=30)
        await wait_for(pilot, lambda: cal.state in ("done", "failed", "cancelled"))
        log = new_log()
        assert cal.state == "done", log[-300:]
        assert "was damaged" in log and "made again" in log
        from wina.api import Plan
        assert Plan.load(str(out)).n_allocated == Plan.load(str(out)).n_layers


async def test_calibration_checks_and_locks_its_plan_before_loading_the_model(tmp_path):
    """A plan folder another writer holds, or a calibration text that is not UTF-8, stops the
    calibration at once with one line, and the model is never loaded."""
    import threading
    from wina.files import locked
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        set_greedy(app)
        await pilot.pause()
        out = app.session.plan_dir_for(app.setup_screen.read(show=False)[0])
        held, release = threading.Event(), threading.Event()

        def other_writer():
            with locked(out, "plan"):
                held.set()
                release.wait(30)
        t = threading.Thread(target=other_writer)
        t.start()
        try:
            assert held.wait(10)
            await pilot.press("ctrl+b")
            cal = app.calibrate_screen
            await wait_for(pilot, lambda: cal.state not in ("idle", "running"), timeout=60)
            assert cal.state == "failed"
            assert "being written by process" in " ".join(line.text for line in cal.query_one("#cal-log").lines)
            assert app.session.loaded is None
        finally:
            release.set()
            t.join()

        binary = tmp_path / "calib.bin"
        binary.write_bytes(bytes(range(256)) * 8)
        await pilot.press("f2")
        await wait_for(pilot, lambda: app.screen is app.setup_screen)
        set_greedy(app, source=str(binary))
        await pilot.pause()
        n = len(cal.query_one("#cal-log").lines)
        await pilot.press("ctrl+b")
        await wait_for(pilot, lambda: len(cal.query_one("#cal-log").lines) > n + 1 and cal.state != "running",
                       timeout=60)
        new = " ".join(line.text for line in cal.query_one("#cal-log").lines[n:])
        assert cal.state == "failed" and "UTF-8" in new, new
        assert app.session.loaded is None


@pytest.mark.parametrize("args,needle", [(["--max-new-tokens", "-1"], "--max-new-tokens"),
                                         (["--temperature", "-2"], "--temperature"),
                                         (["--temperature", "inf"], "--temperature must be a finite number"),
                                         (["--temperature", "nan"], "--temperature must be a finite number"),
                                         (["--threads", "0"], "--threads"),
                                         (["--results", __file__], "is a file")])
def test_bad_startup_options_are_refused_before_the_app_starts(args, needle, capsys):
    from wina_tui.app import main
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err      # one line, no usage block


def test_the_app_without_a_terminal_is_one_line(capsys):
    """Run from a script or with its output piped, the app would draw escape codes into it."""
    from wina_tui.app import main
    with pytest.raises(SystemExit) as e:
        main([])                                    # pytest's captured stdin/stdout are not terminals
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "needs a terminal" in err and len(err.strip().splitlines()) == 1, err
