"""Presets: TOML files that describe a whole experiment for ``wina run``.

A preset names a model, how to calibrate and allocate, which method variants to compare and at
which sparsities, and what to evaluate. ``wina run PRESET`` turns it into steps
(:mod:`wina.runner`). Presets live in the repository's ``presets/`` folder (found next to the
installed package for an editable install, else in ``./presets``) or anywhere, given by path;
``$WINA_PRESETS`` (a ``:``-separated list of folders) is searched first.

Schema (every key but ``model`` is optional; unknown keys are errors)::

    name = "smollm2-quick"          # defaults to the file's stem
    description = "one line"
    model = "smollm2-135m"          # embedded default | .gguf path | local dir | hub id
    dtype = "auto"                  # auto | float32 | bfloat16 | float16
    device = "auto"                 # auto (cuda if available, else cpu) | cpu | cuda | cuda:N

    [calibration]                   # used by every variant with allocation = "greedy"
    source = "self"                 # .txt/.jsonl path | "wikitext" | "self" | hub dataset name
    samples = 20                    # calibration sequences
    seq_len = 2048                  # tokens per sequence (omit: the library's default)
    weighted = "default"            # default (k/gate weight-informed, as the seed) | all

    [allocation]                    # greedy allocation of per-matrix sparsities
    mode = "layer"                  # layer (within each layer) | global (across layers)
    max_sparsity = 0.9
    step = 0.025                    # base step (omit: the library's: 0.025 for >= 1 B parameters, as
                                    #   the seed; 0.1 below)
    samples = 4                     # calibration sequences the greedy uses (omit: the library's
    seq_len = 128                   #   default: all for >= 1 B parameters, 4 × 128 below)
    error = "wina"                  # wina (L2 over channels per position) | seed (the official rule:
                                    #   L2 over positions per channel); docs/seed-fidelity.md
    step_norm = "wina"              # wina (steps relative to q_proj/qkv_proj) | seed (to o_proj; differs
                                    #   on Phi-4 only)

    [eval]
    sparsities = [0.25, 0.40, 0.50, 0.65]
    gating = "topk"                 # topk | threshold
    tasks = ["piqa", "winogrande", "hellaswag", "arc_challenge", "mmlu", "gsm8k"]
    limit = 100                     # documents per task (omit: all)
    num_fewshot = 5                 # omit: each task's default
    batch_size = 8
    data_dir = "auto"               # "auto" | "hub" | a folder (see below)
    ppl_text = "{data}/wikitext2/wiki.test.raw"   # optional: also the fast perplexity on a text
    ppl_max_tokens = 8192
    ppl_protocol = "windows"        # windows (non-overlapping 512-token windows) | seed (the official
                                    #   ppl script: 1000 shuffled rows, 2048 + 512 sliding windows)

    [[variants]]                    # one per method variant; at least one
    name = "wina"                   # unique, [A-Za-z0-9_.-], not starting with '.'; names the output files
    method = "wina"                 # dense | teal | wina
    transform = true                # column-orthogonal transform first (default false)
    rotation = "pca"                # the transform's rotation: svd (the seed's, default) | pca
                                    # (activation PCA from the calibration text, one basis; implies
                                    # transform) | pca-block (a PCA basis per block, with shortcuts)
    allocation = "greedy"           # greedy (calibrate + allocate; the default) | uniform (plain top-k)

Paths (``calibration.source`` when it is a file, ``eval.data_dir``, ``eval.ppl_text``) are relative
to the preset file's folder. ``data_dir = "auto"`` follows :func:`wina.data.resolve`: ``$WINA_DATA``
if set, else ``<repo>/../shared/data`` or ``./data``, else the subsets shipped with the package when
they cover the tasks and limit, else the hub. ``"hub"`` always uses lm-eval's hub datasets. ``{data}``
in ``ppl_text`` stands for the full data folder.

Errors name the file and the key, e.g. ``presets/x.toml: eval.sparsities[1]: must be in [0, 1), got 1.5``.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .errors import WinaError
from .files import name_problem
from .perplexity import PROTOCOLS as PPL_PROTOCOLS, max_tokens_problem
from .plan_meta import DATA_ROTATIONS, PLAN_ROTATIONS

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # Python 3.10: the tomli backport (same API)
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ModuleNotFoundError:  # pragma: no cover - only on 3.10 without tomli
        _toml = None  # type: ignore[assignment]

METHODS = ("dense", "teal", "wina")
GATINGS = ("topk", "threshold")
MODES = ("layer", "global")
ALLOCATIONS = ("greedy", "uniform")
WEIGHTED = ("default", "all")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_PRESETS = PACKAGE_DIR.parent / "presets"          # the repo's presets/ (editable install)


class PresetError(WinaError):
    """A preset that cannot be found, parsed or validated; the message names the file and key."""


@dataclass
class Calibration:
    source: str = "self"
    samples: int = 20
    seq_len: Optional[int] = None
    weighted: str = "default"


@dataclass
class Allocation:
    mode: str = "layer"
    max_sparsity: float = 0.9
    step: Optional[float] = None
    samples: Optional[int] = None
    seq_len: Optional[int] = None
    error: str = "wina"
    step_norm: str = "wina"


@dataclass
class EvalSpec:
    sparsities: list[float] = field(default_factory=lambda: [0.25, 0.40, 0.50, 0.65])
    gating: str = "topk"
    tasks: list[str] = field(default_factory=list)
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    data_dir: str = "auto"
    ppl_text: Optional[str] = None
    ppl_max_tokens: Optional[int] = None
    ppl_protocol: str = "windows"


@dataclass
class Variant:
    name: str
    method: str
    transform: bool = False
    allocation: str = "greedy"
    rotation: str = "svd"           # with the transform: svd (the seed's) | pca (needs greedy: a plan)

    @property
    def needs_plan(self) -> bool:
        return self.method != "dense" and self.allocation == "greedy"


@dataclass
class Preset:
    name: str
    model: str
    path: Optional[Path] = None
    description: str = ""
    dtype: str = "auto"
    device: str = "auto"
    calibration: Calibration = field(default_factory=Calibration)
    allocation: Allocation = field(default_factory=Allocation)
    eval: EvalSpec = field(default_factory=EvalSpec)
    variants: list[Variant] = field(default_factory=list)

    # --- resolution of paths that depend on where the preset file is --------------------------
    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()

    def _rel(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else (self.base_dir / q)

    def data_source(self, limit=None):
        """Where the tasks are read from (:func:`wina.data.resolve`), for ``limit`` documents per task
        (None: the preset's own limit)."""
        from . import data
        from .tasks import parse_tasks
        d = self.eval.data_dir
        tasks = parse_tasks(self.eval.tasks) if self.eval.tasks else []
        lim = self.eval.limit if limit is None else limit
        return data.resolve(d if d in ("auto", "hub") else self._rel(d), tasks, lim)

    def resolved_data_dir(self, limit=None) -> Optional[Path]:
        """The folder tasks are read from, or None for lm-eval's hub datasets."""
        return self.data_source(limit).path

    def resolved_source(self) -> str:
        """The calibration source with a relative file path made absolute."""
        s = self.calibration.source
        if s.endswith((".txt", ".jsonl")) and not Path(s).expanduser().is_absolute():
            return str(self._rel(s).resolve())
        return s

    def resolved_ppl_text(self) -> Optional[Path]:
        t = self.eval.ppl_text
        if not t:
            return None
        if t.startswith("{data}/"):
            d = find_data_dir() if self.eval.data_dir in ("auto", "hub") else self.resolved_data_dir()
            from .data import data_text
            from .errors import DataError
            try:                        # the data folder's file, else the shipped excerpt (wina.data)
                return data_text(t[len("{data}/"):], d, self.eval.ppl_max_tokens)
            except DataError as e:
                raise PresetError(f"{self.where}: eval.ppl_text: {e}") from None
        if "{data}" in t:
            raise PresetError(f"{self.where}: eval.ppl_text: {{data}} must start the path, got {t!r}")
        return self._rel(t).resolve()

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else f"preset {self.name!r}"

    def protocol(self) -> dict:
        """The settings where the seed's protocol and this project's defaults differ, as this preset
        chooses them (docs/seed-fidelity.md); "seed" values reproduce microsoft/wina."""
        return {"allocation.error": self.allocation.error, "allocation.step_norm": self.allocation.step_norm,
                "eval.ppl_protocol": self.eval.ppl_protocol, "dtype": self.dtype,
                "eval.batch_size": self.eval.batch_size}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path) if self.path else None
        return d


