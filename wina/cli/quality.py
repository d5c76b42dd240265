"""``wina eval``, ``wina ppl`` and ``wina compare``: what sparsity costs in quality."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from .app import app, out, EPILOG_MODEL
from .common import _device, _limit, _load, _opts, _sparsity_line
from .common import O_DEVICE, O_DTYPE, O_GATING, O_METHOD, O_PLAN, O_SPARSITY, O_TRANSFORM, O_WEIGHTED
from .render import ProgressRenderer


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help=EPILOG_MODEL),
    method: Optional[str] = O_METHOD, sparsity: Optional[float] = O_SPARSITY,
    transform: Optional[bool] = O_TRANSFORM, plan: Optional[str] = O_PLAN, gating: str = O_GATING,
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
    from ..errors import InvalidArgument
    opts = _opts(method, sparsity, transform, plan, gating, weighted)
    if not tasks and ppl_text is None:
        raise InvalidArgument("nothing to evaluate: give --tasks and/or --ppl-text")
    from .. import api
    from ..api import check_writable
    from ..api import check_local, parse_tasks
    names = parse_tasks(tasks) if tasks else []
    lim = _limit(limit)
    if names:
        from ..api import resolve_data as resolve
        data_path = resolve(data_dir, names, lim).path
        if data_path is not None:
            check_local(names, data_path)
    ev = api.Evaluation(tasks=tuple(names), limit=lim, data_dir=data_dir, num_fewshot=num_fewshot,
                        batch_size=batch_size, ppl_text=ppl_text, ppl_max_tokens=ppl_max_tokens,
                        ppl_protocol=ppl_protocol).validate()      # before the model loads
    check_writable(output)
    from ..api import distributed
    if procs > 1 and not distributed.in_child():
        # every process loads and sparsifies its own copy; lm-eval shards the requests, rank 0 writes
        raise typer.Exit(distributed.relaunch(_without_procs(sys.argv[1:]), procs,
                                              cpu=not _device(device).startswith("cuda")))
    main_rank = distributed.world().is_main
    with api.locked_output(output), ProgressRenderer() as r:       # a second writer of it: refused at once
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
    transform: Optional[bool] = O_TRANSFORM, plan: Optional[str] = O_PLAN, gating: str = O_GATING,
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
    from .. import api
    from ..api import check_max_tokens, read_text
    check_max_tokens(max_tokens, protocol, context)  # the protocol, the window, the budget: before loading
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
    from ..api import comparison_markdown, comparison_table, quality_chart
    from ..api import load_runs
    loaded = load_runs(runs)
    # the chart first: a --y it cannot draw is one error line, not a table and then an error
    chart = quality_chart(loaded, y=y, width=min(100, max(60, out.width)), color=out.is_terminal) if plot else None
    if markdown:
        print(comparison_markdown(loaded))
    else:
        out.print(comparison_table(loaded))
    if chart is not None:
        if out.is_terminal:
            from rich.text import Text
            out.print(Text.from_ansi(chart))
        else:
            print(chart)
