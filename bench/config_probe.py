"""Pick the sparse GEMV config of each decode-step role by timing the whole engine, then bench.

Usage (on the GPU, from the repo root):
    python3 bench/config_probe.py [--models llama-2-7b,llama-3-8b,qwen-2.5-7b,phi-4]
                                  [--sparsity 0.5] [--new 128] [--final]

A kernel sweep times each GEMV shape alone; the winner there need not be the winner inside the
decode step (run 8, docs/gpu-notes.md: the pre-compaction config won every Llama-2 sweep yet cost
Llama-3-8B 10 %). Here, per model shape: one engine, thresholds for ``--sparsity``, decode
tokens/s with every role on the base config, then with one role at a time switched to each
candidate. Per role, the candidate with the best geometric-mean speed-up over the models wins
(roles are assumed independent). ``--final`` then runs the full benchmark (all sparsities, the
kernel table) with the winners set as role configs. Writes $OUT/probe.json (and bench.json);
prints the tables last.
"""
import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.getcwd())
OUT = os.environ.get("OUT", "/tmp/out")
os.makedirs(OUT, exist_ok=True)

ap = argparse.ArgumentParser()
ap.add_argument("--models", default="llama-2-7b,llama-3-8b,qwen-2.5-7b,phi-4")
ap.add_argument("--sparsity", type=float, default=0.5)
ap.add_argument("--new", type=int, default=128, help="new tokens per timed generate")
ap.add_argument("--final", action="store_true", help="then run the full benchmark with the winners")
ap.add_argument("--hf-tokens", type=int, default=64, help="transformers generate tokens in the final bench")
ap.add_argument("--device", default="cuda")
ap.add_argument("--layers", type=int, default=None, help="shrink the shapes (a smoke test)")
args = ap.parse_args()
T0 = time.time()


def stamp(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


import torch  # noqa: E402

from wina import bench  # noqa: E402
from wina.cli.bench_tables import print_bench  # noqa: E402
from wina.engine import Engine  # noqa: E402
from wina.kernels import GemvConfig, set_role_config  # noqa: E402
from wina.kernels.config import clear_shape_configs  # noqa: E402

ROLES = ("attn_in", "o", "mlp_in", "down")
CANDIDATES = {
    "base": GemvConfig(256, 64, 264, 4),                     # run 4's sparse winner
    "pipe": GemvConfig(128, 64, 264, 4, pipeline=1),         # two-tile pipeline (o_proj's winner)
    # runs 6-7 sweep winner on 3 shapes (min_ctas=3 since run 11: the library's _PRE)
    "precompact": GemvConfig(128, 64, 528, 4, pipeline=1, precompact=1, min_ctas=3),
}
PROMPT = 128


def use(assign: dict) -> None:
    for role, name in assign.items():
        set_role_config(role, CANDIDATES[name], sparse=True)


def tps(eng, ids) -> float:
    eng.drop_cache(eng.cache)      # the configs are baked into a capture: capture again
    return bench.engine_tps(eng, ids, args.new, sparse=True)["decode_tokens_per_s"]


clear_shape_configs(sparse=True)                                 # exact-shape sparse entries off
models = args.models.split(",")
base = {r: "base" for r in ROLES}
probe = {}
for mname in models:
    stamp(f"{mname}: building")
    cfg = bench.shape_config(mname, args.layers)
    model = bench.random_model(cfg, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32, 0)
    eng = Engine.from_model(model, scales=bench.scales_for(model, "wina"), max_seq_len=PROMPT + args.new + 8,
                            use_sparsifier=False)
    del model
    torch.cuda.empty_cache()
    ids = torch.randint(0, cfg.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    eng.set_sparsity(bench.engine_thresholds(eng, ids, args.sparsity))
    use(base)
    rec = {"base": tps(eng, ids)}
    for role in ROLES:
        for cand in CANDIDATES:
            if cand == "base":
                continue
            use({**base, role: cand})
            rec[f"{role}={cand}"] = tps(eng, ids)
    use(base)
    probe[mname] = rec
    stamp(f"{mname}: " + ", ".join(f"{k} {v:.0f}" for k, v in rec.items()))
    del eng
    torch.cuda.empty_cache()

winners = {}
for role in ROLES:
    scores = {}
    for cand in CANDIDATES:
        key = "base" if cand == "base" else f"{role}={cand}"
        scores[cand] = math.exp(sum(math.log(probe[m][key] / probe[m]["base"]) for m in models) / len(models))
    winners[role] = max(scores, key=scores.get)
    stamp(f"role {role}: " + ", ".join(f"{c} {s:.3f}" for c, s in scores.items()) + f" -> {winners[role]}")
with open(f"{OUT}/probe.json", "w") as f:
    json.dump({"sparsity": args.sparsity, "new_tokens": args.new, "probe": probe,
               "candidates": {k: list(v.__dict__.values()) for k, v in CANDIDATES.items()},
               "winners": winners}, f, indent=1)

if args.final:
    use(winners)
    stamp(f"final bench with role configs {winners}")
    res = bench.run_bench(models, hf_new_tokens=args.hf_tokens, kernels=True, json_path=f"{OUT}/bench.json",
                          device=args.device, num_hidden_layers=args.layers,
                          on_event=lambda ev: print(f"    {ev.message}", flush=True))
    for m in res["models"]:
        if "error" in m:
            print(m.get("traceback", m["error"]), flush=True)
    stamp("done")
    print_bench(res)
print("probe, decode tokens/s at", args.sparsity)
cols = list(next(iter(probe.values())).keys())
for m in models:
    print(f"  {m:12s} " + " ".join(f"{c}={probe[m][c]:.0f}" for c in cols))
print("winners:", winners)
