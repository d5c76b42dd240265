"""How a result relates to the seed's (microsoft/wina @8153dbf): the record every results file carries.

Two kinds of difference (docs/seed-fidelity.md has the whole list, with the official file:line and
the measured effect of each):

- corrections, on in every run because the seed's behaviour is a defect: the exact transform (the
  seed subtracts each embedding row's mean, which is not exact for RMSNorm models), untied
  embeddings before the transform (the seed breaks models whose LM head is the embedding), top-k over
  live columns only (the seed's TEAL top-k spends places on the input columns the transform made
  zero), and measured sparsity over every position (the seed reports the nominal figure for top-k
  and counts only the sparsified positions for thresholds);
- protocol choices, which a preset selects ("seed" reproduces the official code): the greedy's error
  rule and step normalisation (recorded in the plan), the perplexity protocol, the dtype and the
  lm-eval batch size.

:func:`record` returns the block, built from what the model, sparsifier and plan say; nothing here
imports torch at module level.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def record(model=None, sparsifier=None, transform: Optional[bool] = None, plan: Optional[str] = None,
           perplexity: Optional[dict] = None) -> dict:
    """The ``seed_fidelity`` block of a results file."""
    info = getattr(model, "_wina_transform", None) if model is not None else None
    if transform is None:
        transform = info is not None
    gates = getattr(sparsifier, "gates", {}) or {}
    dead = any(getattr(g, "live", None) is not None for g in gates.values())
    topk = sparsifier is not None and getattr(sparsifier, "gating", None) == "topk"
    dtype = None
    if model is not None:
        try:
            dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        except (StopIteration, AttributeError, TypeError):
            dtype = None
    corrections = {
        "exact_transform": bool(transform),                 # on whenever the transform is
        "untied_embeddings": bool(getattr(info, "untied", False)),
        "live_column_topk": bool(topk and dead),            # only differs where columns are dead
        "measured_sparsity_all_positions": True,              # the counting rule of wina.sparsify
    }
    protocol: dict = {"dtype": dtype}
    alloc = _plan_allocation(plan)
    if alloc is not None:
        protocol["allocation_error"] = alloc.get("error_rule", "wina")
        protocol["allocation_step_norm"] = alloc.get("step_norm", "wina")
    if perplexity:
        protocol["ppl_protocol"] = perplexity.get("protocol", "windows")
    return {"corrections": corrections, "protocol": protocol, "doc": "docs/seed-fidelity.md"}


def _plan_allocation(plan: Optional[str]) -> Optional[dict]:
    if not plan:
        return None
    try:
        meta = json.loads((Path(plan) / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    alloc = meta.get("allocation") if isinstance(meta, dict) else None
    return alloc if isinstance(alloc, dict) else None
