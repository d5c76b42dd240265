"""Key-press latency of wina-tui while a worker calibrates or generates.

Runs the real app headless (Textual's run_test, 100×30) on the embedded model (``--tiny``: a tiny
random model, no model files needed) and measures, for presses of F1 (open help) and Escape (close
it):

- handled: from posting the key event to the app until the bound action runs (what the issue's
  "a key press handled within 100 ms" is about), and
- shown: until the help screen is the active screen (its compose and mount included).

Scenarios: idle, while the chat worker generates (dense then sparse reply), while the calibration
worker runs (WINA, greedy within-layer, default sizes; cancelled at the end).

    python bench/tui_latency.py                 # embedded SmolLM2-135M
    python bench/tui_latency.py --tiny --n 10
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def stats(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    ms = sorted(1000 * x for x in xs)
    p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
    return f"median {statistics.median(ms):6.1f} ms · p95 {p95:6.1f} ms · max {ms[-1]:6.1f} ms (n={len(ms)})"


async def probe(app, pilot, n: int, gap: float, busy=lambda: True) -> tuple[list[float], list[float]]:
    from textual import events
    from wina_tui.screens.help import HelpScreen
    handled: list[float] = []
    shown: list[float] = []
    orig = app.action_help
    mark: dict[str, float] = {}

    def wrapped():
        mark["handled"] = time.perf_counter()
        orig()

    app.action_help = wrapped
    try:
        for _ in range(n):
            if not busy():
                break
            mark.clear()
            t0 = time.perf_counter()
            app.post_message(events.Key("f1", None))
            while "handled" not in mark:
                await asyncio.sleep(0.0005)
            handled.append(mark["handled"] - t0)
            while not isinstance(app.screen, HelpScreen):
                await asyncio.sleep(0.0005)
            shown.append(time.perf_counter() - t0)
            await asyncio.sleep(gap / 2)
            app.post_message(events.Key("escape", None))
            while isinstance(app.screen, HelpScreen):
                await asyncio.sleep(0.0005)
            await asyncio.sleep(gap / 2)
    finally:
        app.action_help = orig
    return handled, shown


async def main(args) -> None:
    import torch
    from wina_tui.app import WinaApp, set_threads
    set_threads(args.threads)
    from wina_tui.widgets.chat_pane import ChatPane
    from textual.widgets import Input, Select

    loader = None
    if args.tiny:
        from test_tui_support import tiny_loader
        loader = tiny_loader
    tmp = Path(tempfile.mkdtemp(prefix="wina-tui-latency-"))
    app = WinaApp(loader=loader, state_dir=tmp, config_dir=tmp / "config", max_new_tokens=args.tokens)
    if args.tiny:
        app.session.calibrate_options = {"samples": 4, "seq_len": 256}
    out = []

    def report(name, h, s):
        out.append((name, h, s))
        print(f"{name:34s} handled: {stats(h)}", flush=True)
        print(f"{'':34s} shown:   {stats(s)}", flush=True)

    async def until(cond, timeout=120.0, what=""):
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    model = "tiny random (tests)" if args.tiny else "smollm2-135m (embedded)"
    print(f"wina-tui key-press latency · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {platform.platform()} · {os.cpu_count()} CPUs · load avg "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} · torch {torch.__version__} "
          f"({torch.get_num_threads()} threads) · model {model}", flush=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        h, s = await probe(app, pilot, args.n, args.gap)
        report("idle", h, s)

        # chat: load and prepare WINA 50 % top-k, then probe while the replies stream
        await pilot.press("ctrl+g")
        await until(lambda: app.screen is app.chat_screen, what="the chat screen")
        await pilot.pause(0.2)
        chat = app.chat_screen
        assert chat.send("Explain in detail how a transformer language model works, step by step.")
        await until(lambda: bool(chat.query_one("#dense", ChatPane)._buffer), what="the first tokens")
        h, s = await probe(app, pilot, args.n, args.gap, busy=lambda: chat.worker.is_running)
        report("generating (chat worker)", h, s)
        chat.action_stop()
        await until(lambda: not chat.worker.is_running, what="the chat worker to stop")
        dense = chat.query_one("#dense", ChatPane).stats
        sparse = chat.query_one("#sparse", ChatPane).stats

        # calibration: greedy within-layer on self-generated text, probe while it runs
        await pilot.press("f2")
        await pilot.pause(0.2)
        app.setup_screen.query_one("#allocation", Select).value = "layer"
        app.setup_screen.query_one("#calib-source", Input).value = "self"
        await pilot.pause()
        await pilot.press("ctrl+b")
        cal = app.calibrate_screen
        await until(lambda: cal.state != "idle", what="calibration to start")
        if cal.state != "running":
            raise SystemExit(f"calibration did not start: {cal.state}: {cal.query_one('#cal-log').lines[-1:]}")
        await asyncio.sleep(1.0)
        h, s = await probe(app, pilot, args.n, args.gap, busy=lambda: cal.state == "running")
        report("calibrating (calibration worker)", h, s)
        cal.action_cancel()
        await until(lambda: cal.state != "running", what="calibration to stop")

    if dense is not None:
        print(f"chat during the probe: dense reply {dense.tokens} tokens at {dense.tokens_per_s:.1f} tok/s")
    print(f"load avg at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of the embedded one")
    p.add_argument("--n", type=int, default=20, help="presses per scenario")
    p.add_argument("--gap", type=float, default=0.25, help="seconds between presses")
    p.add_argument("--tokens", type=int, default=400, help="max new tokens of the chat reply")
    p.add_argument("--threads", type=int, help="torch threads (default: as wina-tui chooses)")
    asyncio.run(main(p.parse_args()))
