"""The ``wina`` command line: a thin typer layer over the public API (:mod:`wina.api`).

Every command imports torch / transformers / lm-eval / textual inside its body, so ``wina --help``
answers at once. User errors (:class:`wina.errors.WinaError`, bad options) print one red line on
stderr and exit with code 2; ``--debug`` (anywhere on the line, or ``WINA_DEBUG=1``) shows the
traceback instead. Long steps report :class:`wina.events.Progress` events, drawn by one small
renderer (:class:`ProgressRenderer`) shared by every command.
"""
from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, List, Optional

import importlib

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from .errors import Cancelled, WinaError

_STATE = {"debug": False}
out = Console(highlight=False)                  # results (stdout)
err = Console(stderr=True, highlight=False)     # progress, notes and errors (stderr)

EPILOG_MODEL = ("MODEL: smollm2-135m (the embedded default), a .gguf file, a local transformers "
                "folder, or a hub id such as meta-llama/Llama-2-7b-hf.")


# --- error boundary ---------------------------------------------------------------------------------

def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _click_exc(name: str) -> tuple:
    """An exception class of click, as typer uses it: its vendored copy (typer >= 0.20) and/or click."""
    found = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
        if cls not in found:
            found.append(cls)
    return tuple(found)


_USAGE, _ABORT, _CLICK = _click_exc("UsageError"), _click_exc("Abort"), _click_exc("ClickException")


class WinaGroup(TyperGroup):
    """Runs the app in non-standalone mode and turns every error into one red line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        cut = argv.index("--") if "--" in argv else len(argv)
        if "--debug" in argv[:cut]:
            argv = [a for i, a in enumerate(argv) if not (a == "--debug" and i < cut)]
            _STATE["debug"] = True
        else:
            _STATE["debug"] = os.environ.get("WINA_DEBUG", "") not in ("", "0")
        try:
            rv = super().main(args=argv, prog_name=prog_name or "wina", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except _USAGE as e:
            if _STATE["debug"]:
                traceback.print_exc()
            hint = ""
            if e.ctx is not None and e.ctx.command_path:
                hint = f" (see {e.ctx.command_path} --help)"
            _red_line(e.format_message() + hint)
            sys.exit(2)
        except _ABORT:
            _red_line("aborted")
            sys.exit(130)
        except KeyboardInterrupt:
            _red_line("interrupted")
            sys.exit(130)
        except Cancelled as e:
            _red_line(str(e) or "cancelled")
            sys.exit(130)
        except WinaError as e:
            if _STATE["debug"]:
                traceback.print_exc()
            _red_line(str(e) or type(e).__name__)
            sys.exit(2)
        except _CLICK as e:
            _red_line(e.format_message())
            sys.exit(e.exit_code)
        except SystemExit:
            raise
        except Exception as e:  # an environment fault (one line, exit 2) or a bug (traceback with --debug)
            from .errors import user_error
            if _STATE["debug"]:
                traceback.print_exc()
            fault = user_error(e)
            if fault is not None:
                _red_line(str(fault))
                sys.exit(2)
            if not _STATE["debug"]:
                _red_line(f"internal error: {type(e).__name__}: {e} (run again with --debug for the traceback)")
            sys.exit(1)
        if rv == 130:                        # Ctrl-C (typer turns it into exit code 130)
            _red_line("interrupted")
        sys.exit(rv if isinstance(rv, int) else 0)


def _red_line(msg: str) -> None:
    err.print(f"[bold red]error:[/] [red]{escape(_one_line(msg))}[/]", soft_wrap=True)


app = typer.Typer(
    cls=WinaGroup, name="wina", add_completion=False, rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="WINA and TEAL training-free activation sparsity for LLM decoding: calibrate, allocate, "
         "evaluate, chat, benchmark, compare.\n\n"
         "Quick start: [bold]wina run smollm2-quick[/]  ·  [bold]wina ppl smollm2-135m --text FILE "
         "--method wina --sparsity 0.5[/]  ·  [bold]wina chat smollm2-135m[/]",
    epilog="Add --debug anywhere to see the traceback of an error.")


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
          threads: Optional[int] = typer.Option(None, "--threads", envvar="WINA_THREADS",
                                                help="CPU threads for torch (default: torch's choice)."),
          version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    _STATE["threads"] = threads
    if version:
        from . import __version__
        out.print(f"wina {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())
        raise typer.Exit(0)


# --- progress rendering -----------------------------------------------------------------------------

def _fmt_metric(v: Any) -> Optional[str]:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    if isinstance(v, str):
        return v if len(v) <= 40 else v[:39] + "…"
    return None          # nested structures are for the TUI


def _fmt_eta(s: Optional[float]) -> str:
    if s is None or s < 0 or math.isinf(s) or math.isnan(s):
        return ""
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"eta {h}:{m:02d}:{sec:02d}" if h else f"eta {m}:{sec:02d}"


class ProgressRenderer:
    """Draws library :class:`~wina.events.Progress` events as rich progress bars, one bar per stage.

    Use as a context manager and pass the instance as ``on_event``. ``steps`` (optional) adds an
    overall bar for multi-step commands (``wina run``). Writes to stderr, so that stdout stays clean
    for ``--json`` output.
    """

    def __init__(self, console: Optional[Console] = None, steps: Optional[int] = None,
                 transient: bool = False) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)
        self.console = console or err
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("[cyan]{task.fields[eta]}"), TextColumn("[dim]{task.fields[info]}"),
                                 console=self.console, transient=transient, refresh_per_second=8)
        self.tasks: dict[str, Any] = {}
        self.steps_task = None
        if steps is not None:
            self.steps_task = self.progress.add_task("[bold]steps", total=steps, eta="", info="")

    def __enter__(self) -> "ProgressRenderer":
        self.progress.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:             # an error: leave only its one red line on the screen
            self.progress.live.transient = True
        self.progress.stop()

    def __call__(self, ev) -> None:
        tid = self.tasks.get(ev.stage)
        if tid is None:
            tid = self.progress.add_task(ev.stage, total=ev.total or None, eta="", info="")
            self.tasks[ev.stage] = tid
        desc = ev.stage
        if ev.layer is not None and ev.n_layers:
            desc += f" [dim]layer {ev.layer + 1}/{ev.n_layers}[/]"
        parts = [escape(ev.message)] if ev.message else []
        for k, v in (ev.metrics or {}).items():
            f = _fmt_metric(v)
            if f is not None and k not in ("task",):
                parts.append(f"{k}={escape(f)}")
        self.progress.update(tid, completed=ev.done, total=ev.total or None, description=desc,
                             eta=_fmt_eta(ev.eta_s), info=" ".join(parts))

    def note(self, stage: str, message: str = "") -> None:
        """An indeterminate bar (a spinner) for work without events, e.g. loading a model."""
        tid = self.tasks.get(stage)
        if tid is None:
            self.tasks[stage] = self.progress.add_task(stage, total=None, eta="", info=escape(message))
        else:
            self.progress.update(tid, info=escape(message))

    def done(self, stage: str, message: str = "", keep: bool = True) -> None:
        """Mark a stage's bar finished (``keep=False``: remove it)."""
        tid = self.tasks.pop(stage, None)
        if tid is not None and not keep:
            self.progress.remove_task(tid)
        elif tid is not None:
            t = self.progress.tasks[[x.id for x in self.progress.tasks].index(tid)]
            total = t.total if t.total is not None else 1
            self.progress.update(tid, total=total, completed=total, eta="", info=escape(message))
            self.progress.stop_task(tid)

    def step(self, title: str, advance: bool = False) -> None:
        if self.steps_task is not None:
            self.progress.update(self.steps_task, description=f"[bold]steps[/] {escape(title)}",
                                 advance=1 if advance else 0)

    def print(self, *a, **kw) -> None:
        self.progress.console.print(*a, **kw)


