"""Live histogram of the gating scores of one matrix, with the threshold of the target marked.

Calibration collects, for every projection of a layer, a histogram of its gating score (TEAL
``|x_i|``, WINA ``|x_i|·‖W[:,i]‖₂``) over log-spaced bins (:mod:`wina.calibrate`: 256 bins per
octave from 2⁻²⁴ to 2²⁴, plus an underflow bin for zeros). This widget rebins the occupied range
to the chart's width, plots the share of inputs against log10 of the score, and marks the
threshold that drops the target fraction of the matrix's inputs (dead columns count as dropped):
the part left of it is what the gate skips.
"""
from __future__ import annotations

import math
from typing import Optional, Protocol

from .plot_view import PlotView


class MatrixScores(Protocol):
    """One matrix's histogram, as :func:`wina.api.plan_histogram` gives it (``LayerHistogram``)."""
    counts: object          # torch tensor [N_BINS] (float64)
    n_live: int
    in_features: int


def _bin_edges_log2(b: int) -> float:
    """Lower edge (log2 of the score) of histogram bin ``b`` (1 .. N_BINS-2)."""
    from wina.api import BINS_PER_OCTAVE, LO_EXP
    return LO_EXP + (b - 1) / BINS_PER_OCTAVE


def rebin(counts, columns: int, trim: float = 0.001) -> tuple[list[float], list[float], float]:
    """(log10 score of each column's centre, share of the scores in it in %, share in the underflow
    bin in %) over the occupied range, tails of ``trim`` cut on each side."""
    import torch
    from wina.api import BINS_PER_OCTAVE
    c = torch.as_tensor(counts, dtype=torch.float64)
    total = float(c.sum())
    if total <= 0:
        return [], [], 0.0
    inner = c[1:-1]
    cum = torch.cumsum(inner, 0)
    inner_total = float(cum[-1]) if len(cum) else 0.0
    under = 100.0 * float(c[0]) / total
    if inner_total <= 0:
        return [], [], under
    lo = int(torch.searchsorted(cum, torch.tensor([trim * inner_total], dtype=cum.dtype)))
    hi = int(torch.searchsorted(cum, torch.tensor([(1 - trim) * inner_total], dtype=cum.dtype)))
    hi = max(hi, lo + 1)
    n = hi - lo + 1
    columns = max(4, min(columns, n))
    per = n / columns
    xs, ys = [], []
    for k in range(columns):
        a = lo + int(round(k * per))
        b = lo + int(round((k + 1) * per))
        b = max(b, a + 1)
        share = float(inner[a:b].sum()) / total * 100.0
        mid_log2 = _bin_edges_log2(1 + a) + (b - a) / (2 * BINS_PER_OCTAVE)
        xs.append(mid_log2 * math.log10(2))
        ys.append(share)
    return xs, ys, under


class ScoreHistogram(PlotView):
    """Holds the histograms of every calibrated layer; shows one (layer, matrix) at a time.

    :meth:`set_layer` adds a layer's matrices (and shows it, following calibration);
    :meth:`step_layer` / :meth:`next_matrix` browse; :attr:`target` is the sparsity whose
    threshold is marked."""

    def __init__(self, **kw) -> None:
        super().__init__(None, empty="the score histogram of each matrix appears here as calibration "
                                     "finishes its layers", **kw)
        self.hists: dict[int, dict[str, MatrixScores]] = {}
        self.n_layers: Optional[int] = None
        self.cur_layer: Optional[int] = None
        self.cur_matrix: Optional[str] = None
        self.target = 0.5
        self.updates = 0
        self._draw = self._plot

    def reset(self, target: Optional[float] = None) -> None:
        self.hists.clear()
        self.cur_layer = None
        self.n_layers = None
        if target is not None:
            self.target = target
        self.replot()

    def set_layer(self, layer: int, n_layers: Optional[int], mats: dict[str, MatrixScores],
                  follow: bool = True, redraw: bool = True) -> None:
        self.hists[layer] = dict(mats)
        self.n_layers = n_layers or self.n_layers
        if follow or self.cur_layer is None:
            self.cur_layer = layer
        if self.cur_matrix not in mats:
            self.cur_matrix = next(iter(mats), None)
        self.updates += 1
        if redraw:
            self.replot()

    def step_layer(self, step: int) -> None:
        if not self.hists:
            return
        keys = sorted(self.hists)
        i = keys.index(self.cur_layer) if self.cur_layer in keys else len(keys) - 1
        self.cur_layer = keys[(i + step) % len(keys)]
        self.replot()

    def next_matrix(self) -> None:
        mats = list(self.hists.get(self.cur_layer, {}))
        if not mats:
            return
        i = mats.index(self.cur_matrix) if self.cur_matrix in mats else -1
        self.cur_matrix = mats[(i + 1) % len(mats)]
        self.replot()

    def threshold(self) -> Optional[float]:
        """The score below which the target fraction of the current matrix's inputs is dropped."""
        m = self.hists.get(self.cur_layer, {}).get(self.cur_matrix)
        if m is None:
            return None
        from wina.api import matrix_threshold
        return matrix_threshold(m.counts, self.target, m.n_live, m.in_features)

    def _plot(self, fig, width: int, height: int) -> bool:
        m = self.hists.get(self.cur_layer, {}).get(self.cur_matrix)
        if m is None:
            return False
        xs, ys, under = rebin(m.counts, max(8, width - 10))
        if not xs:
            return False
        thr = self.threshold()
        tx = math.log10(thr) if thr and thr > 0 else None
        if tx is not None and xs[0] < tx < xs[-1]:
            cut = next(i for i, x in enumerate(xs) if x >= tx)
            drop = fig.signal(xs[:cut + 1], ys[:cut + 1])
            drop.lines()                  # (plotext 6's filly() distorts a partial signal)
            fig.draw(drop)
            keep = fig.signal(xs[cut:], ys[cut:])
            keep.lines()
            fig.draw(keep)
            fig.line(tx, orientation=1)
        else:
            sig = fig.signal(xs, ys)
            sig.lines()
            fig.draw(sig)
        n = f"/{self.n_layers}" if self.n_layers else ""
        dead = 1.0 - m.n_live / m.in_features if m.in_features else 0.0
        where = f"layer {self.cur_layer + 1}{n} · {self.cur_matrix}"
        if thr is None or thr <= 0:
            mark = f" · {self.target:.0%} ≤ dead columns" if dead >= self.target else ""
        else:
            mark = f" · │ threshold {thr:.3g} drops {self.target:.0%}"
        fig.title(where + mark)
        extra = f"; {dead:.0%} dead columns" if dead > 0 else ""
        extra += f"; {under:.1f}% zero" if under >= 0.05 else ""
        fig.label(f"log10 gating score (% of inputs{extra})", "x")
        return True

