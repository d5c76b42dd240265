"""Comparison of runs: a table shaped like the paper's and a terminal chart of quality vs sparsity.

Both take :class:`wina.results.Run` objects (``wina.results.load_runs``) and return things that the
CLI and the TUI can show as they are: :func:`comparison_table` a ``rich.table.Table``,
:func:`quality_chart` a string (plotext; ANSI colours unless ``color=False``), and
:func:`comparison_rows` the plain numbers behind them.

Rows are method × sparsity (dense first, then each sparsity with TEAL, TEAL-transform, WINA, ...),
for each model when the runs come from more than one (a model column then tells them apart). Files
of one model, method and sparsity make one row, their metrics merged (a ``wina ppl`` file and a
``wina eval`` file of the same configuration fill the same row); where two of them measured the same
metric the latest wins, and if they disagree a warning line names the files (never a silent pick);
columns are the tasks' headline metrics (accuracy in %, see :func:`wina.evaluate.headline_metric`),
their average, and perplexities (lm-eval's wikitext word perplexity, and the fast perplexity of
``wina ppl``) which are not averaged. The best value in each column at each sparsity is bold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
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
    run: Optional[Run] = None            # the latest of ``runs``
    model: str = "?"                     # the ``wina.model`` of the row's runs
    runs: list[Run] = field(default_factory=list)   # every run merged into this row, oldest first


@dataclass
class Comparison:
    acc_columns: list[str]               # averaged, higher is better (values in [0, 1])
    low_columns: list[str]               # perplexities, lower is better, not averaged
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)     # more than one: rows are told apart by model
    warnings: list[str] = field(default_factory=list)   # one line per row whose files disagree


def _method_key(label: str) -> tuple:
    base = label.split(" (")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), label)


def _claims(r: Run) -> dict[str, tuple[bool, Optional[float]]]:
    """{column: (higher_is_better, value)} for every metric this run measured (a measured value may be
    None: a perplexity that overflowed)."""
    out: dict[str, tuple[bool, Optional[float]]] = {}
    for task, h in r.headline.items():
        out[task] = (h.get("higher_is_better", True) is not False, h.get("value"))
    if r.wina.get("perplexity"):
        out[PPL_COLUMN] = (False, r.perplexity)
    return out


def _where(r: Run) -> str:
    return str(r.path) if r.path is not None else "(unsaved run)"


def comparison_rows(runs: Sequence[Run]) -> Comparison:
    """Collect the headline numbers of each run, one row per model × method × sparsity.

    Runs of the same row are merged metric by metric (a perplexity-only file and an lm-eval file of
    the same configuration make one row with both); where two runs measured the same metric, the
    latest (``wina.date``, then the order given) wins, and when their values differ as shown a
    warning line names the files (:attr:`Comparison.warnings`)."""
    if not runs:
        raise InvalidArgument("nothing to compare: no runs")
    groups: dict[tuple[str, str, float], list[tuple[str, int, Run]]] = {}
    for i, r in enumerate(runs):
        key = (str(r.wina.get("model", "?")), r.label, round(r.sparsity, 4))
        groups.setdefault(key, []).append((r.wina.get("date") or "", i, r))
    models = sorted({m for m, _, _ in groups})
    acc_cols: list[str] = []
    low_cols: list[str] = []
    for r in runs:
        for col, (higher, _) in _claims(r).items():
            cols = acc_cols if higher else low_cols
            if col not in acc_cols and col not in low_cols:
                cols.append(col)
    acc_cols.sort(key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))
    low_cols.sort(key=lambda t: (t == PPL_COLUMN, t))
    rows: list[Row] = []
    warnings: list[str] = []
    used: set[int] = set()                               # the runs a shown value comes from
    for (model, label, s), members in groups.items():
        members.sort(key=lambda m: (m[0], m[1]))          # oldest first: the latest claim wins
        group = [r for _, _, r in members]
        vals: dict[str, Optional[float]] = {c: None for c in acc_cols + low_cols}
        shown: dict[str, tuple[str, Run]] = {}           # column -> (value as shown, run that set it)
        disagree: dict[str, None] = {}                   # columns whose files disagree (ordered)
        losers: dict[str, None] = {}
        for r in group:
            for col, (_, v) in _claims(r).items():
                fmt = _fmt_acc if col in acc_cols else _fmt_ppl
                text = fmt(v)
                if col in shown and shown[col][0] != text:
                    disagree[col] = None
                    losers[_where(shown[col][1])] = None
                vals[col] = v
                shown[col] = (text, r)
        used.update(id(r) for _, r in shown.values())
        measured = next((r.wina.get("measured_sparsity") for r in reversed(group)
                         if r.wina.get("measured_sparsity") is not None), None)
        acc = [vals[c] for c in acc_cols]
        avg = sum(acc) / len(acc) if acc and all(v is not None for v in acc) else None
        row = Row(label, s, measured, vals, avg, group[-1], model, group)
        rows.append(row)
        if disagree:
            winners = {_where(shown[c][1]): None for c in disagree}
            others = [w for w in losers if w not in winners]
            what = f"{label} at {_fmt_sparsity(row)}" + (f" of {model}" if len(models) > 1 else "")
            warnings.append(f"warning: {what}: {', '.join(others)} and {', '.join(winners)} disagree on "
                            f"{', '.join(SHORT.get(c, c) for c in disagree)}; showing the latest "
                            f"({', '.join(winners)})")
    rows.sort(key=lambda row: (models.index(row.model), row.label != "dense", row.sparsity,
                               _method_key(row.label)))
    notes = []
    runs = [r for r in runs if id(r) in used]
    limits = {(r.wina.get("eval") or {}).get("limit") for r in runs if r.headline}
    limits.discard(None)
    if limits:
        notes.append(f"lm-eval --limit {', '.join(str(x) for x in sorted(limits, key=str))} documents per task")
    ppl = _ppl_settings(runs)
    if len(ppl) == 1:
        notes.append(f"ppl over {next(iter(ppl))}")
    elif len(ppl) > 1:
        warnings.append(f"warning: the perplexities were not measured alike ({'; '.join(sorted(ppl))}): "
                        "their column does not compare")
    if any((r.wina.get("eval") or {}).get("data_dir") and "hellaswag" in r.headline for r in runs):
        notes.append("hellaswag from llama.cpp's preprocessed text: close to the harness's scores, not identical")
    return Comparison(acc_cols, low_cols, rows, notes, models, warnings)


def _ppl_settings(runs) -> set[str]:
    """How each run's perplexity was measured (text, tokens, window, protocol), as one phrase each."""
    out = set()
    for r in runs:
        p = r.wina.get("perplexity")
        if not isinstance(p, dict) or p.get("perplexity") is None:
            continue
        name = Path(str(p.get("file") or "?")).name
        protocol = p.get("protocol") or "windows"
        how = (f" (windows of {p['context']})" if protocol == "windows" and p.get("context")
               else f" (the {protocol} protocol)" if protocol != "windows" else "")
        out.add(f"{p.get('tokens', '?')} tokens of {name}{how}")
    return out