# --- data folder ---------------------------------------------------------------------------------

def find_data_dir() -> Optional[Path]:
    """The full data folder ``auto`` finds (:func:`wina.data.find_data_dir`), or None."""
    from .data import find_data_dir as find
    return find()


# --- finding presets -----------------------------------------------------------------------------

def preset_dirs() -> list[Path]:
    """Folders searched for a preset given by name, in order."""
    dirs = [Path(p).expanduser() for p in os.environ.get("WINA_PRESETS", "").split(os.pathsep) if p]
    for d in (REPO_PRESETS, Path.cwd() / "presets"):
        if d not in dirs:
            dirs.append(d)
    return [d for d in dirs if d.is_dir()]


def list_presets(problems: Optional[list[str]] = None) -> list[Preset]:
    """Every valid preset in the search folders (first one wins per name), sorted by name. A broken
    file is left out, and its one-line error is appended to ``problems`` when given: one bad
    ``.toml`` in ``./presets`` does not hide the others."""
    seen: dict[str, Optional[Preset]] = {}
    for d in preset_dirs():
        for f in sorted(d.glob("*.toml")):
            if f.stem in seen:
                continue
            try:
                seen[f.stem] = load_preset(f)
            except WinaError as e:          # unparsable, invalid, not UTF-8, unreadable
                seen[f.stem] = None
                if problems is not None:
                    problems.append(str(e))
    return [p for k, p in sorted(seen.items()) if p is not None]


