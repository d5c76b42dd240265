"""``wina run``: the whole pipeline a preset describes, resumable.

Steps, in order (variants without the transform first, so that one loaded model serves every step:
it is transformed in place once, when the first transformed variant needs it)::

    calibrate <variant>          -> plans/<variant>/              (greedy variants)
    allocate <variant>           -> plans/<variant>/ (same plan, allocation added)
    eval <variant> @ <sparsity>  -> runs/<variant>-s<NN>.json     (dense: runs/<variant>.json)
    compare                      -> compare.md (the paper-shaped table of every run file)

A step whose output exists (and is complete) is skipped, so an interrupted run resumes: results
files are written atomically (temporary file + rename), and a plan records which layers are
calibrated / allocated (``plan.json``), which calibrate and allocate resume from. The model is
loaded only when a step has to run, and only after every input of the steps to run is checked.

The ledger (``steps.json``) records the settings that made each output (text inputs by their
sha256), and, while a calibrate or allocate step runs, that it started (so that a killed step
resumes where it stopped). An output is kept only when the ledger proves it was made, to the end,
with the settings asked for now: an edited setting or text, or another data folder (``auto``
resolved), reruns it (saying what changed), and an output the ledger does not know (a folder
without ``steps.json``) or that is damaged (a results file that does not load, a plan file that
does not match its checksum) is made again. Outputs the ledger records that the preset no longer
makes (a variant or a sparsity taken out) are moved to ``retired/<date-time>/`` (:func:`retire`),
never deleted. ``--limit N`` writes to ``runs/<preset>-limitN`` by default so
that quick checks never mix with full results. Nothing here draws anything: the CLI passes
``on_step`` and ``on_event`` callbacks.

With ``procs`` > 1 (``wina run --gpus N``) every eval step runs data-parallel: the step is re-run in
N processes under ``accelerate launch`` (one per GPU; CPU processes over gloo without CUDA), each
loading and sparsifying its own copy, lm-eval sharding the requests and rank 0 writing the results
file (as ``wina eval --gpus N``). Calibration and allocation stay in this process, layer by layer.
Rank 0's progress events come back over its stdout and reach ``on_event``; everything else the
processes print goes to ``logs/<results file>.log`` in the output folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional, Union

from . import api
from .api import Preset, PresetError, Variant
from .errors import DataError, InvalidArgument, PlanError, WinaError
from .events import CancelToken, Progress, ProgressCallback

CALIBRATE, ALLOCATE, EVAL, COMPARE = "calibrate", "allocate", "eval", "compare"


def _without_default_rotation(d: dict) -> dict:
    """Settings without ``rotation`` when it is the default svd: ledgers written before the option
    existed keep their keys (their steps are not rerun for nothing)."""
    if d.get("rotation") == "svd":
        d.pop("rotation")
    return d


@dataclass
class Step:
    kind: str                                # calibrate | allocate | eval | compare
    output: Path
    variant: Optional[Variant] = None
    sparsity: Optional[float] = None
    inputs: list[Path] = field(default_factory=list)
    preset: Optional[Preset] = None
    limit: Optional[float] = None
    root: Optional[Path] = None              # the run folder (where the ledger steps.json lives)
    why: Optional[str] = None                # set by run_preset: why an existing output is rerun
    aside: bool = False                      # set with ``why``: what is there is kept aside, not overwritten

    @property
    def title(self) -> str:
        if self.kind == COMPARE:
            return "compare all runs"
        v = self.variant
        tr = ""
        if self.kind == EVAL:
            if v.method == "dense":
                return f"eval {v.name}{tr}"
            return f"eval {v.name}{tr} @ {self.sparsity:.0%}"
        return f"{self.kind} {v.name}{tr}"

    def settings(self) -> dict:
        """Everything that decides this step's output: what its key hashes. Plain JSON values."""
        from dataclasses import asdict
        p, v = self.preset, self.variant
        d: dict = {"kind": self.kind, "model": p.model, "dtype": p.dtype}
        if self.kind in (CALIBRATE, ALLOCATE) or (self.kind == EVAL and v.needs_plan):
            cal = calibration_of(p, v)
            d["calibration"] = _without_default_rotation(asdict(cal))
            text = api.calibration_file(cal.source)
            if text is not None:                     # the text itself, not its name: an edit reruns
                d["calibration"]["source_sha256"] = _sha256(text)
        if self.kind == ALLOCATE or (self.kind == EVAL and v.needs_plan):
            d["allocation"] = asdict(allocation_of(p))
        if self.kind == EVAL:
            e = p.eval
            o = _without_default_rotation(asdict(options_of(p, self)))
            o.pop("plan", None)                      # the folder; what made it is recorded above
            d["options"] = o
            d["eval"] = {"tasks": list(e.tasks or []), "limit": self.limit if self.limit is not None else e.limit,
                         "data_dir": self.data_folder, "num_fewshot": e.num_fewshot, "batch_size": e.batch_size,
                         "ppl_text": str(p.resolved_ppl_text()) if e.ppl_text else None,
                         "ppl_max_tokens": e.ppl_max_tokens, "ppl_protocol": getattr(e, "ppl_protocol", None)}
            if e.ppl_text:
                d["eval"]["ppl_text_sha256"] = _sha256(p.resolved_ppl_text())
        if self.kind == COMPARE:
            d = {"kind": COMPARE, "inputs": [x.name for x in self.inputs]}
        return d

    @cached_property
    def data_folder(self) -> Optional[str]:
        """The folder an evaluation reads its tasks from (``auto`` resolved, once per step: it depends
        on $WINA_DATA and on which folders exist), or "hub"; the preset's own ``data_dir`` when there
        are no tasks (nothing is read) or when it resolves to nothing here (the run stops on it)."""
        e = self.preset.eval
        if not e.tasks:
            return e.data_dir
        try:
            path = self.preset.resolved_data_dir(self.limit)
        except DataError:
            return e.data_dir
        return str(path) if path is not None else "hub"

    @property
    def key(self) -> str:
        return _key(self.settings())

    @property
    def rel(self) -> str:
        """The step's name in the ledger: kind and output (calibrate and allocate share a folder)."""
        where = self.output.relative_to(self.root) if self.root else self.output
        return f"{self.kind} {where}"

    @property
    def scratch(self) -> Optional[Path]:
        """Where this step makes a new output beside one it replaces only once complete (a plan
        calibrated or allocated again with other settings), or None for steps that write in place."""
        if self.kind == CALIBRATE:
            return self.output.with_name(self.output.name + ".new")
        if self.kind == ALLOCATE:
            return api.allocating_folder(self.output)
        return None

    @property
    def scratch_rel(self) -> Optional[str]:
        """The ledger's name for :attr:`scratch` (its record says which settings started it)."""
        if self.scratch is None:
            return None
        return f"{self.kind} {self.scratch.relative_to(self.root) if self.root else self.scratch}"

    def recorded(self) -> Optional[dict]:
        """What the ledger says made this step's output (None: nothing recorded)."""
        if self.root is None:
            return None
        return _ledger(self.root).get(self.rel)

    def _has_output(self) -> bool:
        """Whether something this step makes is on disk (for allocate: an allocation in the plan)."""
        if self.kind == ALLOCATE:
            meta = _plan_json(self.output)
            return meta is not None and meta.get("allocation") is not None
        return self.output.exists()

    def stale(self, ledger: Optional[dict] = None) -> Optional[str]:
        """Why the existing output no longer fits the preset (which settings changed, that no
        settings are recorded for it, or that it is damaged: :meth:`_damage`), or None. An output the ledger does not know (a run folder
        without steps.json, or from before it) is never adopted: nothing proves how it was made."""
        self.aside = False
        if self.root is None or not self._has_output():
            return None
        led = _ledger(self.root) if ledger is None else ledger
        rec = led.get(self.rel)
        if rec is None:
            # a comparison made before the ledger recorded comparisons: its inputs' times decide
            self.aside = self.kind != COMPARE
            return None if self.kind == COMPARE else UNKNOWN
        if rec.get("key") != self.key:
            old = self._with_folder_read(rec.get("settings") or {})
            if _key(old) != self.key:
                changed = _diff(old, self.settings())
                return "settings changed: " + (", ".join(changed[:4]) + (" …" if len(changed) > 4 else "")
                                               if changed else "unknown")
        why = None
        if self.kind == COMPARE and rec.get("sha256") and _sha256(self.output) != rec["sha256"]:
            why = "the table was changed or damaged since it was written"
        why = why or self._damage() or self._replaced_by_hand()
        self.aside = why is not None
        return why

    def _replaced_by_hand(self) -> Optional[str]:
        """Why a finished allocation in the plan is not this step's (made again with other settings
        outside this run, e.g. by ``wina allocate``), or None."""
        if self.kind != ALLOCATE:
            return None
        meta = _plan_json(self.output)
        if meta is None or not api.allocation_finished(meta) or _allocated(meta, self.preset):
            return None
        return "the plan's allocation was made again outside this run, with other settings"

    def _with_folder_read(self, old: dict) -> dict:
        """Recorded settings with the data folder the results file says was read, where the ledger
        (written before data folders were resolved) records the preset's ``data_dir`` ("auto")."""
        ev = old.get("eval")
        if self.kind != EVAL or not isinstance(ev, dict) or ev.get("data_dir") != self.preset.eval.data_dir:
            return old
        try:
            info = api.load_run(self.output).wina["eval"]
            read = info.get("data_dir")
        except (DataError, KeyError, AttributeError):
            return old
        if not info.get("tasks"):          # no task was read (perplexity only): no folder to compare
            return old
        return {**old, "eval": {**ev, "data_dir": read if read is not None else "hub"}}

    def _damage(self) -> Optional[str]:
        """Why the output on disk cannot be used (an unreadable results file, a plan whose files are
        missing or do not match their checksums), or None."""
        if self.kind == EVAL and self.output.exists():
            try:
                api.load_run(self.output)
            except DataError as e:
                return f"its results file is damaged ({e})"
        if self.kind in (CALIBRATE, ALLOCATE) and self.output.exists():
            problem = api.plan_damage(self.output)
            if problem is not None:
                return f"its plan is damaged ({problem})"
        return None

    def done(self, ledger: Optional[dict] = None) -> bool:
        """Whether the output exists, is complete, and was made with this step's settings, to the
        end (a step the ledger records as started runs again, resuming) (cheap: reads JSON only)."""
        led = _ledger(self.root) if (ledger is None and self.root is not None) else (ledger or {})
        if self.stale(led) is not None:
            return False
        if (led.get(self.rel) or {}).get("state") == STARTED:
            return False
        return self._complete()

    def _complete(self) -> bool:
        if self.kind == CALIBRATE:
            meta = _plan_json(self.output)
            return meta is not None and _calibrated(meta)
        if self.kind == ALLOCATE:
            meta = _plan_json(self.output)
            return meta is not None and _calibrated(meta) and _allocated(meta, self.preset)
        if self.kind == EVAL:
            return self.output.is_file()
        if self.kind == COMPARE:
            if not self.output.is_file():
                return False
            t = self.output.stat().st_mtime
            return all(p.is_file() and p.stat().st_mtime <= t for p in self.inputs)
        return False


