"""Allocation that knows the score (issue 20, item 3): greedy per-matrix allocation against the
uniform one, for TEAL, WINA and WINA with the PCA rotation, on the embedded model.

    python bench/greedy_quality.py --json /tmp/greedy_quality.jsonl               # the full run
    python bench/greedy_quality.py --max-tokens 1024 --sparsities 0.5 \\
        --calib-samples 2 --calib-seq-len 64 --plans /tmp/gq-smoke --ids-file /tmp/gq-smoke-ids.pt   # smoke

What it measures (SmolLM2-135M-Instruct, float32, CPU):

1. Calibration ids: text sampled from the model itself with the small-model defaults
   (``wina.calibrate.sample_self``, ``default_sizes``: 16 x 512 tokens, seed 0), cached in
   --ids-file; the SAME ids for every variant.
2. Variants: ``teal`` (no transform), ``wina`` (no transform), ``wina-pca`` (WINA on the model rotated
   by the one-basis activation PCA, ``calibrate(..., rotation="pca")``: the basis comes from the
   calibration ids and is stored in the plan). Each variant is calibrated on its own copy of the
   pristine model, then allocated with the small-model defaults (lazy greedy on 4 x 128 tokens, base
   step 0.1, to 0.9): ``allocate(mode="layer")`` then ``allocate(mode="global")`` (which reuses the
   within-layer trajectories). The greedy's trials gate with the plan's own score (TEAL |x|, WINA
   |x|·||W_col||, on the rotated model for wina-pca): the allocation knows the score.
3. Evaluation: each plan is applied to a FRESH copy of the pristine model with
   ``apply_plan(model, plan, s, mode=...)`` (refined thresholds, the default; the pca plan rotates the
   fresh copy itself), for mode uniform / layer / global and each nominal sparsity s; perplexity on
   the first --max-tokens tokens of wikitext-2 test, GSM8K test and HellaSwag validation (512-token
   windows, ``bench/rotation_study.texts()``), and the measured sparsity on that text (counters reset
   before each text). Dense perplexity per text once; for wina-pca, the rotated model's dense
   perplexity on wikitext-2 too (a check that the plan's rotation is exact).

One JSON line per measurement is printed (flushed) and appended to --json; a measurement already in
--json (same variant, allocation, target, text, max_tokens) is skipped, so a restart after a crash
goes on where it stopped (plans are kept in --plans and resumed too). At the end: markdown tables
(cells "perplexity (measured %)") and the WINA/TEAL perplexity ratios.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VARIANTS = {                  # name: (method, rotation)
    "teal": ("teal", None),
    "wina": ("wina", None),
    "wina-pca": ("wina", "pca"),
}
ALLOCATIONS = ("uniform", "layer", "global")
TEXTS = ("wikitext-2", "gsm8k", "hellaswag")


def machine() -> str:
    from calibrate_bench import machine as bench_machine
    return bench_machine("cpu")


def key(r: dict) -> tuple:
    return (r.get("kind"), r.get("variant"), r.get("allocation"), r.get("target"), r.get("text"),
            r.get("max_tokens"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--sparsities", default="0.25,0.4,0.5")
    ap.add_argument("--allocations", default=",".join(ALLOCATIONS))
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--ids-file", default="/tmp/wina-calib-ids.pt")
    ap.add_argument("--calib-samples", type=int, default=None, help="default: the small-model default (16)")
    ap.add_argument("--calib-seq-len", type=int, default=None, help="default: the small-model default (512)")
    ap.add_argument("--plans", default="/tmp/wina-greedy-plans", help="plan folders, one per variant (resumed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="append one JSON line per measurement (and skip those there)")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from rotation_study import texts
    from wina.allocate import allocate
    from wina.calibrate import calibrate, default_sizes, sample_self
    from wina.models import load
    from wina.perplexity import perplexity
    from wina.plan import apply_plan
    from wina.transform import is_transformed

    variants = [v for v in args.variants.split(",") if v]
    allocations = [a for a in args.allocations.split(",") if a]
    targets = [float(s) for s in args.sparsities.split(",") if s]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v}; choose from {', '.join(VARIANTS)}")

    records: list[dict] = []
    done: set = set()
    if args.json and Path(args.json).exists():
        for line in Path(args.json).read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("max_tokens") == args.max_tokens and r.get("kind") in ("dense", "sparse", "dense-rotated"):
                records.append(r)
                done.add(key(r))

    mach = machine()

    def emit(**kw) -> dict:
        kw.update(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  max_tokens=args.max_tokens, context=args.context)
        line = json.dumps(kw)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
        if kw.get("kind") in ("dense", "sparse", "dense-rotated"):
            records.append(kw)
            done.add(key(kw))
        return kw

    t_start = time.time()
    base = load("smollm2-135m", dtype="float32", device="cpu")
    pristine, tok = base.model, base.tokenizer
    pristine.eval()
    d = default_sizes(pristine.config)
    n_s = args.calib_samples or d["samples"]
    n_l = args.calib_seq_len or d["seq_len"]
    ids_file = Path(args.ids_file)
    if ids_file.exists():
        ids = torch.load(ids_file)
        if tuple(ids.shape) != (n_s, n_l):
            raise SystemExit(f"{ids_file} holds {tuple(ids.shape)} ids, not {n_s} x {n_l}; use another --ids-file")
    else:
        t = time.time()
        ids = sample_self(pristine, tok, n_s, n_l, seed=0)
        torch.save(ids, ids_file)
        emit(kind="timing", stage="sample_self", seconds=round(time.time() - t, 1))
    emit(kind="setup", machine=mach, calib=list(ids.shape), ids_file=str(ids_file), defaults=d,
         variants=variants, allocations=allocations, targets=targets)

    corpora = {k: v for k, v in texts().items() if k in TEXTS}

    def ppl(model, text: str) -> float:
        return perplexity(model, tok, corpora[text], context=args.context, max_tokens=args.max_tokens).perplexity

    for name in corpora:
        if ("dense", None, None, None, name, args.max_tokens) not in done:
            emit(kind="dense", text=name, perplexity=round(ppl(pristine, name), 4))

    for v in variants:
        method, rotation = VARIANTS[v]
        todo = [(a, s, name) for a in allocations for s in targets for name in corpora
                if ("sparse", v, a, s, name, args.max_tokens) not in done]
        if not todo:
            continue
        # 1. calibrate + allocate on its own copy (the pca variant rotates it in place)
        m = copy.deepcopy(pristine)
        out = Path(args.plans) / v
        t = time.time()
        plan = calibrate(m, tok, method=method, source="self", input_ids=ids, out=out,
                         model_id="smollm2-135m", rotation=rotation)
        t1 = time.time()
        if not (plan.allocated and plan.global_order is not None):
            plan = allocate(m, tok, plan, mode="layer")
            t2 = time.time()
            plan = allocate(m, tok, plan, mode="global")      # reuses the within-layer trajectories
            t3 = time.time()
            emit(kind="timing", variant=v, calibrate_s=round(t1 - t, 1), allocate_layer_s=round(t2 - t1, 1),
                 allocate_global_extra_s=round(t3 - t2, 1), allocation=plan.meta["allocation"])
        else:
            emit(kind="timing", variant=v, calibrate_s=round(t1 - t, 1), note="plan resumed, allocation done")
        del m
        # 2. evaluate on a fresh copy of the pristine model (apply_plan applies the plan's rotation)
        model = copy.deepcopy(pristine)
        for a in allocations:
            for s in targets:
                if all(("sparse", v, a, s, name, args.max_tokens) in done for name in corpora):
                    continue
                sp = apply_plan(model, plan, s, mode=a)          # refined thresholds (the default)
                try:
                    if rotation is not None and ("dense-rotated", v, None, None, "wikitext-2", args.max_tokens) not in done:
                        assert is_transformed(model) and model._wina_transform.rotation == rotation
                        with sp.paused():
                            emit(kind="dense-rotated", variant=v, text="wikitext-2",
                                 perplexity=round(ppl(model, "wikitext-2"), 4))
                    nominal = plan.effective_at(s, a)
                    for name in corpora:
                        if ("sparse", v, a, s, name, args.max_tokens) in done:
                            continue
                        sp.reset_counters()
                        p = ppl(model, name)
                        emit(kind="sparse", variant=v, method=method, rotation=rotation, allocation=a,
                             target=s, nominal=round(nominal, 4), text=name, perplexity=round(p, 4),
                             measured=round(sp.measured_sparsity(), 4))
                finally:
                    sp.remove()
        del model

    emit(kind="end", total_s=round(time.time() - t_start, 1))
    print()
    print(tables(records, variants, allocations, targets, list(corpora)))


def tables(records: list[dict], variants, allocations, targets, text_names) -> str:
    dense = {r["text"]: r["perplexity"] for r in records if r["kind"] == "dense"}
    cell = {(r["variant"], r["allocation"], r["target"], r["text"]): r for r in records if r["kind"] == "sparse"}
    short = {"wikitext-2": "wiki", "gsm8k": "gsm8k", "hellaswag": "hellaswag"}
    cols = [(s, name) for s in targets for name in text_names]
    out = ["### All texts: perplexity (measured sparsity on that text)", "",
           "| variant | allocation | " + " | ".join(f"{s:.0%} {short.get(n, n)}" for s, n in cols) + " |",
           "|---|---|" + "---|" * len(cols),
           "| dense | – | " + " | ".join(f"{dense[n]:.2f}" if n in dense else "–" for _, n in cols) + " |"]
    for v in variants:
        for a in allocations:
            cs = []
            for s, name in cols:
                r = cell.get((v, a, s, name))
                cs.append(f"{r['perplexity']:.2f} ({100 * r['measured']:.1f} %)" if r else "–")
            out.append(f"| {v} | {a} | " + " | ".join(cs) + " |")
    out.append("")
    for name in text_names:
        out += [f"### {name} (dense {dense.get(name, float('nan')):.2f})", "",
                "| variant | allocation | " + " | ".join(f"{s:.0%}" for s in targets) + " |",
                "|---|---|" + "---|" * len(targets)]
        for v in variants:
            for a in allocations:
                cs = []
                for s in targets:
                    r = cell.get((v, a, s, name))
                    cs.append(f"{r['perplexity']:.2f} ({r['measured']:.1%})" if r else "–")
                out.append(f"| {v} | {a} | " + " | ".join(cs) + " |")
        out.append("")
    pairs = [(x, y) for x, y in (("wina", "teal"), ("wina-pca", "teal"), ("wina-pca", "wina"))
             if x in variants and y in variants]
    for num, den in pairs:
        out += [f"### perplexity ratio {num} / {den}, same allocation rule: at the same nominal sparsity "
                f"[measured-sparsity difference, points] / at matched measured sparsity ({den} interpolated)", "",
                "| allocation | sparsity | " + " | ".join(text_names) + " |", "|---|---|" + "---|" * len(text_names)]
        for a in allocations:
            for s in targets:
                cs = []
                for name in text_names:
                    x, y = cell.get((num, a, s, name)), cell.get((den, a, s, name))
                    if not (x and y):
                        cs.append("–")
                        continue
                    ref = matched(cell, dense.get(name), den, a, targets, name, x["measured"])
                    cs.append(f"{x['perplexity'] / y['perplexity']:.3f} [{100 * (x['measured'] - y['measured']):+.1f}]"
                              + (f" / {x['perplexity'] / ref:.3f}" if ref else " / –"))
                out.append(f"| {a} | {s:.0%} | " + " | ".join(cs) + " |")
        out.append("")
    out += ["Matched measured sparsity: the reference's perplexity at the other's measured sparsity on the "
            "same text, interpolated linearly in log-perplexity between the reference's two neighbouring "
            "measured points (dense = 0 %); if log-perplexity is convex in sparsity the chord "
            "overestimates the reference, so a ratio above 1 there is not an artefact of the interpolation.", ""]
    if "uniform" in allocations:
        out += ["### greedy / uniform perplexity, same variant, same nominal sparsity "
                "[measured-sparsity difference, points]", "",
                "| variant | allocation | sparsity | " + " | ".join(text_names) + " |",
                "|---|---|---|" + "---|" * len(text_names)]
        for v in variants:
            for a in [a for a in allocations if a != "uniform"]:
                for s in targets:
                    cs = []
                    for name in text_names:
                        x, y = cell.get((v, a, s, name)), cell.get((v, "uniform", s, name))
                        cs.append(f"{x['perplexity'] / y['perplexity']:.3f} [{100 * (x['measured'] - y['measured']):+.1f}]"
                                  if x and y else "–")
                    out.append(f"| {v} | {a} | {s:.0%} | " + " | ".join(cs) + " |")
        out.append("")
    return "\n".join(out)


def matched(cell: dict, dense_ppl, variant: str, allocation: str, targets, text: str, measured: float):
    """``variant``'s perplexity at ``measured`` sparsity on ``text`` (same allocation rule),
    interpolated linearly in log-perplexity between its neighbouring measured points; None outside."""
    import math
    pts = [(0.0, dense_ppl)] if dense_ppl else []
    pts += [(r["measured"], r["perplexity"]) for s in targets
            if (r := cell.get((variant, allocation, s, text)))]
    pts.sort()
    for (m0, p0), (m1, p1) in zip(pts, pts[1:]):
        if m0 <= measured <= m1 and m1 > m0:
            f = (measured - m0) / (m1 - m0)
            return math.exp((1 - f) * math.log(p0) + f * math.log(p1))
    return None


if __name__ == "__main__":
    main()
