"""Run 19 of docs/gpu-notes.md: does the gather lose bandwidth because of WHICH rows it reads?
Run 17's block gather streams 0.94-1.02 of copy bandwidth when it reads every row of a K-chunk in
order, 0.69-0.80 when it reads the kept half. Same kernel (`gather_gemv_*`), hand-made kept lists
of one K-chunk layout, for gate/up and down: every row in order; every row in a shuffled order;
half: the first half of each chunk (contiguous), every other row, a random half (what sparsity
gives); a quarter, contiguous and random. Bandwidth on the bytes read.
From the repo root on the GPU:  python3 bench/cuda_gather/probe_pattern.py
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe import loader  # noqa: E402

from bench.probe_gemv import time_graph  # noqa: E402
from wina.bench import copy_bandwidth  # noqa: E402


def lists(k: int, kps: int, pick, gen) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One segment's kept lists: pick(lo, hi, gen) -> the chunk's row indices, in read order."""
    n_split = -(-k // kps)
    scr = torch.zeros(n_split * 2 * kps, dtype=torch.float32)
    kept = torch.zeros(n_split, dtype=torch.int32)
    for j in range(n_split):
        lo, hi = j * kps, min(k, (j + 1) * kps)
        idx = pick(lo, hi, gen)
        scr[j * 2 * kps:j * 2 * kps + len(idx)] = idx.float()
        scr[j * 2 * kps + kps:j * 2 * kps + kps + len(idx)] = torch.randn(len(idx), generator=gen)
        kept[j] = len(idx)
    return scr.cuda(), kept.cuda(), n_split


PATTERNS = {
    "all, in order": lambda lo, hi, g: torch.arange(lo, hi),
    "all, shuffled": lambda lo, hi, g: lo + torch.randperm(hi - lo, generator=g),
    "half, contiguous": lambda lo, hi, g: torch.arange(lo, lo + (hi - lo) // 2),
    "half, every other": lambda lo, hi, g: torch.arange(lo, hi, 2),
    "half, random (sorted)": lambda lo, hi, g: (lo + torch.randperm(hi - lo, generator=g)[:(hi - lo) // 2]).sort().values,
    "quarter, contiguous": lambda lo, hi, g: torch.arange(lo, lo + (hi - lo) // 4),
    "quarter, random (sorted)": lambda lo, hi, g: (lo + torch.randperm(hi - lo, generator=g)[:(hi - lo) // 4]).sort().values,
}


@torch.no_grad()
def main() -> None:
    drv = loader("", os.environ.get("OUT") or tempfile.mkdtemp())
    bw = copy_bandwidth("cuda")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, k, n in (("gate_up", 4096, 22016), ("down", 11008, 4096), ("o", 4096, 4096)):
        wts = [torch.randn(k, n, dtype=torch.bfloat16, device="cuda") for _ in range(8)]
        for kps in (512, 1024):
            part = torch.empty(-(-k // kps), n, dtype=torch.float32, device="cuda")
            for pname, pick in PATTERNS.items():
                scr, kept, n_split = lists(k, kps, pick, gen)
                byts = int(kept.sum()) * n * 2
                for var in ("256_8_8_0_2", "256_4_8_0_4", "256_8_16_0_2"):
                    warps = int(var.split("_")[1])

                    def launch(w, var=var, warps=warps, scr=scr, kept=kept, n_split=n_split, kps=kps):
                        drv.launch(f"gather_gemv_{var}", (n // 256, n_split), warps * 32,
                                   [w, scr, kept, part, n, n_split, kps, n, n])
                    t = time_graph(lambda: [launch(w) for w in wts]) / len(wts)
                    rows.append((name, kps, pname, var, t, byts / (t * 1e-6) / bw))
            print(f"{name} kps {kps} done", flush=True)
    print(f"\n{'role':>8} {'kps':>5} {'rows':>26} {'variant':>14} {'us':>7} {'of copy bw':>10}")
    for name, kps, pname, var, t, f in rows:
        print(f"{name:>8} {kps:>5} {pname:>26} {var:>14} {t:7.2f} {f:10.2f}")


if __name__ == "__main__":
    main()