@dataclass
class Summary:
    out_dir: Path
    ran: list[Step] = field(default_factory=list)
    skipped: list[Step] = field(default_factory=list)
    runs: list[Any] = field(default_factory=list)          # wina.results.Run of every eval output
    compare_path: Optional[Path] = None
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each step run (title -> s)
    total_s: float = 0.0
    retired_to: Optional[Path] = None                         # where outputs the preset no longer makes went
    retired: list[str] = field(default_factory=list)          # those outputs (relative paths)


# --- plan.json reading (no torch) ------------------------------------------------------------------

def _plan_json(path: Path) -> Optional[dict]:
    """The plan's checked metadata, or None where there is no usable plan (the step runs)."""
    if not (path / "plan.json").is_file():
        return None
    try:
        return api.plan_info(path)
    except (PlanError, OSError):
        return None


def _calibrated(meta: dict) -> bool:
    try:
        return int(meta["status"]["calibrated_layers"]) == int(meta["n_layers"])
    except (KeyError, TypeError, ValueError):
        return False


def _allocated(meta: dict, preset: Optional[Preset]) -> bool:
    if not api.allocation_finished(meta):
        return False
    alloc = meta["allocation"]
    if alloc.get("mode") == "global" and "global.safetensors" not in (meta.get("files") or {}):
        return False
    if preset is not None:
        want = {"mode": preset.allocation.mode, "max_sparsity": preset.allocation.max_sparsity,
                "step": preset.allocation.step}
        for k, v in want.items():
            if v is not None and k in alloc and alloc[k] != v:
                return False
    return True


