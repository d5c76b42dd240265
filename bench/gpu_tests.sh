#!/usr/bin/env bash
# GPU check of the kernel split and the removed experiments (issue 17, point 4; docs/gpu-notes.md,
# "Experiments removed from the product"): the GPU tests, then the shortest benchmark that still
# compares with runs 13 and 21 (llama-2-7b shape, library configs, no sweep, kernel table with the
# registers per launch). Logs and JSON go to $OUT. From the repo root, on the device machine:
#   bash bench/gpu_tests.sh          # both steps (on a fresh machine, where Triton compiles every
#   bash bench/gpu_tests.sh tests    # kernel, they may not fit one 10-minute call: then one step
#   bash bench/gpu_tests.sh bench    # per call, on the same warm machine)
# The interpreter test (CPU only, ~4 min single-threaded) is left to the CPU runs.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; STEP=${1:-all}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; git log --oneline -1 2>/dev/null; } | tee "$OUT/gpu_tests.txt"
[ "$STEP" = bench ] || { timeout 420 python3 -m pytest -q -rP -p no:cacheprovider tests/test_kernels.py tests/test_engine.py tests/test_chat.py --deselect tests/test_kernels.py::test_triton_kernel_in_the_interpreter > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?" | tee -a "$OUT/gpu_tests.txt"; grep -E "FAILED|Error|transformers bf16|sparse 50%" "$OUT/pytest.log" | head -40; tail -3 "$OUT/pytest.log"; }
[ "$STEP" = tests ] || { timeout 420 python3 bench/gpu_bench.py --skip-tests --skip-tune --precompact -1 --models llama-2-7b > "$OUT/bench.log" 2>&1; echo "gpu_bench rc=$?" | tee -a "$OUT/gpu_tests.txt"; tail -45 "$OUT/bench.log"; }
