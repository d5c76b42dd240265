"""Where the transform loses, and which rotation helps (issue 20), on the embedded model.

    python bench/rotation_study.py [--tokens 4096] [--sparsities 0.25,0.4,0.5] [--out docs/rotation-study.md]
                                   [--pca-text boolq --pca-windows 64]

1. Calibration text: the model's own samples (8 x 256 tokens, as the quick preset), cached in
   --cache. The activation-PCA rotation's moments come from it, nothing else does (with another
   ``--pca-windows``, from that many windows of 256 tokens of the model's own text); with
   ``--pca-text boolq`` they come instead from ``--pca-windows`` windows of 256 tokens of BoolQ's
   validation passages (Wikipedia paragraphs; no text evaluated here).
2. Per block input (the residual stream after RMSNorm, what q/k/v and gate/up read) and per
   projection input: kurtosis over channels and the share of energy in the top 1 % channels,
   averaged over tokens, for the model as it is, after the SVD transform and after the PCA rotation.
3. Per matrix, on the calibration text: the relative gating error ||W x - W mask(x)|| / ||W x|| of
   uniform 50 % top-k, TEAL and WINA scores, each rotation (the layer's own dense input: no
   compounding).
4. Perplexity at each sparsity (uniform top-k, first 1 % of each window dense) on wikitext-2 test
   (the text the configuration is chosen on) and two held-out texts never used to choose anything:
   GSM8K test (question and answer) and HellaSwag validation (context and the right ending).
Prints markdown and writes it to --out.
"""
from __future__ import annotations