# --- the ledger: which settings made each output ------------------------------------------------

LEDGER = "steps.json"
STARTED = "started"          # a ledger entry's state while its step runs (the output may be partial)
UNKNOWN = "made with unknown settings (steps.json has no record of it)"


def _sha256(path) -> Optional[str]:
    """A text input's content hash (None when it cannot be read: the step's own check says why)."""
    if path is None:
        return None
    try:
        return api.file_sha256(path)
    except OSError:
        return None


def _ledger(root: Path) -> dict:
    f = Path(root) / LEDGER
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        raise InvalidArgument(f"{f} is damaged (not JSON); delete it to rerun every step") from None
    if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
        raise InvalidArgument(f"{f} is damaged (not a ledger); delete it to rerun every step")
    return d


def _key(settings: dict) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _record(step: Step, *, rel: Optional[str] = None, started: bool = False) -> None:
    """Write in the ledger the settings that made (``started``: that are making) ``rel`` (default:
    the step's own output)."""
    led = _ledger(step.root)
    entry = {"key": step.key, "settings": step.settings()}
    if started:
        entry["state"] = STARTED
    elif step.kind == COMPARE and rel is None:
        entry["sha256"] = _sha256(step.output)       # a table changed or damaged since is made again
    led[rel or step.rel] = entry
    _write_ledger(step.root, led)


def _forget(root: Path, rel: str) -> None:
    led = _ledger(root)
    if led.pop(rel, None) is not None:
        _write_ledger(root, led)


def _write_ledger(root: Path, led: dict) -> None:
    api.atomic_write_text(Path(root) / LEDGER, json.dumps(led, indent=1, sort_keys=True, default=str) + "\n")


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``a.b: old → new`` for every leaf that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif isinstance(a, list) and isinstance(b, list) and a != b and (set(map(repr, a)) != set(map(repr, b))):
            gone, added = [x for x in a if x not in b], [x for x in b if x not in a]   # what went, what came
            out.append(f"{prefix}{k} " + ", ".join([f"−{_short(x)}" for x in gone] + [f"+{_short(x)}" for x in added]))
        elif a != b:
            out.append(f"{prefix}{k} {_short(a)} → {_short(b)}")
    return out


def _short(v) -> str:
    """``v`` in at most 40 characters, its start and its end (a folder's name ends a path)."""
    text = repr(v)
    return text if len(text) <= 40 else text[:13] + "…" + text[-26:]


# --- planning ------------------------------------------------------------------------------------

def default_out_dir(preset: Preset, limit=None) -> Path:
    api.check_name(preset.name, f"{preset.where}: name")
    name = preset.name + (f"-limit{limit:g}" if limit is not None else "")
    return Path("runs") / name


