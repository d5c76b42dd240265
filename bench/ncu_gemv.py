"""One eager launch of each llama-2-7b GEMV role (dense, and sparse at 50 %) between
cudaProfilerStart/Stop, for Nsight Compute (docs/gpu-notes.md, run 14):
    ncu --profile-from-start off --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \
        python3 bench/ncu_gemv.py > ncu.csv
The library's configs are used (the precompact roles also launch their small compaction kernel)."""
import sys

import torch

sys.path.insert(0, ".")
from bench.probe_gemv import CASES, case_inputs, thresholds_at  # noqa: E402
from wina.kernels import gemv  # noqa: E402


@torch.no_grad()
def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    calls = []
    for case in CASES:
        name, role, k, n, bounds, pre, act, res_on = case
        (w,), c, x, ssq, res, xa = case_inputs(case, gen, layers=1)
        thr = thresholds_at(xa, c, 0.5)
        for sparse in (False, True):
            calls.append(lambda w=w, c=c, x=x, ssq=ssq, res=res, thr=thr, sparse=sparse, bounds=bounds, act=act,
                         role=role: gemv(x, w, scales=c, thresholds=thr, bounds=bounds, res=res, ssq_in=ssq,
                                         eps=1e-5, act=act, sparse=sparse, want_ssq=res is not None, role=role))
    for f in calls:          # compile and warm up outside the profiled range
        f(); f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for f in calls:
        f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("order:", [f"{c[0]}:{s}" for c in CASES for s in ("dense", "sparse50")], file=sys.stderr)


if __name__ == "__main__":
    main()
