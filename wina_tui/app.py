"""The wina Textual app: setup → calibrate & allocate → chat side by side → evaluate.

``wina-tui`` (console script) calls :func:`main`; the CLI calls :func:`run`. Tests and scripts build
:class:`WinaApp` with their own ``loader`` (any callable ``spec -> wina.api.Loaded``).

Leaving is quick in every state: ``ctrl+q`` and the palette's quit (asking first while calibration,
allocation or an evaluation runs) and SIGINT/SIGTERM/SIGHUP (at once) cancel every worker through
its cancel token, the settings are saved, the app exits, and :func:`run_app` gives the workers a
second to notice before it ends the process without them (everything the library writes is
atomic, so nothing is left half-written).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen

from .screens.calibrate import CalibrateScreen
from .screens.chat import ChatScreen
from .screens.confirm import ConfirmScreen
from .screens.evaluate import EvaluateScreen
from .screens.help import HelpScreen
from .screens.setup import SetupScreen
from .state import (Loader, PlanInfo, Session, Settings, SettingsStore, describe_error, settings_from_dict,
                    settings_to_dict)

QUIT_NOTES = {"calibration": "Finished layers are kept: calibrating again with the same settings resumes.",
              "allocation": "Finished layers are kept: allocating again with the same settings resumes.",
              "evaluation": "Finished runs are saved; the run in progress is dropped.",
              "loading the model": "Nothing is written while the model loads."}

MODES_ORDER = ("setup", "calibrate", "chat", "evaluate")
QUIT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)   # quit as ctrl+q does, without asking


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
                 theme: Optional[str] = None, start: str = "setup", config_dir: Optional[Path] = None,
                 handle_signals: bool = False) -> None:
        super().__init__()
        self.session = Session(loader, results_dir=results_dir, state_dir=state_dir, plans_dir=plans_dir,
                               data_dir=data_dir)
        # the last settings (setup form, evaluate form, system prompt) come back at launch
        self.store = SettingsStore(Path(config_dir) / "settings.json" if config_dir else None)
        self.saved = self.store.load()
        if isinstance(self.saved.get("setup"), dict):
            self.session.settings, self.settings_ignored = settings_from_dict(self.saved["setup"])
        else:
            self.settings_ignored = []
        if model:
            self.session.settings.model = model
        # the saved preset comes back only with its setup: a one-off --model is another setup
        restore_preset = self.session.settings.preset if not (preset or model) else None
        self.session.settings.preset = None          # set again when the preset is applied
        self._preset_name = preset or restore_preset
        self._restoring_preset = bool(restore_preset)
        self._handle_signals = handle_signals
        self.quitting = False
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
        ev = self.saved.get("evaluate")
        if isinstance(ev, dict):                     # what has the wrong type is left as the form has it
            self.settings_ignored += [f"evaluate.{k}" for k in self.evaluate_screen.restore(ev)]
        elif ev is not None:
            self.settings_ignored.append("evaluate")
        chat = self.saved.get("chat")
        system = chat.get("system") if isinstance(chat, dict) else None
        if isinstance(system, str):
            self.chat_screen.system = system
        elif chat is not None and (not isinstance(chat, dict) or "system" in chat):
            self.settings_ignored.append("chat.system")

    def on_mount(self) -> None:
        self.switch_mode(self._start)
        if self._preset_name:
            self.call_after_refresh(self._apply_preset_name, self._preset_name)
        if self.settings_ignored:
            self.notify(f"{self.store.path}: ignored {', '.join(self.settings_ignored)} (not valid)",
                        severity="warning", timeout=8)
        if self._handle_signals:
            import asyncio
            loop = asyncio.get_running_loop()
            for sig in QUIT_SIGNALS:
                try:
                    loop.add_signal_handler(sig, self.shutdown)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass

    def on_unmount(self) -> None:
        if self._handle_signals:
            import asyncio
            try:
                loop = asyncio.get_running_loop()
                for sig in QUIT_SIGNALS:
                    loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass

    # --- leaving ----------------------------------------------------------------------------------
    def running_work(self) -> Optional[str]:
        """Work that asks before quitting ("calibration", "allocation", "evaluation"), or None."""
        w = self.calibrate_screen.running_work()
        if w and w != "loading":
            return w
        if self.evaluate_screen.job_running:
            return "evaluation"
        return None

    def cancel_all(self) -> None:
        """Set every worker's cancel token (calibration, allocation, evaluation, both chat replies)."""
        self.calibrate_screen.cancel_all()
        self.evaluate_screen.cancel_all()
        self.chat_screen.cancel_all()

    async def action_quit(self) -> None:
        """ctrl+q and the palette's quit: at once, or after a question while long work runs (a
        second ctrl+q answers it)."""
        work = self.running_work()
        if work and not isinstance(self.screen, ConfirmScreen):
            def answered(yes: Optional[bool]) -> None:
                if yes:
                    self.shutdown()

            self.push_screen(ConfirmScreen(f"{work} running: quit anyway?", QUIT_NOTES.get(work, "")), answered)
            return
        self.shutdown()

    def shutdown(self) -> None:
        """Cancel every worker, remember the settings, exit (the process ends in :func:`run_app`)."""
        if self.quitting:
            return
        self.quitting = True
        self.cancel_all()
        self.remember()
        self.exit()

    def remember(self) -> None:
        """Save the setup form (as shown, if valid), the evaluate form and the system prompt. A form
        that does not pass its checks (a mistyped path, a one-off ``--model`` that is not there) is
        not saved: the last good setup stays."""
        form = None
        try:
            if self.setup_screen.is_mounted:
                form = self.setup_screen.read(show=False)[0]
        except Exception:
            pass
        if form is not None:
            setup = {**settings_to_dict(form), "preset": self.session.settings.preset}
        elif isinstance(self.saved.get("setup"), dict):
            setup = self.saved["setup"]
        else:
            setup = None
        data: dict = {"chat": {"system": self.chat_screen.system}}
        if setup is not None:
            data["setup"] = setup
        try:
            ev = self.evaluate_screen.snapshot()
        except Exception:
            ev = None
        if ev:
            data["evaluate"] = ev
        err = self.store.save(data)
        if err and not self.quitting:
            self.notify(err, severity="warning")

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the workers to let go of the model; False if one still runs."""
        lock = self.session.lock
        if lock.acquire(timeout=max(0.0, timeout)):
            lock.release()
            return True
        return False

    def _apply_preset_name(self, name: str) -> None:
        from .screens.setup import NO_PRESET
        from textual.widgets import Select
        if self._restoring_preset:
            self.setup_screen.fill_form_from_preset = False
        sel = self.setup_screen.query_one("#preset", Select)
        values = [v for _, v in self.setup_screen.presets]
        if name in [n for n, _ in self.setup_screen.presets]:
            sel.value = name
        else:
            try:
                from wina.api import load_preset
                p = load_preset(name)
                self.setup_screen.presets.append((p.name, p))
                sel.set_options([("none", NO_PRESET)] + [(n, n) for n, _ in self.setup_screen.presets])
                sel.value = p.name
            except Exception as e:
                self.setup_screen.fill_form_from_preset = True
                if not self._restoring_preset:      # a remembered preset that is gone: skip it quietly
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
        yield SystemCommand("Load earlier runs", "Browse past evaluations and reopen them", self._load_runs)
        yield SystemCommand("Saved plans", "Browse calibration plans; open one for chat or evaluation",
                            self.action_plans)
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
        self.remember()
        if target == "evaluate":
            if self.session.preset is not None and settings.preset:
                self.evaluate_screen.apply_preset(self.session.preset)
            await self.switch_mode("evaluate")
            return
        if target == "calibrate" or settings.needs_plan:
            # Load & chat with greedy allocation or threshold gating: build the plan, then chat
            await self.switch_mode("calibrate")
            self.calibrate_screen.start(settings, then=None if target == "calibrate" else target)
            return
        if self.session.busy:
            self.notify(f"the model is busy ({self.session.busy})", severity="warning")
            return
        self.setup_screen.set_status(f"⏳ loading {settings.model} and preparing {settings.describe()}…")
        self.prepare_model(settings, target)

    @work(thread=True, exclusive=True, group="prepare")
    def prepare_model(self, settings: Settings, target: str, plan_path: Optional[Path] = None) -> None:
        s = self.session
        try:
            with s.using("loading"):
                s.ensure_loaded(settings.model, settings.options.transform)
                if plan_path is not None:
                    from wina.api import Plan
                    plan = Plan.load(plan_path)
                    s.prepare(settings, plan_path=plan_path, plan=plan)
                    s.plan, s.plan_path = plan, Path(plan_path)
                else:
                    s.prepare(settings)
            self.post_message(self.Prepared(True, s.model_summary(), target))
        except Exception as e:
            self.post_message(self.Prepared(False, describe_error(e), target))

    # --- saved plans ------------------------------------------------------------------------------
    def action_plans(self) -> None:
        from .screens.plans import PlansScreen

        def chosen(result) -> None:
            if result:
                self.open_plan(*result)

        self.push_screen(PlansScreen([self.session.plans_dir]), chosen)

    def open_plan(self, target: str, info: PlanInfo) -> None:
        """Load the plan's model, apply the plan (its method, transform and allocation; the setup's
        target sparsity and gating) and open the chat or the evaluate screen."""
        if self.session.busy:
            self.notify(f"the model is busy ({self.session.busy})", severity="warning")
            return
        base = self.session.settings
        opts = replace(base.options, method=info.method if info.method in ("teal", "wina") else "wina",
                       transform=info.transform, weighted=info.weighted)
        settings = replace(base, model=info.model, options=opts, allocation=info.usable_allocation,
                           calib_source=info.source or base.calib_source)
        self.session.settings = settings
        self.setup_screen.fill(settings)
        self.setup_screen.set_status(f"⏳ loading {info.model} with the plan {info.path.name}…")
        self.notify(f"opening the plan {info.path.name} for {target}")
        self.prepare_model(settings, target, info.path)

    @on(Prepared)
    def _prepared(self, message: "WinaApp.Prepared") -> None:
        self.setup_screen.refresh_model_info()
        if not message.ok:
            from rich.text import Text
            self.setup_screen.set_status(Text("⚠ " + message.message, style="bold red"), error=True)
            self.notify(message.message, severity="error", timeout=8)
            return
        if self.quitting:
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


def run_app(app: WinaApp, *, headless: bool = False, grace: float = 0.3) -> int:
    """Run ``app`` to its end and return its exit code; then leave quickly. Textual runs thread
    workers in asyncio's default executor, which ``asyncio.run`` joins at the end and Python joins
    again at exit: a calibration layer or a model load still in flight kept the process alive (with
    a blank terminal) for minutes. Here the app runs on a loop of our own; when it ends, every
    cancel token is set and the workers get ``grace`` seconds to let go of the model; if one
    still runs (a long torch op between two cancel checks), the process ends without waiting for
    it — every file the library writes is atomic, so nothing is half-written."""
    import asyncio
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        app.run(loop=loop, headless=headless)
    finally:
        app.cancel_all()
    code = int(app.return_code or 0)
    if not app.wait_idle(grace):
        _flush()
        os._exit(code)
    return code


def run(model: Optional[str] = None, *, preset: Optional[str] = None, results_dir=None,
        max_new_tokens: int = 256, temperature: float = 0.0, light: bool = False,
        loader: Optional[Loader] = None, start: str = "setup", threads: Optional[int] = None) -> None:
    """Start the app (blocking). ``model``: a spec for setup's model field; ``preset``: a preset name/path;
    ``threads``: torch threads (see :func:`set_threads`)."""
    from wina.api import quiet_libraries
    set_threads(threads)
    quiet_libraries()                # no library's bar or warning across the screen (or after it)
    app = WinaApp(loader=loader, model=model, preset=preset,
                  results_dir=Path(results_dir) if results_dir else None, max_new_tokens=max_new_tokens,
                  temperature=temperature, theme="textual-light" if light else None, start=start,
                  handle_signals=True)
    code = run_app(app)
    # The terminal is restored and every file is written (atomically); skip the interpreter's
    # teardown of torch and friends, which took 1-3 s on a loaded 2-CPU machine.
    _flush()
    os._exit(code)


def _flush() -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass


class _Parser(argparse.ArgumentParser):
    """argparse, with a refused option as one line (and exit 2) instead of the usage block first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: Optional[list[str]] = None) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")    # read when tqdm is imported: no bar across the screen
    p = _Parser(prog="wina-tui", description="WINA / TEAL activation sparsity: the Textual app")
    p.add_argument("--model", help="model spec (default: the embedded smollm2-135m)")
    p.add_argument("--preset", help="a preset name or .toml path")
    p.add_argument("--results", help="results store folder (default: ~/.cache/wina/results)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--light", action="store_true", help="start with the light theme")
    p.add_argument("--threads", type=int, help="torch threads (default: CPUs − 1 on machines of ≤ 4 CPUs)")
    a = p.parse_args(argv)
    # what the app cannot use is refused here, in one line (exit 2), not at the first message
    from wina.api import InvalidArgument, check_sampling
    try:
        check_sampling(a.max_new_tokens, a.temperature, options=True)      # the library's one rule
    except InvalidArgument as e:
        p.error(str(e))
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be at least 1, got {a.threads}")
    if a.results is not None and Path(a.results).expanduser().exists() and not Path(a.results).expanduser().is_dir():
        p.error(f"--results {a.results} is a file, not a folder")
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        p.error("needs a terminal (its input or output is redirected); scripts use wina run, wina chat --prompt")
    run(a.model, preset=a.preset, results_dir=a.results, max_new_tokens=a.max_new_tokens,
        temperature=a.temperature, light=a.light, threads=a.threads)


if __name__ == "__main__":
    main()
