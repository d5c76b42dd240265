"""The results store: one JSON file per run.

A run file is lm-eval's own results dictionary (``results``, ``groups``, ``configs``, ``versions``,
``n-shot``, ``n-samples``, ``config``, ...; absent for a perplexity-only run) plus a ``wina`` block::

    "wina": {
      "schema": 1,
      "model": "smollm2-135m",             # what the user asked for
      "model_type": "llama", "n_params": 134515008,
      "method": "dense" | "teal" | "wina",
      "transform": false,                  # column-orthogonal transform applied
      "allocation": "uniform" | "greedy" | ... | null,
      "plan": null | "path/to/plan",
      "gating": "topk" | "threshold" | null, "weighted": "default" | "all" | null,
      "nominal_sparsity": 0.5,             # size-weighted, what was asked
      "measured_sparsity": 0.4951,         # size-weighted, inputs actually dropped during the run
      "flops": {"dense": ..., "sparse": ..., "shortcut": ..., "lm_head": ..., "sparse_total": ..., "fraction": ...},
      "headline": {"piqa": {"metric": "acc_norm", "filter": "none", "value": 0.61, "stderr": 0.01,
                            "higher_is_better": true}, ...},
      "perplexity": null | {"file": ..., "perplexity": ..., "tokens": ..., "context": ..., ...},
      "eval": {"tasks": [...], "limit": 100, "data_dir": "...", "num_fewshot": null, ...},
      "versions": {"wina": ..., "torch": ..., "transformers": ..., "lm_eval": ..., "python": ...},
      "date": "2026-11-29T00:10:00+00:00",
      "machine": {"platform": ..., "cpu": ..., "cpu_count": 2, "gpu": null, "device": "cpu", ...},
      "elapsed_s": 123.4
    }

Files are written atomically (a temporary file in the same folder, then ``os.replace``). They are
read strictly (:func:`load_run`, the one reader): every value the readers use is checked for its type
and its range (sparsities in [0, 1], accuracies in [0, 1], perplexities > 0, counts whole numbers,
...), and a damaged file is one error naming the file and the key.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from .errors import DataError, InvalidArgument
from . import files
from .files import write_text
from .plan_meta import DATA_ROTATIONS, PLAN_ROTATIONS, rotation_suffix

SCHEMA = 1
REQUIRED = ("schema", "model", "method", "transform", "allocation", "nominal_sparsity",
            "measured_sparsity", "flops", "versions", "date", "machine")
METHOD_LABELS = {"dense": "dense", "teal": "TEAL", "wina": "WINA"}


@dataclass
class Run:
    path: Optional[Path]
    data: dict

    @property
    def wina(self) -> dict:
        return self.data["wina"]

    @property
    def method(self) -> str:
        return self.wina.get("method") or "dense"

    @property
    def transform(self) -> bool:
        return bool(self.wina.get("transform"))

    @property
    def sparsity(self) -> float:
        """Nominal sparsity (0 for dense)."""
        s = self.wina.get("nominal_sparsity")
        return 0.0 if self.method == "dense" or s is None else float(s)

    @property
    def label(self) -> str:
        """Method label as in the paper's tables: dense, TEAL, TEAL-transform, WINA, WINA-transform
        (WINA-pca, TEAL-pca: the activation-PCA rotation)."""
        return method_label(self.wina)

    @property
    def headline(self) -> dict[str, dict]:
        return self.wina.get("headline") or {}

    @property
    def perplexity(self) -> Optional[float]:
        p = self.wina.get("perplexity")
        v = None if not p else p.get("perplexity")
        return None if v is None or math.isnan(v) else float(v)   # NaN: the model's numbers overflowed


def method_label(wina: dict) -> str:
    method = wina.get("method") or "dense"
    if method == "dense":
        return "dense"
    label = METHOD_LABELS.get(method, method)
    if wina.get("transform"):
        label += rotation_suffix(wina.get("rotation") or "svd")
    alloc = wina.get("allocation")
    if alloc and alloc != "uniform":
        label += f" ({alloc})"
    return label


# --- the wina block -------------------------------------------------------------------------------

def versions() -> dict[str, Optional[str]]:
    from importlib import metadata
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for dist, key in (("wina-tui", "wina"), ("torch", "torch"), ("transformers", "transformers"),
                      ("lm_eval", "lm_eval"), ("datasets", "datasets")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    if out["wina"] is None:
        try:
            from . import __version__
            out["wina"] = __version__
        except ImportError:
            pass
    return out


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info(device: Optional[str] = None) -> dict[str, Any]:
    info: dict[str, Any] = {"hostname": platform.node(), "platform": platform.platform(),
                            "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "gpu": None,
                            "device": device}
    try:
        info["cpu_count_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def _finite(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def make_wina_block(*, model_id: str, model=None, sparsifier=None, method: Optional[str] = None,
                    sparsity: Optional[float] = None, transform: Optional[bool] = None,
                    allocation: Optional[str] = None, plan: Optional[str] = None,
                    measured: Optional[float] = None, headline: Optional[dict] = None,
                    eval_info: Optional[dict] = None, perplexity: Optional[dict] = None,
                    elapsed_s: Optional[float] = None, extra: Optional[dict] = None) -> dict:
    """Build the ``wina`` block. What a sparsifier or model knows is taken from them; the keyword
    arguments fill in (or override) the rest."""
    gating = weighted = None
    nominal = sparsity
    flops = None
    if sparsifier is not None:
        method = method or sparsifier.method
        gating, weighted = sparsifier.gating, sparsifier.weighted
        if nominal is None:
            nominal = sparsifier.nominal_sparsity()
        if measured is None:
            measured = sparsifier.measured_sparsity()
        model = model if model is not None else sparsifier.model
    method = method or "dense"
    if method == "dense":
        nominal = 0.0 if nominal is None else nominal
        measured = 0.0 if measured is None else measured
    if model is not None and transform is None:
        transform = getattr(model, "_wina_transform", None) is not None
    device = None
    model_type = n_params = None
    if model is not None:
        try:
            p = next(model.parameters())
            device = str(p.device)
            n_params = sum(q.numel() for q in model.parameters())
        except (StopIteration, AttributeError):
            pass
        cfg = getattr(model, "config", None)
        model_type = getattr(cfg, "model_type", None)
        if cfg is not None:
            try:
                from .accounting import flops_per_token
                if sparsifier is not None:
                    fl = flops_per_token(cfg, sparsifier.sparsities, transform=bool(transform))
                else:
                    fl = flops_per_token(cfg, float(nominal or 0.0), transform=bool(transform))
                flops = fl.as_dict()
            except Exception:      # an architecture the accountant does not know: no FLOPs
                flops = None
    info = getattr(model, "_wina_transform", None) if model is not None else None
    block = {
        "schema": SCHEMA, "model": model_id, "model_type": model_type, "n_params": n_params,
        "method": method, "transform": bool(transform), "allocation": allocation, "plan": plan,
        "gating": gating, "weighted": weighted,
        "nominal_sparsity": _finite(nominal), "measured_sparsity": _finite(measured),
        "flops": flops, "headline": headline or {}, "perplexity": perplexity,
        "eval": eval_info or {}, "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device), "elapsed_s": elapsed_s,
    }
    if transform and info is not None and info.rotation != "svd":
        block["rotation"] = info.rotation          # absent: the seed's svd transform
    from .fidelity import record as _fidelity      # which seed corrections / protocol (docs/seed-fidelity.md)
    block["seed_fidelity"] = _fidelity(model, sparsifier, transform, plan, perplexity)
    if extra:
        block["extra"] = extra
    return block


def make_record(lm_results: Optional[dict], wina: dict) -> dict:
    rec = dict(lm_results or {})
    rec.pop("wina_eval", None)
    rec["wina"] = wina
    return rec


# --- files ------------------------------------------------------------------------------------------

def default_filename(wina: dict) -> str:
    date = re.sub(r"[^0-9T]", "", (wina.get("date") or "")[:19]) or "run"
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(wina.get("model", "model"))).name)[:40]
    method = wina.get("method") or "dense"
    s = wina.get("nominal_sparsity") or 0.0
    rot = (f"-{wina['rotation']}" if wina.get("rotation") in DATA_ROTATIONS else "-tr") if wina.get("transform") else ""
    tag = f"{method}{rot}-s{round(100 * s):02d}"
    return f"{date}_{model}_{tag}.json"


def check_writable(out: Union[str, Path], *, folder: bool = False) -> None:
    """Raise before any work if ``out`` (a file or a folder) cannot be written."""
    files.check_writable(out, folder=folder)


def _is_folder(out: Union[str, Path]) -> bool:
    """Whether ``out`` names a folder to make a results file's name up in (an existing folder, or a
    path without a suffix) rather than the file itself."""
    p = Path(out).expanduser()
    return p.is_dir() or p.suffix == ""


def locked_output(out: Union[str, Path]):
    """Hold the results file ``out`` for writing (:func:`wina.files.locked_file`), to be taken before
    the model loads: a second command told to write the same file stops at once, naming the process
    that writes it, instead of overwriting its results. A folder (a name is made up in it) is not
    held; of data-parallel processes only the one that writes the file holds it."""
    import contextlib
    from .distributed import world
    if _is_folder(out) or not world().is_main:
        return contextlib.nullcontext()
    return files.locked_file(out, f"results file {out}")


def write_run(record: dict, out: Union[str, Path]) -> Run:
    """Write one run file atomically. ``out``: a ``.json`` path, or a folder (a name is made up)."""
    if "wina" not in record:
        raise InvalidArgument("a run record needs a 'wina' block")
    p = Path(out).expanduser()
    if _is_folder(p):
        p = p / default_filename(record["wina"])
    text = json.dumps(record, indent=1, sort_keys=False, default=str, allow_nan=True)
    write_text(p, text)
    return Run(p, record)


def load_run(path: Union[str, Path]) -> Run:
    """Read one results file, strictly: every value a reader uses (:mod:`wina.compare`, the CLI, the
    TUI) is checked for its type and its range here, so a damaged file is one error naming the file
    and the key (``runs/x.json: wina.perplexity.perplexity: must be a number > 0, got 'big'``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"results file not found: {p}")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{p} is not a JSON results file: {e}") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read: {e.strerror or e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("wina"), dict):
        raise DataError(f"{p} has no 'wina' block (not a wina results file)")
    missing = [k for k in REQUIRED if k not in data["wina"]]
    if missing:
        raise DataError(f"{p}: the 'wina' block lacks {', '.join(missing)}")
    check_wina_block(data["wina"], str(p))
    return Run(p, data)