def pending(steps: list[Step]) -> list[Step]:
    """The steps that will run, in order (each with ``why`` set where an existing output is redone):
    what the CLI's header counts and what :func:`run_preset` runs, decided once, by one rule. An
    output is kept when it is complete and the ledger records that this step's settings made it to
    the end; the comparison is redone when any evaluation runs."""
    todo: list[Step] = []
    ledgers: dict[Path, dict] = {}
    eval_runs = False
    remade: set[Path] = set()                        # the plans that will be made (again)
    for s in steps:
        led = ledgers.setdefault(s.root, _ledger(s.root)) if s.root is not None else {}
        s.why = s.stale(led)
        if s.kind == COMPARE:
            # also when results the preset no longer makes are still recorded (retire moves them)
            retiring = any(k.startswith(EVAL + " ") for k in _superseded(led, steps))
            if eval_runs or retiring or s.why is not None or not s._complete():
                todo.append(s)
            continue
        if s.why is None and s.kind == EVAL and remade.intersection(s.inputs) and s.output.exists():
            s.why = "its plan is made again"         # results name the plan they were made with
        if s.why is not None or not s.done(led):
            todo.append(s)
            eval_runs = eval_runs or s.kind == EVAL
            if s.kind in (CALIBRATE, ALLOCATE):
                remade.add(s.output)
    return todo


def _tag(s: float) -> str:
    pct = round(100 * s, 2)
    return f"s{int(pct):02d}" if float(pct).is_integer() else f"s{pct:05.2f}".replace(".", "p")


def plan_steps(preset: Preset, out_dir: Union[str, Path], *, limit=None) -> list[Step]:
    """The steps of a preset, in execution order (untransformed variants first)."""
    out = Path(out_dir)
    steps: list[Step] = []
    evals: list[Path] = []
    for i, v in enumerate(preset.variants):          # names become folders and files: the one rule
        if api.name_problem(v.name) is not None:
            raise PresetError(f"{preset.where}: variants[{i}].name: {api.name_problem(v.name)}")
    made_by: dict[Path, str] = {}
    ordered = ([v for v in preset.variants if not v.transform]
               + [v for v in preset.variants if v.transform and v.rotation == "svd"]
               + [v for v in preset.variants if v.transform and v.rotation != "svd"])
    for v in ordered:
        plan_dir = out / "plans" / v.name
        if v.needs_plan:
            steps.append(Step(CALIBRATE, plan_dir, v, preset=preset, limit=limit, root=out))
            steps.append(Step(ALLOCATE, plan_dir, v, inputs=[plan_dir], preset=preset, limit=limit, root=out))
        if v.method == "dense":
            targets = [None]
        else:
            targets = list(preset.eval.sparsities)
        for s in targets:
            name = f"{v.name}.json" if s is None else f"{v.name}-{_tag(s)}.json"
            p = out / "runs" / name
            if p in made_by:
                raise PresetError(f"{preset.where}: variants {made_by[p]!r} and {v.name!r} would both write "
                                  f"runs/{name}; rename one of them")
            made_by[p] = v.name
            evals.append(p)
            steps.append(Step(EVAL, p, v, s, inputs=[plan_dir] if v.needs_plan else [], preset=preset,
                              limit=limit, root=out))
    steps.append(Step(COMPARE, out / "compare.md", inputs=evals, preset=preset, limit=limit, root=out))
    return steps


def describe(preset: Preset, limit=None, *, strict: bool = True, device: Optional[str] = None,
             procs: int = 1) -> dict[str, str]:
    """What a dry run shows about a preset, after resolving and checking what can be checked cheaply
    (model spec, data folder, task names and files, calibration file, perplexity text). ``device``
    and ``procs``: the run's overrides (``--device``, ``--gpus``); a device typed for this run must
    exist here (InvalidArgument), the preset's own is shown either way."""
    kind, path = api.resolve_source(preset.model)
    info: dict[str, str] = {"model": f"{preset.model} ({kind})"}
    if kind == "hub":                    # shown, not raised, like the device: the run fails at load, clearly
        info["model"] = f"{preset.model} (hub; {api.model_availability(preset.model)})"
    if device not in (None, "auto"):
        info["device"] = f"{resolve_device(preset, device)} (--device)"
    else:
        try:                             # shown, not raised: a dry run may look at a GPU preset anywhere
            info["device"] = api.resolve_device(preset.device)
        except InvalidArgument as err:
            info["device"] = f"{preset.device}: NOT AVAILABLE here ({err})"
    if procs > 1:
        info["evaluation"] = f"{procs} processes each (--gpus)"
    if preset.description:
        info["description"] = preset.description
    greedy = [v for v in preset.variants if v.needs_plan]
    if greedy:
        src = preset.resolved_source()
        c = preset.calibration
        if src.endswith((".txt", ".jsonl")) and not Path(src).is_file():
            raise PresetError(f"{preset.where}: calibration.source: file not found: {src}")
        info["calibration"] = (f"{src}, {c.samples} samples × {c.seq_len or 'default'} tokens, "
                               f"weighted={c.weighted}")
        a = preset.allocation
        info["allocation"] = (f"greedy, mode={a.mode}, step={a.step or 'default'}, "
                              f"max_sparsity={a.max_sparsity}") + (
            f", on {a.samples or 'all'} × {a.seq_len or 'all'} tokens" if (a.samples or a.seq_len) else "")
    info["variants"] = ", ".join(
        f"{v.name} ({v.method}{(', pca rotation' if v.rotation == 'pca' else ', transform') if v.transform else ''}"
        f"{', ' + v.allocation if v.method != 'dense' else ''})" for v in preset.variants)
    e = preset.eval
    info["protocol"] = ", ".join(f"{k}={v}" for k, v in preset.protocol().items())
    info["sparsities"] = ", ".join(f"{s:g}" for s in e.sparsities)
    info["gating"] = e.gating
    lim = limit if limit is not None else e.limit
    if e.tasks:
        names = api.parse_tasks(e.tasks)
        try:
            src = preset.data_source(lim)
        except DataError as err:
            if strict or e.data_dir not in ("auto", "hub"):     # a folder the preset names must exist
                raise
            info["tasks"] = f"{', '.join(names)}: NOT AVAILABLE here ({err})"
            src = None
        if src is None:
            pass
        elif src.path is not None:
            try:
                api.check_local(names, src.path)
            except (InvalidArgument, DataError) as err:      # named as the preset's key, like its other errors
                raise type(err)(f"{preset.where}: eval.tasks: {err}") from None
            where = src.label
        else:
            hub = [n for n in names if n not in api.TASKS]
            where = "lm-eval hub datasets" + (f" ({', '.join(hub)}: checked when run)" if hub else "")
        if src is not None:
            info["tasks"] = f"{', '.join(names)} from {where}"
    if e.tasks:
        info["limit"] = "all documents" if lim is None else f"{lim:g} per task"
    try:
        ppl = preset.resolved_ppl_text()
        if ppl is not None and not ppl.is_file():
            raise PresetError(f"{preset.where}: eval.ppl_text: file not found: {ppl}")
    except PresetError as err:
        if strict:
            raise
        info["perplexity"] = f"NOT AVAILABLE here ({err})"
        ppl = None
    if ppl is not None:
        info["perplexity"] = f"{ppl} ({e.ppl_max_tokens or 'all'} tokens)"
    return info


