#!/usr/bin/env bash
# The benchmark with the fused MLP paths off / level 1 / level 2 (WINA_FUSE_MLP), each under a
# timeout, then one summary table (docs/gpu-notes.md runs 11-12). From the repo root, on the GPU:
#   bash bench/levels.sh [MODELS] [LEVELS] [gpu_bench.py options...]   (defaults: llama-2-7b, "0 1 2")
set -u
MODELS="${1:-llama-2-7b}"
LEVELS="${2:-0 1 2}"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
for level in $LEVELS; do
    mkdir -p "$OUT/fuse$level"
    WINA_FUSE_MLP=$level OUT="$OUT/fuse$level" timeout 300 python3 bench/gpu_bench.py --skip-tests --skip-tune \
        --precompact -1 --models $MODELS "${@:3}" > "$OUT/fuse$level.txt" 2>&1
    echo "level $level rc=$?"
done
python3 - "$OUT" $LEVELS <<'PY'
import json, os, sys
out = sys.argv[1]
print(f"{'level':>5} {'model':>12} {'dense':>7} " + " ".join(f"{s:>14}" for s in ("25%", "40%", "50%", "65%")))
for level in sys.argv[2:]:
    p = os.path.join(out, f"fuse{level}", "bench.json")
    if not os.path.exists(p):
        print(f"{level:>5} (no results)")
        continue
    for m in json.load(open(p))["models"]:
        if "error" in m:
            print(f"{level:>5} {m['model']:>12} error: {m['error']}")
            continue
        cells = [f"{v['decode_tokens_per_s']:6.0f} ({v['speedup_vs_dense']:.2f}x)" for _, v in sorted(m["sparse"].items())]
        print(f"{level:>5} {m['model']:>12} {m['dense']['decode_tokens_per_s']:7.0f} " + " ".join(f"{c:>14}" for c in cells))
PY
