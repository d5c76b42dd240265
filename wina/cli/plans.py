"""``wina calibrate`` and ``wina allocate``: make a plan."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .app import app, out, EPILOG_MODEL
from .common import _load, _plan_info
from .common import O_DEVICE, O_DTYPE, O_TRANSFORM, O_WEIGHTED
from .render import ProgressRenderer


@app.command("calibrate")
def calibrate_cmd(
    model: str = typer.Argument(..., help=EPILOG_MODEL),
    method: str = typer.Option("wina", "--method", "-m", help="teal | wina: the gating score to record."),
    transform: Optional[bool] = O_TRANSFORM,
    rotation: str = typer.Option("svd", "--rotation", help="The transform's rotation: svd (the seed's: "
                                 "orthogonal columns of k/gate) | pca (activation PCA from the calibration "
                                 "text, one basis, no decode cost) | pca-block (a PCA basis per block, a d×d "
                                 "shortcut between blocks; wants ≥ 64k tokens of real text, --data FILE). The pca ones imply --transform."),
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
    from ..errors import InvalidArgument
    if method not in ("teal", "wina"):
        raise InvalidArgument(f"unknown calibration method {method!r}; choose teal or wina")
    from ..api import ROTATIONS
    if rotation not in ROTATIONS:
        raise InvalidArgument(f"unknown rotation {rotation!r}; choose one of {', '.join(ROTATIONS)}")
    from ..api import DATA_ROTATIONS
    if transform is False and rotation in DATA_ROTATIONS:
        raise InvalidArgument(f"--rotation {rotation} is a transform's rotation: drop --no-transform")
    transform = bool(transform) or rotation in DATA_ROTATIONS
    if samples is not None and samples < 1:
        raise InvalidArgument(f"--samples must be at least 1, got {samples}")
    if seq_len is not None and seq_len < 8:
        raise InvalidArgument(f"--seq-len must be at least 8, got {seq_len}")
    from ..api import Calibration, calibrate
    from ..api import check_writable, locked
    cal = Calibration(method=method, transform=transform, rotation=rotation, source=data, samples=samples,
                      seq_len=seq_len, weighted=weighted).validate(out_plan)    # the source too
    check_writable(out_plan, folder=True)               # before loading anything
    with locked(out_plan, f"plan {out_plan}"), ProgressRenderer() as r:    # a second writer: refused at once
        loaded = _load(model, device, dtype, r)
        plan = calibrate(loaded, out_plan, cal, on_event=r)
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
    gpus: int = typer.Option(0, "--gpus", min=0, help="GPUs the greedy spreads its layers over, one layer "
                                                      "each at a time (0: every visible GPU when the "
                                                      "model is on one). The plan does not depend on it."),
    device: str = O_DEVICE, dtype: str = O_DTYPE,
) -> None:
    """Greedy allocation of per-matrix sparsities (the seed's greedyopt.py) for a calibrated plan.

    Example: [bold]wina allocate plans/smol-wina --mode layer --step 0.025[/]
    """
    from ..errors import InvalidArgument
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
        from ..api import same_calibration
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            # the same command again (an interrupted allocation) resumes; anything else is refused
            if not (target.is_dir() and same_calibration(target, meta)):
                raise InvalidArgument(f"--out {target} exists and is not a copy of {plan} "
                                      "(not empty, not a folder, or another calibration)")
        else:
            import shutil
            shutil.copytree(plan, target, dirs_exist_ok=True)      # the calibrated plan stays as it is
    from ..api import Allocation, allocate, allocation_change, locked
    alloc = Allocation(mode=mode, max_sparsity=max_sparsity, step=step, error=error_rule, step_norm=step_norm)
    with locked(target, f"plan {target}"), ProgressRenderer() as r:      # a second writer: refused at once
        loaded = _load(spec, device, dtype, r)
        change = allocation_change(loaded, target, alloc)
        if change:
            r.print(f"[yellow]note:[/] this allocation {escape(change)}", soft_wrap=True)
        allocate(loaded, target, alloc, on_event=r, devices=_gpu_devices(gpus, loaded))
    out.print(f"[green]allocated plan written:[/] {escape(str(target))}")


def _gpu_devices(gpus: int, loaded) -> Optional[list[str]]:
    """``--gpus N``: the first N visible GPUs (None, the library's default, for 0)."""
    if gpus == 0:
        return None
    import torch
    from ..errors import InvalidArgument
    home = next(loaded.model.parameters()).device
    if home.type != "cuda":
        raise InvalidArgument(f"--gpus {gpus} needs the model on a GPU (it is on {home.type}; see --device)")
    if gpus > torch.cuda.device_count():
        raise InvalidArgument(f"--gpus {gpus}: only {torch.cuda.device_count()} GPU(s) visible")
    first = home.index or 0
    return [f"cuda:{(first + k) % torch.cuda.device_count()}" for k in range(gpus)]
