"""The session: what the screens share (the loaded model, the options, the sparsifier, paths).

Plain Python, no Textual: the screens read and change it from the UI thread and from workers.
The model is not thread-safe, so every use of it goes through :attr:`Session.lock`
(``with session.using("chat"):`` in a worker; it refuses at once when another job holds it).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from wina.api import EMBEDDED, Loaded, SparseOptions, WinaError, atomic_write_text, format_duration

Loader = Callable[[str], Loaded]

ALLOCATIONS = {"uniform": "uniform", "layer": "greedy, within-layer", "global": "greedy, cross-layer"}
METHOD_NAMES = {"dense": "dense", "teal": "TEAL", "wina": "WINA"}
GATING_NAMES = {"topk": "top-k", "threshold": "threshold"}


class Busy(WinaError):
    """The model is in use by another job (calibration, chat, evaluation)."""


def default_loader(spec: str) -> Loaded:
    from wina.api import load
    return load(spec)


def config_dir() -> Path:
    from wina.api import cache_dir
    return cache_dir()


def default_data_dir() -> Optional[Path]:
    """The library's data folder (:func:`wina.api.find_data_dir`: ``$WINA_DATA``, then
    ``../shared/data`` beside the project, then ``./data``); None when there is none."""
    from wina.api import find_data_dir
    return find_data_dir()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "model"


@dataclass
class Settings:
    """What the setup screen edits."""
    model: str = EMBEDDED
    options: SparseOptions = field(default_factory=SparseOptions)
    allocation: str = "uniform"          # uniform | layer | global (greedy)
    calib_source: str = "self"           # self | wikitext | a text/jsonl path
    preset: Optional[str] = None

    @property
    def needs_plan(self) -> bool:
        o = self.options
        return o.method != "dense" and (self.allocation != "uniform" or o.gating == "threshold")

    def calibration(self, extra: Optional[dict] = None):
        """The pipeline's calibration settings for this form (``extra``: the session's sizes)."""
        from wina.api import Calibration
        c = extra or {}
        o = self.options
        return Calibration(method=o.method, transform=o.transform, source=self.calib_source,
                           samples=c.get("samples"), seq_len=c.get("seq_len"), weighted=o.weighted)

    def allocation_settings(self, extra: Optional[dict] = None):
        """The pipeline's allocation settings for this form (``extra``: the session's overrides)."""
        from wina.api import Allocation
        kw = {k: v for k, v in (extra or {}).items() if v is not None}
        return Allocation(mode=self.allocation, **kw)

    def describe(self) -> str:
        o = self.options
        if o.method == "dense":
            return "dense" + (" + transform" if o.transform else "")
        parts = [f"{METHOD_NAMES[o.method]} {o.sparsity:.0%}", GATING_NAMES[o.gating], ALLOCATIONS[self.allocation]]
        if o.transform:
            parts.append("transform")
        return " · ".join(parts)


class Session:
    """Shared state of one app run."""

    def __init__(self, loader: Optional[Loader] = None, *, results_dir: Optional[Path] = None,
                 state_dir: Optional[Path] = None, plans_dir: Optional[Path] = None,
                 data_dir: Optional[Path] = None) -> None:
        self.loader: Loader = loader or default_loader
        self.settings = Settings()
        self.loaded: Optional[Loaded] = None
        self.sparsifier = None                   # wina.sparsify.Sparsifier or None (dense)
        self.applied: Optional[Settings] = None  # the settings the model is prepared with
        self.plan_path: Optional[Path] = None
        self.plan = None                         # wina.plan.Plan after calibration
        base = state_dir or config_dir()
        self.state_dir = Path(base)
        self.results_dir = Path(results_dir) if results_dir else self.state_dir / "results"
        self.plans_dir = Path(plans_dir) if plans_dir else self.state_dir / "plans"
        self.data_dir = data_dir if data_dir is not None else default_data_dir()
        self.lock = threading.Lock()
        self.job: Optional[str] = None
        self.calibrate_options: dict[str, Any] = {}  # extra keywords for wina.calibrate.calibrate
        self.allocate_options: dict[str, Any] = {}   # extra keywords for wina.allocate.allocate
        self.preset = None                           # the wina.presets.Preset picked in setup

    # --- the model lock ------------------------------------------------------------------------
    @contextlib.contextmanager
    def using(self, job: str) -> Iterator[None]:
        if not self.lock.acquire(blocking=False):
            raise Busy(f"the model is busy ({self.job}); wait for it or cancel it first")
        self.job = job
        try:
            yield
        finally:
            self.job = None
            self.lock.release()

    @property
    def busy(self) -> Optional[str]:
        return self.job

    # --- loading and preparing (call from a worker, inside using()) ------------------------------
    def ensure_loaded(self, spec: str, transform: Optional[bool] = None) -> Loaded:
        """Load ``spec`` unless it is loaded already. ``transform=False`` reloads a model that was
        transformed earlier (the transform is in place; a plan made without it refuses it)."""
        stale = self.loaded is None or self.loaded.model_id != spec
        if not stale and transform is False:
            from wina.api import is_transformed
            stale = is_transformed(self.loaded.model)
        if stale:
            self.plan = None
            self.plan_path = None
            self._load(spec)
        return self.loaded

    def _load(self, spec: str) -> None:
        self.drop_sparsifier()
        self.loaded = None
        self.applied = None
        self.loaded = self.loader(spec)
        self.remember_model(spec)

    def drop_sparsifier(self) -> None:
        if self.sparsifier is not None:
            self.sparsifier.remove()
            self.sparsifier = None

    def prepare(self, settings: Settings, plan_path=None, plan=None):
        """Apply ``settings`` to the loaded model through :func:`wina.api.apply`, which owns the
        transform (a plan's own rotation included): uniform top-k, or the calibration plan
        ``plan_path``. When the model carries a transform the step cannot use (the library's error
        says ``needs_reload``), the model is loaded again and the step runs once more. Returns the
        sparsifier (None for dense). ``plan``: unused, kept for callers that have it in memory."""
        from wina import api
        assert self.loaded is not None
        opts = replace(settings.options, plan=str(plan_path) if plan_path else None)
        if opts.method == "dense":
            opts.plan = None
        opts.validate()
        self.drop_sparsifier()
        if opts.plan:
            opts.mode = settings.allocation if settings.allocation in ("layer", "global") else "uniform"
        # the Loaded, not the bare model: apply() takes ``getattr(x, "model", x)``, which is the
        # inner decoder of a transformers model
        try:
            self.sparsifier = api.apply(self.loaded, opts)
        except WinaError as e:
            if not getattr(e, "needs_reload", False):
                raise
            self._load(self.loaded.model_id)
            self.sparsifier = api.apply(self.loaded, opts)
        self.applied = replace(settings, options=opts)
        return self.sparsifier

    # --- the form's settings as the pipeline's (what the calibrate and evaluate workers run) -------
    def calibration_for(self, settings: Settings):
        """The plan folder and the checked :class:`wina.api.Calibration` the calibrate worker
        uses for ``settings`` (with this session's sizes); raises before any model loads."""
        out = self.plan_dir_for(settings)
        return out, settings.calibration(self.calibrate_options).validate(out)

    def allocation_for(self, settings: Settings):
        """The :class:`wina.api.Allocation` the calibrate worker runs after calibration (with this
        session's overrides), or None for the uniform allocation (no allocation step)."""
        if settings.allocation == "uniform":
            return None
        return settings.allocation_settings(self.allocate_options)

    def load_for_calibration(self, settings: Settings) -> Loaded:
        """The loaded model, bare (no sparsifier), for a calibration of ``settings``; call inside
        ``using()``."""
        loaded = self.ensure_loaded(settings.model, settings.options.transform)
        self.drop_sparsifier()
        return loaded

    def adopt_plan(self, settings: Settings, plan_path: Path, plan) -> None:
        """Keep a finished calibration's plan (the evaluate worker uses it) and prepare the model
        with it, as the calibrate worker does at its end."""
        self.plan = plan
        self.plan_path = Path(plan_path)
        self.prepare(settings, plan_path=plan_path, plan=plan)

    def eval_options(self, method: str, sparsity: float, settings: Optional[Settings] = None) -> SparseOptions:
        """The :class:`wina.api.SparseOptions` of one evaluation run (``method`` at ``sparsity``):
        the form's options, with the session's plan and allocation where the plan was calibrated
        for that method and the allocation is not uniform, else uniform top-k."""
        settings = settings or self.settings
        use_plan = (self.plan is not None and self.plan_path is not None and method == self.plan.method
                    and settings.allocation != "uniform" and method != "dense")
        return replace(settings.options, method=method, sparsity=sparsity if method != "dense" else 0.5,
                       gating="topk" if not use_plan else settings.options.gating,
                       plan=str(self.plan_path) if use_plan else None,
                       mode=settings.allocation if use_plan else None)

    def discard_damaged_plan(self, out: Path) -> Optional[str]:
        """The app's own saved plan ``out`` (under :attr:`plans_dir`) when it is damaged
        (:func:`wina.api.plan_damage`: plan.json unreadable, a file missing or failing its checksum):
        emptied, so that calibration makes it again, and what was wrong returned; None for a sound or
        absent plan (or one elsewhere). Called holding the folder's lock, which stays."""
        import shutil
        from wina.api import LOCK_NAME, plan_damage
        out = Path(out)
        if self.plans_dir.resolve() not in out.resolve().parents:
            return None
        problem = plan_damage(out)
        if problem is None:
            return None
        for p in out.iterdir():
            if p.name == LOCK_NAME:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        return problem

    def plan_dir_for(self, settings: Settings) -> Path:
        o = settings.options
        src = settings.calib_source
        src = slug(Path(src).name) if src not in ("self", "wikitext") else src
        name = f"{slug(settings.model)}-{o.method}{'-tr' if o.transform else ''}-{o.weighted}-{src}"
        c = self.calibrate_options
        if c.get("samples") or c.get("seq_len"):
            name += f"-{c.get('samples') or 'd'}x{c.get('seq_len') or 'd'}"
        return self.plans_dir / name

    # --- numbers for the chat panes --------------------------------------------------------------
    def flop_fraction(self, measured: bool = True) -> float:
        from wina.api import flops_per_token, is_transformed
        model = self.loaded.model
        tr = is_transformed(model)
        if self.sparsifier is None:
            return flops_per_token(model.config, 0.0, transform=tr).fraction
        rep = self.sparsifier.report()
        f = rep.flops_measured if (measured and rep.flops_measured is not None) else rep.flops_nominal
        return f.fraction

    def dense_flop_fraction(self) -> float:
        from wina.api import flops_per_token, is_transformed
        model = self.loaded.model
        return flops_per_token(model.config, 0.0, transform=is_transformed(model)).fraction

    def model_summary(self) -> str:
        if self.loaded is None:
            return "no model loaded"
        m = self.loaded.model
        n = sum(p.numel() for p in m.parameters())
        cfg = m.config
        dev = str(next(m.parameters()).device)
        return (f"{self.loaded.model_id} · {cfg.model_type} · {cfg.num_hidden_layers} layers · "
                f"{n / 1e6:.1f} M params · {dev}")

    # --- recent models -----------------------------------------------------------------------------
    @property
    def _recent_file(self) -> Path:
        return self.state_dir / "tui-recent.json"

    def recent_models(self) -> list[str]:
        try:
            data = json.loads(self._recent_file.read_text(encoding="utf-8"))
            return [str(x) for x in data.get("models", [])][:8]
        except (OSError, ValueError, AttributeError):
            return []

    def remember_model(self, spec: str) -> None:
        models = [spec] + [m for m in self.recent_models() if m != spec]
        try:
            atomic_write_text(self._recent_file, json.dumps({"models": models[:8]}))
        except (OSError, WinaError):
            pass


JOB_LABELS = {"loading": "loading the model", "calibrate": "calibration", "allocate": "allocation",
              "evaluate": "evaluation", "chat": "a chat reply"}


def job_label(job: Optional[str]) -> str:
    """What a :attr:`Session.busy` job is, in words (``"calibrate"`` -> ``"calibration"``)."""
    return JOB_LABELS.get(job or "", job or "")


def busy_text(job: Optional[str]) -> str:
    """A status line for a busy model: "calibration running (F3)", "loading the model (F2)"."""
    label = job_label(job)
    key = {"calibrate": "F3", "allocate": "F3", "evaluate": "F5", "loading": "F2", "chat": "F4"}.get(job or "")
    text = f"{label} running" if job in ("calibrate", "allocate", "evaluate") else label
    return f"{text} ({key})" if key else text


def fmt_pct(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.1%}"


def fmt_eta(s: Optional[float]) -> str:
    d = format_duration(s)
    return f"ETA {d}" if d else "ETA —"


def describe_error(e: BaseException) -> str:
    """One line for the user: library errors as they are, an environment fault (disk full, read-only,
    a path through a file, a truncated file) as the command line says it, anything else with its type."""
    from wina.errors import user_error
    fault = user_error(e)
    if fault is not None:
        return str(fault)
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def event_dict(ev: Any) -> dict:
    """A Progress event as a plain dict (safe to hand to the UI thread)."""
    return {"stage": ev.stage, "done": ev.done, "total": ev.total, "layer": ev.layer,
            "n_layers": ev.n_layers, "message": ev.message, "metrics": dict(ev.metrics or {}),
            "eta_s": ev.eta_s}


class Throttle:
    """Coalesces calls from a worker thread so that the UI thread is not flooded by per-token or
    per-step messages: ``push(x)`` sends at once after a quiet period, otherwise collects; what is
    collected goes out in one ``send(items)`` at most ``interval`` seconds later (a timer), or on
    ``flush()``. Order is kept."""

    def __init__(self, send: Callable[[list], None], interval: float = 0.05) -> None:
        import time as _time
        self._time = _time
        self.send = send
        self.interval = interval
        self.items: list = []
        self._last = 0.0
        self._lock = threading.RLock()
        self._timer: Optional[threading.Timer] = None

    def push(self, item) -> None:
        with self._lock:
            self.items.append(item)
            now = self._time.perf_counter()
            wait = self._last + self.interval - now
            if wait <= 0:
                self.flush()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self.items:
                items, self.items = self.items, []
                self.send(items)
            self._last = self._time.perf_counter()


# --- what the app remembers between launches ------------------------------------------------------

def user_config_dir() -> Path:
    """``$XDG_CONFIG_HOME/wina-tui`` (default ``~/.config/wina-tui``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "wina-tui"


SETTINGS_VERSION = 1


def settings_to_dict(s: Settings) -> dict:
    o = s.options
    return {"model": s.model, "method": o.method, "transform": bool(o.transform), "sparsity": float(o.sparsity),
            "gating": o.gating, "allocation": s.allocation, "calib_source": s.calib_source,
            "preset": s.preset}


def settings_from_dict(d: dict, base: Optional[Settings] = None) -> tuple[Settings, list[str]]:
    """Settings from a saved dict; a value of the wrong type or out of range keeps ``base``'s value
    and is named in the returned list (nothing raises)."""
    base = base or Settings()
    o = base.options
    bad: list[str] = []

    def pick(key, ok, default):
        if key not in d:
            return default
        v = d[key]
        try:
            if ok(v):
                return v
        except Exception:
            pass
        bad.append(key)
        return default

    model = pick("model", lambda v: isinstance(v, str) and v.strip(), base.model)
    method = pick("method", lambda v: v in METHOD_NAMES, o.method)
    transform = pick("transform", lambda v: isinstance(v, bool), o.transform)
    sparsity = pick("sparsity", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                    and 0.0 <= float(v) < 1.0, o.sparsity)
    gating = pick("gating", lambda v: v in GATING_NAMES, o.gating)
    allocation = pick("allocation", lambda v: v in ALLOCATIONS, base.allocation)
    source = pick("calib_source", lambda v: isinstance(v, str) and v.strip(), base.calib_source)
    preset = pick("preset", lambda v: v is None or isinstance(v, str), base.preset)
    opts = replace(o, method=method, transform=transform, sparsity=float(sparsity), gating=gating)
    return Settings(model=model, options=opts, allocation=allocation, calib_source=source, preset=preset), bad


class SettingsStore:
    """The last settings (setup form, evaluate form, chat system prompt) as one small JSON file,
    written atomically; unreadable or odd content is ignored, never an error."""

    def __init__(self, path: Optional[Path] = None) -> None:
        self.path = Path(path) if path is not None else user_config_dir() / "settings.json"

    def load(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def save(self, data: dict) -> Optional[str]:
        """Write ``data``; returns an error line instead of raising (a read-only home is no crash)."""
        try:
            atomic_write_text(self.path, json.dumps({"version": SETTINGS_VERSION, **data}, indent=1,
                                                    sort_keys=True))
        except (OSError, WinaError) as e:
            return f"settings not saved: {describe_error(e)}"
        return None


# --- ETA from the work done in this run ---------------------------------------------------------------

class RunEta:
    """Seconds left from the rate of the work done since this run started (not counting units a
    resumed run skipped): ``update(done, total)`` per event; the clock starts at the first event
    whose ``done`` is at or beyond ``start`` (the units finished before a resume)."""

    def __init__(self, start: int = 0) -> None:
        import time as _time
        self._time = _time
        self.start = start
        self.t0: Optional[float] = None
        self.d0 = 0

    def update(self, done: int, total: Optional[int]) -> Optional[float]:
        now = self._time.perf_counter()
        if self.t0 is None:
            if done < self.start:
                return None
            self.t0, self.d0 = now, done
            return None
        if not total or done <= self.d0:
            return None
        rate = (now - self.t0) / (done - self.d0)
        return max(0.0, rate * (total - done))


# --- saved plans ------------------------------------------------------------------------------------

@dataclass
class PlanInfo:
    """What the plan browser lists (from a plan folder's metadata only; the histograms are loaded
    when a plan is opened)."""
    path: Path
    model: str
    method: str
    transform: bool
    weighted: str
    source: str
    calibrated: int
    n_layers: int
    allocation: Optional[str]           # "layer" | "global" | None
    allocated: int
    max_sparsity: Optional[float]
    date: str
    problem: Optional[str] = None       # why it cannot be opened (a file missing, plan.json unreadable)

    @classmethod
    def damaged(cls, path: Path, problem: str) -> "PlanInfo":
        """A folder holding a plan.json that cannot be read: listed, never opened."""
        return cls(path=Path(path), model=Path(path).name, method="?", transform=False, weighted="?", source="",
                   calibrated=0, n_layers=0, allocation=None, allocated=0, max_sparsity=None, date="",
                   problem=problem)

    @property
    def complete(self) -> bool:
        return self.calibrated == self.n_layers

    @property
    def usable_allocation(self) -> str:
        """The allocation the plan can serve now: its greedy mode when that finished, else uniform."""
        if self.allocation in ("layer", "global") and self.allocated == self.n_layers:
            return self.allocation
        return "uniform"

    def describe_state(self) -> str:
        if self.problem:
            return f"damaged: {self.problem}"
        if not self.complete:
            return f"partial: {self.calibrated}/{self.n_layers} layers"
        if self.allocation and self.allocated < self.n_layers:
            return f"allocation {self.allocated}/{self.n_layers}"
        return "ready"


def read_plan_info(folder: Path) -> Optional[PlanInfo]:
    """What the plan browser shows of a plan folder, from :func:`wina.api.plan_info` (the checked
    reader of its metadata); None for a folder that is not a readable plan."""
    from wina.api import plan_damage, plan_info
    try:
        meta = plan_info(folder)
        status = meta.get("status") or {}
        alloc = meta.get("allocation") or {}
        cal = meta.get("calibration") or {}
        src = str(cal.get("source") or "")
        if "/" in src:
            src = Path(src).name
        date = str(status.get("calibrated_at") or meta.get("saved_at") or meta.get("created") or "")
        return PlanInfo(path=Path(folder), model=str(meta.get("model_id") or meta.get("architecture") or "?"),
                        method=str(meta.get("method", "?")), transform=bool(meta.get("transform")),
                        weighted=str(meta.get("weighted") or "default"), source=src,
                        calibrated=int(status.get("calibrated_layers", 0)), n_layers=int(meta["n_layers"]),
                        allocation=alloc.get("mode") if isinstance(alloc, dict) else None,
                        allocated=int(status.get("allocated_layers", 0)),
                        max_sparsity=(float(alloc["max_sparsity"]) if isinstance(alloc, dict)
                                      and isinstance(alloc.get("max_sparsity"), (int, float)) else None),
                        date=date[:16].replace("T", " "),
                        problem=plan_damage(folder, checksums=False))    # a listed file missing
    except (WinaError, ValueError, TypeError, KeyError, AttributeError):
        return None


def browse_plans(*roots: Path) -> list[PlanInfo]:
    """Every plan folder under ``roots`` (:func:`plan_folders`) for the plan browser: readable ones
    with their state, unreadable ones listed as damaged with the reason."""
    from wina.api import plan_damage
    out = []
    for d in plan_folders(*roots):
        info = read_plan_info(d)
        out.append(info if info is not None else PlanInfo.damaged(d, plan_damage(d, checksums=False)
                                                                   or "plan.json cannot be read"))
    return out


def plan_folders(*roots: Path) -> list[Path]:
    """The plan folders under each root, plus those of ``runs/*/plans`` under the current directory
    (what ``wina run`` writes); newest first (:func:`wina.api.plan_folders`)."""
    from wina.api import plan_folders as folders
    extra: list[Path] = []
    with contextlib.suppress(OSError):
        extra = sorted(p for p in Path.cwd().glob("runs/*/plans") if p.is_dir())
    return folders(*[r for r in roots if r is not None], *extra)


def result_folders(results_dir: Path) -> list[Path]:
    """The results store and ``runs/*/runs`` under the current directory (``wina run``'s results)."""
    out = [Path(results_dir)]
    with contextlib.suppress(OSError):
        out += sorted(p for p in Path.cwd().glob("runs/*/runs") if p.is_dir())
    return out
