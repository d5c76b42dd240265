"""Helpers and option declarations the commands share."""
from __future__ import annotations

import math
from typing import Optional

import typer

from .app import _STATE
from .render import ProgressRenderer

# --- shared helpers ---------------------------------------------------------------------------------

def _device(device: str) -> str:
    from ..api import resolve_device
    return resolve_device(device)


def _quiet_libraries() -> None:
    """Our own bars replace the libraries' (:func:`wina.api.quiet_libraries`); torch's threads as asked."""
    from ..api import quiet_libraries
    quiet_libraries()
    _threads()


def _threads() -> None:
    n = _STATE.get("threads")
    if n:
        import torch
        torch.set_num_threads(max(1, int(n)))


def _load(spec: str, device: str, dtype: str, r: Optional[ProgressRenderer] = None):
    from .. import api
    from ..api import resolve_source
    resolve_source(spec)                     # a bad path, device or dtype fails before any slow import
    dev = _device(device)
    api.resolve_dtype(dtype, dev)
    _quiet_libraries()
    return api.load(spec, device=dev, dtype=dtype, on_event=r)


def _limit(v: Optional[float]):
    if v is None:
        return None
    return int(v) if float(v).is_integer() else float(v)


def _opts(method: Optional[str], sparsity: Optional[float], transform: bool, plan: Optional[str],
          gating: str, weighted: str = "default"):
    """Options checked before anything slow, with the library's defaults (wina.api.sparse_options)."""
    from ..api import sparse_options
    return sparse_options(method, sparsity, transform, plan, gating, weighted)


def _prepare(loaded, opts):
    from ..api import apply
    return apply(loaded, opts)


def _plan_info(plan: str) -> dict:
    from ..api import plan_info
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
O_TRANSFORM = typer.Option(None, "--transform/--no-transform", show_default=False,
                           help="Apply the column-orthogonal transform first (exact; the seed's --transform).")
O_PLAN = typer.Option(None, "--plan", "-p", help="A calibration plan (from wina calibrate / allocate).")
O_GATING = typer.Option("topk", "--gating", help="topk (exact per-token top-k) | threshold (needs --plan).")
O_WEIGHTED = typer.Option("default", "--weighted",
                          help="default (k/gate projections weight-informed, as the seed) | all.")
O_DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.")
O_DTYPE = typer.Option("auto", "--dtype", help="auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16.")
