"""Run 23 of docs/gpu-notes.md: does one persistent launch save the per-launch cost with the
*library's* GEMV item code (Triton's `_gemv_body`), as run 20 measured for plain CUDA items?

The chain is run 20's (llama-2-7b o 4096->4096, up 4096->11008, down 11008->4096, for 8 layers: 24
dependent single-token GEMVs, x_{m+1} = y_m, 1.7 GB). `_pchain_kernel` walks a table of matrices:
program p takes items p, p + P, ... in chain order (an item is one (output block, K-split) program of
the library's GEMV); an item of matrix m first waits until every item of matrix m-1 is done (one
acquire counter per matrix), then runs `_gemv_body`, then bumps m's counter (release). Every program
is resident (the grid is what fits on the SMs), and an item only waits for items of lower index, so
the chain always makes progress; the spin is bounded anyway and reported, so a wrong occupancy
estimate gives an error row, never a hang.

Forms, each checked against float32 x_m·W_m on NaN-poisoned outputs (before and after graph replays)
and timed in a CUDA graph: the library's GEMV per matrix; `_pchain_kernel` launched once per matrix
(the same item code, one program per item); `_pchain_kernel` as one persistent launch. Sparse
(--sparsity > 0): the items compact their own K-chunk (the library's in-kernel compaction, one
K-chunk size for the whole chain).
--fine (run 25): down's items wait only for the up blocks of their own K-chunk (SiLU·up is
elementwise in a real layer, so gate/up -> down needs no whole-matrix barrier), against the same items
and order with whole-matrix waits: does the finer dependency hide the boundary?
From the repo root on the GPU:  python3 bench/persistent_chain.py [--sparsity 0.5] [--kps 512] [--fine]
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")
from bench.chain_check import ChainChecks, chain_thresholds, measure  # noqa: E402
from wina.kernels import kernels as wk  # noqa: E402

ROW = tl.constexpr(24)          # int64 fields per matrix in the table (see Table)
MAX_SPIN = 1 << 22


@triton.jit
def _pchain_kernel(tab_ptr, w_base, a_base, c_base, t_base, done_ptr, err_ptr, ws_base, cnt_base, scr_base,
                   ws_n, cnt_n, scr_n, total,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPARSE: tl.constexpr, KPS: tl.constexpr,
                   PIPE: tl.constexpr, SPLIT_C: tl.constexpr, MAX_SPIN: tl.constexpr):
    # the table holds element offsets from four aligned base buffers (weights, activations, scales,
    # thresholds), and shapes that are multiples of 16: the compiler then vectorises the weight loads as
    # in the library's own launches (without the hints: 255 registers and spills)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    m = 0
    item_end = tl.load(tab_ptr + 11)
    it = pid
    while it < total:
        while it >= item_end:                         # items are taken in chain order: m only grows
            m += 1
            item_end = tl.load(tab_ptr + m * ROW + 11)
        row = tab_ptr + m * ROW
        w_ptr = w_base + tl.multiple_of(tl.load(row + 0), 16)
        x_ptr = a_base + tl.multiple_of(tl.load(row + 1), 16)
        y_ptr = a_base + tl.multiple_of(tl.load(row + 2), 16)
        c_ptr = c_base + tl.multiple_of(tl.load(row + 3), 16)
        t_ptr = t_base + tl.load(row + 4)
        K = tl.multiple_of(tl.load(row + 5).to(tl.int32), 16)
        N = tl.multiple_of(tl.load(row + 6).to(tl.int32), 16)
        kps = tl.multiple_of(tl.load(row + 7).to(tl.int32), 16)
        split = tl.load(row + 8).to(tl.int32)
        nb = tl.load(row + 9).to(tl.int32)
        local = (it - tl.load(row + 10)).to(tl.int32)
        need = tl.load(row + 12).to(tl.int32)
        wait_on = tl.load(row + 13).to(tl.int32)
        if tl.load(row + 15) == 1:                    # K-split-major: a consumer's K-chunks in order
            pid_s = local // nb
            pid_n = local % nb
        else:                                         # block-major: a producer's blocks in order
            pid_n = local // split
            pid_s = local % split
        spins = 0
        if tl.load(row + 16) == 1:
            # fine-grained: wait only for the producer blocks that cover this item's K-chunk
            want = (tl.minimum(kps, K - pid_s * kps) + BLOCK_N - 1) // BLOCK_N
            flag = done_ptr + tl.load(row + 17).to(tl.int32) + pid_s
            while (tl.atomic_add(flag, 0, sem="acquire", scope="gpu") < want) & (spins < MAX_SPIN):
                spins += 1
        elif need > 0:
            while (tl.atomic_add(done_ptr + wait_on, 0, sem="acquire", scope="gpu") < need) & (spins < MAX_SPIN):
                spins += 1
        if spins >= MAX_SPIN:
            tl.atomic_max(err_ptr, 1)
        par = m % 2
        ws_ptr = ws_base + par * ws_n
        cnt_ptr = cnt_base + par * cnt_n
        scr_ptr = scr_base + par * scr_n
        wk._gemv_body(pid_n, pid_s, x_ptr, w_ptr, y_ptr, c_ptr, t_ptr, y_ptr, y_ptr, y_ptr, y_ptr,
                      ws_ptr, cnt_ptr, scr_ptr, y_ptr,
                      y_ptr, y_ptr, y_ptr, y_ptr, y_ptr, y_ptr, 0, 0, 0, 0,
                      y_ptr, y_ptr, y_ptr, y_ptr, y_ptr, y_ptr,
                      y_ptr, y_ptr, 0,
                      1, K, N, N, N, K, 1, nb, 1e-6, kps, split,
                      1, BLOCK_N, BLOCK_K, 2, SPARSE, False, 0, False, False, False, True,
                      KPS, False, PIPE, False, False, False, SPLIT_C, False, 16, False, 16, False, False)
        if tl.load(row + 18) == 1:
            # a fine-grained consumer follows: the last item of each output block to return bumps the
            # counter of the consumer K-chunk that the block belongs to
            blk = done_ptr + tl.load(row + 19).to(tl.int32) + pid_n
            if tl.atomic_add(blk, 1, sem="acq_rel", scope="gpu") == split - 1:
                chunk = pid_n // tl.load(row + 21).to(tl.int32)
                tl.atomic_add(done_ptr + tl.load(row + 20).to(tl.int32) + chunk, 1, sem="release", scope="gpu")
        tl.atomic_add(done_ptr + tl.load(row + 14).to(tl.int32), 1, sem="release", scope="gpu")
        it += nprog


def _arena(tensors, dtype, device, align: int = 16):
    """One buffer holding copies of ``tensors`` at offsets that are multiples of ``align`` elements;
    returns (buffer, views, offsets)."""
    offs, n = [], 0
    for t in tensors:
        offs.append(n)
        n += -(-t.numel() // align) * align
    buf = torch.empty(max(n, align), dtype=dtype, device=device)
    views = []
    for t, o in zip(tensors, offs):
        v = buf[o:o + t.numel()].view(t.shape)
        v.copy_(t)
        views.append(v)
    return buf, views, offs


class Table:
    """The chain as `_pchain_kernel`'s table (persistent: item numbers run on through the chain and an
    item waits for the previous matrix) and as one single-matrix table per matrix (no waits). A row:
    weight, input, output, scales and threshold offsets; K, N, K-chunk, split, blocks; first item,
    end item, items to wait for, counter waited on, counter bumped; item order (1: K-split-major);
    fine-grained wait (per K-chunk, on the chunk counters from field 17); publish (count this matrix's
    finished blocks from field 19, bump its consumer's chunk counters from field 20, field 21 blocks
    per chunk).

    ``fine``: indices m whose items wait per K-chunk on matrix m-1 (gate/up -> down in a real layer:
    SiLU·up is elementwise, so a K-chunk of down needs only the gate/up blocks of its columns)."""

    def __init__(self, shapes, offs, plans, device, block_n: int, fine=(), orders=None):
        w_off, a_off, c_off = offs
        nm = len(shapes)
        self.items = [nb * split for (_, _, _, nb, split, _) in plans]
        self.total = sum(self.items)
        blk_base, chunk_base, n = [0] * nm, [0] * nm, nm + 1
        for i in range(nm):
            blk_base[i] = n
            n += plans[i][3]
        for i in range(nm):
            chunk_base[i] = n
            n += plans[i + 1][4] if i + 1 < nm else 1
        self.done = torch.zeros(n, dtype=torch.int32, device=device)      # every counter, zeroed per run
        orders = orders or [0] * nm
        rows_p, rows_s, item0 = [], [], 0
        for i, (k, n_out, _) in enumerate(shapes):
            _, _, _, nb, split, kps = plans[i]
            base = [w_off[i], a_off[i], a_off[i + 1], c_off[i], i, k, n_out, kps, split, nb]
            need = self.items[i - 1] if i else 0
            publish = int(i + 1 in fine)
            if publish and (plans[i + 1][5] % block_n):
                raise ValueError("a fine-grained consumer's K-chunk must hold whole producer blocks")
            tail = [orders[i], int(i in fine), chunk_base[i - 1] if i else 0, publish, blk_base[i], chunk_base[i],
                    plans[i + 1][5] // block_n if publish else 1, 0, 0]
            assert len(base) + 5 + len(tail) == ROW.value
            rows_p.append(base + [item0, item0 + self.items[i], need, max(i - 1, 0), i] + tail)
            rows_s.append(base + [0, self.items[i], 0, 0, nm] + [orders[i]] + [0] * 8)   # no waits
            item0 += self.items[i]
        self.tab_p = torch.tensor(rows_p, dtype=torch.int64, device=device)
        self.tab_s = [torch.tensor([r], dtype=torch.int64, device=device) for r in rows_s]


class PChain(ChainChecks):
    """Weights, activations, library-style plans and workspaces of the chain (weights, activations and
    scales each in one aligned buffer: see `_pchain_kernel`)."""

    def __init__(self, shapes, gen, device, sparsity: float, kps: int, block_n: int = 128, block_k: int = 64,
                 pipe: int = 1, dense_kps=None, fine: bool = False):
        """``dense_kps``: the K-chunk of each role ({"o": 256, ...}) for the dense items instead of the
        library's plan; ``fine``: down's items wait per K-chunk on up's blocks (see Table), and both
        tables order down's items K-split-major (the global table too, so that the two differ only in
        the waits)."""
        self.shapes = shapes
        self.sparse = sparsity > 0
        w = [(torch.randn(k, n, device=device, generator=gen) / k ** 0.5).to(torch.bfloat16) for k, n, _ in shapes]
        x0 = torch.randn(shapes[0][0], device=device, generator=gen).to(torch.bfloat16)
        acts = [x0] + [torch.empty(n, dtype=torch.bfloat16, device=device) for _, n, _ in shapes]
        c = [torch.rand(k, device=device, generator=gen) + 0.5 for k, _, _ in shapes]
        self.w_buf, self.w, w_off = _arena(w, torch.bfloat16, device)
        del w
        self.a_buf, acts, a_off = _arena(acts, torch.bfloat16, device)
        self.x0, self.y = acts[0], acts[1:]
        self.c_buf, self.c, c_off = _arena(c, torch.float32, device)
        self.thr = chain_thresholds(self.x0, self.w, self.c, sparsity)
        self.t_buf = torch.tensor(self.thr, dtype=torch.float32, device=device)
        self.thr_t = [self.t_buf[i:i + 1] for i in range(len(shapes))]
        if self.sparse:     # one K-chunk for the whole chain (a constexpr of the kernel)
            self.plans = []
            for k, n, _ in shapes:
                nb = -(-n // block_n)
                self.plans.append((1, block_n, block_k, nb, -(-k // kps), kps))
        elif dense_kps:
            self.plans = [(1, block_n, block_k, -(-n // block_n), -(-k // dense_kps[r]), dense_kps[r])
                          for k, n, r in shapes]
        else:
            cfg = wk.GemvConfig(block_n, block_k, 528, 4)
            self.plans = [wk.plan_gemv(1, k, n, [], cfg, False) for k, n, _ in shapes]
        self.kps = kps if self.sparse else 16
        self.block_n, self.block_k, self.pipe = block_n, block_k, int(pipe and self.sparse)
        self.split_c = max(wk._split_rows(p[4], block_n) for p in self.plans)
        # split-K partials, block counters and compaction scratch: two sets, matrix m uses set m % 2 (with
        # fine-grained waits a matrix overlaps the next one in time, never the one after)
        self.ws_n = max(p[4] * n for p, (_, n, _) in zip(self.plans, shapes))
        self.cnt_n = max(p[3] for p in self.plans) + 16
        self.scr_n = max(p[3] * p[4] * 2 * self.kps for p in self.plans) if self.sparse else 16
        self.ws = torch.zeros(2 * self.ws_n, device=device)
        self.cnt = torch.zeros(2 * self.cnt_n, dtype=torch.int32, device=device)
        self.scr = torch.zeros(2 * self.scr_n, device=device)
        self.err = torch.zeros(1, dtype=torch.int32, device=device)
        self.maxnreg = 0
        down = [i for i, (_, _, r) in enumerate(shapes) if r == "down"]
        orders = [int(fine and r == "down") for _, _, r in shapes]
        self.tab = Table(shapes, (w_off, a_off, c_off), self.plans, device, block_n, orders=orders)
        self.tab_fine = Table(shapes, (w_off, a_off, c_off), self.plans, device, block_n, fine=down,
                              orders=orders) if fine else None
        self.bytes = sum(k * n * 2 for k, n, _ in shapes)

    def launch(self, tab, total, grid, done=None):
        done = self.tab.done if done is None else done
        return _pchain_kernel[(grid,)](tab, self.w_buf, self.a_buf, self.c_buf, self.t_buf, done, self.err,
                                       self.ws, self.cnt, self.scr, self.ws_n, self.cnt_n, self.scr_n, total,
                                       BLOCK_N=self.block_n, BLOCK_K=self.block_k, SPARSE=self.sparse,
                                       KPS=self.kps, PIPE=bool(self.pipe), SPLIT_C=self.split_c,
                                       MAX_SPIN=MAX_SPIN, num_warps=4,
                                       **({"maxnreg": self.maxnreg} if self.maxnreg else {}))

    def persistent(self, grid, fine: bool = False):
        tab = self.tab_fine if fine else self.tab
        tab.done.zero_()
        return self.launch(tab.tab_p, tab.total, grid, tab.done)

    def separate(self):
        for i, t in enumerate(self.tab.tab_s):
            self.launch(t, self.tab.items[i], self.tab.items[i])

    def before_check(self) -> None:
        self.err.zero_()

    def after_check(self) -> None:
        if int(self.err):
            raise RuntimeError("a wait gave up (spin limit): the grid does not fit")


def occupancy(compiled, sm_regs: int = 65536, sm_smem: int = 233472) -> int:
    """Programs of ``compiled`` that fit on one SM at once (registers, shared memory, warps)."""
    compiled._init_handles()
    warps = compiled.metadata.num_warps
    regs = -(-compiled.n_regs * 32 // 256) * 256 * warps     # registers go out per warp, 256 at a time
    smem = compiled.metadata.shared + 1024
    return max(1, min(sm_regs // regs, sm_smem // smem, 64 // warps, 32))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.0)
    ap.add_argument("--kps", type=int, default=512, help="sparse: the K-chunk of every item")
    ap.add_argument("--pipe", type=int, default=1, help="sparse: two weight tiles in flight")
    ap.add_argument("--maxnreg", type=int, default=-1,
                    help="register cap of the chain kernel (-1: 128 dense, the library's 4 programs per SM; "
                         "0: none)")
    ap.add_argument("--fine", action="store_true",
                    help="also run down's items with per-K-chunk waits on up (and compare with whole-matrix waits)")
    ap.add_argument("--dense-kps", default="256,256,512",
                    help="with --fine, dense: the K-chunk of o, up, down (down's a multiple of 128)")
    args = ap.parse_args()
    from wina.bench import copy_bandwidth
    bw = copy_bandwidth("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = [(4096, 4096, "o"), (4096, 11008, "mlp_in"), (11008, 4096, "down")] * args.layers
    dkps = dict(zip(("o", "mlp_in", "down"), map(int, args.dense_kps.split(",")))) if args.fine else None
    ch = PChain(shapes, torch.Generator(device="cuda").manual_seed(0), "cuda", args.sparsity, args.kps,
                pipe=args.pipe, dense_kps=dkps, fine=args.fine)
    ch.maxnreg = (0 if ch.sparse else 128) if args.maxnreg < 0 else args.maxnreg
    compiled = ch.persistent(1)               # compiles; one program walks the whole chain
    torch.cuda.synchronize()
    occ = occupancy(compiled)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, {sms} SMs; chain of {len(ch.w)} matrices, {ch.bytes / 1e9:.2f} GB, "
          f"{ch.tab.total} items, sparsity {args.sparsity:.0%}; kernel {compiled.n_regs} registers, "
          f"{compiled.n_spills} spills, {compiled.metadata.shared} B shared -> {occ} programs per SM", flush=True)
    rows = []

    measure(ch, rows, bw, "library GEMV, one launch per matrix", ch.library, lambda: ch.library(keep=True))
    measure(ch, rows, bw, "pchain, one launch per matrix (one program per item)", ch.separate)
    if args.fine:
        for per_sm in sorted({occ, max(1, occ - 1)}, reverse=True):
            measure(ch, rows, bw, f"pchain, persistent, {per_sm} per SM, whole-matrix waits",
                    lambda g=sms * per_sm: ch.persistent(g))
            measure(ch, rows, bw, f"pchain, persistent, {per_sm} per SM, down waits per K-chunk of up",
                    lambda g=sms * per_sm: ch.persistent(g, fine=True))
    else:
        for per_sm in sorted({occ, max(1, occ - 1), 1}, reverse=True):
            measure(ch, rows, bw, f"pchain, one persistent launch, {per_sm} per SM",
                    lambda g=sms * per_sm: ch.persistent(g))
    t_lib = rows[0][1]
    print(f"\nchain of {len(ch.w)} matrices, {ch.bytes / 1e9:.2f} GB, sparsity {args.sparsity:.0%}, "
          f"K-chunks {[p[5] for p in ch.plans[:3]]} (o, up, down), items {ch.tab.items[:3]}")
    print(f"{'us':>8} {'of copy bw':>10} {'vs library':>10}  form")
    for label, t, byts, note in rows:
        if t is None:
            print(f"{'-':>8} {'-':>10} {'-':>10}  {label}: {note}")
        else:
            rel = f"{t_lib / t:9.3f}x" if t_lib else "-"
            print(f"{t:8.1f} {byts / (t * 1e-6) / bw:10.2f} {rel:>10}  {label}  ({note})")


if __name__ == "__main__":
    main()