# --- shared helpers ---------------------------------------------------------------------------------

def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _quiet_libraries() -> None:
    """Our own bars replace transformers' and datasets' tqdm bars and their info logs."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")            # lm-eval's and datasets' own bars
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    with _suppress():
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    with _suppress():
        import datasets
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    _threads()


def _threads() -> None:
    n = _STATE.get("threads")
    if n:
        import torch
        torch.set_num_threads(max(1, int(n)))


def _suppress():
    import contextlib
    return contextlib.suppress(Exception)


def _load(spec: str, device: str, dtype: str, r: Optional[ProgressRenderer] = None):
    from . import api
    from .models import resolve_source
    resolve_source(spec)                     # a bad path fails before any slow import
    _quiet_libraries()
    return api.load(spec, device=_device(device), dtype=dtype, on_event=r)


def _limit(v: Optional[float]):
    if v is None:
        return None
    return int(v) if float(v).is_integer() else float(v)


def _opts(method: Optional[str], sparsity: Optional[float], transform: bool, plan: Optional[str],
          gating: str, weighted: str = "default"):
    """Options checked before anything slow, with the library's defaults (wina.api.sparse_options)."""
    from .api import sparse_options
    return sparse_options(method, sparsity, transform, plan, gating, weighted)


def _prepare(loaded, opts):
    from .api import apply
    return apply(loaded, opts)


def _plan_info(plan: str) -> dict:
    from .api import plan_info
    return plan_info(plan)


def _sparsity_line(sp, opts) -> str:
    if sp is None:
        return "dense (no sparsity)"
    m = sp.measured_sparsity()
    ms = "n/a" if m is None or (isinstance(m, float) and math.isnan(m)) else f"{m:.1%}"
    return f"{opts.label}: nominal {sp.nominal_sparsity():.1%}, measured {ms}"


# Reusable option declarations (typer.Option objects are immutable descriptions: safe to share)
O_METHOD = typer.Option(None, "--method", "-m", help="dense | teal | wina (default: dense, or wina when "
                                                     "--sparsity is given, or the plan's method).")
O_SPARSITY = typer.Option(None, "--sparsity", "-s", help="Target sparsity in [0, 1), e.g. 0.5.")
O_TRANSFORM = typer.Option(False, "--transform/--no-transform",
                           help="Apply the column-orthogonal transform first (exact; the seed's --transform).")
O_PLAN = typer.Option(None, "--plan", "-p", help="A calibration plan (from wina calibrate / allocate).")
O_GATING = typer.Option("topk", "--gating", help="topk (exact per-token top-k) | threshold (needs --plan).")
O_WEIGHTED = typer.Option("default", "--weighted",
                          help="default (k/gate projections weight-informed, as the seed) | all.")
O_DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.")
O_DTYPE = typer.Option("auto", "--dtype", help="auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16.")


# --- commands ---------------------------------------------------------------------------------------

