"""The pipeline in one file: load → calibrate → allocate → apply → evaluate / perplexity. Every
front-end reaches it through :mod:`wina.api` (which also exports presets, results, chat and bench);
the preset runner (:mod:`wina.runner`) drives it directly. No caller decides on its own what a
step needs::

    from wina import api
    loaded = api.load("smollm2-135m")                                       # 1. model + tokenizer
    api.calibrate(loaded, "plans/smol", api.Calibration(method="wina", transform=True))
    api.allocate(loaded, "plans/smol", api.Allocation(mode="layer"))        # 2. histograms, greedy
    opts = api.SparseOptions(method="wina", sparsity=0.5, plan="plans/smol")
    run = api.evaluate(loaded, opts, api.Evaluation(tasks=("piqa",), limit=100), out="runs/x.json")
    ppl = api.perplexity(loaded, opts, "wiki.test.raw")                    # 3. quality
    chat = api.ChatSession(loaded, sparse=opts)                             # 4. talk to it

The rules that live here and nowhere else:

- a step's model state: :func:`wina.transform.ensure` (drop the sparsifier, transform when the
  method asks for it, refuse to un-transform) before calibrating, allocating or applying;
- method defaults (:func:`sparse_options`): dense unless a sparsity is given (then WINA) or a plan is
  given (then the plan's method, and its transform);
- where evaluation data comes from: :func:`wina.data.resolve`;
- how an allocation is named in results (:func:`allocation_label`): ``uniform``, ``greedy`` (within
  layers, the seed's) or ``greedy-global``.

Every function reports progress through ``on_event`` (:class:`wina.events.Progress`) and stops at the
next unit of work when ``cancel`` (:class:`wina.events.CancelToken`) is set. Errors a user can fix are
:class:`wina.errors.WinaError` with one line of text.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .errors import InvalidArgument, PlanError
from .events import CancelToken, ProgressCallback, Reporter
from .models import EMBEDDED, Loaded
from .sparsify import GATINGS, METHODS, WEIGHTED, _check_sparsity
from .plan_meta import rotation_suffix

PathLike = Union[str, Path]


# --- settings ----------------------------------------------------------------------------------

@dataclass
class SparseOptions:
    """How a loaded model is sparsified for evaluation or chat."""
    method: str = "wina"            # dense | teal | wina
    sparsity: float = 0.5           # target (uniform with top-k; plan-allocated with a plan)
    transform: bool = False
    rotation: str = "svd"           # with transform: svd | pca | pca-block (the pca ones need a plan: their bases are there)
    gating: str = "topk"            # topk | threshold (threshold needs a plan)
    weighted: str = "default"       # default (k/gate only, as the official code) | all
    plan: Optional[str] = None      # calibration plan directory
    dense_prefix: float = 0.01
    mode: Optional[str] = None      # with a plan: "layer" | "global" | "uniform" (None: the plan's)

    def validate(self) -> "SparseOptions":
        if self.method not in METHODS:
            raise InvalidArgument(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.gating not in GATINGS:
            raise InvalidArgument(f"unknown gating {self.gating!r}; choose one of {', '.join(GATINGS)}")
        if self.weighted not in WEIGHTED:
            raise InvalidArgument(f"unknown weighting {self.weighted!r}; choose one of {', '.join(WEIGHTED)}")
        _check_sparsity(self.sparsity)
        if self.gating == "threshold" and not self.plan and self.method != "dense":
            raise InvalidArgument("threshold gating needs a calibration plan (--plan)")
        from .plan_meta import DATA_ROTATIONS, PLAN_ROTATIONS
        if self.rotation not in PLAN_ROTATIONS:
            raise InvalidArgument(f"unknown rotation {self.rotation!r}; choose one of {', '.join(PLAN_ROTATIONS)}")
        if self.transform and self.rotation in DATA_ROTATIONS and not self.plan:
            raise InvalidArgument(f"the {self.rotation} rotation comes from a calibration plan: calibrate with "
                                  f"--rotation {self.rotation} and pass --plan")
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        if self.method == "dense":
            return "dense"
        name = self.method.upper() + (rotation_suffix(self.rotation) if self.transform else "")
        return f"{name} {self.sparsity:.0%}"


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate`` records: the gating score of ``method`` on ``source`` text."""
    method: str = "wina"            # teal | wina
    transform: bool = False
    rotation: str = "svd"           # with transform: svd (the seed's) | pca (activation PCA, no shortcuts) | pca-block
    source: str = "self"            # self | wikitext | a .txt/.jsonl file | hub:<dataset>
    samples: Optional[int] = None   # None: the library's default for the model's size
    seq_len: Optional[int] = None
    weighted: str = "default"

    def validate(self, out: Optional[PathLike] = None) -> "Calibration":
        """Checked before any model is loaded (:func:`wina.calibrate.check_settings`): the method,
        rotation, weighting and sizes, and the source (a text file read whole, wikitext's data folder,
        the hub for a hub dataset) unless ``out`` holds a calibration to resume (its ids are there)."""
        from .calibrate import check_settings
        resuming = out is not None and (Path(out) / "plan.json").is_file()
        check_settings(method=self.method, rotation=self.rotation, weighted=self.weighted, samples=self.samples,
                       seq_len=self.seq_len, source=None if resuming else self.source)
        return self