# --- execution -----------------------------------------------------------------------------------

class _Model:
    """The one loaded model, transformed in place on first need; reloaded only if a step needs the
    untransformed model after the transform (which the step order avoids)."""

    def __init__(self, preset: Preset, device: Optional[str], renderer=None) -> None:
        self.preset, self.device, self.r = preset, device, renderer
        self.loaded = None

    def release(self) -> None:
        """Drop the loaded model (and its GPU memory); the next get() loads it again."""
        if self.loaded is not None:
            self.loaded = None
            import gc
            gc.collect()
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def get(self, transform: bool, on_event=None, rotation: str = "svd"):
        """The loaded model, reloaded when a step needs it untransformed, or with another rotation,
        after a transform; the steps themselves (wina.pipeline) transform it when they need to."""
        info = getattr(self.loaded.model, "_wina_transform", None) if self.loaded is not None else None
        if info is not None and (not transform or info.rotation != rotation):
            self.release()
        if self.loaded is None:
            self.loaded = api.load(self.preset.model, device=resolve_device(self.preset, self.device),
                                   dtype=self.preset.dtype, on_event=on_event)
        return self.loaded


def resolve_device(preset: Preset, device: Optional[str]) -> str:
    """The device a run uses: the override, else the preset's ("auto": cuda when there is one),
    checked by the one rule (:func:`wina.api.resolve_device`)."""
    return api.resolve_device(device if device not in (None, "auto") else preset.device)


def run_preset(preset: Preset, out_dir: Union[str, Path, None] = None, *, limit=None,
               device: Optional[str] = None, on_step: Optional[Callable[[Step, str], None]] = None,
               on_event: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
               renderer=None, procs: int = 1,
               on_plan: Optional[Callable[[list, list], None]] = None) -> Summary:
    """Run every step of a preset that is not done yet; returns what ran and the loaded runs.

    ``on_step(step, status)`` is called with status "rerun" (before "start", ``step.why`` says
    why), "start", "done" or "skip". ``on_plan(steps, todo)`` is called once, before anything runs,
    with every step and those that will run (:func:`pending`). ``renderer`` (optional, the CLI's)
    gets ``note``/``done`` calls for work without progress events. ``procs`` > 1: eval steps run
    data-parallel in that many processes (module docstring). Every input is checked before the
    model is loaded (:meth:`wina.pipeline.Evaluation.validate`, :meth:`~wina.pipeline.Calibration.validate`).
    """
    if procs < 1:
        raise InvalidArgument(f"procs must be at least 1, got {procs}")
    limit = check_run_limit(preset, limit)
    out = Path(out_dir) if out_dir is not None else default_out_dir(preset, limit)
    steps = plan_steps(preset, out, limit=limit)     # names and outputs checked
    describe(preset, limit)                          # fail early on a bad path / task / data folder
    resolve_device(preset, device)                   # an unknown or absent device, before any folder
    api.check_writable(out, folder=True)
    with api.locked(out, f"run folder {out}"):
        api.sweep_temps(out)                             # what a killed run left half-written
        for s in steps:
            if s.kind == CALIBRATE:
                api.recover_folder(s.output)             # a swap of plan folders cut short
        return _run_steps(preset, out, steps, limit, device, on_step, on_event, cancel, renderer, procs,
                          on_plan)


def check_run_limit(preset: Preset, limit):
    """``limit`` (documents per lm-eval task) checked for this preset: a preset without tasks (perplexity
    only) has nothing it would limit, and a run with it would only go to another folder."""
    if limit is None:
        return None
    limit = api.check_limit(limit)
    if not preset.eval.tasks:
        raise InvalidArgument(f"--limit sets documents per lm-eval task, and preset {preset.name} has no tasks "
                              "(it measures perplexity only); run it without --limit")
    return limit