# --- the reader's rules: every key a reader uses, its type and its range ------------------------------

def _show(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (dict, list)):
        return "an object" if isinstance(v, dict) else "a list"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Checker:
    """Typed, bounded reads of one ``wina`` block; a failure names the file and the dotted key."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, what: str, v) -> None:
        raise DataError(f"{self.where}: wina.{key}: must be {what}, got {_show(v)}")

    def number(self, d: dict, key: str, name: str, *, lo=None, hi=None, lo_open=False, hi_open=False,
               optional=True, nan=False, integer=False) -> None:
        if key not in d or d[key] is None:
            if not optional:
                self.fail(name, "a number", d.get(key))
            return
        v = d[key]
        lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        hi_s = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        what = ("an integer" if integer else "a number") + (
            f" in {lo_s}, {hi_s}" if lo is not None and hi is not None else
            f" {'>' if lo_open else '>='} {lo:g}" if lo is not None else "")
        if not _is_num(v) or (integer and not isinstance(v, int)):
            self.fail(name, what, v)
        if isinstance(v, float) and math.isnan(v):
            if nan:
                return
            self.fail(name, what, v)
        if (lo is not None and (v < lo or (lo_open and v == lo))) or \
                (hi is not None and (v > hi or (hi_open and v == hi))) or (isinstance(v, float) and math.isinf(v)):
            self.fail(name, what, v)

    def kind(self, d: dict, key: str, name: str, types: tuple, what: str, *, optional=True, choices=None) -> None:
        if key not in d or d[key] is None:
            if not optional:
                self.fail(name, what, d.get(key))
            return
        v = d[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            self.fail(name, what, v)
        if choices is not None and v not in choices:
            self.fail(name, f"one of {', '.join(choices)}", v)


FRACTION = dict(lo=0.0, hi=1.0)


def check_wina_block(w: dict, where: str = "results") -> None:
    """Raise :class:`~wina.errors.DataError` naming ``where`` and the key at the first value of the
    ``wina`` block that has the wrong type or lies out of its range (module docstring)."""
    c = _Checker(where)
    s = w.get("schema")
    if isinstance(s, int) and not isinstance(s, bool) and s > SCHEMA:
        raise DataError(f"{where} was written by a newer wina (wina.schema {s}; this version reads schema "
                        f"{SCHEMA}): upgrade wina to read it")
    c.number(w, "schema", "schema", lo=1, hi=SCHEMA, integer=True, optional=False)
    c.kind(w, "model", "model", (str,), "a string", optional=False)
    c.kind(w, "method", "method", (str,), "a string", optional=False, choices=tuple(METHOD_LABELS))
    c.kind(w, "transform", "transform", (bool,), "true or false", optional=False)
    c.kind(w, "rotation", "rotation", (str,), "a string", choices=PLAN_ROTATIONS)
    for key in ("allocation", "plan", "gating", "weighted", "model_type", "date"):
        c.kind(w, key, key, (str,), "a string")
    c.number(w, "n_params", "n_params", lo=0, integer=True)
    c.number(w, "nominal_sparsity", "nominal_sparsity", **FRACTION)
    c.number(w, "measured_sparsity", "measured_sparsity", **FRACTION)
    c.number(w, "sparsity", "sparsity", **FRACTION)                  # older files
    c.number(w, "elapsed_s", "elapsed_s", lo=0)
    c.kind(w, "machine", "machine", (dict, str), "an object")
    c.kind(w, "versions", "versions", (dict,), "an object")
    c.kind(w, "flops", "flops", (dict,), "an object")
    for k, v in (w.get("flops") or {}).items():
        c.number(w["flops"], k, f"flops.{k}", lo=0)
    c.kind(w, "headline", "headline", (dict,), "an object (task: metric record)")
    for task, h in (w.get("headline") or {}).items():
        name = f"headline.{task}"
        if not isinstance(h, dict):
            c.fail(name, "a metric record (an object)", h)
        c.kind(h, "metric", f"{name}.metric", (str,), "a string")
        c.kind(h, "filter", f"{name}.filter", (str,), "a string")
        c.kind(h, "higher_is_better", f"{name}.higher_is_better", (bool,), "true or false")
        if h.get("higher_is_better", True) is not False:                  # an accuracy: a fraction
            c.number(h, "value", f"{name}.value", **FRACTION)
        else:                                                              # a perplexity
            c.number(h, "value", f"{name}.value", lo=0, nan=True)
        c.number(h, "stderr", f"{name}.stderr", lo=0, nan=True)
    c.kind(w, "perplexity", "perplexity", (dict,), "an object")
    ppl = w.get("perplexity")
    if ppl:
        c.number(ppl, "perplexity", "perplexity.perplexity", lo=0, lo_open=True, nan=True, optional=False)
        c.number(ppl, "nll", "perplexity.nll", lo=0, nan=True)
        for k in ("tokens", "windows", "context", "max_tokens"):
            c.number(ppl, k, f"perplexity.{k}", lo=0, integer=True)
        c.number(ppl, "measured_sparsity", "perplexity.measured_sparsity", **FRACTION)
        for k in ("file", "protocol"):
            c.kind(ppl, k, f"perplexity.{k}", (str,), "a string")
    c.kind(w, "eval", "eval", (dict,), "an object")
    ev = w.get("eval") or {}
    c.number(ev, "limit", "eval.limit", lo=0, lo_open=True)
    c.number(ev, "num_fewshot", "eval.num_fewshot", lo=0, integer=True)
    c.kind(ev, "data_dir", "eval.data_dir", (str,), "a string")
    c.kind(ev, "tasks", "eval.tasks", (list,), "a list of task names")
    for i, t in enumerate(ev.get("tasks") or []):
        if not isinstance(t, str):
            c.fail(f"eval.tasks[{i}]", "a task name", t)


RUN_FOLDER_FILES = ("preset.json", "steps.json")     # what wina run keeps beside its runs/ folder


def is_run_folder(folder: Union[str, Path]) -> bool:
    """Whether ``folder`` is a ``wina run`` output folder (its results are in its ``runs/``)."""
    p = Path(folder)
    return (p / "runs").is_dir() and any((p / name).is_file() for name in RUN_FOLDER_FILES)


def load_runs(paths: Iterable[Union[str, Path]]) -> list[Run]:
    """Load run files; a folder stands for every ``*.json`` in it (sorted)."""
    runs: list[Run] = []
    for path in paths:
        p = Path(path).expanduser()
        if p.is_dir():
            if is_run_folder(p):        # its preset.json and steps.json are no results
                raise DataError(f"{p} is a wina run folder: compare {p / 'runs'}")
            files = sorted(p.glob("*.json"))
            if not files:
                raise DataError(f"no results files (*.json) in {p}")
            runs.extend(load_run(f) for f in files)
        else:
            runs.append(load_run(p))
    if not runs:
        raise InvalidArgument("no results files given")
    return runs