@dataclass(frozen=True)
class Allocation:
    """Greedy per-matrix sparsities (:mod:`wina.allocate`)."""
    mode: str = "layer"             # layer (the seed's) | global
    max_sparsity: float = 0.9
    step: Optional[float] = None    # None: 0.025 for models >= 1 B parameters, 0.1 below
    samples: Optional[int] = None   # calibration sequences the greedy uses (None: size default)
    seq_len: Optional[int] = None
    error: str = "wina"             # layer-error rule: wina | seed
    step_norm: str = "wina"         # step normalisation: wina | seed


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate`` measures: lm-eval tasks and/or the perplexity of a text."""
    tasks: tuple = ()
    limit: Optional[float] = None   # documents per task (or a fraction < 1)
    data_dir: Any = "auto"          # auto | hub | a folder (wina.data.resolve)
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    ppl_text: Optional[PathLike] = None
    ppl_max_tokens: Optional[int] = None
    ppl_protocol: str = "windows"   # windows | seed

    def validate(self) -> "Evaluation":
        """Checked before any model is loaded (:func:`wina.evaluate.check_settings`): tasks, limit,
        few-shot count, batch size, perplexity protocol and budget (one window at least) and text."""
        from .evaluate import check_settings
        check_settings(tasks=self.tasks, limit=self.limit, num_fewshot=self.num_fewshot,
                       batch_size=self.batch_size, ppl_text=self.ppl_text, ppl_max_tokens=self.ppl_max_tokens,
                       ppl_protocol=self.ppl_protocol)
        return self


# --- 1. load --------------------------------------------------------------------------------------

def resolve_device(device: Optional[str] = "auto") -> str:
    """``auto`` is cuda when a GPU is visible, else cpu. Any other name must be a device this
    machine has (cpu, cuda, cuda:N, mps): an unknown name or a GPU that is not there is an
    InvalidArgument, before anything loads."""
    import torch
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = str(device)
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InvalidArgument(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise InvalidArgument(f"device {name!r}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgument(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidArgument(f"device {name!r}: no Apple GPU is available here; use --device cpu")
    elif dev.type != "cpu":
        raise InvalidArgument(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return name


def load(model: str = EMBEDDED, *, device: Optional[str] = "auto", dtype: Optional[str] = "auto",
         on_event: Optional[ProgressCallback] = None) -> Loaded:
    """The model and its tokenizer: the embedded default, a .gguf file, a local folder or a hub id."""
    from .models import load as _load, resolve_source
    resolve_source(model)                       # a bad path fails before any slow import
    dev = resolve_device(device)
    rep = Reporter("load", 1, on_event)
    rep.emit(0, message=f"{model} on {dev}")
    loaded = _load(model, dtype=None if dtype in (None, "auto") else dtype, device=dev)
    rep.emit(1, message=f"{model} on {dev}")
    return loaded


# --- 2. calibrate and allocate ---------------------------------------------------------------------

def calibrate(loaded: Loaded, out: PathLike, cal: Calibration = Calibration(), *,
              on_event: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None):
    """Score histograms of every projection, layer by layer, into the plan folder ``out`` (resumed
    when it holds an unfinished calibration with the same settings). Returns the plan."""
    from .calibrate import calibrate as _calibrate
    from .transform import ensure
    cal.validate(out)
    from .files import check_writable, locked, sweep_temps
    check_writable(out, folder=True)
    if not cal.transform:               # a transform is made by the calibration (pca needs its text)
        ensure(loaded.model, False, what="an untransformed calibration", on_event=on_event)
    with locked(out, f"plan {out}"):
        sweep_temps(out)
        return _calibrate(loaded.model, loaded.tokenizer, method=cal.method, source=cal.source,
                          samples=cal.samples, seq_len=cal.seq_len, out=str(out), weighted=cal.weighted,
                          model_id=loaded.model_id, on_event=on_event, cancel=cancel,
                          rotation=cal.rotation if cal.transform else None)


def allocate(loaded: Loaded, plan_dir: PathLike, alloc: Allocation = Allocation(), *,
             on_event: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
             devices: Optional[Sequence[str]] = None):
    """Greedy allocation for the calibrated plan in ``plan_dir``, stored in the same folder (a
    finished allocation with other settings is replaced only once the new one is complete).
    ``devices``: where the layers' greedies run (default: every visible GPU when the model is on
    one); the plan does not depend on it."""
    import shutil
    from .allocate import allocate as _allocate
    from .files import locked, recover_folder, replace_folder, sweep_temps
    from .plan import Plan, allocating_folder
    target = Path(plan_dir)
    recover_folder(target)
    with locked(target, f"plan {target}"):
        sweep_temps(target)
        meta = plan_info(target)
        finished = allocation_finished(meta)
        if finished:                    # a damaged plan is named as the user's, and no copy is made of it
            why = plan_damage(target)
            if why is not None:
                raise PlanError(f"corrupt plan {target}: {why}; calibrate it again (or delete it)")
        # a finished allocation is replaced only when the new one is complete: work on a copy
        work = allocating_folder(target) if finished else target
        copy = allocating_folder(target)
        if copy.exists() and (not finished or not same_calibration(copy, meta)
                              or _allocation_args_of(copy) != _requested_args(loaded, meta, alloc)):
            shutil.rmtree(copy)         # left by an allocation of another calibration or with other settings

        def copy_plan() -> None:
            shutil.copytree(target, work, ignore=shutil.ignore_patterns(".wina-lock"))

        if finished and not work.exists():
            copy_plan()
        try:
            plan = Plan.load(str(work), allow_partial=True)
        except PlanError:
            if work == target:
                raise
            shutil.rmtree(work)         # a copy cut short (killed while copying): made again
            copy_plan()
            plan = Plan.load(str(work), allow_partial=True)
        if not plan.calibrated:
            raise PlanError(f"{target}: calibration is not finished; run calibrate first")
        new = _allocate(loaded.model, loaded.tokenizer, plan, max_sparsity=alloc.max_sparsity, step=alloc.step,
                        mode=alloc.mode, samples=alloc.samples, seq_len=alloc.seq_len, error=alloc.error,
                        step_norm=alloc.step_norm, on_event=on_event, cancel=cancel, devices=devices)
        if getattr(new, "path", None) is None or Path(new.path).resolve() != work.resolve():
            new.save(str(work))
        if work != target:
            replace_folder(work, target)
            new.path = target
        return new


def allocation_change(loaded: Loaded, plan_dir: PathLike, alloc: Allocation = Allocation()) -> Optional[str]:
    """What :func:`allocate` with ``alloc`` does to an allocation the plan already holds with other
    settings (a finished one is replaced once the new one is complete; an unfinished one starts
    over), in words naming the settings that differ; None when there is none to replace."""
    try:
        meta = plan_info(plan_dir)
    except (PlanError, OSError):
        return None
    if plan_damage(plan_dir) is not None:       # nothing is replaced: allocate refuses it, naming why
        return None
    old, new = _allocation_args_of(Path(plan_dir)), _requested_args(loaded, meta, alloc)
    if not old or old == new:
        return None
    changed = ", ".join(f"{k} {old.get(k)} → {new.get(k)}" for k in sorted(set(old) | set(new))
                        if old.get(k) != new.get(k))
    if allocation_finished(meta):
        return f"replaces the finished allocation ({changed}); it stays until the new one is complete"
    done = meta["status"].get("allocated_layers", 0)
    return f"starts over: the unfinished allocation ({done} of {meta['n_layers']} layers) has other settings ({changed})"


def _allocation_args_of(plan_dir: Path) -> Optional[dict]:
    """The settings a plan folder's allocation was (or is being) made with, as
    :func:`wina.allocate.allocation_args` gives them (None: unreadable)."""
    try:
        recorded = plan_info(plan_dir).get("allocation") or {}
    except (PlanError, OSError):
        return None
    return {k: v for k, v in recorded.items() if k not in ("mode", "grid")}


def _requested_args(loaded: Loaded, meta: dict, alloc: Allocation) -> dict:
    from .allocate import allocation_args
    return allocation_args(loaded.model.config, meta, max_sparsity=alloc.max_sparsity, step=alloc.step,
                           samples=alloc.samples, seq_len=alloc.seq_len, error=alloc.error,
                           step_norm=alloc.step_norm)


def allocation_finished(meta: dict) -> bool:
    """Whether the plan whose metadata is ``meta`` holds a finished allocation (every layer's
    trajectory): a new allocation of it is then made in a copy (:func:`wina.plan.allocating_folder`)
    and replaces it only once complete."""
    try:
        return meta.get("allocation") is not None and int(meta["status"].get("allocated_layers", 0)) == int(meta["n_layers"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def allocation_work(plan_dir: PathLike) -> Path:
    """Where :func:`allocate` writes the allocation of ``plan_dir``: beside it
    (:func:`wina.plan.allocating_folder`) when its allocation is finished, else in it."""
    from .plan import allocating_folder
    try:
        finished = allocation_finished(plan_info(plan_dir))
    except (PlanError, OSError):
        finished = False
    return allocating_folder(plan_dir) if finished else Path(plan_dir)


def same_calibration(copy: PathLike, meta: dict) -> bool:
    """Whether the plan folder ``copy`` holds the calibration of the plan whose metadata is ``meta``
    (the same checksums of its calibration ids, rotation and histograms)."""
    def calibration(m: dict) -> dict:
        return {k: v for k, v in m.get("files", {}).items()
                if k.startswith("histograms/") or k in ("calibration.safetensors", "rotation.safetensors")}
    try:
        return calibration(plan_info(copy)) == calibration(meta)
    except PlanError:
        return False


def plan_info(path: PathLike) -> dict:
    """A plan's metadata (method, transform, model, allocation, ...) from its plan.json, checked,
    without reading its tensors."""
    from .plan_meta import read_meta
    return read_meta(path)


def plan_damage(path: PathLike, *, checksums: bool = True) -> Optional[str]:
    """What is wrong with the plan folder ``path``: an unreadable plan.json, or a file it lists
    missing or (``checksums``) not matching its sha256 (hashes are cached while a file's size and
    time stay); None for a sound plan. A folder without plan.json is a calibration that has not
    saved anything yet: not damaged."""
    from .files import sha256
    path = Path(path)
    if not (path / "plan.json").is_file():
        return None
    try:
        meta = plan_info(path)
    except PlanError as e:
        return str(e)
    for rel, sha in meta["files"].items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        try:
            if checksums and sha256(f) != sha:
                return f"{rel} does not match its checksum"
        except OSError:
            return f"{rel} cannot be read"
    return None


# --- 3. apply ---------------------------------------------------------------------------------------

def sparse_options(method: Optional[str] = None, sparsity: Optional[float] = None,
                   transform: Optional[bool] = None, plan: Optional[str] = None, gating: str = "topk",
                   weighted: str = "default", mode: Optional[str] = None) -> SparseOptions:
    """Options from what a user typed, with the defaults: dense unless a sparsity is given (then
    wina), or the plan's method and transform when a plan is given. ``transform``: None when not
    asked for; False (``--no-transform``) with a plan made on the transformed model is refused, not
    overridden."""
    if plan is not None:
        meta = plan_info(plan)
        pm = meta.get("method")
        if method is not None and pm and method != pm:
            raise InvalidArgument(f"--method {method} does not match the plan's method {pm} ({plan})")
        method = method or pm or "wina"
        if transform is False and meta.get("transform"):
            raise InvalidArgument(f"the plan {plan} was made on the transformed model: drop --no-transform")
        transform = bool(transform) or bool(meta.get("transform"))
        rotation = meta.get("rotation") or "svd"
    else:
        rotation = "svd"
        if gating == "threshold":        # else it would quietly run dense: the method's default
            raise InvalidArgument("threshold gating needs a calibration plan (--plan)")
    if method is None:
        method = "wina" if sparsity is not None else "dense"
    if method == "dense" and sparsity:
        raise InvalidArgument(f"--sparsity {sparsity} with --method dense: a dense model gates nothing; "
                              "drop one of them")
    if sparsity is None:
        sparsity = 0.0 if method == "dense" else 0.5
    return SparseOptions(method=method, sparsity=sparsity, transform=bool(transform), rotation=rotation,
                         gating=gating, weighted=weighted, plan=plan, mode=mode).validate()


def apply(loaded: Loaded, opts: SparseOptions):
    """Put the options on the loaded model (in place): the transform, then the gates (uniform top-k,
    or a plan's allocation and thresholds). Returns the sparsifier, or None for dense.
    ``loaded`` may also be the bare model."""
    from .sparsify import sparsify
    from .transform import ensure
    opts.validate()
    model = loaded.model if isinstance(loaded, Loaded) else loaded
    if opts.plan and opts.method != "dense":
        from .plan import Plan, apply_plan
        plan = Plan.load(opts.plan)
        return apply_plan(model, plan, opts.sparsity, gating=opts.gating, dense_prefix=opts.dense_prefix,
                          mode=opts.mode)
    ensure(model, opts.transform, what="dense or untransformed sparsity")
    if opts.method == "dense":
        return None
    return sparsify(model, opts.method, opts.sparsity, gating=opts.gating, weighted=opts.weighted,
                    dense_prefix=opts.dense_prefix)


def allocation_label(opts: SparseOptions) -> Optional[str]:
    """How results name the allocation: None (dense), uniform, greedy (within layers) or greedy-global."""
    if opts.method == "dense":
        return None
    if not opts.plan or opts.mode == "uniform":
        return "uniform"
    mode = opts.mode or (plan_info(opts.plan).get("allocation") or {}).get("mode")
    return {"layer": "greedy", "global": "greedy-global"}.get(mode, "uniform")


# --- 4. evaluate ------------------------------------------------------------------------------------

def evaluate(loaded: Loaded, opts: SparseOptions, ev: Evaluation, *, out: Optional[PathLike] = None,
             extra: Optional[dict] = None, on_event: Optional[ProgressCallback] = None,
             cancel: Optional[CancelToken] = None):
    """lm-eval tasks and/or perplexity of the model under ``opts``; one results file at ``out``
    (written atomically, and held while it is made: :func:`wina.results.locked_output`; None writes
    nothing). Returns a :class:`wina.results.Run`."""
    import contextlib
    from . import data, tasks as _tasks
    from .evaluate import run_evaluation
    from .results import locked_output
    ev.validate()
    names = _tasks.parse_tasks(ev.tasks) if ev.tasks else []
    data_dir = data.resolve(ev.data_dir, names, ev.limit).path if names else None
    with (locked_output(out) if out is not None else contextlib.nullcontext()):
        sp = apply(loaded, opts)
        try:
            return run_evaluation(
                loaded.model, loaded.tokenizer, names, model_id=loaded.model_id, sparsifier=sp,
                method=opts.method, sparsity=opts.sparsity if opts.method != "dense" else 0.0,
                allocation=allocation_label(opts), plan=opts.plan, out=out, ppl_file=ev.ppl_text,
                ppl_max_tokens=ev.ppl_max_tokens, ppl_protocol=ev.ppl_protocol, limit=ev.limit,
                data_dir=data_dir, num_fewshot=ev.num_fewshot, batch_size=ev.batch_size,
                on_event=on_event, cancel=cancel, extra=extra)
        finally:
            if sp is not None:
                sp.remove()


def perplexity(loaded: Loaded, opts: SparseOptions, text_file: PathLike, *, context: int = 512,
               max_tokens: Optional[int] = None, protocol: str = "windows",
               on_event: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None):
    """Perplexity of a UTF-8 text under ``opts`` and the sparsity measured while computing it.
    Returns ``(PerplexityResult, measured sparsity or None)``; the sparsifier stays on the model."""
    from .perplexity import check_options, perplexity as _perplexity, read_text
    check_options(max_tokens, protocol, context)
    text = read_text(text_file)
    sp = apply(loaded, opts)
    if sp is not None:
        sp.reset_counters()
    r = _perplexity(loaded.model, loaded.tokenizer, text, context=context, max_tokens=max_tokens,
                    protocol=protocol, on_event=on_event, cancel=cancel)
    return r, (sp.measured_sparsity() if sp is not None else None)