def find_preset(name_or_path: Union[str, Path]) -> Path:
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.suffix == ".toml" or os.sep in s or p.is_file():
        if p.is_dir():
            raise PresetError(f"{s} is a folder, not a preset file (.toml)")
        if not p.is_file():
            raise PresetError(f"preset file not found: {s}")
        return p
    for d in preset_dirs():
        f = d / f"{s}.toml"
        if f.is_file():
            return f
    names = sorted({f.stem for d in preset_dirs() for f in d.glob("*.toml")})
    known = f"; known presets: {', '.join(names)}" if names else " (no presets folder found)"
    raise PresetError(f"unknown preset {s!r}{known}")


def load_preset(name_or_path: Union[str, Path]) -> Preset:
    """Find, parse and validate a preset; raises :class:`PresetError` naming the file and key."""
    path = find_preset(name_or_path)
    if _toml is None:  # pragma: no cover
        raise PresetError("reading presets on Python 3.10 needs the package tomli: pip install tomli")
    try:
        with open(path, "rb") as f:
            data = _toml.load(f)
    except _toml.TOMLDecodeError as e:
        raise PresetError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise PresetError(f"{path}: not UTF-8 text (byte {e.start} cannot be decoded)") from None
    except OSError as e:
        raise PresetError(f"{path}: cannot read: {e.strerror}") from None
    return parse_preset(data, path=path)


# --- validation ----------------------------------------------------------------------------------

class _V:
    """Typed reads from one TOML table with errors that name the file and the key."""

    def __init__(self, where: str, table: Any, prefix: str = "") -> None:
        self.where, self.prefix = where, prefix
        if not isinstance(table, dict):
            self.fail("", f"must be a table, got {_tname(table)}")
        self.t = table

    def fail(self, key: str, msg: str):
        name = f"{self.prefix}{key}".rstrip(".") or "(top level)"
        raise PresetError(f"{self.where}: {name}: {msg}")

    def check_keys(self, allowed) -> None:
        for k in self.t:
            if k not in allowed:
                self.fail(k, f"unknown key; allowed here: {', '.join(allowed)}")

    def get(self, key, kind, default=None, *, required=False):
        if key not in self.t:
            if required:
                self.fail(key, "missing (required)")
            return default
        v = self.t[key]
        if kind is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                self.fail(key, f"must be a number, got {_tname(v)}")
            return float(v)
        if kind is int:
            if isinstance(v, bool) or not isinstance(v, int):
                self.fail(key, f"must be an integer, got {_tname(v)}")
            return v
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            self.fail(key, f"must be {_kind_name(kind)}, got {_tname(v)}")
        return v

    def choice(self, key, choices, default):
        v = self.get(key, str, default)
        if v not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, got {v!r}")
        return v

    def sub(self, key) -> "_V":
        return _V(self.where, self.t.get(key, {}), f"{self.prefix}{key}.")


