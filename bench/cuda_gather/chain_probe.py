"""Run 20 of docs/gpu-notes.md: a chain of dependent single-token GEMVs (llama-2-7b's o 4096->4096,
up 4096->11008, down 11008->4096, for 8 layers: 24 matrices, 1.7 GB of weights, x_{m+1} = y_m) run
  * as one persistent launch (`chain_*` in chain.cu: items wait on the previous matrix's column-block
    flags, so one matrix's tail overlaps the next one's weight stream), with and without an L2
    prefetch of each item's rows before its wait,
  * as one launch per matrix of the same kernel (the baseline with identical code),
  * through the library's dense Triton GEMV, and through cuBLAS (torch.matmul),
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

from bench.probe_gemv import time_graph  # noqa: E402
from wina.bench import copy_bandwidth  # noqa: E402
from wina.kernels.kernels import _gemv_triton, config_for  # noqa: E402

VARIANTS = [(8, 8, 2), (8, 16, 2), (4, 8, 4), (4, 16, 3), (4, 16, 4), (4, 32, 2), (2, 16, 6)]     # warps, U rows in flight, blocks per SM
MAT = struct.Struct("<7Q6iQfi")                                 # struct Mat in chain.cu (96 bytes)


class Chain:
    """The chain's weights, activations, workspaces and its two Mat tables (persistent: item0 runs on
    through the chain; per-launch: item0 = 0 for every matrix)."""

    def __init__(self, layers: int, kps: list[int], gen: torch.Generator, sparsity: float = 0.0):
        shapes = [(4096, 4096, "o"), (4096, 11008, "mlp_in"), (11008, 4096, "down")] * layers
        self.shapes = shapes
        self.w = [(torch.randn(k, n, device="cuda", generator=gen) / k ** 0.5).to(torch.bfloat16) for k, n, _ in shapes]
        self.x0 = torch.randn(4096, device="cuda", generator=gen).to(torch.bfloat16)
        self.y = [torch.empty(n, dtype=torch.bfloat16, device="cuda") for _, n, _ in shapes]
        self.kps = [kps[i % 3] for i in range(len(shapes))]
        # sparse chain: WINA-style scales per matrix and thresholds that drop `sparsity` of each
        # matrix's inputs along a float32 run of the chain (bf16 outputs, as the kernels write them)
        self.sparsity = sparsity
        self.c = [torch.rand(k, device="cuda", generator=gen) + 0.5 for k, _, _ in shapes]
        self.thr = [0.0] * len(shapes)
        if sparsity:
            x = self.x0.float()
            for i, w in enumerate(self.w):
                sc = x.abs() * self.c[i]
                self.thr[i] = float(torch.quantile(sc, sparsity))
                x = ((x * (sc > self.thr[i])) @ w.float()).to(torch.bfloat16).float()
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

    def kept_bytes(self) -> int:
        """Weight bytes a sparse pass reads (the kept rows), from the inputs of the last run."""
        total = 0
        for i, (k, n, _) in enumerate(self.shapes):
            x = (self.x0 if i == 0 else self.y[i - 1]).float()
            total += int((x.abs() * self.c[i] > self.thr[i]).sum()) * n * 2
        return total

    def errors(self) -> float:
        """Worst relative error of y_m against float32 x_m W_m (sparse: x_m gated with the matrix's
        threshold), x_m being what the kernel read."""
        worst = 0.0
        for i, w in enumerate(self.w):
            x = (self.x0 if i == 0 else self.y[i - 1]).float()
            if self.sparsity:
                x = x * (x.abs() * self.c[i] > self.thr[i])
            ref = x @ w.float()
            worst = max(worst, float((self.y[i].float() - ref).norm() / ref.norm()))
        return worst


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kps", default="256,512,512", help="K-chunk of o, up, down")
    ap.add_argument("--prefetch", default="0,1")
    ap.add_argument("--sparsity", type=float, default=0.0, help="> 0: the sparse chain (schain_*, in-block compaction)")
    args = ap.parse_args()
    drv = loader("", os.environ.get("OUT") or tempfile.mkdtemp(), source="chain.cu")
    bw = copy_bandwidth("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ch = Chain(args.layers, [int(v) for v in args.kps.split(",")], torch.Generator(device="cuda").manual_seed(0),
               args.sparsity)
    if args.sparsity:
        sparse_main(drv, ch, bw, sms)
        return
    floor_us = ch.bytes / bw * 1e6
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, {sms} SMs; chain of {len(ch.w)} matrices, {ch.bytes / 1e9:.2f} GB, "
          f"{ch.total} items; at copy bandwidth {floor_us:.1f} us", flush=True)
    rows = []

    def record(label, fn, check=None):
        """``check``: a form of ``fn`` that leaves its outputs in ch.y (when ``fn`` does not)."""
        check = check or fn
        try:
            for y in ch.y:
                y.fill_(float("nan"))
            check()
            torch.cuda.synchronize()
            err = ch.errors()
            t = time_graph(fn, reps=5)
            for y in ch.y:
                y.fill_(float("nan"))
            check()
            torch.cuda.synchronize()
            err2 = ch.errors()
        except Exception as e:  # report, go on
            rows.append((label, None, "error " + str(e).splitlines()[0][:150]))
            print(rows[-1], flush=True)
            return
        rows.append((label, t, f"err {err:.1e} / {err2:.1e}"))
        print(f"{label}: {t:.1f} us ({floor_us / t:.2f} of copy bw), err {err:.1e} / {err2:.1e}", flush=True)

    for warps, u, minb in VARIANTS:
        name = f"chain_{warps}_{u}_{minb}"
        for prefetch in map(int, args.prefetch.split(",")):
            def persistent(name=name, warps=warps, minb=minb, prefetch=prefetch):
                ch.flags.zero_()
                drv.launch(name, (sms * minb, 1), warps * 32, [ch.mats_p, len(ch.w), ch.total, prefetch])

            def separate(name=name, warps=warps, prefetch=prefetch):
                ch.flags.zero_()
                for i in range(len(ch.w)):
                    drv.launch(name, (ch.items[i], 1), warps * 32,
                               [ch.mats_s[i * MAT.size:(i + 1) * MAT.size], 1, ch.items[i], prefetch])
            record(f"{name} persistent, prefetch {prefetch}", persistent)
            record(f"{name} one launch per matrix, prefetch {prefetch}", separate)

    xs = [ch.x0[None]] + [y[None] for y in ch.y[:-1]]
    cfgs = [config_for(k, n, False, role) for k, n, role in ch.shapes]

    def triton_chain(keep=False):
        x = ch.x0[None]
        for i, w in enumerate(ch.w):
            y, _ = _gemv_triton(x, w, None, None, [], None, None, None, 1e-5, 0, False, False, cfgs[i])
            if keep:
                ch.y[i].copy_(y[0])
            x = y

    def cublas_chain():
        for i, w in enumerate(ch.w):
            torch.matmul(xs[i], w, out=ch.y[i][None])
    record("library Triton dense GEMV, one launch per matrix", triton_chain, lambda: triton_chain(True))
    record("cuBLAS, one launch per matrix", cublas_chain)

    print(f"\n{'us':>8} {'of copy bw':>10}  variant  (chain of {len(ch.w)}: {ch.bytes / 1e9:.2f} GB, floor {floor_us:.1f} us)")
    for label, t, note in rows:
        if t is None:
            print(f"{'-':>8} {'-':>10}  {label}: {note}")
        else:
            print(f"{t:8.1f} {floor_us / t:10.2f}  {label}  ({note})")


SVARIANTS = [(8, 8, 2), (8, 16, 2), (4, 8, 4), (4, 16, 3), (4, 32, 2)]


def sparse_main(drv, ch: Chain, bw: float, sms: int) -> None:
    """The sparse chain: schain_* persistent and one launch per matrix, the library's sparse GEMV
    (its default config: compaction launch + GEMV launch) per matrix."""
    from wina.kernels import gemv
    for y in ch.y:
        y.fill_(0)
    rows = []

    def record(label, fn, check=None):
        check = check or fn
        try:
            for y in ch.y:
                y.fill_(float("nan"))
            check()
            torch.cuda.synchronize()
            err = ch.errors()
            byts = ch.kept_bytes()
            t = time_graph(fn, reps=5)
        except Exception as e:  # report, go on
            rows.append((label, None, None, "error " + str(e).splitlines()[0][:150]))
            print(rows[-1], flush=True)
            return
        rows.append((label, t, byts, f"err {err:.1e}"))
        print(f"{label}: {t:.1f} us, {byts / (t * 1e-6) / bw:.2f} of copy bw on the bytes read, err {err:.1e}",
              flush=True)

    for warps, u, minb in SVARIANTS:
        name = f"schain_{warps}_{u}_{minb}"

        def persistent(name=name, warps=warps, minb=minb):
            ch.flags.zero_()
            drv.launch(name, (sms * minb, 1), warps * 32, [ch.mats_p, len(ch.w), ch.total])

        def separate(name=name, warps=warps):
            ch.flags.zero_()
            for i in range(len(ch.w)):
                drv.launch(name, (ch.items[i], 1), warps * 32,
                           [ch.mats_s[i * MAT.size:(i + 1) * MAT.size], 1, ch.items[i]])
        record(f"{name} persistent", persistent)
        record(f"{name} one launch per matrix", separate)

    def library(keep=False):
        x = ch.x0[None]
        for i, w in enumerate(ch.w):
            y, _ = gemv(x, w, scales=ch.c[i][None], thresholds=ch.thr_t[i], sparse=True, role=ch.shapes[i][2])
            if keep:
                ch.y[i].copy_(y[0])
            x = y
    record("library sparse GEMV (Triton), one launch per matrix", library, lambda: library(True))
    dense_bytes = ch.bytes

    def library_dense():
        x = ch.x0[None]
        for w in ch.w:
            x, _ = gemv(x, w)
    t_dense = time_graph(library_dense, reps=5)
    print(f"\nsparse chain at {ch.sparsity:.0%}: {len(ch.w)} matrices; library dense chain {t_dense:.1f} us "
          f"({dense_bytes / (t_dense * 1e-6) / bw:.2f} of copy bw)")
    print(f"{'us':>8} {'of copy bw':>10} {'vs dense':>8}  variant")
    for label, t, byts, note in rows:
        if t is None:
            print(f"{'-':>8} {'-':>10} {'-':>8}  {label}: {note}")
        else:
            print(f"{t:8.1f} {byts / (t * 1e-6) / bw:10.2f} {t_dense / t:7.2f}x  {label}  ({note})")


if __name__ == "__main__":
    main()