def _check_inputs(preset: Preset, limit, todo: list[Step]) -> None:
    """What the steps that will run read, checked before the model is loaded: the evaluation's
    settings and texts, and each calibration's source (unless it resumes from its plan)."""
    if any(s.kind == EVAL for s in todo):
        evaluation_of(preset, limit).validate()
    for s in todo:
        if s.kind == CALIBRATE:
            calibration_of(preset, s.variant).validate(out=_calibrate_work(s))
    for where in dict.fromkeys(s.output.parent for s in todo):   # runs/, plans/: a read-only one shows here
        api.check_writable(where, folder=True)


def _run_steps(preset: Preset, out: Path, steps: list[Step], limit, device, on_step, on_event, cancel,
               renderer, procs: int, on_plan=None) -> Summary:
    todo = pending(steps)
    _check_inputs(preset, limit, todo)
    if on_plan is not None:
        on_plan(steps, todo)
    _drop_abandoned_scratch(steps, todo)
    summary = Summary(out)
    if (out / LEDGER).is_file():         # the ledger can be written: else fail before anything moves
        _write_ledger(out, _ledger(out))
    summary.retired_to, summary.retired = retire(out, steps)
    if any(p.startswith("runs/") for p in summary.retired):
        _drop_table_to_remake(out, steps, todo)
    t_start = time.perf_counter()
    holder = _Model(preset, device, renderer)
    notify = on_step or (lambda s, st: None)
    runs = {id(s) for s in todo}
    for step in steps:
        if cancel is not None:
            cancel.check()
        if id(step) not in runs:
            summary.skipped.append(step)
            notify(step, "skip")
            continue
        if step.kind == EVAL:
            _drop_table_to_remake(out, steps, todo)  # the results change from here on
        if step.aside and step.kind in (CALIBRATE, EVAL, COMPARE):
            kept = _set_aside(out, step)
            if kept is not None:
                step.why = f"{step.why}; what was there is kept in {kept}"
        if step.why is not None:
            notify(step, "rerun")
        notify(step, "start")
        t0 = time.perf_counter()
        if step.kind == CALIBRATE:
            _calibrate(step, preset, holder, on_event, cancel)
        elif step.kind == ALLOCATE:
            _allocate(step, preset, holder, on_event, cancel)
        elif step.kind == EVAL:
            if procs > 1:
                holder.release()                     # the processes load their own copies
                _evaluate_parallel(step, steps.index(step), preset, out, limit, device, procs,
                                   on_event, cancel)
            else:
                _evaluate(step, preset, holder, limit, on_event, cancel)
        elif step.kind == COMPARE:
            _compare(step, preset)
        _record(step)
        _write_preset(out, preset)                   # once a step has made something from it
        summary.ran.append(step)
        summary.seconds[step.title] = time.perf_counter() - t0
        notify(step, "done")
    _write_preset(out, preset)
    compare = next(s for s in steps if s.kind == COMPARE)
    summary.runs = [api.load_run(p) for p in compare.inputs if p.is_file()]
    summary.compare_path = compare.output if compare.output.is_file() else None
    summary.total_s = time.perf_counter() - t_start
    return summary


RETIRED = "retired"


def _superseded(led: dict, steps: list[Step]) -> list[str]:
    """The ledger entries (``"<kind> <output>"``) of outputs that none of ``steps`` makes: a variant
    or a sparsity taken out of the preset, a variant renamed."""
    current = {s.rel for s in steps} | {s.scratch_rel for s in steps if s.scratch is not None}
    return sorted(k for k in led if k not in current and k.split(" ", 1)[0] in (CALIBRATE, ALLOCATE, EVAL))


def superseded(steps: list[Step]) -> list[str]:
    """The outputs (paths in the run folder) that the preset no longer makes and that
    :func:`retire` moves aside. Only outputs the ledger records as this runner's are ever moved; a
    user's own files in the folder are left where they are."""
    root = steps[0].root if steps else None
    gone = _superseded(_ledger(root), steps) if root is not None else []
    return sorted({k.split(" ", 1)[1] for k in gone})


def _retired_folder(root: Path) -> Path:
    """A new ``retired/<date-time>/`` in the run folder (not made yet), never one that exists."""
    dest = Path(root) / RETIRED / time.strftime("%Y%m%d-%H%M%S")
    while dest.exists():
        dest = dest.with_name(dest.name + "+")
    return dest


def retire(root: Path, steps: list[Step]) -> tuple[Optional[Path], list[str]]:
    """Move the outputs the preset no longer makes (:func:`superseded`) into
    ``retired/<date-time>/`` (same relative paths, with their ledger entries in its own
    ``steps.json``), so that the folder's ``runs/`` holds only the preset's results (``wina compare``
    on it, the TUI's run list) and nothing is lost. Returns that folder (None: nothing to move) and
    the outputs moved."""
    led = _ledger(root)
    gone = _superseded(led, steps)
    if not gone:
        return None, []
    dest = _retired_folder(root)
    moved: dict[str, dict] = {}
    paths: list[str] = []
    try:
        for key in gone:
            where = key.split(" ", 1)[1]
            src, to = Path(root) / where, dest / where
            if src.exists() and not to.exists():
                try:
                    to.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, to)
                except OSError as e:
                    raise DataError(f"cannot move {src}, which the preset no longer makes, to {to}: "
                                    f"{e.strerror or e}") from None
                paths.append(where)
            moved[key] = led.pop(key)
    finally:                                         # what was moved keeps its record, even after a failure
        if not paths and dest.exists():
            import shutil                            # nothing moved: no empty folders left behind
            shutil.rmtree(dest, ignore_errors=True)
            with contextlib.suppress(OSError):
                dest.parent.rmdir()                  # retired/ itself, when it was made for this
        if paths:
            api.atomic_write_text(dest / LEDGER, json.dumps(moved, indent=1, sort_keys=True, default=str) + "\n")
        if moved:
            _write_ledger(root, led)                 # last: a kill before it only leaves entries to drop again
    return (dest if paths else None), paths