@app.command("models")
def models_cmd(as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout.")) -> None:
    """Supported architectures, the embedded default model and the presets.

    Example: [bold]wina models[/]
    """
    from rich.table import Table
    from .adapters import ADAPTERS
    from .models import EMBEDDED, EMBEDDED_PACKAGE, embedded_gguf
    from .presets import list_presets
    examples = {"llama": "Llama-2, Llama-3, SmolLM2", "mistral": "Mistral", "qwen2": "Qwen-2.5",
                "phi3": "Phi-3, Phi-4"}
    try:
        gguf = str(embedded_gguf())
    except WinaError as e:
        gguf = None
        gguf_note = str(e)
    presets = list_presets()
    if as_json:
        print(json.dumps({
            "architectures": {k: {"projections": list(a.projections), "examples": examples.get(k, "")}
                              for k, a in ADAPTERS.items()},
            "embedded": {"name": EMBEDDED, "package": EMBEDDED_PACKAGE, "gguf": gguf},
            "presets": [{"name": p.name, "model": p.model, "description": p.description,
                         "path": str(p.path)} for p in presets]}, indent=1))
        return
    t = Table(title="Supported architectures (config.model_type)", title_justify="left")
    t.add_column("model_type", style="bold")
    t.add_column("projections sparsified per layer")
    t.add_column("examples", style="dim")
    for k, a in ADAPTERS.items():
        t.add_row(k, ", ".join(a.projections), examples.get(k, ""))
    out.print(t)
    out.print(f"\n[bold]Embedded default:[/] {EMBEDDED} — SmolLM2-135M-Instruct (GGUF from the PyPI package "
              f"{EMBEDDED_PACKAGE}==0.1.2)")
    out.print(f"  {'[green]installed[/]: ' + escape(gguf) if gguf else '[yellow]' + escape(gguf_note) + '[/]'}",
              soft_wrap=True)
    pt = Table(title="\nPresets (wina run NAME)", title_justify="left")
    pt.add_column("name", style="bold")
    pt.add_column("model")
    pt.add_column("description", style="dim")
    for p in presets:
        pt.add_row(p.name, p.model, p.description)
    out.print(pt)


@app.command("calibrate")
def calibrate_cmd(
    model: str = typer.Argument(..., help=EPILOG_MODEL),
    method: str = typer.Option("wina", "--method", "-m", help="teal | wina: the gating score to record."),
    transform: bool = O_TRANSFORM,
    data: str = typer.Option("self", "--data", help="Calibration text: 'self' (model-generated, offline), "
                                                    "a .txt/.jsonl file, or a hub dataset such as tatsu-lab/alpaca."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Sequences (default: 16 for small "
                                                                  "models, 20 for large ones as the seed)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per sequence (default 512 / 2048)."),
    weighted: str = O_WEIGHTED,
    out_plan: Path = typer.Option(..., "--out", "-o", help="Plan directory to write (resumed if interrupted)."),
    device: str = O_DEVICE, dtype: str = O_DTYPE,
) -> None:
    """Record the gating-score histograms of every projection, layer by layer, into a plan.

    Example: [bold]wina calibrate smollm2-135m --method wina --transform --out plans/smol-wina[/]
    """
    from .errors import InvalidArgument
    if method not in ("teal", "wina"):
        raise InvalidArgument(f"unknown calibration method {method!r}; choose teal or wina")
    if samples is not None and samples < 1:
        raise InvalidArgument(f"--samples must be at least 1, got {samples}")
    if seq_len is not None and seq_len < 8:
        raise InvalidArgument(f"--seq-len must be at least 8, got {seq_len}")
    from .api import Calibration, calibrate
    from .results import check_writable
    check_writable(out_plan, folder=True)               # before loading anything
    with ProgressRenderer() as r:
        loaded = _load(model, device, dtype, r)
        plan = calibrate(loaded, out_plan, Calibration(method=method, transform=transform, source=data,
                                                       samples=samples, seq_len=seq_len, weighted=weighted),
                         on_event=r)
    n = getattr(plan, "n_calibrated", None)
    out.print(f"[green]plan written:[/] {escape(str(out_plan))}" + (f" ({n} layers calibrated)" if n else ""))
    out.print(f"next: wina allocate {escape(str(out_plan))}   or   "
              f"wina eval {escape(model)} --plan {escape(str(out_plan))} --sparsity 0.5 --tasks piqa")


@app.command("allocate")
def allocate_cmd(
    plan: Path = typer.Argument(..., help="A calibrated plan directory (from wina calibrate)."),
    max_sparsity: float = typer.Option(0.9, "--max-sparsity", help="Highest sparsity allocated to any matrix."),
    step: Optional[float] = typer.Option(None, "--step", help="Greedy base step (the seed's base_step_size; "
                                                              "default 0.025 for models >= 1 B, 0.1 below)."),
    mode: str = typer.Option("layer", "--mode", help="layer (greedy within each layer, as the seed) | "
                                                     "global (greedy across layers)."),
    error_rule: str = typer.Option("wina", "--error-rule", help="wina (L2 over channels per position) | seed "
                                                               "(the official: L2 over positions per channel)."),
    step_norm: str = typer.Option("wina", "--step-norm", help="wina (steps relative to q_proj/qkv_proj) | "
                                                             "seed (to o_proj, as the official; differs on Phi-4)."),
    out_plan: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the allocated plan here "
                                                                     "(default: update PLAN in place)."),
    model: Optional[str] = typer.Option(None, "--model", help="Load this model instead of the plan's own."),
    device: str = O_DEVICE, dtype: str = O_DTYPE,
) -> None:
    """Greedy allocation of per-matrix sparsities (the seed's greedyopt.py) for a calibrated plan.

    Example: [bold]wina allocate plans/smol-wina --mode layer --step 0.025[/]
    """
    from .errors import InvalidArgument
    if mode not in ("layer", "global"):
        raise InvalidArgument(f"unknown allocation mode {mode!r}; choose layer or global")
    for name, v in (("--max-sparsity", max_sparsity), ("--step", step)):
        if v is not None and not (0.0 < v < 1.0):
            raise InvalidArgument(f"{name} must be in (0, 1), got {v}")
    meta = _plan_info(str(plan))
    spec = model or meta.get("model_id") or meta.get("model")
    if not spec:
        raise InvalidArgument(f"{plan} does not name its model; give --model")
    target = Path(out_plan) if out_plan is not None else Path(plan)
    if target.resolve() != Path(plan).resolve():
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise InvalidArgument(f"--out {target} exists and is not empty (or not a folder)")
        import shutil
        shutil.copytree(plan, target, dirs_exist_ok=True)      # the calibrated plan stays as it is
    from .api import Allocation, allocate
    with ProgressRenderer() as r:
        loaded = _load(spec, device, dtype, r)
        allocate(loaded, target, Allocation(mode=mode, max_sparsity=max_sparsity, step=step,
                                            error=error_rule, step_norm=step_norm), on_event=r)
    out.print(f"[green]allocated plan written:[/] {escape(str(target))}")


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help=EPILOG_MODEL),
    method: Optional[str] = O_METHOD, sparsity: Optional[float] = O_SPARSITY,
    transform: bool = O_TRANSFORM, plan: Optional[str] = O_PLAN, gating: str = O_GATING,
    weighted: str = O_WEIGHTED,
    tasks: Optional[str] = typer.Option(None, "--tasks", "-t", help="Comma-separated lm-eval tasks, e.g. "
                                                                    "piqa,winogrande,hellaswag,arc_challenge,mmlu,gsm8k."),
    limit: Optional[float] = typer.Option(None, "--limit", "-l", help="Documents per task (or a fraction < 1)."),
    data_dir: str = typer.Option("auto", "--data-dir", help="Where the tasks come from: a folder laid out like "
                                 "../shared/data, 'hub', or 'auto' ($WINA_DATA, ../shared/data, the shipped "
                                 "subsets, then the hub)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Override every task's few-shot count."),
    batch_size: int = typer.Option(8, "--batch-size", help="lm-eval batch size."),
    ppl_text: Optional[Path] = typer.Option(None, "--ppl-text", help="Also the fast perplexity on this text file."),
    ppl_max_tokens: Optional[int] = typer.Option(None, "--ppl-max-tokens", help="Cut the perplexity text to N tokens."),
    ppl_protocol: str = typer.Option("windows", "--ppl-protocol", help="windows | seed (the official ppl "
                                                                        "script's protocol, see wina ppl --help)."),
    output: Path = typer.Option(Path("runs"), "--output", "-o", help="Results file (.json) or folder."),
    device: str = O_DEVICE, dtype: str = O_DTYPE,
    procs: int = typer.Option(1, "--procs", "--gpus", min=1,
                              help="Data-parallel processes through accelerate launch (one per GPU "
                                   "with --device cuda; CPU processes otherwise)."),
) -> None:
    """Evaluate a (sparsified) model with lm-evaluation-harness and write one results file.

    Example: [bold]wina eval smollm2-135m --method wina --sparsity 0.5 --tasks piqa,arc_easy --limit 100
    --data-dir ../shared/data --output runs/smol-wina50.json[/]
    """
    from .errors import InvalidArgument
    opts = _opts(method, sparsity, transform, plan, gating, weighted)
    if not tasks and ppl_text is None:
        raise InvalidArgument("nothing to evaluate: give --tasks and/or --ppl-text")
    from . import api
    from .results import check_writable
    from .tasks import check_local, parse_tasks
    names = parse_tasks(tasks) if tasks else []
    lim = _limit(limit)
    if names:
        from .data import resolve
        data_path = resolve(data_dir, names, lim).path
        if data_path is not None:
            check_local(names, data_path)
    if ppl_text is not None and not ppl_text.is_file():
        from .errors import DataError
        raise DataError(f"text file not found: {ppl_text}")
    check_writable(output)
    from . import distributed
    if procs > 1 and not distributed.in_child():
        # every process loads and sparsifies its own copy; lm-eval shards the requests, rank 0 writes
        raise typer.Exit(distributed.relaunch(_without_procs(sys.argv[1:]), procs,
                                              cpu=not _device(device).startswith("cuda")))
    main_rank = distributed.world().is_main
    ev = api.Evaluation(tasks=tuple(names), limit=lim, data_dir=data_dir, num_fewshot=num_fewshot,
                        batch_size=batch_size, ppl_text=ppl_text, ppl_max_tokens=ppl_max_tokens,
                        ppl_protocol=ppl_protocol)
    with ProgressRenderer() as r:
        loaded = _load(model, distributed.device_for_rank(_device(device)), dtype, r if main_rank else None)
        run = api.evaluate(loaded, opts, ev, out=output, on_event=r if main_rank else None)
    if run is not None:
        _print_run(run)