def _fmt_sparsity(row: Row) -> str:
    return "0 %" if row.label == "dense" else f"{100 * row.sparsity:.0f} %"


def _fmt_acc(v: Optional[float]) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _fmt_ppl(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.2f}" if v < 1000 else f"{v:.4g}"


def _caption(cmp: Comparison) -> Optional[str]:
    lines = (["; ".join(cmp.notes)] if cmp.notes else []) + cmp.warnings
    return "\n".join(lines) or None


def comparison_table(runs: Sequence[Run], *, title: Optional[str] = None):
    """A rich Table: rows (model ×) method × sparsity, columns tasks + average (+ perplexities); a
    model column when the runs come from more than one model, and the warnings in the caption."""
    from rich.table import Table
    from rich import box
    cmp = comparison_rows(runs)
    many = len(cmp.models) > 1
    table = Table(title=title or f"Quality vs sparsity — {', '.join(cmp.models)}", box=box.SIMPLE_HEAVY,
                  caption=_caption(cmp), caption_justify="left", collapse_padding=True,
                  pad_edge=False)
    # every column at least as wide as its widest value: a narrow console folds headers, not numbers
    widths = {"sparsity": 4, "method": max(len(r.label) for r in cmp.rows), "avg": 5, "measured": 7,
              "model": max(len(r.model) for r in cmp.rows)}

    def col(header, key=None, **kw):
        table.add_column(header, min_width=widths.get(key or header, 5), overflow="fold", **kw)

    if many:
        col("model")
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

    def cell(row: Row, c: str, v: Optional[float], fmt) -> str:
        s = fmt(v)
        return f"[bold green]{s}[/]" if is_best(cmp, row, c) else s

    prev = None
    for row in cmp.rows:
        if prev is not None and (row.model, row.sparsity) != prev:
            table.add_section()
        prev = (row.model, row.sparsity)
        cells = ([row.model] if many else []) + [_fmt_sparsity(row), row.label]
        cells += [cell(row, c, row.values.get(c), _fmt_acc) for c in cmp.acc_columns]
        if cmp.acc_columns:
            cells.append(cell(row, "avg", row.average, _fmt_acc))
        cells += [cell(row, c, row.values.get(c), _fmt_ppl) for c in cmp.low_columns]
        cells.append("—" if row.measured is None else f"{100 * row.measured:.1f} %")
        table.add_row(*cells)
    return table


