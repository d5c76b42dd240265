"""``wina run``: a preset's whole pipeline, resumable; and ``wina models``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..events import format_duration

from .app import app, out, err
from .common import _limit, _quiet_libraries
from .render import ProgressRenderer


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
    from ..api import load_preset
    from ..runner import check_run_limit, default_out_dir, plan_steps, run_preset
    p = load_preset(preset)
    if not dry_run:
        _quiet_libraries()
    lim = check_run_limit(p, _limit(limit))
    folder = out_dir or default_out_dir(p, lim)
    steps = plan_steps(p, folder, limit=lim)
    if dry_run:
        _print_steps(p, folder, steps, lim, device, procs)
        return
    with ProgressRenderer(steps=len(steps)) as r:
        def on_plan(all_steps, todo) -> None:        # decided once, under the run folder's lock
            r.print(f"[bold]{escape(p.name)}[/]: {escape(p.model)} → {escape(str(folder))} "
                    f"({len(all_steps)} steps, {len(all_steps) - len(todo)} already done)", soft_wrap=True)

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
                             on_step=on_step, on_event=r, renderer=r, procs=procs, on_plan=on_plan)
    if summary.runs:
        from ..api import comparison_table
        out.print(comparison_table(summary.runs, title=f"{p.name}: {p.model}"))
    if summary.seconds:
        _print_stage_times(summary)
    if summary.retired:
        out.print(f"[yellow]moved aside[/] {len(summary.retired)} output(s) the preset no longer makes "
                  f"({escape(', '.join(summary.retired[:4]))}{' …' if len(summary.retired) > 4 else ''}) "
                  f"to {escape(str(summary.retired_to))}", soft_wrap=True)
    out.print(f"[green]finished:[/] {len(summary.ran)} steps run, {len(summary.skipped)} skipped; "
              f"outputs in {escape(str(folder))}", soft_wrap=True)


def _print_stage_times(summary) -> None:
    """Wall time of each step this run executed (the model load counts in the first step that needed it)."""
    from rich.table import Table
    t = Table(title="wall time of each step run", title_justify="left")
    t.add_column("step")
    t.add_column("time", justify="right")
    for title, sec in summary.seconds.items():
        t.add_row(escape(title), format_duration(sec))
    t.add_row("[bold]total[/]", f"[bold]{format_duration(summary.total_s)}[/]")
    out.print(t)


@app.command("eval-step", hidden=True)
def eval_step_cmd(
    preset: str = typer.Argument(...),
    out_dir: Path = typer.Option(..., "--out"),
    index: int = typer.Option(..., "--index"),
    limit: Optional[float] = typer.Option(None, "--limit"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """One eval step of `wina run --gpus N` (what each data-parallel process runs)."""
    from ..api import load_preset
    from ..runner import run_eval_step
    _quiet_libraries()
    run_eval_step(load_preset(preset), out_dir, index, limit=_limit(limit),
                  device=None if device == "auto" else device)


def _step_status(s, todo) -> str:
    if not any(s is t for t in todo):
        return "[dim]done, skipped[/]"
    return f"[yellow]rerun[/] ({escape(s.why)})" if s.why is not None else "to run"


def _print_steps(p, folder: Path, steps, limit, device: str = "auto", procs: int = 1) -> None:
    from rich.table import Table
    from ..runner import describe, pending, superseded
    info = describe(p, limit, strict=False, device=device, procs=procs)   # shows what is missing, goes on
    todo = pending(steps)                        # the rule wina run follows
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
                  else str(s.output), _step_status(s, todo))
    out.print(t)
    gone = superseded(steps)
    if gone:
        out.print(f"  no longer in the preset, moved to {escape(str(folder))}/retired/ by the run: "
                  f"{escape(', '.join(gone))}", soft_wrap=True)
    out.print("dry run: nothing was executed")
