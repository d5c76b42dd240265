"""The wina Textual app: setup → calibrate & allocate → chat side by side → evaluate.

``wina-tui`` (console script) calls :func:`main`; the CLI calls :func:`run`. Tests and scripts build
:class:`WinaApp` with their own ``loader`` (any callable ``spec -> wina.api.Loaded``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Optional

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen

from .screens.calibrate import CalibrateScreen
from .screens.chat import ChatScreen
from .screens.evaluate import EvaluateScreen
from .screens.help import HelpScreen
from .screens.setup import SetupScreen
from .state import Loader, Session, Settings, describe_error

MODES_ORDER = ("setup", "calibrate", "chat", "evaluate")


class WinaApp(App):
    """The app. All model work runs in thread workers; the UI thread only renders."""

    CSS_PATH = "app.tcss"
    TITLE = "wina"
    SUB_TITLE = "activation sparsity"
    BINDINGS = [
        Binding("f1", "help", "Help"),
        Binding("f2", "switch_mode('setup')", "Setup"),
        Binding("f3", "switch_mode('calibrate')", "Calib"),
        Binding("f4", "switch_mode('chat')", "Chat"),
        Binding("f5", "switch_mode('evaluate')", "Eval"),
        Binding("ctrl+t", "toggle_dark", "Theme", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True, show=False),
    ]

    class Prepared(Message):
        def __init__(self, ok: bool, message: str, target: str) -> None:
            super().__init__()
            self.ok = ok
            self.message = message
            self.target = target

    def __init__(self, *, loader: Optional[Loader] = None, model: Optional[str] = None,
                 preset: Optional[str] = None, results_dir: Optional[Path] = None,
                 state_dir: Optional[Path] = None, plans_dir: Optional[Path] = None,
                 data_dir: Optional[Path] = None, max_new_tokens: int = 256, temperature: float = 0.0,
                 theme: Optional[str] = None, start: str = "setup") -> None:
        super().__init__()
        self.session = Session(loader, results_dir=results_dir, state_dir=state_dir, plans_dir=plans_dir,
                               data_dir=data_dir)
        if model:
            self.session.settings.model = model
        self._preset_name = preset
        self._start = start if start in MODES_ORDER else "setup"
        if theme:
            self.theme = theme
        self.setup_screen = SetupScreen(self.session)
        self.calibrate_screen = CalibrateScreen(self.session)
        self.chat_screen = ChatScreen(self.session, max_new_tokens=max_new_tokens, temperature=temperature)
        self.evaluate_screen = EvaluateScreen(self.session)
        for name, scr in zip(MODES_ORDER, (self.setup_screen, self.calibrate_screen, self.chat_screen,
                                           self.evaluate_screen)):
            self.add_mode(name, lambda scr=scr: scr)

    def on_mount(self) -> None:
        self.switch_mode(self._start)
        if self._preset_name:
            self.call_after_refresh(self._apply_preset_name, self._preset_name)

    def _apply_preset_name(self, name: str) -> None:
        from .screens.setup import NO_PRESET
        from textual.widgets import Select
        sel = self.setup_screen.query_one("#preset", Select)
        values = [v for _, v in self.setup_screen.presets]
        if name in [n for n, _ in self.setup_screen.presets]:
            sel.value = name
        else:
            try:
                from wina.presets import load_preset
                p = load_preset(name)
                self.setup_screen.presets.append((p.name, p))
                sel.set_options([("none", NO_PRESET)] + [(n, n) for n, _ in self.setup_screen.presets])
                sel.value = p.name
            except Exception as e:
                self.notify(describe_error(e), severity="error", timeout=8)
        del values

    # --- navigation and commands --------------------------------------------------------------
    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.pop_screen()
        else:
            self.push_screen(HelpScreen())

    def action_toggle_dark(self) -> None:
        self.theme = "textual-light" if self.current_theme.dark else "textual-dark"

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield SystemCommand("Setup", "Pick the model and the method (F2)", lambda: self.switch_mode("setup"))
        yield SystemCommand("Load & chat", "Load and prepare the model, then chat side by side",
                            lambda: self._from_setup("chat"))
        yield SystemCommand("Calibrate", "Calibrate and allocate with the setup's options",
                            lambda: self._from_setup("calibrate"))
        yield SystemCommand("Chat", "Dense and sparse side by side (F4)", lambda: self.switch_mode("chat"))
        yield SystemCommand("New chat", "Clear both conversations", self._new_chat)
        yield SystemCommand("Evaluate", "Choose tasks and sparsities to compare (F5)",
                            lambda: self.switch_mode("evaluate"))
        yield SystemCommand("Run evaluation", "Run the evaluation form", self._run_eval)
        yield SystemCommand("Load earlier runs", "Compare runs from the results store", self._load_runs)
        yield SystemCommand("Light / dark", "Toggle the light and dark themes (ctrl+t)", self.action_toggle_dark)
        yield SystemCommand("Help", "Screens and keys (F1)", self.action_help)
        yield from super().get_system_commands(screen)

    def _from_setup(self, target: str) -> None:
        self.switch_mode("setup")
        self.call_after_refresh(self.setup_screen.action_go, target)

    def _new_chat(self) -> None:
        self.switch_mode("chat")
        self.chat_screen.action_new_chat()

    def _run_eval(self) -> None:
        self.switch_mode("evaluate")
        self.call_after_refresh(self.evaluate_screen.action_run)

    def _load_runs(self) -> None:
        self.switch_mode("evaluate")
        self.call_after_refresh(self.evaluate_screen.action_load_runs)

    # --- setup's requests -------------------------------------------------------------------------
    @on(SetupScreen.Submitted)
    async def _submitted(self, message: SetupScreen.Submitted) -> None:
        settings, target = message.settings, message.target
        if target == "evaluate":
            if self.session.preset is not None and settings.preset:
                self.evaluate_screen.apply_preset(self.session.preset)
            await self.switch_mode("evaluate")
            return
        if target == "calibrate" or settings.needs_plan:
            await self.switch_mode("calibrate")
            self.calibrate_screen.start(settings)
            return
        if self.session.busy:
            self.notify(f"the model is busy ({self.session.busy})", severity="warning")
            return
        self.setup_screen.set_status(f"⏳ loading {settings.model} and preparing {settings.describe()}…")
        self.prepare_model(settings, target)

    @work(thread=True, exclusive=True, group="prepare")
    def prepare_model(self, settings: Settings, target: str) -> None:
        s = self.session
        try:
            with s.using("loading"):
                s.ensure_loaded(settings.model, settings.options.transform)
                s.prepare(settings)
            self.post_message(self.Prepared(True, s.model_summary(), target))
        except Exception as e:
            self.post_message(self.Prepared(False, describe_error(e), target))

    @on(Prepared)
    def _prepared(self, message: "WinaApp.Prepared") -> None:
        self.setup_screen.refresh_model_info()
        if not message.ok:
            from rich.text import Text
            self.setup_screen.set_status(Text("⚠ " + message.message, style="bold red"))
            self.notify(message.message, severity="error", timeout=8)
            return
        self.setup_screen.set_status(f"✓ {self.session.applied.describe() if self.session.applied else ''}")
        self.chat_screen.refresh_titles()
        self.switch_mode(message.target)


def set_threads(n: Optional[int] = None) -> int:
    """torch's intra-op threads for the app. Default: on a machine of 4 CPUs or fewer, one less than
    the CPUs (the UI thread needs a core; on a 2-CPU machine two torch threads beside it made decoding
    the embedded model 4-5x slower); on larger machines torch's own default."""
    import os
    import torch
    if n is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, cpus - 1) if cpus <= 4 else torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    return torch.get_num_threads()