def _value(row: Row, column: str) -> Optional[float]:
    return row.average if column == "avg" else row.values.get(column)


def is_best(cmp: Comparison, row: Row, column: str) -> bool:
    """Whether ``row``'s value in ``column`` ("avg" for the average) is the best among the sparse rows
    of its model and sparsity (the highest accuracy, the lowest perplexity), where there are at least
    two such rows: the cell the tables put in bold."""
    v = _value(row, column)
    if v is None or row.label == "dense":
        return False
    peers = [r for r in cmp.rows if (r.model, r.sparsity) == (row.model, row.sparsity) and r.label != "dense"]
    if len(peers) < 2:
        return False
    values = [x for x in (_value(r, column) for r in peers) if x is not None]
    return v == (min(values) if column in cmp.low_columns else max(values))


def comparison_markdown(runs: Sequence[Run]) -> str:
    """The same table as GitHub markdown (for docs/); the warnings, if any, below it."""
    cmp = comparison_rows(runs)
    many = len(cmp.models) > 1
    head = (["model"] if many else []) + ["sparsity", "method"] + [SHORT.get(c, c) for c in cmp.acc_columns]
    head += ["avg"] if cmp.acc_columns else []
    head += [("ppl" if c == PPL_COLUMN else f"{c} word ppl") + " ↓" for c in cmp.low_columns] + ["measured"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in cmp.rows:
        cells = ([row.model] if many else []) + [_fmt_sparsity(row), row.label]
        cells += [_fmt_acc(row.values.get(c)) for c in cmp.acc_columns]
        cells += [_fmt_acc(row.average)] if cmp.acc_columns else []
        cells += [_fmt_ppl(row.values.get(c)) for c in cmp.low_columns]
        cells.append("—" if row.measured is None else f"{100 * row.measured:.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    if cmp.warnings:
        lines += [""] + [f"> {w}  " for w in cmp.warnings]
    return "\n".join(lines)


def chart_series(runs: Sequence[Run], y: str = "avg") -> dict[str, list[tuple[float, float]]]:
    """{method label: [(sparsity %, value), ...]} for ``y`` = "avg", a task name or "ppl"; with runs
    of more than one model the keys are ``"<model>: <method label>"``.

    Each sparse method's line starts at its model's dense value (sparsity 0) when there is one."""
    cmp = comparison_rows(runs)
    if y not in ("avg", *cmp.acc_columns, *cmp.low_columns):
        raise InvalidArgument(f"nothing to plot for {y!r}; choose avg, "
                              f"{', '.join(cmp.acc_columns + cmp.low_columns)}")
    many = len(cmp.models) > 1

    def value(row: Row) -> Optional[float]:
        v = row.average if y == "avg" else row.values.get(y)
        if v is None:
            return None
        return 100 * v if (y == "avg" or y in cmp.acc_columns) else v

    dense = {}
    for r in cmp.rows:
        if r.label == "dense" and value(r) is not None:
            dense.setdefault(r.model, value(r))
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in cmp.rows:
        v = value(row)
        if v is None:
            continue
        series.setdefault((row.model, row.label), []).append((100 * row.sparsity, v))
    for (model, label), pts in series.items():
        if label != "dense" and model in dense and all(x > 0 for x, _ in pts):
            pts.insert(0, (0.0, dense[model]))
        pts.sort()
    ordered = sorted(series.items(), key=lambda kv: (cmp.models.index(kv[0][0]), _method_key(kv[0][1])))
    return {(f"{model}: {label}" if many else label): pts for (model, label), pts in ordered}


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
        sig = fig.signal(xs, ys, marker="D" if label.split(": ")[-1] == "dense" else markers[i % len(markers)])
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
