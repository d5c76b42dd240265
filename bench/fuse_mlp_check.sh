#!/usr/bin/env bash
# Run 11 of docs/gpu-notes.md in one device command: the GPU tests once, then the benchmark with the
# fused MLP paths off / level 1 / level 2 (WINA_FUSE_MLP), each under a timeout (level 2 spins on
# flags: a hang must not eat the whole command). Prints one summary table last.
#   bash bench/fuse_mlp_check.sh [MODELS]        (default llama-2-7b; from the repo root, on the GPU)
set -u
MODELS="${1:-llama-2-7b}"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_kernels.py tests/test_engine.py \
    > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? ($(grep -E 'passed|failed' "$OUT/pytest.log" | tail -1))"
grep -E "FAILED|fused gate/up" "$OUT/pytest.log" | head -20
for level in 0 1 2; do
    mkdir -p "$OUT/fuse$level"
    WINA_FUSE_MLP=$level OUT="$OUT/fuse$level" timeout 150 python3 bench/gpu_bench.py --skip-tests --skip-tune \
        --precompact -1 --models "$MODELS" > "$OUT/fuse$level.txt" 2>&1
    echo "level $level rc=$?"
done
python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
print(f"{'level':>5} {'model':>12} {'dense':>7} " + " ".join(f"{s:>14}" for s in ("25%", "40%", "50%", "65%")))
for level in (0, 1, 2):
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
EOF
