"""One eager launch of each llama-2-7b GEMV role (dense, and sparse at 50 %) between
cudaProfilerStart/Stop, for Nsight Compute (docs/gpu-notes.md, run 14):
    ncu --profile-from-start off --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \
        python3 bench/ncu_gemv.py > ncu.csv
The library's configs are used (the precompact roles also launch their small compaction kernel)."""
import sys

import torch

sys.path.insert(0, ".")
from bench.probe_gemv import CASES  # noqa: E402
from wina.kernels import gemv  # noqa: E402
from wina.kernels.kernels import _prepare_input  # noqa: E402


@torch.no_grad()
def main():
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    calls = []
    for name, role, k, n, bounds, pre, act, res_on in CASES:
        w = torch.randn(k, n, generator=gen, device=dev).to(dt)
        n_seg = len(bounds) + 1
        c = torch.rand(n_seg, k, generator=gen, device=dev) + 0.5
        x = torch.randn(1, 2 * k if act else k, generator=gen, device=dev).to(dt)
        ssq = (x.float() ** 2).sum(-1, keepdim=True) if pre else None
        res = torch.randn(1, n, generator=gen, device=dev).to(dt) if res_on else None
        xf = _prepare_input(x, k, ssq, 1e-5, act)
        thr = torch.tensor([float(torch.quantile((xf.abs()[0] * c[j]).float(), 0.5)) for j in range(n_seg)],
                           device=dev)
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
