"""The allocation found by calibration: sparsity per layer (rows) and matrix (columns) as a heat map.

Where the tab is narrower than the table (80 columns), the cells shrink to two digits and the
matrix names to two letters; where even that does not fit, the tab scrolls sideways.
"""
from __future__ import annotations

from typing import Mapping, Optional

from rich.measure import Measurement
from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

Key = tuple[int, str]

# a perceptual-ish ramp from low (blue) to high (red) sparsity
RAMP = ["#1d4877", "#1b8a5a", "#6aa84f", "#fbb021", "#f68838", "#ee3e32", "#b01c2e"]


def cell_color(s: float, lo: float, hi: float) -> str:
    if hi <= lo:
        return RAMP[len(RAMP) // 2]
    t = min(max((s - lo) / (hi - lo), 0.0), 1.0)
    return RAMP[min(int(t * len(RAMP)), len(RAMP) - 1)]


def heatmap_table(alloc: Mapping[Key, float], *, target: Optional[float] = None,
                  n_layers: Optional[int] = None, note: str = "", compact: bool = False) -> Table:
    """Rows: layers (1-based, as everywhere in the app); a layer not allocated yet is a row of dots
    when ``n_layers`` is given, so that the map fills in layer by layer. ``compact``: two-digit
    cells under two-letter matrix names (``q k v o ga up do``), for a narrow terminal."""
    projs: list[str] = []
    layers: list[int] = []
    for (layer, proj) in alloc:
        if proj not in projs:
            projs.append(proj)
        if layer not in layers:
            layers.append(layer)
    if n_layers:
        layers = list(range(n_layers))
    layers.sort()
    vals = list(alloc.values())
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    title = "sparsity % by layer × matrix" + (f" · target {target:.0%}" if target is not None else "")
    if note:
        title += f" · {note}"
    table = Table(title=title, box=None, pad_edge=False, padding=(0, 1, 0, 0), expand=False,
                  title_style="bold", header_style="bold")
    table.add_column("L" if compact else "layer", justify="right")
    for p in projs:
        table.add_column(p.replace("_proj", "")[:2 if compact else 4], justify="center",
                         min_width=2 if compact else 4)
    table.add_column("mean", justify="right")
    cell = "{:2.0f}" if compact else "{:3.0f} "
    for layer in layers:
        row: list[Text] = [Text(str(layer + 1))]
        vs = []
        for p in projs:
            s = alloc.get((layer, p))
            if s is None:
                row.append(Text("·", style="dim"))
                continue
            vs.append(s)
            row.append(Text(cell.format(100 * s), style=Style(color="white", bgcolor=cell_color(s, lo, hi))))
        row.append(Text(f"{100 * sum(vs) / len(vs):.0f}" if vs else "—"))
        table.add_row(*row)
    return table


EMPTY = "the allocation per layer and matrix fills in here, layer by layer, while allocation runs"


class AllocationHeatmap(Static):
    """:meth:`show_allocation` shows a whole allocation (``{(layer, proj): sparsity}``);
    :meth:`set_layer` adds one layer's row while allocation runs; :meth:`reset` empties it.
    Holds what the table shows (``table_args``) and draws it again, compact or not, when resized."""

    DEFAULT_CSS = """
    AllocationHeatmap { width: 100%; }
    """

    def __init__(self, **kw) -> None:
        super().__init__(Text(EMPTY, style="dim"), **kw)
        self.allocation: dict[Key, float] = {}
        self.n_layers: Optional[int] = None
        self.target: Optional[float] = None
        self.note = ""                       # what the title adds ("5/30 layers" while it fills in)
        self.updates = 0
        self.table_args: Optional[dict] = None   # heatmap_table's keywords of what is shown; None: a message
        self.compact = False                 # two-digit cells: the full table is wider than the tab

    def reset(self, message: str = EMPTY) -> None:
        self.allocation = {}
        self.n_layers = None
        self._message(message)

    def _message(self, message: str) -> None:
        self.table_args = None
        self.styles.min_width = None
        self.update(Text(message, style="dim"))

    def set_layer(self, layer: int, row: Mapping[str, float], *, n_layers: Optional[int] = None,
                  target: Optional[float] = None) -> None:
        for p, v in row.items():
            self.allocation[(layer, p)] = float(v)
        self.n_layers = n_layers or self.n_layers
        self.target = target if target is not None else self.target
        self.updates += 1
        done = len({k[0] for k in self.allocation})
        note = f"{done}/{self.n_layers} layers" if self.n_layers else ""
        self.note = note
        self.table_args = dict(target=self.target, n_layers=self.n_layers, note=note)
        self._draw()

    def show_allocation(self, alloc: Mapping[Key, float], target: Optional[float] = None,
                        note: str = "") -> None:
        self.allocation = {tuple(k): float(v) for k, v in alloc.items()}
        self.target = target
        self.note = note
        self.updates += 1
        if not self.allocation:
            self._message("no allocation")
            return
        self.table_args = dict(target=target, note=note)
        self._draw()

    def on_resize(self) -> None:
        if self.table_args is not None:
            self._draw()

    def _draw(self) -> None:
        """The full table where the tab is wide enough, else the compact one; one still wider than
        the tab sets this widget's minimum width, so that the tab scrolls sideways to every column."""
        room = self.parent.scrollable_content_region.width if self.parent is not None else 0
        table = heatmap_table(self.allocation, **self.table_args)
        self.compact = bool(room) and table_width(self, table) > room
        if self.compact:
            table = heatmap_table(self.allocation, compact=True, **self.table_args)
        need = table_width(self, table)
        self.styles.min_width = need if room and need > room else None
        self.update(table)


def table_width(widget: Static, table: Table) -> int:
    """The width ``table`` takes when it has room (its widest row, title aside)."""
    console = widget.app.console
    return Measurement.get(console, console.options, table).maximum