def run(model: Optional[str] = None, *, preset: Optional[str] = None, results_dir=None,
        max_new_tokens: int = 256, temperature: float = 0.0, light: bool = False,
        loader: Optional[Loader] = None, start: str = "setup", threads: Optional[int] = None) -> None:
    """Start the app (blocking). ``model``: a spec for setup's model field; ``preset``: a preset name/path;
    ``threads``: torch threads (see :func:`set_threads`)."""
    set_threads(threads)
    app = WinaApp(loader=loader, model=model, preset=preset,
                  results_dir=Path(results_dir) if results_dir else None, max_new_tokens=max_new_tokens,
                  temperature=temperature, theme="textual-light" if light else None, start=start)
    app.run()


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="wina-tui", description="WINA / TEAL activation sparsity: the Textual app")
    p.add_argument("--model", help="model spec (default: the embedded smollm2-135m)")
    p.add_argument("--preset", help="a preset name or .toml path")
    p.add_argument("--results", help="results store folder (default: ~/.cache/wina/results)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--light", action="store_true", help="start with the light theme")
    p.add_argument("--threads", type=int, help="torch threads (default: CPUs − 1 on machines of ≤ 4 CPUs)")
    a = p.parse_args(argv)
    run(a.model, preset=a.preset, results_dir=a.results, max_new_tokens=a.max_new_tokens,
        temperature=a.temperature, light=a.light, threads=a.threads)


if __name__ == "__main__":
    main()
