"""One call from user options to a ready model: load, transform, sparsify or apply a plan.

The CLI and the TUI both go through :func:`prepare`, so option checking lives in one place.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from .errors import InvalidArgument
from .sparsify import GATINGS, METHODS, WEIGHTED, Sparsifier, _check_sparsity


@dataclass
class SparseOptions:
    method: str = "wina"            # dense | teal | wina
    sparsity: float = 0.5           # target (uniform with top-k; plan-allocated with a plan)
    transform: bool = False
    gating: str = "topk"            # topk | threshold (threshold needs a plan)
    weighted: str = "default"       # default (k/gate only, as the official code) | all
    plan: Optional[str] = None      # calibration plan directory
    dense_prefix: float = 0.01
    mode: Optional[str] = None      # with a plan: "layer" | "global" allocation (None: the plan's)

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
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        if self.method == "dense":
            return "dense"
        name = self.method.upper() + ("-transform" if self.transform else "")
        return f"{name} {self.sparsity:.0%}"


def prepare(model, opts: SparseOptions) -> Optional[Sparsifier]:
    """Apply the options to a loaded model in place; returns the sparsifier (None for dense)."""
    from .sparsify import sparsify
    from .transform import is_transformed, transform
    opts.validate()
    existing = getattr(model, "_wina_sparsifier", None)
    if existing is not None:                 # one sparsifier per model: the new options replace it
        existing.remove()
    if opts.plan:
        from .plan import Plan, apply_plan
        plan = Plan.load(opts.plan)
        return apply_plan(model, plan, opts.sparsity, gating=opts.gating, dense_prefix=opts.dense_prefix,
                          mode=opts.mode)
    if opts.transform and not is_transformed(model):
        transform(model)
    if opts.method == "dense":
        return None
    return sparsify(model, opts.method, opts.sparsity, gating=opts.gating, weighted=opts.weighted,
                    dense_prefix=opts.dense_prefix)
