"""Run 20 of docs/gpu-notes.md: a chain of dependent single-token GEMVs (llama-2-7b's o 4096->4096,
up 4096->11008, down 11008->4096, for 8 layers: 24 matrices, 1.7 GB of weights, x_{m+1} = y_m) run
  * as one persistent launch (`chain_*` in chain.cu: items wait on the previous matrix's column-block
    flags, so one matrix's tail overlaps the next one's weight stream), with and without an L2
    prefetch of each item's rows before its wait,
  * as one launch per matrix of the same kernel (the baseline with identical code),
  * through the library's dense Triton GEMV (the "vs dense" column), and through cuBLAS (torch.matmul),
each checked matrix by matrix against a float32 product of the kernel's own input, and timed in a
CUDA graph (the flag reset included). The question: how much of the ~3-5 us per-launch cost
(runs 17-19) goes away when launches stop being separate.
From the repo root on the GPU:  python3 bench/cuda_gather/chain_probe.py [--layers 8] [--kps 256,512,512]
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile

import torch

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe import loader  # noqa: E402  (bench/cuda_gather/probe.py)

from bench.chain_check import ChainChecks, chain_thresholds, measure  # noqa: E402
from bench.probe_gemv import time_graph  # noqa: E402
from wina.bench import copy_bandwidth  # noqa: E402

# warps, U rows in flight, blocks per SM (launch bounds): dense (chain_*) and sparse (schain_*) kernels
VARIANTS = [(8, 8, 2), (8, 16, 2), (4, 8, 4), (4, 16, 3), (4, 16, 4), (4, 32, 2), (2, 16, 6)]
SVARIANTS = [(8, 8, 2), (8, 16, 2), (4, 8, 4), (4, 16, 3), (4, 32, 2)]
MAT = struct.Struct("<7Q6iQfi")                                 # struct Mat in chain.cu (96 bytes)


class Chain(ChainChecks):
    """The chain's weights, activations, workspaces and its two Mat tables (persistent: item0 runs on
    through the chain; per-launch: item0 = 0 for every matrix)."""

    def __init__(self, layers: int, kps: list[int], gen: torch.Generator, sparsity: float = 0.0):
        shapes = [(4096, 4096, "o"), (4096, 11008, "mlp_in"), (11008, 4096, "down")] * layers
        self.shapes = shapes
        self.w = [(torch.randn(k, n, device="cuda", generator=gen) / k ** 0.5).to(torch.bfloat16) for k, n, _ in shapes]
        self.x0 = torch.randn(4096, device="cuda", generator=gen).to(torch.bfloat16)
        self.y = [torch.empty(n, dtype=torch.bfloat16, device="cuda") for _, n, _ in shapes]
        self.kps = [kps[i % 3] for i in range(len(shapes))]
        # sparse chain: WINA-style scales per matrix and thresholds for the target sparsity
        self.sparsity, self.sparse = sparsity, sparsity > 0
        self.c = [torch.rand(k, device="cuda", generator=gen) + 0.5 for k, _, _ in shapes]
        self.thr = chain_thresholds(self.x0, self.w, self.c, sparsity)
        self.thr_t = [torch.tensor([t], device="cuda") for t in self.thr]
        self.split = [-(-k // p) for (k, _, _), p in zip(shapes, self.kps)]
        self.nblk = [n // 256 for _, n, _ in shapes]
        # every matrix has its own partial sums and counters: in one launch, matrices overlap in time
        psz = [s * n for s, (_, n, _) in zip(self.split, shapes)]
        self.part = torch.empty(sum(psz), device="cuda")
        self.cnt = torch.zeros(sum(self.nblk), dtype=torch.int32, device="cuda")
        self.flags = torch.zeros(sum(self.nblk), dtype=torch.int32, device="cuda")
        offs = [sum(self.nblk[:i]) for i in range(len(shapes))]
        poffs = [sum(psz[:i]) for i in range(len(shapes))]
        self.items = [b * s for b, s in zip(self.nblk, self.split)]
        self.total = sum(self.items)
        recs_p, recs_s, item0 = [], [], 0
        for i, (k, n, _) in enumerate(shapes):
            x = self.x0 if i == 0 else self.y[i - 1]
            flag_in = 0 if i == 0 else self.flags.data_ptr() + 4 * offs[i - 1]
            common = (self.w[i].data_ptr(), x.data_ptr(), self.y[i].data_ptr(), self.part.data_ptr() + 4 * poffs[i],
                      self.cnt.data_ptr() + 4 * offs[i], flag_in, self.flags.data_ptr() + 4 * offs[i])
            ints = (k, n, self.kps[i], self.split[i], self.nblk[i])
            tail = (self.c[i].data_ptr(), self.thr[i], 0)
            recs_p.append(MAT.pack(*common, *ints, item0, *tail))
            recs_s.append(MAT.pack(*common, *ints, 0, *tail))
            item0 += self.items[i]
        self.mats_p = torch.frombuffer(bytearray(b"".join(recs_p)), dtype=torch.uint8).cuda()
        self.mats_s = torch.frombuffer(bytearray(b"".join(recs_s)), dtype=torch.uint8).cuda()
        self.bytes = sum(k * n * 2 for k, n, _ in shapes)


def chain_forms(drv, ch: Chain, name: str, warps: int, minb: int, sms: int, extra: list):
    """The kernel ``name`` over the whole chain as one persistent launch, and as one launch per matrix
    (``extra``: the kernel's arguments after (mats, m_count, total))."""
    def persistent():
        ch.flags.zero_()
        drv.launch(name, (sms * minb, 1), warps * 32, [ch.mats_p, len(ch.w), ch.total, *extra])

    def separate():
        ch.flags.zero_()
        for i in range(len(ch.w)):
            drv.launch(name, (ch.items[i], 1), warps * 32,
                       [ch.mats_s[i * MAT.size:(i + 1) * MAT.size], 1, ch.items[i], *extra])
    return persistent, separate


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kps", default="256,512,512", help="K-chunk of o, up, down")
    ap.add_argument("--prefetch", default="0,1", help="dense chain: without / with the L2 prefetch")
    ap.add_argument("--sparsity", type=float, default=0.0, help="> 0: the sparse chain (schain_*, in-block compaction)")
    args = ap.parse_args()
    drv = loader("", os.environ.get("OUT") or tempfile.mkdtemp(), source="chain.cu")
    bw = copy_bandwidth("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ch = Chain(args.layers, [int(v) for v in args.kps.split(",")], torch.Generator(device="cuda").manual_seed(0),
               args.sparsity)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, {sms} SMs; chain of {len(ch.w)} matrices, {ch.bytes / 1e9:.2f} GB, "
          f"{ch.total} items, sparsity {ch.sparsity:.0%}", flush=True)
    rows = []
    if ch.sparsity:
        for warps, u, minb in SVARIANTS:
            name = f"schain_{warps}_{u}_{minb}"
            persistent, separate = chain_forms(drv, ch, name, warps, minb, sms, [])
            measure(ch, rows, bw, f"{name} persistent", persistent)
            measure(ch, rows, bw, f"{name} one launch per matrix", separate)
        measure(ch, rows, bw, "library sparse GEMV (Triton), one launch per matrix",
                ch.library, lambda: ch.library(keep=True))
    else:
        for warps, u, minb in VARIANTS:
            name = f"chain_{warps}_{u}_{minb}"
            for prefetch in map(int, args.prefetch.split(",")):
                persistent, separate = chain_forms(drv, ch, name, warps, minb, sms, [prefetch])
                measure(ch, rows, bw, f"{name} persistent, prefetch {prefetch}", persistent)
                measure(ch, rows, bw, f"{name} one launch per matrix, prefetch {prefetch}", separate)
        measure(ch, rows, bw, "library dense GEMV (Triton), one launch per matrix",
                ch.library, lambda: ch.library(keep=True))
        xs = [ch.x0[None]] + [y[None] for y in ch.y[:-1]]

        def cublas_chain():
            for i, w in enumerate(ch.w):
                torch.matmul(xs[i], w, out=ch.y[i][None])
        measure(ch, rows, bw, "cuBLAS, one launch per matrix", cublas_chain)
    t_dense = time_graph(lambda: ch.library(sparse=False), reps=5)
    print(f"\nchain of {len(ch.w)} matrices, {ch.bytes / 1e9:.2f} GB, sparsity {ch.sparsity:.0%}; library dense "
          f"chain {t_dense:.1f} us ({ch.bytes / (t_dense * 1e-6) / bw:.2f} of copy bw)")
    print(f"{'us':>8} {'of copy bw':>10} {'vs dense':>8}  variant (bandwidth on the bytes read)")
    for label, t, byts, note in rows:
        if t is None:
            print(f"{'-':>8} {'-':>10} {'-':>8}  {label}: {note}")
        else:
            print(f"{t:8.1f} {byts / (t * 1e-6) / bw:10.2f} {t_dense / t:7.2f}x  {label}  ({note})")


if __name__ == "__main__":
    main()