def _set_aside(root: Path, step: Step) -> Optional[Path]:
    """An output this runner has no record of making (a user's own file at that path, a folder from
    an older version) is moved into ``retired/<date-time>/`` before the step makes its own, never
    overwritten. Returns where it went (None: nothing there)."""
    src = step.output
    if not src.exists():
        return None
    dest = _retired_folder(root) / step.output.relative_to(root)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
    except OSError as e:
        raise DataError(f"cannot move {src}, which this run did not make, to {dest}: {e.strerror or e}") from None
    return dest


def _drop_table_to_remake(out: Path, steps: list[Step], todo: list[Step]) -> None:
    """The comparison table, when it is to be made again, goes as soon as the results it shows begin
    to change (before the first evaluation runs, or once results are retired): a run stopped half-way
    never leaves a table of the old results beside new ones. One changed by hand (or damaged) is
    kept in ``retired/<date-time>/``; the run's own is removed (``wina compare`` on ``runs/`` shows
    the results at any time)."""
    compare = next(s for s in steps if s.kind == COMPARE)
    if not any(s is compare for s in todo) or not compare.output.is_file():
        return
    if compare.aside:
        compare.why = f"{compare.why}; what was there is kept in {_set_aside(out, compare)}"
        compare.aside = False
    else:
        compare.output.unlink()
    _forget(out, compare.rel)


def _drop_abandoned_scratch(steps: list[Step], todo: list[Step]) -> None:
    """A :attr:`Step.scratch` (``<variant>.new``, ``<variant>.allocating``) beside a plan that is done
    with the settings asked for now is what is left of a re-calibration or re-allocation for other
    settings, stopped and then given up (the preset went back): stale, with its ledger record."""
    import shutil
    running = {id(s) for s in todo}
    for s in steps:
        if s.scratch is None or id(s) in running:
            continue
        if s.scratch.is_dir():
            shutil.rmtree(s.scratch)
        if s.root is not None:
            _forget(s.root, s.scratch_rel)


def _write_preset(out: Path, preset: Preset) -> None:
    """The preset the folder's outputs were made with (written once a step has finished, so a run
    that stops at its first step, e.g. at the model's load, leaves no folder that holds only this)."""
    text = json.dumps(preset.as_dict(), indent=1, default=str)
    f = out / "preset.json"
    if not (f.is_file() and f.read_text(encoding="utf-8") == text):
        api.atomic_write_text(f, text)


def _calibrate_work(step: Step) -> Path:
    """Where a calibrate step writes: its plan folder when it is new or being resumed, else (an
    existing plan made with other or unknown settings) ``<variant>.new`` beside it."""
    if not step.output.exists() or step.why is None:
        return step.output
    return step.scratch


def _calibrate(step: Step, preset: Preset, holder: _Model, on_event, cancel) -> None:
    """Calibrate into the plan folder; a plan made with other settings is replaced only once the new
    calibration is complete (it is made beside it, in ``<variant>.new``, which a rerun resumes when
    the ledger says that these settings started it, and removes otherwise)."""
    import shutil
    v = step.variant
    work = _calibrate_work(step)
    scratch, scratch_rel = step.scratch, step.scratch_rel
    if scratch.exists() and (work != scratch or (_ledger(step.root).get(scratch_rel) or {}).get("key") != step.key):
        shutil.rmtree(scratch)                       # left by a calibration with other settings
    # the plan is ours (locked) before the ledger says this calibration started in it: a plan another
    # process is writing stops the step without a record that would vouch for that writer's plan
    with api.locked(work, f"plan {work}"):
        _record(step, rel=scratch_rel if work == scratch else None, started=True)
        api.calibrate(holder.get(v.transform, on_event, v.rotation), work, calibration_of(preset, v),
                      on_event=on_event, cancel=cancel)
    if work != step.output:
        api.replace_folder(work, step.output)
        _record(step)                                # the plan's record first: a kill between leaves no doubt
        _forget(step.root, scratch_rel)


def _allocate(step: Step, preset: Preset, holder: _Model, on_event, cancel) -> None:
    """Allocate in the plan folder. A finished allocation made with other settings stays the ledger's
    record of the plan until the new one replaces it (it is made in :attr:`Step.scratch`, whose own
    record says which settings started it): a re-allocation killed and then given up (the preset went
    back) leaves the old allocation done, not to be made again."""
    api.recover_folder(step.output)                  # a swap of plan folders cut short, before the lock
    with api.locked(step.output, f"plan {step.output}"):
        beside = api.allocation_work(step.output) != step.output
        # a killed allocation resumes (wina.pipeline.allocate)
        _record(step, rel=step.scratch_rel if beside else None, started=True)
        api.allocate(holder.get(step.variant.transform, on_event, step.variant.rotation), step.output,
                     allocation_of(preset), on_event=on_event, cancel=cancel)
    if beside:
        _record(step)                                # the plan's record first: a kill between leaves no doubt
        _forget(step.root, step.scratch_rel)


