"""A Static that shows a plotext 6 figure, rebuilt to the widget's size.

plotext 6 has an object API (``plotext.figure``); textual-plotext pins plotext < 6, so this renders
the figure to an ANSI string and shows it through ``rich.text.Text.from_ansi``. The figure's own
background and black/white foregrounds are dropped, so the chart follows the app's theme.
plotext keeps global state: only call :meth:`PlotView.replot` from the UI thread.

A figure of several series gets its legend as a line of text under the plot, never plotext's
legend box, which is drawn inside the plot and covers the lines (the first points above all).
"""
from __future__ import annotations

import re
from typing import Callable, Optional, Union

from rich.text import Text
from textual.widgets import Static

_BG = re.compile(r"\x1b\[48;5;\d+m")
_MONO_FG = re.compile(r"\x1b\[38;5;(?:0|7|8|15)m")

# (figure, width, height) -> drew anything; a list of names: drew those series, in the order drawn,
# and wants them named in a legend line under the plot
DrawFn = Callable[[object, int, int], Union[bool, list]]

SERIES_COLORS = (12, 10, 9, 14, 13, 11)   # the 256-colour codes plotext's default theme gives series in turn


def ansi_to_text(ansi: str) -> Text:
    return Text.from_ansi(_MONO_FG.sub("\x1b[39m", _BG.sub("", ansi)), no_wrap=True, end="")


def legend_line(names: list[str], width: int) -> Text:
    """``━━ name`` per series in its plot colour, centred in ``width``."""
    line = Text(no_wrap=True, end="")
    for i, name in enumerate(names):
        line.append(("   " if i else "") + "━━ ", style=f"color({SERIES_COLORS[i % len(SERIES_COLORS)]})")
        line.append(str(name))
    line.pad_left(max((width - line.cell_len) // 2, 0))
    return line


def render_figure(draw: DrawFn, width: int, height: int) -> Optional[Text]:
    """Clear the global plotext figure, let ``draw`` fill it, and return the result as rich Text
    (with the legend line under it when ``draw`` names its series)."""
    import plotext as plt
    fig = plt.figure
    fig.clear()
    try:
        fig.theme("default")
        fig.plot_size(max(width, 20), max(height, 6))
        drew = draw(fig, width, height)
        if not drew:
            return None
        names = drew if isinstance(drew, list) else []
        if names:                      # the plot one row shorter, its own legend box off
            fig.legend(False)
            fig.plot_size(max(width, 20), max(height - 1, 6))
        out = fig.build().string()
    finally:
        fig.clear()
    text = ansi_to_text(out)
    if names:
        text.append("" if text.plain.endswith("\n") else "\n")
        text.append_text(legend_line(names, width))
    return text


class PlotView(Static):
    """Shows ``draw``'s figure at the widget's content size; call :meth:`replot` when data changes."""

    DEFAULT_CSS = """
    PlotView { height: 1fr; min-height: 8; }
    """

    def __init__(self, draw: Optional[DrawFn] = None, *, empty: str = "no data yet", **kw) -> None:
        super().__init__("", **kw)
        self._draw = draw
        self._empty = empty

    def set_draw(self, draw: DrawFn) -> None:
        self._draw = draw
        self.replot()

    def on_resize(self) -> None:
        self.replot()

    def replot(self) -> None:
        w, h = self.content_region.width, self.content_region.height
        if w <= 0 or h <= 0:
            return
        try:
            text = render_figure(self._draw, w, h) if self._draw is not None else None
        except Exception as e:          # odd data (a damaged file): say so, never crash the screen
            msg = str(e).splitlines()[0] if str(e) else ""
            text = Text(f"the chart cannot be drawn: {type(e).__name__}{': ' + msg if msg else ''}",
                        style="red")
        self.update(text if text is not None else Text(self._empty, style="dim"))
