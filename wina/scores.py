"""The gating score and its histograms: one rule for calibration, allocation, plans and the sparsifier.

A matrix's input ``x`` is scored per column: TEAL ``|x_i|``, WINA ``|x_i|·‖W[:,i]‖₂`` (the column
norm, on the projections :func:`is_weighted` names). Calibration records the scores in log-spaced
histograms (:func:`bin_scores`: 256 bins per octave from 2^-24 to 2^24, plus under/overflow), and a
plan reads thresholds back from them (:func:`hist_threshold`, :func:`matrix_threshold`, counting
dead columns as already dropped). The first ``dense_prefix`` of a sequence's positions stays dense
(:func:`prefix_start`). Default calibration and allocation sizes depend on the model's size
(:data:`SIZE_DEFAULTS`).
"""
from __future__ import annotations

from typing import Optional

import torch

from .adapters import projection_shapes

# ---- histogram binning ---------------------------------------------------------------------------
LO_EXP = -24
HI_EXP = 24
BINS_PER_OCTAVE = 256
N_BINS = (HI_EXP - LO_EXP) * BINS_PER_OCTAVE + 2      # + underflow (incl. exact zeros) + overflow


SIZE_DEFAULTS = {
    # name: (max projection params, calibration samples, seq_len, allocation samples, allocation
    # seq_len, lazy greedy, allocation base step)
    "small": (1e9, 16, 512, 4, 128, True, 0.1),
    "large": (float("inf"), 20, 2048, None, None, False, 0.025),  # None: all calibration data (the seed)
}


def size_class(config) -> str:
    n = projection_params(config)
    for name, (limit, *_rest) in SIZE_DEFAULTS.items():
        if n < limit:
            return name
    return "large"


def projection_params(config) -> int:
    shapes = projection_shapes(config)
    return config.num_hidden_layers * sum(o * i for o, i in shapes.values())


def default_sizes(config) -> dict[str, Optional[int]]:
    _, s, L, a_s, a_L, lazy, step = SIZE_DEFAULTS[size_class(config)]
    return {"samples": s, "seq_len": L, "alloc_samples": a_s, "alloc_seq_len": a_L, "alloc_lazy": lazy,
            "alloc_step": step}


def bin_scores(score: torch.Tensor) -> torch.Tensor:
    """Histogram (float64 counts, N_BINS) of non-negative scores."""
    s = score.float().flatten()
    idx = torch.floor((torch.log2(s) - LO_EXP) * BINS_PER_OCTAVE)
    idx = torch.nan_to_num(idx, nan=-1.0, neginf=-1.0, posinf=float(N_BINS)).clamp_(-1, N_BINS - 2) + 1
    return torch.bincount(idx.long(), minlength=N_BINS).double().cpu()


def hist_threshold(counts: torch.Tensor, q: float) -> float:
    """Score value below which a fraction ``q`` of the histogram's mass lies (log-linear in the bin)."""
    counts = counts.double()
    total = float(counts.sum())
    if q <= 0.0 or total == 0.0:
        return 0.0
    cum = torch.cumsum(counts, 0)
    r = min(q, 1.0) * total
    b = int(torch.searchsorted(cum, torch.tensor([r], dtype=cum.dtype)).clamp(max=N_BINS - 1))
    prev = float(cum[b - 1]) if b > 0 else 0.0
    frac = (r - prev) / float(counts[b]) if float(counts[b]) > 0 else 1.0
    frac = min(max(frac, 0.0), 1.0)
    if b == 0:
        return 0.0                                     # inside the underflow bin (zeros, tiny values)
    if b == N_BINS - 1:
        return float(2.0 ** HI_EXP)
    return float(2.0 ** (LO_EXP + (b - 1 + frac) / BINS_PER_OCTAVE))


def matrix_threshold(counts: torch.Tensor, sparsity: float, n_live: int, in_features: int) -> float:
    """Threshold that drops a fraction ``sparsity`` of a matrix's inputs, dead columns included."""
    floor = 1.0 - n_live / in_features
    if sparsity <= floor + 1e-12 or n_live == 0:
        return 0.0
    return hist_threshold(counts, (sparsity - floor) / (1.0 - floor))


def is_weighted(method: str, weighted: str, proj: str, adapter) -> bool:
    if method != "wina":
        return False
    return weighted == "all" or proj in adapter.weighted_default


def gate_scale_and_live(lin, weighted_proj: bool):
    """The same column norms / dead columns as Sparsifier.refresh_scales."""
    norms = lin.weight.detach().float().norm(dim=0)
    dead = norms == 0
    live = (~dead) if bool(dead.any()) else None
    scale = norms.to(lin.weight.dtype) if weighted_proj else None
    return scale, live


def prefix_start(n_tok: int, dense_prefix: float) -> int:
    """First gated position of a sequence of n_tok tokens (as the sparsifier's hook)."""
    if n_tok <= 1 or dense_prefix <= 0:
        return 0
    return n_tok - int((1.0 - dense_prefix) * n_tok)