def _tname(v) -> str:
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    if isinstance(v, str):
        return f"a string ({v!r})"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return type(v).__name__


def _kind_name(kind) -> str:
    return {str: "a string", bool: "a boolean (true/false)", list: "an array", dict: "a table"}.get(
        kind, kind.__name__)


def _fraction(v: _V, key: str, value: float, lo_open: bool = False) -> float:
    if math.isnan(value) or not (0.0 <= value < 1.0) or (lo_open and value == 0.0):
        rng = "(0, 1)" if lo_open else "[0, 1)"
        v.fail(key, f"must be in {rng}, got {value}")
    return value


def _step(a: "_V") -> Optional[float]:
    v = a.get("step", float, None)
    return None if v is None else _fraction(a, "step", v, lo_open=True)


TOP_KEYS = ("name", "description", "model", "dtype", "device", "calibration", "allocation", "eval",
            "variants")
CAL_KEYS = ("source", "samples", "seq_len", "weighted")
ALLOC_KEYS = ("mode", "max_sparsity", "step", "samples", "seq_len", "error", "step_norm")
EVAL_KEYS = ("sparsities", "gating", "tasks", "limit", "num_fewshot", "batch_size", "data_dir",
             "ppl_text", "ppl_max_tokens", "ppl_protocol")
ERROR_RULES = ("wina", "seed")          # = wina.allocate.ERROR_RULES (no torch import here)
STEP_NORMS = ("wina", "seed")           # = wina.allocate.STEP_NORMS
VARIANT_KEYS = ("name", "method", "transform", "allocation", "rotation")