import argparse
import bz2
import copy
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from wina.calibrate import calibration_ids
from wina.models import load
from wina.perplexity import perplexity, read_text
from wina.sparsify import gate_reference, sparsify
from wina.transform import block_input_moments, transform

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def texts(n_chars: int = 60000) -> dict[str, str]:
    wiki = read_text(DATA / "wikitext2" / "wiki.test.raw")
    gsm = []
    for line in (DATA / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        gsm.append(r["question"] + "\n" + r["answer"])
    lines = bz2.decompress((DATA / "hellaswag" / "hellaswag_val_full.txt.bz2").read_bytes()).decode().splitlines()
    hs = []
    for i in range(0, len(lines) - 5, 6):
        ctx, label, ends = lines[i], int(lines[i + 1]), lines[i + 2:i + 6]
        hs.append(ctx + " " + ends[label])
    return {"wikitext-2": wiki, "gsm8k": "\n\n".join(gsm)[:n_chars * 2], "hellaswag": "\n".join(hs)[:n_chars * 2]}


def channel_stats(x: torch.Tensor) -> tuple[float, float]:
    """(kurtosis over channels, share of energy in the top 1 % channels), mean over tokens."""
    x = x.double().reshape(-1, x.shape[-1])
    m2 = x.pow(2).mean(-1)
    kurt = (x.pow(4).mean(-1) / m2.pow(2)).mean().item()
    k = max(1, x.shape[-1] // 100)
    e = x.pow(2)
    top = e.topk(k, dim=-1).values.sum(-1) / e.sum(-1)
    return kurt, top.mean().item()


@torch.no_grad()
def record_inputs(model, ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Each projection's input over ``ids`` (one batch), from a dense forward."""
    from wina.adapters import adapter_for, iter_projections
    seen: dict = {}
    handles = []
    for layer, proj, lin in iter_projections(model, adapter_for(model)):
        def hook(mod, args, key=(layer, proj)):
            seen[key] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
        handles.append(lin.register_forward_pre_hook(hook))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def gating_errors(model, inputs, method: str, sparsity: float, weighted: str) -> dict:
    sp = sparsify(model, method, sparsity, weighted=weighted)
    out = {}
    try:
        for key, x in inputs.items():
            g = sp.gates[key]
            w = sp._modules[key].weight
            xm, _ = gate_reference(x, g, "topk")
            y = x @ w.T
            e = ((x - xm) @ w.T).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-30)
            out[key] = e.mean().item()              # per token, then the mean: every token counts
    finally:
        sp.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--sparsities", default="0.5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="/tmp/wina-rotation-calib.pt")
    ap.add_argument("--configs", default="teal,wina,wina-all,teal-svd,wina-svd,teal-pca,wina-pca,wina-all-pca,teal-pcab,wina-pcab")
    ap.add_argument("--skip-analysis", action="store_true")
    ap.add_argument("--pca-text", choices=("self", "boolq"), default="self")
    ap.add_argument("--pca-windows", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "docs" / "rotation-study.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    base = load("smollm2-135m", dtype="float32", device="cpu")
    tok = base.tokenizer
    cache = Path(args.cache)
    if cache.exists():
        ids = torch.load(cache)
    else:
        ids = calibration_ids(base.model, tok, "self", 8, 256)
        torch.save(ids, cache)
    lines = [f"# Rotation study (issue 20): embedded model, {datetime.date.today()}",
             "", f"{platform.machine()} CPU, torch {torch.__version__}, {args.threads} thread(s); "
             f"SmolLM2-135M-Instruct float32; calibration: the model's own text, {ids.shape[0]} x {ids.shape[1]} tokens "
             "(`bench/rotation_study.py`).", ""]

    t = time.time()
    pca_ids = ids
    if args.pca_text == "boolq":
        passages = [json.loads(line)["passage"]
                    for line in (DATA / "boolq" / "val.jsonl").read_text(encoding="utf-8").splitlines()]
        text_ids = tok("\n\n".join(passages), return_tensors="pt").input_ids[0]
        pca_ids = text_ids[:args.pca_windows * 256].reshape(args.pca_windows, 256)
        lines += [f"The PCA rotations' moments: {args.pca_windows} x 256 tokens of BoolQ validation passages.", ""]
    elif args.pca_windows != ids.shape[0]:
        pca_ids = calibration_ids(base.model, tok, "self", args.pca_windows, 256)
        lines += [f"The PCA rotations' moments: {args.pca_windows} x 256 tokens of the model's own text.", ""]
    moments = block_input_moments(base.model, pca_ids)
    models = {"none": base.model}
    m = copy.deepcopy(base.model)
    transform(m)
    models["svd"] = m
    m = copy.deepcopy(base.model)
    transform(m, rotation="pca-block", moments=moments)
    models["pcab"] = m
    m = copy.deepcopy(base.model)
    transform(m, rotation="pca", moments=moments)
    models["pca"] = m
    lines.append(f"PCA moments and both transforms: {time.time() - t:.1f} s.")
    lines.append("")
    print("\n".join(lines), flush=True)

    corpora = texts()
    if not args.skip_analysis:
        # held-out: the first 2 x 256 tokens of wikitext-2 (the PCA never saw them)
        wt = tok(corpora["wikitext-2"][:20000], return_tensors="pt").input_ids[0, :512].reshape(2, 256)
        batch = wt
        lines += ["The statistics below are measured on a held-out batch (the first 2 × 256 tokens of "
                  "wikitext-2 test), except the in-sample column of the error summary (2 × 256 tokens of "
                  "the calibration text).", ""]
        rec = {name: record_inputs(mod, batch) for name, mod in models.items()}
        rec_in = {name: record_inputs(mod, pca_ids[:2]) for name, mod in models.items()}
        n_layers = max(k[0] for k in rec["none"]) + 1
        # 2. activation statistics of the block inputs (q_proj / gate_proj read them) and of o/down
        from wina.adapters import adapter_for
        ad = adapter_for(base.model)
        probes = [(ad.attn_inputs[0], "attention input"), (ad.mlp_inputs[0], "MLP input"),
                  (ad.attn_output, "o_proj input"), (ad.mlp_output, "down_proj input")]
        lines += ["## Activations: kurtosis over channels / energy share of the top 1 % channels (mean over layers and tokens)", "",
                  "| input | none | SVD transform (svd) | PCA per block (pcab) | PCA, one basis (pca) |", "|---|---|---|---|---|"]
        for proj, label in probes:
            cells = []
            for name in ("none", "svd", "pcab", "pca"):
                st = [channel_stats(rec[name][(i, proj)]) for i in range(n_layers)]
                cells.append(f"{sum(s[0] for s in st) / n_layers:.1f} / {sum(s[1] for s in st) / n_layers:.1%}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        # 3. gating error per matrix
        configs = [("TEAL", "teal", "default"), ("WINA", "wina", "default"), ("WINA all", "wina", "all")]
        errs, errs_in = {}, {}
        for name in ("none", "svd", "pcab", "pca"):
            for label, method, weighted in configs:
                errs[(name, label)] = gating_errors(models[name], rec[name], method, 0.5, weighted)
                errs_in[(name, label)] = gating_errors(models[name], rec_in[name], method, 0.5, weighted)
        projs = sorted({k[1] for k in rec["none"]}, key=list(ad.projections).index)
        lines += ["## Gating error at 50 % top-k: ||W x - W mask(x)|| / ||W x|| per token, mean over tokens and layers", "",
                  "| rotation | score | " + " | ".join(projs) + " | mean | mean in-sample |",
                  "|---|---|" + "---|" * (len(projs) + 2)]
        for (name, label), e in errs.items():
            per = [sum(e[(i, p)] for i in range(n_layers)) / n_layers for p in projs]
            e_in = errs_in[(name, label)]
            m_in = sum(e_in.values()) / len(e_in)
            lines.append(f"| {name} | {label} | " + " | ".join(f"{v:.3f}" for v in per)
                         + f" | {sum(per) / len(per):.3f} | {m_in:.3f} |")
        lines += ["", "Per layer (mean over the matrices of the layer):", "",
                  "| layer | " + " | ".join(f"{n} {lab}" for (n, lab) in errs) + " |", "|---|" + "---|" * len(errs)]
        for i in range(n_layers):
            lines.append(f"| {i} | " + " | ".join(
                f"{sum(e[(i, p)] for p in projs) / len(projs):.3f}" for e in errs.values()) + " |")
        lines.append("")
        print("\n".join(lines[-(n_layers + 30):]), flush=True)

    # 4. perplexity
    sparsities = [float(s) for s in args.sparsities.split(",")]
    lines += [f"## Perplexity, uniform top-k, first {args.tokens} tokens of each text, 512-token windows", "",
              "| configuration | sparsity | " + " | ".join(corpora) + " | measured |", "|---|---|" + "---|" * (len(corpora) + 1)]
    dense_cells = []
    for name in corpora:
        r = perplexity(base.model, tok, corpora[name], max_tokens=args.tokens, batch_size=4)
        dense_cells.append(f"{r.perplexity:.2f}")
    lines.append("| dense | 0 % | " + " | ".join(dense_cells) + " | 0 % |")
    print(lines[-1], flush=True)
    for cfg in args.configs.split(","):
        parts = cfg.split("-")
        method = parts[0]
        weighted = "all" if "all" in parts else "default"
        rot = parts[-1] if parts[-1] in ("svd", "pcab", "pca") else "none"
        model = models[rot]
        for s in sparsities:
            sp = sparsify(model, method, s, weighted=weighted)
            cells = []
            try:
                for name in corpora:
                    r = perplexity(model, tok, corpora[name], max_tokens=args.tokens, batch_size=4)
                    cells.append(f"{r.perplexity:.2f}")
                meas = sp.measured_sparsity()
            finally:
                sp.remove()
            lines.append(f"| {cfg} | {s:.0%} | " + " | ".join(cells) + f" | {meas:.1%} |")
            print(lines[-1], flush=True)
    lines += ["", f"Total {time.time() - t_start:.0f} s."]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
