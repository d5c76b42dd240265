"""Perplexity of the embedded model under uniform top-k sparsity: dense, TEAL, WINA (official
k/gate-only weighting and every-projection weighting), with and without the transform.

    python bench/sparsity_ppl.py [--max-tokens 8192] [--out docs/sparsity-ppl.md]

Windows of 512 tokens over the first --max-tokens tokens of wikitext-2 test (as in
../shared/notes/reference-numbers.md). Prints a markdown table and writes it to --out.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import time
from pathlib import Path

import torch

from wina.models import load
from wina.perplexity import perplexity, read_text
from wina.sparsify import sparsify
from wina.transform import transform

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.65")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/wikitext2/wiki.test.raw"))
    ap.add_argument("--out", default=str(ROOT / "docs/sparsity-ppl.md"))
    ap.add_argument("--only", default=None, help="run only the rows whose name contains this")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    text = read_text(args.data)
    base = load("smollm2-135m")
    tok = base.tokenizer
    sparsities = [float(s) for s in args.sparsities.split(",")]
    configs = [("TEAL", "teal", "default"), ("WINA (k/gate weighted, official)", "wina", "default"),
               ("WINA (all weighted)", "wina", "all")]
    rows: dict[str, dict[float, float]] = {}
    t0 = time.time()

    def ppl(model):
        return perplexity(model, tok, text, max_tokens=args.max_tokens, batch_size=4).perplexity

    for transformed in (False, True):
        model = copy.deepcopy(base.model)
        if transformed:
            transform(model)
        suffix = " + transform" if transformed else ""
        if args.only is None:
            rows["dense" + suffix] = {0.0: ppl(model)}
            print("dense" + suffix, rows["dense" + suffix], flush=True)
        for label, method, weighted in configs:
            if args.only is not None and args.only not in label + suffix:
                continue
            row = rows.setdefault(label + suffix, {})
            for s in sparsities:
                sp = sparsify(model, method, s, weighted=weighted)
                row[s] = ppl(model)
                sp.remove()
                print(label + suffix, s, round(row[s], 2), flush=True)
    header = "| configuration | " + " | ".join(f"{s:.0%}" for s in [0.0] + sparsities) + " |"
    lines = [header, "|---" * (len(sparsities) + 2) + "|"]
    for name, row in rows.items():
        cells = [f"{row[s]:.2f}" if s in row else "" for s in [0.0] + sparsities]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    stamp = (f"Measured {datetime.date.today()} on {platform.machine()} CPU ({os.cpu_count()} cores), "
             f"torch {torch.__version__}, {args.threads} thread(s), {time.time() - t0:.0f} s. "
             f"SmolLM2-135M-Instruct (float32), wikitext-2 test, first {args.max_tokens} tokens, "
             f"512-token windows, uniform top-k, first 1 % of each window dense.")
    table = "\n".join(lines)
    print(table)
    print(stamp)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(f"# Perplexity under uniform top-k sparsity (embedded model)\n\n{stamp}\n\n{table}\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
