"""Live chart of the greedy allocation: error against effective sparsity for the current layer."""
from __future__ import annotations

from typing import Optional

from .plot_view import PlotView


class TrajectoryChart(PlotView):
    """Collects ``(sparsity, error, matrix)`` points per layer and plots the current layer's path.

    Each greedy step raises one matrix's sparsity; the point is the layer's effective sparsity after
    the step and the layer-output error it costs; the title names the matrix of the last step.
    """

    def __init__(self, **kw) -> None:
        super().__init__(None, empty="the greedy trajectory appears here during allocation", **kw)
        self.points: dict[Optional[int], list[tuple[float, float, str]]] = {}
        self.current_layer: Optional[int] = None
        self.n_layers: Optional[int] = None
        self._draw = self._plot

    def reset(self) -> None:
        self.points.clear()
        self.current_layer = None
        self.replot()

    def add_point(self, layer: Optional[int], sparsity: float, error: float, matrix: str = "",
                  n_layers: Optional[int] = None, redraw: bool = True) -> None:
        self.points.setdefault(layer, []).append((float(sparsity), float(error), matrix or ""))
        self.current_layer = layer
        self.n_layers = n_layers
        if redraw:
            self.replot()

    def set_trajectory(self, layer: Optional[int], pts: list[tuple[float, float, str]]) -> None:
        self.points[layer] = list(pts)
        self.current_layer = layer
        self.replot()

    def _plot(self, fig, width: int, height: int) -> bool:
        pts = self.points.get(self.current_layer)
        if not pts:
            return False
        xs = [100 * p[0] for p in pts]
        ys = [p[1] for p in pts]
        line = fig.signal(xs, ys)
        line.lines()
        fig.draw(line)
        last = next((p[2] for p in reversed(pts) if p[2]), "")
        where = "all layers" if self.current_layer is None else (
            f"layer {self.current_layer + 1}" + (f"/{self.n_layers}" if self.n_layers else ""))
        fig.title(f"error vs sparsity · {where} · {len(pts) - 1} steps" + (f" · {last}" if last else ""))
        fig.label("effective sparsity of the layer (%)", "x")
        return True