def parse_preset(data: dict, *, path: Optional[Path] = None, name: Optional[str] = None) -> Preset:
    """Validate a parsed TOML document and build a :class:`Preset`."""
    where = str(path) if path is not None else f"preset {name or '?'}"
    top = _V(where, data)
    top.check_keys(TOP_KEYS)
    pname = top.get("name", str, name or (path.stem if path else None))
    if name_problem(pname) is not None:          # it names the run folder: the one rule (wina.files)
        top.fail("name", name_problem(pname))
    model = top.get("model", str, required=True).strip()
    if not model:
        top.fail("model", "must not be empty")
    dtype = top.choice("dtype", DTYPES, "auto")
    device = top.get("device", str, "auto")
    if not re.match(r"^(auto|cpu|cuda(:\d+)?|mps)$", device):
        top.fail("device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")

    c = top.sub("calibration")
    c.check_keys(CAL_KEYS)
    source = c.get("source", str, "self").strip()
    if not source:
        c.fail("source", "must not be empty")
    samples = c.get("samples", int, 20)
    if samples < 1:
        c.fail("samples", f"must be at least 1, got {samples}")
    seq_len = c.get("seq_len", int, None)
    if seq_len is not None and seq_len < 8:
        c.fail("seq_len", f"must be at least 8, got {seq_len}")
    cal = Calibration(source, samples, seq_len, c.choice("weighted", WEIGHTED, "default"))

    a = top.sub("allocation")
    a.check_keys(ALLOC_KEYS)
    a_samples = a.get("samples", int, None)
    if a_samples is not None and a_samples < 1:
        a.fail("samples", f"must be at least 1, got {a_samples}")
    a_seq = a.get("seq_len", int, None)
    if a_seq is not None and a_seq < 8:
        a.fail("seq_len", f"must be at least 8, got {a_seq}")
    alloc = Allocation(a.choice("mode", MODES, "layer"),
                       _fraction(a, "max_sparsity", a.get("max_sparsity", float, 0.9), lo_open=True),
                       _step(a), a_samples, a_seq, a.choice("error", ERROR_RULES, "wina"),
                       a.choice("step_norm", STEP_NORMS, "wina"))

    e = top.sub("eval")
    e.check_keys(EVAL_KEYS)
    sps = e.get("sparsities", list, [0.25, 0.40, 0.50, 0.65])
    sparsities: list[float] = []
    for i, s in enumerate(sps):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            e.fail(f"sparsities[{i}]", f"must be a number, got {_tname(s)}")
        _fraction(e, f"sparsities[{i}]", float(s))
        if float(s) in sparsities:
            e.fail(f"sparsities[{i}]", f"{s} is listed twice")
        sparsities.append(float(s))
    tasks = e.get("tasks", list, [])
    for i, t in enumerate(tasks):
        if not isinstance(t, str) or not t.strip():
            e.fail(f"tasks[{i}]", f"must be a task name, got {_tname(t)}")
    tasks = [t.strip() for t in tasks]
    if len(set(tasks)) != len(tasks):
        e.fail("tasks", "lists a task twice")
    limit = e.get("limit", float, None)
    if limit is not None:
        if limit.is_integer():
            if limit < 1:
                e.fail("limit", f"must be at least 1 (or a fraction in (0, 1)), got {limit:g}")
        elif not 0 < limit < 1:
            e.fail("limit", f"a fractional limit must be in (0, 1), got {limit}")
        if limit.is_integer():
            limit = int(limit)
    num_fewshot = e.get("num_fewshot", int, None)
    if num_fewshot is not None and num_fewshot < 0:
        e.fail("num_fewshot", f"must be 0 or more, got {num_fewshot}")
    batch_size = e.get("batch_size", int, 8)
    if batch_size < 1:
        e.fail("batch_size", f"must be at least 1, got {batch_size}")
    data_dir = e.get("data_dir", str, "auto").strip() or "auto"
    ppl_text = e.get("ppl_text", str, None)
    ppl_max = e.get("ppl_max_tokens", int, None)
    ppl_protocol = e.choice("ppl_protocol", PPL_PROTOCOLS, "windows")
    if max_tokens_problem(ppl_max, ppl_protocol) is not None:     # the rule of wina.perplexity
        e.fail("ppl_max_tokens", max_tokens_problem(ppl_max, ppl_protocol))
    if not tasks and not ppl_text:
        e.fail("tasks", "nothing to evaluate: give tasks and/or ppl_text")
    ev = EvalSpec(sparsities, e.choice("gating", GATINGS, "topk"), tasks, limit, num_fewshot,
                  batch_size, data_dir, ppl_text, ppl_max, ppl_protocol)

    raw_variants = top.get("variants", list, None, required=True)
    if not raw_variants:
        top.fail("variants", "must list at least one variant ([[variants]] tables)")
    variants: list[Variant] = []
    for i, rv in enumerate(raw_variants):
        v = _V(where, rv, f"variants[{i}].")
        v.check_keys(VARIANT_KEYS)
        method = v.choice("method", METHODS, None) if "method" in rv else v.fail("method", "missing (required)")
        vname = v.get("name", str, method + ("_transform" if rv.get("transform") is True else ""))
        if name_problem(vname) is not None:      # it names plan folders and results files
            v.fail("name", name_problem(vname))
        if any(x.name == vname for x in variants):
            v.fail("name", f"{vname!r} is used by two variants")
        rotation = v.choice("rotation", PLAN_ROTATIONS, "svd")
        transform = v.get("transform", bool, rotation in DATA_ROTATIONS)
        if rotation in DATA_ROTATIONS and not transform:
            v.fail("rotation", f"the {rotation} rotation is a transform: drop transform = false")
        allocation = v.choice("allocation", ALLOCATIONS, "greedy")
        if rotation in DATA_ROTATIONS and allocation != "greedy":
            v.fail("rotation", f"the {rotation} rotation's basis comes from the calibration: use allocation = \"greedy\"")
        variants.append(Variant(vname, method, transform, allocation, rotation))
    if any(x.method != "dense" for x in variants) and not sparsities:
        e.fail("sparsities", "must list at least one sparsity for the sparse variants")
    if ev.gating == "threshold" and any(x.method != "dense" and x.allocation == "uniform" for x in variants):
        e.fail("gating", "threshold gating needs a calibration plan: use allocation = \"greedy\" "
                         "in every sparse variant, or gating = \"topk\"")

    return Preset(pname, model, path, top.get("description", str, ""), dtype, device, cal, alloc, ev,
                  variants)
