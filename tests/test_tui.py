"""Pilot tests of the Textual app on a tiny random model: every screen, for real.

pick → calibrate (greedy) → chat one message → evaluate with a limit, asserting on widget state and on
what the workers posted; invalid input; cancel and resume; a key press handled while a calibration
worker runs. Torch runs single-threaded here: on a small shared CPU, intra-op threads make tiny
models tens of times slower.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from conftest import DATA_DIR
from test_tui_support import SIZE, set_greedy, tiny_app, wait_for

from textual.widgets import Checkbox, DataTable, Input, Label, Select, SelectionList

from wina_tui.app import WinaApp
from wina_tui.screens.help import HelpScreen
from wina_tui.widgets.allocation_heatmap import AllocationHeatmap
from wina_tui.widgets.chat_pane import ChatPane
from wina_tui.widgets.score_histogram import ScoreHistogram
from wina_tui.widgets.trajectory_chart import TrajectoryChart

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run faster on one thread


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
        set_greedy(app)
        await pilot.pause()
        await pilot.press("ctrl+b")
        cal = app.calibrate_screen
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
            if seen["calls"] == 1 and e.layer == 0:
                app.calibrate_screen.cancel.cancel()    # as esc does: stops before layer 1
        kw["on_event"] = ev
        return real(*a, **kw)

    monkeypatch.setattr(calmod, "calibrate", cancelling)
    async with app.run_test(size=SIZE) as pilot:
        set_greedy(app)
        await pilot.pause()
        await pilot.press("ctrl+b")
        cal = app.calibrate_screen
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
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert dense.history == [] and dense.stats is None


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


async def test_engine_warm_up_before_the_first_reply(tmp_path, monkeypatch):
    """Where the GPU engine applies, the chat compiles/captures the decode step for each pane's mode
    (sparse, and dense with the sparsifier paused) before replying, and says so in the status line."""
    import wina_tui.screens.chat as chat_mod
    calls, statuses = [], []
    monkeypatch.setattr(chat_mod, "generation_backend", lambda model: "engine")
    monkeypatch.setattr(chat_mod, "warm_up", lambda model, sampled=False: calls.append(
        (model._wina_sparsifier.enabled, sampled)))
    app = make_app(tmp_path, max_new_tokens=4)
    async with app.run_test(size=SIZE) as pilot:
        await load_and_chat(app, pilot, "teal")
        chat = app.chat_screen
        orig = chat.set_status
        monkeypatch.setattr(chat, "set_status", lambda text: (statuses.append(text), orig(text)))
        assert chat.send("hi")
        await wait_for(pilot, lambda: not chat.worker.is_running)
        await pilot.pause(0.2)
    assert sorted(calls) == [(False, False), (True, False)]
    assert any("preparing the decode engine" in t for t in statuses)
    assert not statuses[-1].startswith("preparing")            # the usual status line is back
