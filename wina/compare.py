"""Comparison of runs: a table shaped like the paper's and a terminal chart of quality vs sparsity.

Both take :class:`wina.results.Run` objects (``wina.results.load_runs``) and return things that the
CLI and the TUI can show as they are: :func:`comparison_table` a ``rich.table.Table``,
:func:`quality_chart` a string (plotext; ANSI colours unless ``color=False``), and
:func:`comparison_rows` the plain numbers behind them.

Rows are method × sparsity (dense first, then each sparsity with TEAL, TEAL-transform, WINA, ...);
columns are the tasks' headline metrics (accuracy in %, see :func:`wina.evaluate.headline_metric`),
their average, and perplexities (lm-eval's wikitext word perplexity, and the fast perplexity of
``wina ppl``) which are not averaged. The best value in each column at each sparsity is bold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .errors import InvalidArgument
from .results import Run

TASK_ORDER = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "boolq", "mmlu", "gsm8k")
METHOD_ORDER = ("dense", "TEAL", "TEAL-transform", "TEAL-pca", "WINA", "WINA-transform", "WINA-pca")
SHORT = {"winogrande": "wino", "hellaswag": "hswag", "arc_easy": "arc-e", "arc_challenge": "arc-c"}
PPL_COLUMN = "ppl"          # the fast perplexity of a run (wina.perplexity), lower is better


@dataclass
class Row:
    label: str
    sparsity: float                      # nominal
    measured: Optional[float]
    values: dict[str, Optional[float]] = field(default_factory=dict)   # column -> value
    average: Optional[float] = None
    run: Optional[Run] = None


@dataclass
class Comparison:
    acc_columns: list[str]               # averaged, higher is better (values in [0, 1])
    low_columns: list[str]               # perplexities, lower is better, not averaged
    rows: list[Row]
    notes: list[str] = field(default_factory=list)


def _method_key(label: str) -> tuple:
    base = label.split(" (")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), label)


def comparison_rows(runs: Sequence[Run]) -> Comparison:
    """Collect the headline numbers of each run; the latest run wins where two share a row."""
    if not runs:
        raise InvalidArgument("nothing to compare: no runs")
    latest: dict[tuple[str, float], Run] = {}
    for r in runs:
        key = (r.label, round(r.sparsity, 4))
        if key not in latest or (r.wina.get("date") or "") >= (latest[key].wina.get("date") or ""):
            latest[key] = r
    acc_cols: list[str] = []
    low_cols: list[str] = []
    for r in latest.values():
        for task, h in r.headline.items():
            cols = acc_cols if h.get("higher_is_better", True) else low_cols
            if task not in cols:
                cols.append(task)
        if r.perplexity is not None and PPL_COLUMN not in low_cols:
            low_cols.append(PPL_COLUMN)
    acc_cols.sort(key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))
    low_cols.sort(key=lambda t: (t == PPL_COLUMN, t))
    rows = []
    for (label, s), r in latest.items():
        vals: dict[str, Optional[float]] = {}
        for c in acc_cols + low_cols:
            if c == PPL_COLUMN:
                vals[c] = r.perplexity
            else:
                h = r.headline.get(c)
                vals[c] = None if h is None else h.get("value")
        acc = [vals[c] for c in acc_cols]
        avg = sum(acc) / len(acc) if acc and all(v is not None for v in acc) else None
        rows.append(Row(label, s, r.wina.get("measured_sparsity"), vals, avg, r))
    rows.sort(key=lambda row: (row.label != "dense", row.sparsity, _method_key(row.label)))
    notes = []
    limits = {(r.wina.get("eval") or {}).get("limit") for r in latest.values() if r.headline}
    limits.discard(None)
    if limits:
        notes.append(f"lm-eval --limit {', '.join(str(x) for x in sorted(limits, key=str))} documents per task")
    if any((r.wina.get("eval") or {}).get("data_dir") and "hellaswag" in r.headline for r in latest.values()):
        notes.append("hellaswag from llama.cpp's preprocessed text: close to the harness's scores, not identical")
    return Comparison(acc_cols, low_cols, rows, notes)


def _fmt_acc(v: Optional[float]) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _fmt_ppl(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.2f}" if v < 1000 else f"{v:.4g}"


def comparison_table(runs: Sequence[Run], *, title: Optional[str] = None):
    """A rich Table: rows method × sparsity, columns tasks + average (+ perplexities)."""
    from rich.table import Table
    from rich import box
    cmp = comparison_rows(runs)
    models = sorted({r.run.wina.get("model", "?") for r in cmp.rows if r.run is not None})
    table = Table(title=title or f"Quality vs sparsity — {', '.join(models)}", box=box.SIMPLE_HEAVY,
                  caption="; ".join(cmp.notes) or None, caption_justify="left", collapse_padding=True,
                  pad_edge=False)
    # every column at least as wide as its widest value: a narrow console folds headers, not numbers
    widths = {"sparsity": 4, "method": max(len(r.label) for r in cmp.rows), "avg": 5, "measured": 7}

    def col(header, key=None, **kw):
        table.add_column(header, min_width=widths.get(key or header, 5), overflow="fold", **kw)

    col("sparsity", justify="right")
    col("method")
    for c in cmp.acc_columns:
        col(SHORT.get(c, c), justify="right")
    if cmp.acc_columns:
        col("avg", justify="right", style="bold")
    for c in cmp.low_columns:
        width = max([len(_fmt_ppl(r.values.get(c))) for r in cmp.rows] + [5])
        table.add_column(f"{c} ↓" if c != PPL_COLUMN else "ppl ↓", justify="right", min_width=width,
                         overflow="fold")
    col("measured", justify="right", style="dim")

    best: dict[tuple[float, str], float] = {}
    for row in cmp.rows:
        for c in cmp.acc_columns + ["avg"]:
            v = row.average if c == "avg" else row.values.get(c)
            if v is not None and row.label != "dense":
                best[(row.sparsity, c)] = max(best.get((row.sparsity, c), -math.inf), v)
        for c in cmp.low_columns:
            v = row.values.get(c)
            if v is not None and row.label != "dense":
                best[(row.sparsity, c)] = min(best.get((row.sparsity, c), math.inf), v)

    def cell(row: Row, c: str, v: Optional[float], fmt) -> str:
        s = fmt(v)
        n_at = sum(1 for r in cmp.rows if r.sparsity == row.sparsity and r.label != "dense")
        if v is not None and row.label != "dense" and n_at > 1 and best.get((row.sparsity, c)) == v:
            return f"[bold green]{s}[/]"
        return s

    prev = None
    for row in cmp.rows:
        if prev is not None and row.sparsity != prev:
            table.add_section()
        prev = row.sparsity
        cells = ["0 %" if row.label == "dense" else f"{100 * row.sparsity:.0f} %", row.label]
        cells += [cell(row, c, row.values.get(c), _fmt_acc) for c in cmp.acc_columns]
        if cmp.acc_columns:
            cells.append(cell(row, "avg", row.average, _fmt_acc))
        cells += [cell(row, c, row.values.get(c), _fmt_ppl) for c in cmp.low_columns]
        cells.append("—" if row.measured is None else f"{100 * row.measured:.1f} %")
        table.add_row(*cells)
    return table


def comparison_markdown(runs: Sequence[Run]) -> str:
    """The same table as GitHub markdown (for docs/)."""
    cmp = comparison_rows(runs)
    head = ["sparsity", "method"] + [SHORT.get(c, c) for c in cmp.acc_columns]
    head += ["avg"] if cmp.acc_columns else []
    head += [("ppl" if c == PPL_COLUMN else f"{c} word ppl") + " ↓" for c in cmp.low_columns] + ["measured"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in cmp.rows:
        cells = ["0 %" if row.label == "dense" else f"{100 * row.sparsity:.0f} %", row.label]
        cells += [_fmt_acc(row.values.get(c)) for c in cmp.acc_columns]
        cells += [_fmt_acc(row.average)] if cmp.acc_columns else []
        cells += [_fmt_ppl(row.values.get(c)) for c in cmp.low_columns]
        cells.append("—" if row.measured is None else f"{100 * row.measured:.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart_series(runs: Sequence[Run], y: str = "avg") -> dict[str, list[tuple[float, float]]]:
    """{method label: [(sparsity %, value), ...]} for ``y`` = "avg", a task name or "ppl".

    Each sparse method's line starts at the dense run's value (sparsity 0) when there is one."""
    cmp = comparison_rows(runs)
    if y not in ("avg", *cmp.acc_columns, *cmp.low_columns):
        raise InvalidArgument(f"nothing to plot for {y!r}; choose avg, "
                              f"{', '.join(cmp.acc_columns + cmp.low_columns)}")

    def value(row: Row) -> Optional[float]:
        v = row.average if y == "avg" else row.values.get(y)
        if v is None:
            return None
        return 100 * v if (y == "avg" or y in cmp.acc_columns) else v

    dense = next((value(r) for r in cmp.rows if r.label == "dense" and value(r) is not None), None)
    series: dict[str, list[tuple[float, float]]] = {}
    for row in cmp.rows:
        v = value(row)
        if v is None:
            continue
        series.setdefault(row.label, []).append((100 * row.sparsity, v))
    for label, pts in series.items():
        if label != "dense" and dense is not None and all(x > 0 for x, _ in pts):
            pts.insert(0, (0.0, dense))
        pts.sort()
    return dict(sorted(series.items(), key=lambda kv: _method_key(kv[0])))


def quality_chart(runs: Sequence[Run], *, y: str = "avg", width: int = 80, height: int = 20,
                  color: bool = True, log_y: Optional[bool] = None, title: Optional[str] = None) -> str:
    """A plotext line chart of quality against sparsity, one line per method; returned as text."""
    import plotext as plt
    series = chart_series(runs, y)
    is_ppl = y == PPL_COLUMN or y == "wikitext"
    log_y = is_ppl if log_y is None else log_y
    fig = plt.figure                      # plotext 6: one master figure, cleared before each chart
    fig.clear()
    fig.plot_size(width, height)
    fig.theme("default" if color else "colorless")
    markers = ["dot", "x", "+", "o", "*", "#", "@", "$"]
    for i, (label, pts) in enumerate(series.items()):
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        sig = fig.signal(xs, ys, marker="D" if label == "dense" else markers[i % len(markers)])
        sig.label(label)
        if len(pts) > 1:
            sig.lines()
        fig.draw(sig)
    if log_y:
        fig.ruler(1).scale("log")
    what = {"avg": "average accuracy (%)", "ppl": "perplexity"}.get(y, f"{y} ({'word ppl' if is_ppl else '%'})")
    fig.title(title or f"{what} vs sparsity")
    fig.label("sparsity (%)", axis=0)
    out = fig.build().string(colorless=not color)
    fig.clear()
    return out