def _evaluate(step: Step, preset: Preset, holder: _Model, limit, on_event, cancel) -> None:
    v = step.variant
    api.evaluate(holder.get(v.transform, on_event, v.rotation), options_of(preset, step), evaluation_of(preset, limit),
                 out=step.output, on_event=on_event, cancel=cancel,
                 extra={"preset": preset.name, "variant": v.name,
                        "preset_file": str(preset.path) if preset.path else None})


# --- a preset's settings as the pipeline's (the one translation) ---------------------------------

def calibration_of(preset: Preset, v: Variant):
    c = preset.calibration
    return api.Calibration(method=v.method, transform=v.transform, rotation=v.rotation,
                       source=preset.resolved_source(), samples=c.samples, seq_len=c.seq_len, weighted=c.weighted)


def allocation_of(preset: Preset):
    a = preset.allocation
    return api.Allocation(mode=a.mode, max_sparsity=a.max_sparsity, step=a.step, samples=a.samples,
                      seq_len=a.seq_len, **_protocol(a, ("error", "step_norm")))


def options_of(preset: Preset, step: Step):
    v, e = step.variant, preset.eval
    return api.SparseOptions(method=v.method, sparsity=step.sparsity or 0.0, transform=v.transform,
                         rotation=v.rotation, gating=e.gating if v.method != "dense" else "topk",
                         weighted=preset.calibration.weighted,
                         plan=str(step.inputs[0]) if v.needs_plan else None)


def evaluation_of(preset: Preset, limit=None):
    e = preset.eval
    lim = limit if limit is not None else e.limit
    return api.Evaluation(tasks=tuple(e.tasks or ()), limit=lim, data_dir=preset.resolved_data_dir(lim) or "hub",
                      num_fewshot=e.num_fewshot, batch_size=e.batch_size, ppl_text=preset.resolved_ppl_text(),
                      ppl_max_tokens=e.ppl_max_tokens, **_protocol(e, ("ppl_protocol",)))


def _protocol(section, names) -> dict:
    """The protocol settings a preset section carries (absent in older schemas: the defaults)."""
    return {n: getattr(section, n) for n in names if getattr(section, n, None) is not None}


EVENT_PREFIX = "@wina-event "


def _preset_ref(preset: Preset) -> str:
    return str(preset.path) if preset.path is not None else preset.name


def _evaluate_parallel(step: Step, index: int, preset: Preset, out: Path, limit, device: Optional[str],
                       procs: int, on_event, cancel) -> None:
    """One eval step in ``procs`` processes (``wina eval-step`` under accelerate launch)."""
    import subprocess
    distributed = api.distributed
    argv = ["eval-step", _preset_ref(preset), "--out", str(out), "--index", str(index)]
    if limit is not None:
        argv += ["--limit", repr(limit)]
    dev = resolve_device(preset, device)
    argv += ["--device", dev]
    cmd = distributed.launch_command(argv, procs, cpu=not dev.startswith("cuda"))
    env = distributed.launch_env(WINA_EVENTS="1", PYTHONUNBUFFERED="1")
    log_path = out / "logs" / f"{step.output.stem}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                errors="replace")
        try:
            for line in proc.stdout:
                if line.startswith(EVENT_PREFIX):
                    if on_event is not None:
                        try:
                            on_event(Progress(**json.loads(line[len(EVENT_PREFIX):])))
                        except (ValueError, TypeError):
                            log.write(line)
                else:
                    log.write(line)
                if cancel is not None and cancel.cancelled:
                    proc.terminate()
                    break
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if cancel is not None:
        cancel.check()
    if rc != 0 or not step._complete():
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        raise WinaError(f"{step.title}: the {procs} data-parallel processes failed (exit {rc}): "
                        f"{tail[0][:200]} (whole log: {log_path})")


def run_eval_step(preset: Preset, out_dir: Union[str, Path], index: int, *, limit=None,
                  device: Optional[str] = None) -> None:
    """Run eval step ``index`` of a preset in this process: one rank of ``_evaluate_parallel``'s
    group (or alone). Rank 0 prints its progress events as JSON lines when WINA_EVENTS is set."""
    distributed = api.distributed
    steps = plan_steps(preset, Path(out_dir), limit=limit)
    if not (0 <= index < len(steps)) or steps[index].kind != EVAL:
        raise InvalidArgument(f"step {index} of preset {preset.name} is not an eval step")
    step = steps[index]
    holder = _Model(preset, distributed.device_for_rank(resolve_device(preset, device)))
    on_event = None
    if os.environ.get("WINA_EVENTS") == "1" and distributed.world().is_main:
        from dataclasses import asdict

        def on_event(ev) -> None:
            print(EVENT_PREFIX + json.dumps(asdict(ev), default=str), flush=True)
    _evaluate(step, preset, holder, limit, on_event, None)


def _compare(step: Step, preset: Preset) -> None:
    runs = [api.load_run(p) for p in step.inputs if p.is_file()]
    if not runs:
        raise InvalidArgument("nothing to compare: no results files")
    head = f"# {preset.name}: {preset.model}\n\n"
    api.atomic_write_text(step.output, head + api.comparison_markdown(runs) + "\n")
