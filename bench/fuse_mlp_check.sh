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
bash bench/levels.sh "$MODELS" "0 1 2"
