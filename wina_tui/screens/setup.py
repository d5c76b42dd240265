"""Setup: pick the model and the sparsity method; every field is checked as it is typed."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Header, Input, Label, Select, Static

from wina.api import EMBEDDED, SparseOptions, WinaError

from ..state import ALLOCATIONS, Settings, describe_error

OTHER = "__other__"
ABOUT = ("Per token, each linear layer keeps only its inputs with the largest score and skips the "
         "rest. TEAL scores |x_i|; WINA scores |x_i|·‖W[:,i]‖₂ (the weight column's norm). "
         "Greedy allocation gives each layer and matrix its own sparsity; threshold gating uses "
         "calibrated per-matrix thresholds. Both need a calibration run.")
NO_PRESET = "__none__"


def check_sparsity(text: str) -> tuple[Optional[float], Optional[str]]:
    """``0.5`` or ``50%`` -> 0.5; anything outside [0, 1) is an error message, never an exception."""
    raw = text.strip()
    pct = raw.endswith("%")
    t = raw.rstrip("%").strip()
    if not t:
        return None, "target sparsity is required (e.g. 0.5 or 50%)"
    try:
        v = float(t) / (100.0 if pct else 1.0)
    except ValueError:
        return None, f"not a number: {raw!r}"
    if v != v or not (0.0 <= v < 1.0):
        return None, f"target sparsity must be in [0, 1), got {raw}"
    return v + 0.0, None               # -0 is 0


def check_model(spec: str) -> Optional[str]:
    from wina.api import resolve_source
    if not spec.strip():
        return "type a hub id (org/name) or a local path"
    try:
        resolve_source(spec.strip())
    except WinaError as e:
        return str(e)
    return None


def wikitext_unavailable() -> Optional[str]:
    """Why the ``wikitext`` calibration source cannot be used here (no data folder holding
    wikitext2/wiki.test.raw, :func:`wina.api.wikitext_path`), or None when it can."""
    from wina.api import wikitext_path
    try:
        wikitext_path()
    except WinaError as e:
        return str(e)
    return None


def check_source(src: str) -> Optional[str]:
    s = src.strip()
    if not s:
        return ("calibration source is required: self, wikitext or a text/jsonl file" if wikitext_unavailable()
                is None else "calibration source is required: self or a text/jsonl file")
    if s == "wikitext":
        return wikitext_unavailable()
    if s in ("self", "random") or s.startswith("hub:"):
        return None
    p = Path(s).expanduser()
    if not p.exists():
        return f"calibration file not found: {s}"
    if p.is_dir():
        return f"{s} is a folder; give a .txt, .raw or .jsonl file"
    return None


PRESET_ERRORS: list[str] = []      # why a preset file was left out of the list (broken)


def list_presets() -> list[tuple[str, object]]:
    """(name, Preset) for every valid preset (``wina.api.list_presets``); why a broken preset file
    was left out is kept in PRESET_ERRORS."""
    from wina.api import list_presets as _list
    PRESET_ERRORS.clear()
    return [(p.name, p) for p in _list(PRESET_ERRORS)]


class SetupScreen(Screen):
    """The first screen: model, method, transform, sparsity, gating, allocation, calibration."""

    BINDINGS = [
        Binding("ctrl+g", "go('chat')", "Load & chat", priority=True),
        Binding("ctrl+b", "go('calibrate')", "Calibrate", priority=True),
        Binding("ctrl+e", "go('evaluate')", "Evaluate", priority=True),
        Binding("ctrl+l", "plans", "Plans", priority=True),
    ]

    class Submitted(Message):
        """The user asked to load/prepare with ``settings`` and then open ``target``."""

        def __init__(self, settings: Settings, target: str) -> None:
            super().__init__()
            self.settings = settings
            self.target = target

    def __init__(self, session, **kw) -> None:
        super().__init__(**kw)
        self.session = session
        self.presets = list_presets()
        self.wikitext_missing = wikitext_unavailable()    # why the wikitext source is not offered
        self.errors: dict[str, str] = {}
        self.fill_form_from_preset = True     # False once, when the saved settings bring a preset back
        self._status_error = False

    # --- layout ------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        s = self.session.settings
        o = s.options
        recent = [m for m in self.session.recent_models() if m != EMBEDDED]
        model_opts = [(f"{EMBEDDED} (embedded)", EMBEDDED)]
        model_opts += [(f"{m} (recent)", m) for m in recent]
        model_opts += [("other: hub id or local path…", OTHER)]
        preset_opts = [("none", NO_PRESET)] + [(name, name) for name, _ in self.presets]
        yield Header()
        with VerticalScroll(id="setup-scroll"):
            yield from self._form(s, o, model_opts, preset_opts, recent)
        with Horizontal(id="setup-buttons"):
            yield Button("Load & chat", id="go-chat", variant="primary", compact=True)
            yield Button("Calibrate", id="go-calibrate", compact=True)
            yield Button("Evaluate", id="go-evaluate", compact=True)
            yield Button("Plans…", id="go-plans", compact=True)
            yield Static("", id="setup-status")
        yield Footer(compact=True)

    def _form(self, s, o, model_opts, preset_opts, recent) -> ComposeResult:
        with Horizontal(id="setup-columns"):
            with Vertical(id="model-box", classes="box") as box:
                box.border_title = "Model"
                yield self._row("Model", Select(model_opts, value=EMBEDDED if s.model == EMBEDDED else (
                    s.model if s.model in recent else OTHER), allow_blank=False, compact=True, id="model"))
                yield self._row("Hub id / path", Input(
                    "" if s.model == EMBEDDED or s.model in recent else s.model,
                    placeholder="org/name, ./dir or file.gguf", compact=True, id="model-path"))
                yield Label("", id="err-model-path", classes="field-error")
                yield self._row("Preset", Select(preset_opts, value=NO_PRESET, allow_blank=False,
                                                 compact=True, id="preset"))
                yield Label("", id="err-preset", classes="field-error")
                yield Static(self.session.model_summary(), id="model-info")
                yield Static(ABOUT, id="about")
            with Vertical(id="method-box", classes="box") as box:
                box.border_title = "Sparsity"
                yield self._row("Method", Select([("dense", "dense"), ("TEAL  |x|", "teal"),
                                                  ("WINA  |x|·‖W:,i‖", "wina")],
                                                 value=o.method, allow_blank=False, compact=True, id="method"))
                yield self._row("Transform", Checkbox("orthogonal (exact)", o.transform, compact=True,
                                                         id="transform"))
                yield self._row("Target sparsity", Input(f"{o.sparsity:g}", placeholder="0.5",
                                                         compact=True, id="sparsity"))
                yield Label("", id="err-sparsity", classes="field-error")
                yield self._row("Gating", Select([("top-k per token", "topk"),
                                                  ("threshold (calibrated)", "threshold")],
                                                 value=o.gating, allow_blank=False, compact=True, id="gating"))
                yield self._row("Allocation", Select([(v, k) for k, v in ALLOCATIONS.items()],
                                                     value=s.allocation, allow_blank=False, compact=True,
                                                     id="allocation"))
                yield self._row("Calibration", Input(s.calib_source, placeholder=(
                    "self | path (wikitext: no data folder)" if self.wikitext_missing else "self | wikitext | path"),
                    compact=True, id="calib-source"))
                yield Label("", id="err-calib-source", classes="field-error")
        yield Static("", id="summary")

    @staticmethod
    def _row(label: str, widget) -> Horizontal:
        return Horizontal(Label(label, classes="field-label"), widget, classes="field")

    def on_mount(self) -> None:
        self.sub_title = "setup"
        self._sync_visibility()
        self._update_summary()
        self.query_one("#model", Select).focus()
        for why in PRESET_ERRORS:               # the valid presets are offered; a broken file is named
            self.notify(f"preset skipped: {why}", severity="warning", timeout=10)

    def on_screen_resume(self) -> None:
        self.refresh_model_info()

    def refresh_model_info(self) -> None:
        self.query_one("#model-info", Static).update(self.session.model_summary())

    # --- reading and checking the form ---------------------------------------------------------------
    def model_spec(self) -> str:
        sel = self.query_one("#model", Select).value
        if sel == OTHER:
            return self.query_one("#model-path", Input).value.strip()
        return str(sel)

    def read(self, *, show: bool = True) -> tuple[Optional[Settings], dict[str, str]]:
        errors: dict[str, str] = {}
        spec = self.model_spec()
        if self.query_one("#model", Select).value == OTHER:
            e = check_model(spec)
            if e:
                errors["model-path"] = e
        sparsity, e = check_sparsity(self.query_one("#sparsity", Input).value)
        if e:
            errors["sparsity"] = e
        method = str(self.query_one("#method", Select).value)
        gating = str(self.query_one("#gating", Select).value)
        allocation = str(self.query_one("#allocation", Select).value)
        source = self.query_one("#calib-source", Input).value.strip()
        needs_calib = method != "dense" and (allocation != "uniform" or gating == "threshold")
        if needs_calib:
            e = check_source(source)
            if e:
                errors["calib-source"] = e
        if show:
            self.show_errors(errors)
        if errors:
            return None, errors
        opts = SparseOptions(method=method, sparsity=sparsity, transform=self.query_one("#transform", Checkbox).value,
                             gating=gating, weighted=self.session.settings.options.weighted,
                             dense_prefix=self.session.settings.options.dense_prefix)
        settings = Settings(model=spec, options=opts, allocation=allocation, calib_source=source or "self",
                            preset=self.session.settings.preset)
        return settings, errors

    def show_errors(self, errors: dict[str, str]) -> None:
        self.errors = errors
        for key in ("model-path", "sparsity", "calib-source"):
            label = self.query_one(f"#err-{key}", Label)
            msg = errors.get(key, "")
            label.update(f"⚠ {msg}" if msg else "")
            label.set_class(bool(msg), "-shown")
            self.query_one(f"#{key}", Input).set_class(bool(msg), "-invalid")

    def _sync_visibility(self) -> None:
        other = self.query_one("#model", Select).value == OTHER
        self.query_one("#model-path", Input).parent.display = other
        method = self.query_one("#method", Select).value
        sparse = method != "dense"
        for wid in ("#sparsity", "#gating", "#allocation"):
            self.query_one(wid).disabled = not sparse
        gating = self.query_one("#gating", Select).value
        alloc = self.query_one("#allocation", Select).value
        self.query_one("#calib-source", Input).disabled = not (sparse and (alloc != "uniform" or gating == "threshold"))

    def fill(self, settings: Settings) -> None:
        """Put ``settings`` into the form (a plan opened from the plan browser)."""
        if not self.is_mounted:
            return
        sel = self.query_one("#model", Select)
        try:
            sel.value = settings.model           # the embedded one or a recent one
        except Exception:
            sel.value = OTHER
            self.query_one("#model-path", Input).value = settings.model
        o = settings.options
        self.query_one("#method", Select).value = o.method
        self.query_one("#transform", Checkbox).value = bool(o.transform)
        self.query_one("#sparsity", Input).value = f"{o.sparsity:g}"
        self.query_one("#gating", Select).value = o.gating
        self.query_one("#allocation", Select).value = settings.allocation
        self.query_one("#calib-source", Input).value = settings.calib_source

    def _update_summary(self) -> None:
        settings, errors = self.read(show=False)
        if settings is not None and self._status_error:
            self.set_status("")                  # the error next to the buttons is fixed now
        if settings is None:
            self.query_one("#summary", Static).update(Text(f"fix: {next(iter(errors.values()))}", style="bold red"))
            return
        steps = ["load " + settings.model]
        if settings.options.transform:
            steps.append("transform")
        if settings.needs_plan:
            steps.append(f"calibrate on {settings.calib_source}" + (
                " (the wikitext perplexity text: the plan sees the evaluation text)"
                if settings.calib_source == "wikitext" else ""))
            if settings.allocation != "uniform":
                steps.append(f"allocate ({ALLOCATIONS[settings.allocation]})")
        steps.append(settings.describe())
        self.query_one("#summary", Static).update(Text("  →  ".join(steps)))

    # --- events ----------------------------------------------------------------------------------
    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        _, errors = self.read(show=False)
        key = event.input.id
        # show this field's state right away; others keep what they showed
        shown = {k: v for k, v in self.errors.items() if k != key}
        if key in errors:
            shown[key] = errors[key]
        self.show_errors(shown)
        self._update_summary()

    @on(Select.Changed)
    @on(Checkbox.Changed)
    def _choice_changed(self, event) -> None:
        if getattr(event, "select", None) is not None and event.select.id == "preset":
            self.apply_preset(str(event.value))
        self._sync_visibility()
        self._update_summary()
        if self.errors:
            self.show_errors(self.read(show=False)[1])

    def apply_preset(self, name: str) -> None:
        err = self.query_one("#err-preset", Label)
        err.update("")
        err.remove_class("-shown")
        if name == NO_PRESET:
            if self.session.settings.preset is not None:
                self.session.calibrate_options, self.session.allocate_options = {}, {}
            self.session.settings.preset = None
            self.session.preset = None
            self.refresh_model_info()
            return
        preset = dict(self.presets).get(name)
        if preset is None:
            return
        fill, self.fill_form_from_preset = self.fill_form_from_preset, True
        self.session.settings.preset = name
        self.query_one("#model-info", Static).update(Text.assemble(
            ("preset ", "dim"), (name, "bold"), f": {preset.description or ''}".rstrip(": "),
            ("\n" + self.session.model_summary(), "dim")))
        try:
            variant = next((v for v in preset.variants if v.method == "wina"),
                           next((v for v in preset.variants if v.method != "dense"), preset.variants[0]))
            if fill:
                model_sel = self.query_one("#model", Select)
                if preset.model == EMBEDDED:
                    model_sel.value = EMBEDDED
                else:
                    model_sel.value = OTHER
                    self.query_one("#model-path", Input).value = preset.model
                self.query_one("#method", Select).value = variant.method
                self.query_one("#transform", Checkbox).value = bool(variant.transform)
                if preset.eval.sparsities:
                    self.query_one("#sparsity", Input).value = f"{preset.eval.sparsities[0]:g}"
                self.query_one("#gating", Select).value = preset.eval.gating
                self.query_one("#allocation", Select).value = (
                    preset.allocation.mode if variant.allocation == "greedy" else "uniform")
                self.query_one("#calib-source", Input).value = preset.resolved_source()
            self.session.preset = preset
            cal, alloc = preset.calibration, preset.allocation
            self.session.calibrate_options = {k: v for k, v in (("samples", cal.samples), ("seq_len", cal.seq_len))
                                              if v is not None}
            self.session.allocate_options = {"max_sparsity": alloc.max_sparsity, "step": alloc.step}
            o = self.session.settings.options
            self.session.settings.options = replace(o, weighted=cal.weighted)
        except (WinaError, AttributeError, IndexError, ValueError) as e:
            err.update(f"⚠ preset {name}: {describe_error(e)}")
            err.add_class("-shown")

    @on(Button.Pressed, "#go-chat")
    def _b_chat(self) -> None:
        self.action_go("chat")

    @on(Button.Pressed, "#go-calibrate")
    def _b_cal(self) -> None:
        self.action_go("calibrate")

    @on(Button.Pressed, "#go-evaluate")
    def _b_eval(self) -> None:
        self.action_go("evaluate")

    @on(Button.Pressed, "#go-plans")
    def action_plans(self) -> None:
        self.app.action_plans()

    def action_go(self, target: str) -> None:
        settings, errors = self.read()
        if settings is None:
            first = next(iter(errors))
            self.query_one(f"#{first}", Input).focus()
            self.set_status(Text("⚠ " + errors[first], style="bold red"), error=True)
            return
        if target == "calibrate" and settings.options.method == "dense":
            self.set_status(Text("⚠ dense needs no calibration: choose TEAL or WINA", style="bold red"),
                            error=True)
            return
        if target == "calibrate" and not settings.needs_plan:
            # calibrating for a uniform top-k setting: calibrate anyway (threshold-ready plan)
            settings = replace(settings, allocation="uniform")
        self.session.settings = settings
        self.set_status("")
        self.post_message(self.Submitted(settings, target))

    def set_status(self, text, error: bool = False) -> None:
        """The line next to the buttons; an ``error`` one goes away as soon as the form is valid."""
        self._status_error = error
        self.query_one("#setup-status", Static).update(text)