def _without_procs(argv: list) -> list:
    """The command line minus --procs/--gpus (the children must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--procs", "--gpus"):
            skip = True
        elif not a.startswith(("--procs=", "--gpus=")):
            out.append(a)
    return out


def _print_run(run) -> None:
    from rich.table import Table
    w = run.wina
    t = Table(title=f"{w.get('model')} — {run.label}"
                    + ("" if run.method == "dense" else f" {run.sparsity:.0%}"), title_justify="left")
    t.add_column("task")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("± stderr", justify="right", style="dim")
    for task, h in (w.get("headline") or {}).items():
        v, se = h.get("value"), h.get("stderr")
        pct = h.get("higher_is_better", True)
        t.add_row(task, h.get("metric", ""), "—" if v is None else (f"{100 * v:.2f}" if pct else f"{v:.3f}"),
                  "" if se is None else (f"{100 * se:.2f}" if pct else f"{se:.3f}"))
    ppl = w.get("perplexity")
    if ppl:
        t.add_row("perplexity", Path(str(ppl.get("file", ""))).name, f"{ppl['perplexity']:.3f}",
                  f"{ppl.get('tokens')} tokens")
    out.print(t)
    m = w.get("measured_sparsity")
    out.print(f"measured sparsity: {'n/a' if m is None else f'{m:.1%}'}"
              f"  (nominal {w.get('nominal_sparsity') or 0:.1%})")
    if run.path is not None:
        out.print(f"[green]results written:[/] {escape(str(run.path))}", soft_wrap=True)


@app.command("ppl")
def ppl_cmd(
    model: str = typer.Argument(..., help=EPILOG_MODEL),
    text: Path = typer.Option(..., "--text", help="A UTF-8 text file, e.g. ../shared/data/wikitext2/wiki.test.raw."),
    method: Optional[str] = O_METHOD, sparsity: Optional[float] = O_SPARSITY,
    transform: bool = O_TRANSFORM, plan: Optional[str] = O_PLAN, gating: str = O_GATING,
    weighted: str = O_WEIGHTED,
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Use only the first N tokens."),
    context: int = typer.Option(512, "--context", help="Window length in tokens (non-overlapping windows)."),
    protocol: str = typer.Option("windows", "--protocol", help="windows (non-overlapping windows of --context) | "
                                                               "seed (the official ppl script: 1000 rows shuffled "
                                                               "with seed 42, 2048 + 512 sliding windows)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    device: str = O_DEVICE, dtype: str = O_DTYPE,
) -> None:
    """Perplexity of a text with the model dense or sparsified, and the sparsity actually measured.

    Example: [bold]wina ppl smollm2-135m --method wina --sparsity 0.5 --text
    ../shared/data/wikitext2/wiki.test.raw --max-tokens 8192[/]
    """
    opts = _opts(method, sparsity, transform, plan, gating, weighted)
    from . import api
    from .perplexity import check_max_tokens, read_text
    check_max_tokens(max_tokens)
    read_text(text)                                  # a missing or non-UTF-8 file: before loading
    with ProgressRenderer(transient=as_json) as r:
        loaded = _load(model, device, dtype, r)
        res, _ = api.perplexity(loaded, opts, text, context=context, max_tokens=max_tokens,
                                protocol=protocol, on_event=r)
        sp = getattr(loaded.model, "_wina_sparsifier", None)
    measured = 0.0 if sp is None else sp.measured_sparsity()
    if measured is not None and isinstance(measured, float) and math.isnan(measured):
        measured = None
    nominal = 0.0 if sp is None else sp.nominal_sparsity()
    if as_json:
        print(json.dumps({"model": model, "method": opts.method, "transform": opts.transform,
                          "plan": plan, "gating": opts.gating if sp is not None else None,
                          "sparsity": opts.sparsity if opts.method != "dense" else 0.0,
                          "perplexity": res.perplexity, "nll": res.nll, "tokens": res.tokens,
                          "windows": res.windows, "context": res.context, "protocol": res.protocol,
                          "measured_sparsity": measured, "nominal_sparsity": nominal,
                          "text": str(text)}))
        return
    out.print(f"perplexity [bold]{res.perplexity:.3f}[/] over {res.tokens} predicted tokens "
              f"({res.windows} windows of {res.context})")
    out.print(f"sparsity: {_sparsity_line(sp, opts)}")


@app.command("compare")
def compare_cmd(
    runs: List[Path] = typer.Argument(..., help="Results files (wina eval / wina run), or folders of them."),
    plot: bool = typer.Option(False, "--plot", help="Also draw quality vs sparsity (plotext)."),
    y: str = typer.Option("avg", "--y", help="What --plot draws: avg, a task name, or ppl."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the table as GitHub markdown."),
) -> None:
    """The paper-shaped table (method × sparsity, tasks, average) from results files.

    Example: [bold]wina compare runs/smollm2-quick/runs --plot[/]
    """
    from .compare import comparison_markdown, comparison_table, quality_chart
    from .results import load_runs
    loaded = load_runs(runs)
    if markdown:
        print(comparison_markdown(loaded))
    else:
        out.print(comparison_table(loaded))
    if plot:
        chart = quality_chart(loaded, y=y, width=min(100, max(60, out.width)), color=out.is_terminal)
        if out.is_terminal:
            from rich.text import Text
            out.print(Text.from_ansi(chart))
        else:
            print(chart)


@app.command("chat")
def chat_cmd(
    model: str = typer.Argument("smollm2-135m", help=EPILOG_MODEL),
    method: Optional[str] = O_METHOD, sparsity: Optional[float] = O_SPARSITY,
    transform: bool = O_TRANSFORM, plan: Optional[str] = O_PLAN, gating: str = O_GATING,
    weighted: str = O_WEIGHTED,
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Answer this one message and exit."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest reply in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling (with --temperature > 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed."),
    device: str = O_DEVICE, dtype: str = O_DTYPE,
) -> None:
    """A plain streaming chat in the terminal (works over ssh). /reset clears, /exit or Ctrl-D quits.

    Example: [bold]wina chat smollm2-135m --method wina --sparsity 0.5[/]
    """
    from .errors import InvalidArgument
    opts = _opts(method, sparsity, transform, plan, gating, weighted)
    if max_new_tokens < 1:
        raise InvalidArgument(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not (0 < top_p <= 1):
        raise InvalidArgument("--temperature must be >= 0 and --top-p in (0, 1]")
    with ProgressRenderer(transient=True) as r:
        loaded = _load(model, device, dtype, r)
        sp = _prepare(loaded, opts)
    from .chat import ChatSession
    from .events import CancelToken
    # one copy of the weights on the GPU: the engine's (nothing else uses the model here)
    session = ChatSession(loaded.model, loaded.tokenizer, sparse=True, system=system,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          one_copy=True)
    if session.backend == "engine":
        with ProgressRenderer(transient=True) as r:      # compile + capture now, not in the first reply
            session.warm_up(on_event=r)
    err.print(f"[dim]{escape(model)} — {escape(_sparsity_line(sp, opts))} — {session.backend}. "
              f"/reset clears the conversation, "
              f"/exit or Ctrl-D quits.[/]", soft_wrap=True)

    def turn(user: str) -> None:
        cancel = CancelToken()

        def emit(delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()

        try:
            g = session.send(user, on_text=emit, cancel=cancel)
        except KeyboardInterrupt:
            cancel.cancel()
            sys.stdout.write("\n")
            err.print("[dim](interrupted)[/]")
            return
        sys.stdout.write("\n")
        sys.stdout.flush()
        ms = f", measured sparsity {g.sparsity:.1%}" if (g.sparse and g.sparsity is not None) else ""
        dropped = ", older turns dropped" if g.truncated else ""
        err.print(f"[dim][{g.tokens} tokens, first token {g.ttft_s * 1000:.0f} ms, decode "
                  f"{g.decode_tokens_per_s:.1f} tokens/s, stop: {g.stopped}{ms}, context "
                  f"{g.context_tokens + g.tokens} tokens ({g.prefill_tokens} prefilled){dropped}][/]",
                  soft_wrap=True)

    if prompt is not None:
        turn(prompt)
        return
    while True:
        sys.stdout.write("you> ")
        sys.stdout.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            return
        if not line:                          # EOF (Ctrl-D)
            sys.stdout.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit", "/q"):
            return
        if line == "/reset":
            session.reset()
            err.print("[dim](conversation cleared)[/]")
            continue
        sys.stdout.write("bot> ")
        sys.stdout.flush()
        turn(line)


@app.command("run")
def run_cmd(
    preset: str = typer.Argument(..., help="A preset name (wina models lists them) or a .toml file."),
    limit: Optional[float] = typer.Option(None, "--limit", "-l", help="Documents per task, overriding the "
                                                                      "preset (outputs go to a -limitN folder)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default runs/<preset>)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the preset, print the steps, exit."),
    device: str = typer.Option("auto", "--device", help="Override the preset's device (cpu | cuda | cuda:N)."),
    procs: int = typer.Option(1, "--gpus", "--procs", min=1,
                              help="Evaluate each step data-parallel in N processes through accelerate "
                                   "launch (one per GPU with cuda; CPU processes otherwise)."),
) -> None:
    """The whole pipeline of a preset: calibrate → allocate → evaluate each sparsity → compare.

    Steps whose outputs exist are skipped, so an interrupted run resumes where it stopped. With
    --gpus N every evaluation runs in N processes (logs in <output>/logs/).

    Example: [bold]wina run smollm2-quick[/]   ·   [bold]wina run llama2-7b --dry-run[/]
    """
    from .presets import load_preset
    from .runner import default_out_dir, plan_steps, run_preset
    p = load_preset(preset)
    if not dry_run:
        _quiet_libraries()
    lim = _limit(limit)
    if lim is not None:
        from .evaluate import _check_limit
        _check_limit(lim)
    folder = out_dir or default_out_dir(p, lim)
    steps = plan_steps(p, folder, limit=lim)
    if dry_run:
        _print_steps(p, folder, steps, lim)
        return
    todo = [s for s in steps if not s.done()]
    err.print(f"[bold]{escape(p.name)}[/]: {escape(p.model)} → {escape(str(folder))} "
              f"({len(steps)} steps, {len(steps) - len(todo)} already done)", soft_wrap=True)
    with ProgressRenderer(steps=len(steps)) as r:
        def on_step(step, status: str) -> None:
            if status == "rerun":
                r.print(f"[yellow]rerun[/] {escape(step.title)}: {escape(step.why or '')}", soft_wrap=True)
            elif status == "start":
                r.step(step.title)
                for stage in list(r.tasks):
                    r.done(stage, keep=False)
            elif status in ("skip", "done"):
                mark = "[dim]skip[/]" if status == "skip" else "[green]done[/]"
                r.print(f"{mark} {escape(step.title)}", soft_wrap=True)
                r.step(step.title, advance=True)

        summary = run_preset(p, folder, limit=lim, device=None if device == "auto" else device,
                             on_step=on_step, on_event=r, renderer=r, procs=procs)
    if summary.runs:
        from .compare import comparison_table
        out.print(comparison_table(summary.runs, title=f"{p.name}: {p.model}"))
    if summary.seconds:
        _print_stage_times(summary)
    out.print(f"[green]finished:[/] {len(summary.ran)} steps run, {len(summary.skipped)} skipped; "
              f"outputs in {escape(str(folder))}", soft_wrap=True)


def _print_stage_times(summary) -> None:
    """Wall time of each step this run executed (the model load counts in the first step that needed it)."""
    from rich.table import Table
    t = Table(title="wall time of each step run", title_justify="left")
    t.add_column("step")
    t.add_column("time", justify="right")
    for title, sec in summary.seconds.items():
        t.add_row(escape(title), _fmt_seconds(sec))
    t.add_row("[bold]total[/]", f"[bold]{_fmt_seconds(summary.total_s)}[/]")
    out.print(t)


def _fmt_seconds(s: float) -> str:
    m, sec = divmod(int(round(s)), 60)
    return f"{m}:{sec:02d}" if m else f"{s:.1f} s"


@app.command("eval-step", hidden=True)
def eval_step_cmd(
    preset: str = typer.Argument(...),
    out_dir: Path = typer.Option(..., "--out"),
    index: int = typer.Option(..., "--index"),
    limit: Optional[float] = typer.Option(None, "--limit"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """One eval step of `wina run --gpus N` (what each data-parallel process runs)."""
    from .presets import load_preset
    from .runner import run_eval_step
    _quiet_libraries()
    run_eval_step(load_preset(preset), out_dir, index, limit=_limit(limit),
                  device=None if device == "auto" else device)


def _step_status(s) -> str:
    why = s.stale()
    if why is not None:
        return f"[yellow]rerun[/] ({escape(why)})"
    return "[dim]done, skipped[/]" if s.done() else "to run"


def _print_steps(p, folder: Path, steps, limit) -> None:
    from rich.table import Table
    from .runner import describe
    info = describe(p, limit)
    out.print(f"[bold]preset[/] {escape(p.name)} ({escape(str(p.path))})", soft_wrap=True)
    for k, v in info.items():
        out.print(f"  {k}: {escape(str(v))}", soft_wrap=True)
    out.print(f"  output: {escape(str(folder))}", soft_wrap=True)
    t = Table(title=f"{len(steps)} steps", title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("step")
    t.add_column("output")
    t.add_column("status")
    for i, s in enumerate(steps, 1):
        t.add_row(str(i), s.title, str(s.output.relative_to(folder)) if s.output.is_relative_to(folder)
                  else str(s.output), _step_status(s))
    out.print(t)
    out.print("dry run: nothing was executed")


@app.command("bench")
def bench_cmd(
    models: Optional[List[str]] = typer.Argument(None, help="Shape names with random weights (llama-2-7b, "
                                                            "llama-3-8b, qwen-2.5-7b, phi-4, tiny-llama) and/or "
                                                            "model specs. Default: llama-2-7b."),
    sparsities: str = typer.Option("0.25,0.40,0.50,0.65", "--sparsities", help="Comma-separated targets in (0, 1)."),
    method: str = typer.Option("wina", "--method", "-m", help="wina | teal: the score the sparse engine gates by."),
    prompt_len: int = typer.Option(128, "--prompt-len", help="Prompt tokens."),
    new_tokens: int = typer.Option(256, "--new-tokens", help="Decoded tokens per measurement."),
    hf_new_tokens: Optional[int] = typer.Option(None, "--hf-new-tokens", help="Tokens for the transformers "
                                                                              "baseline (default --new-tokens; 0 skips it)."),
    device: str = typer.Option("cuda", "--device", help="cuda | cuda:N | cpu (slow, for smoke runs)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 | float16 | float32."),
    kernels: bool = typer.Option(True, "--kernels/--no-kernels", help="Also the per-kernel bandwidth table (CUDA)."),
    kernel_layers: int = typer.Option(8, "--kernel-layers", help="Layers the kernel table covers."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Shrink shape-only models to N layers."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights and prompt."),
    fuse_mlp: Optional[int] = typer.Option(None, "--fuse-mlp", min=0, max=2,
                                           help="Sparse decode (experimental): 1 = gate/up compacts down's input, "
                                                "2 = also one launch for both; 0 = off (default: the "
                                                "WINA_FUSE_MLP environment variable, else 0). Measured on an "
                                                "H200: no gain (docs/gpu-notes.md run 12)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    chat: bool = typer.Option(False, "--chat", help="Measure the user's path instead: a scripted multi-turn "
                                                   "chat through the chat session, dense and sparse side by "
                                                   "side, per turn TTFT and decode tokens/s against the engine "
                                                   "alone at the same context; peak GPU memory."),
    plan: Optional[str] = typer.Option(None, "--plan", "-p", help="--chat: threshold gating from this plan "
                                                                  "(default: thresholds calibrated on the script)."),
    chat_sparsity: float = typer.Option(0.5, "--sparsity", "-s", help="--chat: the target sparsity."),
    turns: int = typer.Option(5, "--turns", help="--chat: user turns (the context grows past 2k tokens)."),
    user_tokens: int = typer.Option(500, "--user-tokens", help="--chat: tokens of each user message after "
                                                               "the first (~110)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="--chat with a shape name: the tokenizer "
                                                                      "folder to use (the vocabulary grows to fit)."),
) -> None:
    """Decode speed (batch 1): transformers generate vs our dense engine vs the sparse engine, next to the
    memory floor; per-kernel bandwidth on CUDA. With --chat: the chat as users run it.

    Example: [bold]wina bench llama-2-7b llama-3-8b --sparsities 0.25,0.5 --json bench.json[/]   ·
    [bold]wina bench --chat ./my-model --new-tokens 200[/]
    """
    from .errors import InvalidArgument
    if chat:
        _bench_chat((models or ["llama-2-7b"]), plan, chat_sparsity, method, turns, new_tokens, user_tokens,
                    tokenizer, device, dtype, layers, seed, json_out)
        return
    try:
        sps = [float(x) for x in sparsities.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgument(f"--sparsities must be comma-separated numbers, got {sparsities!r}") from None
    if not sps:
        raise InvalidArgument("--sparsities is empty")
    for name, v in (("--prompt-len", prompt_len), ("--new-tokens", new_tokens)):
        if v < 1:
            raise InvalidArgument(f"{name} must be at least 1, got {v}")
    if json_out is not None:
        from .results import check_writable
        check_writable(json_out)
    _quiet_libraries()
    from .bench import run_bench
    with ProgressRenderer() as r:
        res = run_bench(tuple(models or ("llama-2-7b",)), sparsities=sps, method=method, prompt_len=prompt_len,
                        new_tokens=new_tokens, hf_new_tokens=hf_new_tokens, device=device, dtype=dtype,
                        kernels=kernels, kernel_layers=kernel_layers, num_hidden_layers=layers, seed=seed,
                        fuse_mlp=fuse_mlp, on_event=r, json_path=str(json_out) if json_out else None)
    from .bench import print_bench
    print_bench(res, out)
    failed = [m for m in res.get("models", []) if "error" in m]
    for m in failed:
        err.print(f"[red]{escape(m['model'])}: {escape(m['error'])}[/]", soft_wrap=True)
    if json_out is not None:
        out.print(f"[green]results written:[/] {escape(str(json_out))}", soft_wrap=True)
    if failed and len(failed) == len(res.get("models", [])):
        raise WinaError(f"every benchmark failed; first: {failed[0]['model']}: {failed[0]['error']}")


def _bench_chat(models, plan, sparsity, method, turns, new_tokens, user_tokens, tokenizer, device, dtype,
                layers, seed, json_out) -> None:
    """wina bench --chat: load (or build) the model, attach the gating, run wina.bench.run_chat_bench."""
    from .errors import InvalidArgument
    if len(models) != 1:
        raise InvalidArgument("--chat measures one model at a time")
    if turns < 1 or new_tokens < 2:
        raise InvalidArgument("--turns must be >= 1 and --new-tokens >= 2")
    if not 0.0 < sparsity < 1.0:
        raise InvalidArgument(f"--sparsity must be in (0, 1), got {sparsity}")
    if json_out is not None:
        from .results import check_writable
        check_writable(json_out)
    spec = models[0]
    _quiet_libraries()
    from .bench import SHAPES, print_chat_bench, random_model, run_chat_bench, shape_config
    with ProgressRenderer() as r:
        if spec in SHAPES:
            if tokenizer is None:
                raise InvalidArgument(f"{spec} is a shape with random weights: --chat needs --tokenizer DIR")
            from transformers import AutoTokenizer
            from .models import resolve_dtype
            tok = AutoTokenizer.from_pretrained(tokenizer)
            cfg = shape_config(spec, layers)
            cfg.vocab_size = max(cfg.vocab_size, len(tok))
            model = random_model(cfg, _device(device), resolve_dtype(dtype, _device(device)), seed)
        else:
            loaded = _load(spec, device, dtype, r)
            model, tok = loaded.model, loaded.tokenizer
        if plan is not None:
            _prepare(type("L", (), {"model": model})(), _opts(None, sparsity, False, plan, "threshold"))
        res = run_chat_bench(model, tok, turns=turns, new_tokens=new_tokens, user_tokens=user_tokens,
                             sparsity=sparsity, method=method, seed=seed, label=spec, on_event=r,
                             json_path=str(json_out) if json_out else None)
    print_chat_bench(res, out)
    if json_out is not None:
        out.print(f"[green]results written:[/] {escape(str(json_out))}", soft_wrap=True)


@app.command("tui", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                      "help_option_names": []})
def tui_cmd(ctx: typer.Context) -> None:
    """The Textual app: set up a model, calibrate, chat side by side, evaluate. Same as [bold]wina-tui[/];
    every option is passed on to it (wina tui --help lists them).

    Example: [bold]wina tui --model smollm2-135m[/]
    """
    args = list(ctx.args)
    from importlib.metadata import entry_points
    found = [ep for ep in entry_points(group="console_scripts") if ep.name == "wina-tui"]
    if not found:
        raise WinaError("the TUI is not installed (no wina-tui entry point); pip install -e . again")
    try:
        entry = found[0].load()                  # the app is a separate package: found, not imported
    except ImportError as e:
        raise WinaError(f"the TUI is not available: {e}") from None
    try:
        rv = entry(list(args or []))
    except SystemExit as e:             # argparse's --help / a bad option
        rv = e.code
    if isinstance(rv, int) and rv:
        raise typer.Exit(rv)


def main() -> None:
    """Console-script entry point (``wina``)."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
