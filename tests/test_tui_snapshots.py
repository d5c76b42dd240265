"""Snapshot tests of every screen at 100×30 (pytest-textual-snapshot).

Deterministic: a tiny random model, fixed relative paths in what is shown, no timings on screen
(the chat is shot before any reply, so no tokens/s), run files with fixed dates.
The calibrate snapshots show the library's real allocation of the tiny model, so a change in
wina.calibrate / wina.allocate numerics shows here too. Regenerate with
``pytest tests/test_tui_snapshots.py --snapshot-update`` (and look at the diff).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from test_tui_support import SIZE, set_greedy, tiny_app, wait_for

from textual.widgets import Input, Select

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run faster on one thread

PLANS = Path(tempfile.gettempdir()) / "wina-tui-snapshot-plans"    # fixed: its path is not shown,
                                                                   # but keep runs independent


def make_app(tmp_path: Path, **kw):
    shutil.rmtree(PLANS, ignore_errors=True)
    return tiny_app(tmp_path, results_dir=Path("runs"), plans_dir=PLANS, data_dir=Path("../shared/data"),
                    max_new_tokens=4, **kw)


async def calibrated(pilot) -> None:
    """Layer-greedy calibration on random tokens, run to its end, notifications cleared."""
    app = pilot.app
    set_greedy(app)
    await pilot.pause()
    await pilot.press("ctrl+b")
    await wait_for(pilot, lambda: app.calibrate_screen.state in ("done", "failed"))
    await pilot.pause(0.3)
    app.clear_notifications()


async def show_runs(pilot, files: list[Path], tab: str = "") -> None:
    """The evaluate screen with the run files loaded (and ``tab`` shown), notifications cleared."""
    app = pilot.app
    await pilot.press("f5")
    await wait_for(pilot, lambda: app.screen is app.evaluate_screen)
    app.evaluate_screen.load_paths([str(f) for f in files])
    assert len(app.evaluate_screen.runs) == len(files)
    if tab:
        app.evaluate_screen.query_one("#eval-tabs").active = tab
    await pilot.pause(0.2)
    app.clear_notifications()
    await pilot.pause()


def test_setup_screen(snap_compare, tmp_path):
    assert snap_compare(make_app(tmp_path), terminal_size=SIZE)


def test_setup_screen_invalid_sparsity(snap_compare, tmp_path):
    async def before(pilot):
        s = pilot.app.setup_screen
        s.query_one("#allocation", Select).value = "global"
        s.query_one("#sparsity", Input).value = "1.2"
        await pilot.pause()
    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=before)


def test_calibrate_screen_done(snap_compare, tmp_path):
    async def before(pilot):
        await calibrated(pilot)
        await pilot.pause()
    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=before)


def test_calibrate_screen_trajectory(snap_compare, tmp_path):
    async def before(pilot):
        await calibrated(pilot)
        await pilot.press("left_square_bracket")      # layer 0's greedy trajectory
        await pilot.pause(0.2)
    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=before)


def test_chat_screen(snap_compare, tmp_path):
    async def before(pilot):
        app = pilot.app
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.screen is app.chat_screen)
        for box in app.chat_screen.query(Input):     # a blinking cursor makes the shot timing-dependent
            box.cursor_blink = False
        await pilot.pause(0.2)
    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=before)


def _run_file(folder: Path, method: str, sparsity: float, acc: dict, measured: float) -> Path:
    wina = {"schema": 1, "model": "tiny", "method": method, "transform": False,
            "allocation": None if method == "dense" else "uniform", "nominal_sparsity": sparsity,
            "measured_sparsity": measured, "flops": None, "eval": {"limit": 20, "data_dir": "data"},
            "headline": {t: {"metric": "acc_norm", "filter": "none", "value": v, "stderr": 0.01,
                             "higher_is_better": True} for t, v in acc.items()},
            "perplexity": None, "date": "2026-11-29T00:00:00+00:00", "versions": {}, "machine": {}}
    p = folder / f"{method}-{int(100 * sparsity)}.json"
    p.write_text(json.dumps({"wina": wina}), encoding="utf-8")
    return p


def test_evaluate_screen_with_runs(snap_compare, tmp_path):
    runs = tmp_path / "store"
    runs.mkdir()
    files = [_run_file(runs, "dense", 0.0, {"piqa": 0.62, "arc_easy": 0.55}, 0.0)]
    for s, (t, w) in {0.25: (0.60, 0.61), 0.5: (0.55, 0.58)}.items():
        files.append(_run_file(runs, "teal", s, {"piqa": t, "arc_easy": t - 0.05}, s - 0.002))
        files.append(_run_file(runs, "wina", s, {"piqa": w, "arc_easy": w - 0.04}, s - 0.001))

    async def before(pilot):
        await show_runs(pilot, files)
    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=before)


def test_evaluate_chart(snap_compare, tmp_path):
    runs = tmp_path / "store"
    runs.mkdir()
    files = [_run_file(runs, "dense", 0.0, {"piqa": 0.62}, 0.0)]
    for s, (t, w) in {0.25: (0.60, 0.61), 0.5: (0.55, 0.58), 0.65: (0.50, 0.55)}.items():
        files.append(_run_file(runs, "teal", s, {"piqa": t}, s))
        files.append(_run_file(runs, "wina", s, {"piqa": w}, s))

    async def before(pilot):
        await show_runs(pilot, files, tab="tab-chart")
    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=before)


def test_help_screen_light(snap_compare, tmp_path):
    async def before(pilot):
        await pilot.press("ctrl+t")
        await pilot.press("f1")
        await pilot.pause(0.2)
    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=before)


def test_calibrate_screen_scores(snap_compare, tmp_path):
    async def before(pilot):
        await calibrated(pilot)
        pilot.app.calibrate_screen.query_one("#cal-tabs").active = "tab-scores"
        await pilot.press("m")                        # layer 2's second matrix, k_proj
        await pilot.pause(0.3)
    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=before)
