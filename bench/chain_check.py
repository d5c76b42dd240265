"""What the two chain probes share (`bench/cuda_gather/chain_probe.py`, runs 20/22, and
`bench/persistent_chain.py`, runs 23/25): the sparse chain's thresholds, the float32 check of every
matrix's output, the bytes a pass reads, the chain through the library's GEMV, and `measure` (check on
NaN-poisoned outputs, time in a CUDA graph, check again)."""
from __future__ import annotations

import torch


def chain_thresholds(x0: torch.Tensor, ws, cs, sparsity: float) -> list[float]:
    """Per-matrix thresholds that drop ``sparsity`` of each matrix's inputs along a float32 run of the
    chain (bf16 outputs, as the kernels write them); zeros for a dense chain."""
    thr = [0.0] * len(ws)
    if sparsity > 0:
        x = x0.float()
        for i, w in enumerate(ws):
            sc = x.abs() * cs[i]
            thr[i] = float(torch.quantile(sc, sparsity))
            x = ((x * (sc > thr[i])) @ w.float()).to(torch.bfloat16).float()
    return thr


class ChainChecks:
    """Mixin for a chain holding x0, y (outputs), w (weights [K, N]), c (scales), thr (floats), thr_t
    (one-element tensors), shapes ((K, N, role)), bytes (all weights) and sparse (bool)."""

    def inputs(self):
        return [self.x0] + list(self.y[:-1])

    def kept_bytes(self) -> int:
        """Weight bytes the pass reads (sparse: the kept rows, from the inputs of the last run)."""
        if not self.sparse:
            return self.bytes
        return sum(int((x.float().abs() * self.c[i] > self.thr[i]).sum()) * n * 2
                   for i, (x, (_, n, _)) in enumerate(zip(self.inputs(), self.shapes)))

    def errors(self) -> float:
        """Worst relative error of y_m against float32 x_m·W_m (x_m as the kernel read it; sparse: gated
        with the matrix's threshold)."""
        worst = 0.0
        for i, (x, w) in enumerate(zip(self.inputs(), self.w)):
            x = x.float()
            if self.sparse:
                x = x * (x.abs() * self.c[i] > self.thr[i])
            ref = x @ w.float()
            worst = max(worst, float((self.y[i].float() - ref).norm() / ref.norm()))
        return worst

    def library(self, sparse: bool = None, keep: bool = False) -> None:
        """The chain through the library's GEMV (role configs; sparse: its threshold gating; default:
        the chain's own mode); ``keep`` copies every output into y for the check (not when timed)."""
        from wina.kernels import gemv
        sparse = self.sparse if sparse is None else sparse
        x = self.x0[None]
        for i, w in enumerate(self.w):
            kw = dict(scales=self.c[i][None], thresholds=self.thr_t[i], sparse=True) if sparse else {}
            x, _ = gemv(x, w, role=self.shapes[i][2], **kw)
            if keep:
                self.y[i].copy_(x[0])

    def before_check(self) -> None:
        """Called before each checked run (e.g. to clear an error flag)."""

    def after_check(self) -> None:
        """Called after each checked run; raises if the run reported trouble."""


def measure(ch: ChainChecks, rows: list, bw: float, label: str, fn, check=None) -> None:
    """Check ``fn`` (or ``check``: a form of it that leaves its outputs in ch.y) against the float32
    reference on NaN-poisoned outputs, time it in a CUDA graph, check it again after the replays;
    appends (label, µs, bytes read, note) to ``rows`` (an error is reported, not raised)."""
    from bench.probe_gemv import time_graph
    check = check or fn
    try:
        errs = []
        for _ in range(2):
            for y in ch.y:
                y.fill_(float("nan"))
            ch.before_check()
            check()
            torch.cuda.synchronize()
            ch.after_check()
            errs.append(ch.errors())
            if len(errs) == 1:
                byts = ch.kept_bytes()
                t = time_graph(fn, reps=5)
    except Exception as e:  # report, go on
        rows.append((label, None, None, "error " + str(e).splitlines()[0][:150]))
        print(rows[-1], flush=True)
        return
    rows.append((label, t, byts, f"err {errs[0]:.1e} / {errs[1]:.1e}"))
    print(f"{label}: {t:.1f} us, {byts / (t * 1e-6) / bw:.2f} of copy bw on the bytes read, err {errs[0]:.1e}",
          flush=True)
