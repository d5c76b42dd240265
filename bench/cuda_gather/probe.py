"""Run 17 of docs/gpu-notes.md (results: bench/results/h200-2026-11-29-run17-gather.txt): can a plain CUDA gather stream the kept weight rows of a
sparse single-token GEMV at >= 0.85 of copy bandwidth, where the Triton kernel's GEMV launch alone
reaches 0.41-0.80 (run 6, "consumer only")?

Builds gather_gemv.cu with nvcc (or takes --cubin), loads it through the CUDA driver (ctypes, no
extension build), and for each Llama-2-7B role (q/k/v, o, gate/up, down) at 0 % and 50 %:
  * checks every kernel variant against a float32 reference built from the same kept lists,
  * times 8 layers' weights in one CUDA graph: the gather alone, and gather + the split reduction,
  * times the library's Triton GEMV on the same shape with its lists precomputed (consumer only)
    and whole (compaction included), for comparison.
From the repo root on the GPU:  python3 bench/cuda_gather/probe.py [--cubin PATH] [--kps 512,1024]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace

import torch

sys.path.insert(0, ".")
from bench.probe_gemv import CASES, case_inputs, thresholds_at, time_graph  # noqa: E402
from wina.bench import copy_bandwidth  # noqa: E402
from wina.kernels.kernels import _gemv_triton, config_for  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIN_VARIANTS = ["256_8_8_0_2", "256_4_8_0_4", "256_16_8_0_1", "512_4_8_0_4"]   # one launch, reduction inside
VARIANTS = ["256_4_8_1_1", "256_8_8_1_1", "256_8_8_0_2", "256_8_16_0_2", "256_4_8_0_4", "256_4_16_0_4",
            "256_16_8_0_1", "512_8_8_0_2", "512_4_8_0_4"]


# ------------------------------------------------------------------------------------------------
# the CUDA driver through ctypes
# ------------------------------------------------------------------------------------------------
class Driver:
    def __init__(self, cubin: str):
        torch.zeros(1, device="cuda")                 # the primary context, current on this thread
        torch.cuda.synchronize()
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
        self.mod = ctypes.c_void_p()
        self._check(self.lib.cuModuleLoad(ctypes.byref(self.mod), cubin.encode()), "cuModuleLoad")
        self.fns = {}

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(rc, ctypes.byref(name))
            raise RuntimeError(f"{what}: CUDA driver error {rc} ({name.value})")

    def fn(self, name: str):
        if name not in self.fns:
            f = ctypes.c_void_p()
            self._check(self.lib.cuModuleGetFunction(ctypes.byref(f), self.mod, name.encode()), name)
            self.fns[name] = f
        return self.fns[name]

    def launch(self, name: str, grid, block: int, args) -> None:
        vals = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(int(a))
                for a in args]
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._check(self.lib.cuLaunchKernel(self.fn(name), grid[0], grid[1], 1, block, 1, 1, 0, stream, ptrs,
                                            None), name)


class Nvrtc:
    """The same kernels compiled at run time through torch's NVRTC wrapper (torch.cuda._compile_kernel):
    the route a library backend would take, with no nvcc on the user's machine."""

    def __init__(self, source: str = "gather_gemv.cu"):
        with open(os.path.join(HERE, source)) as f:
            self.src = f.read()
        self.fns = {}

    def launch(self, name: str, grid, block: int, args) -> None:
        if name not in self.fns:
            self.fns[name] = torch.cuda._compile_kernel(self.src, name, nvcc_options=["--std=c++17"])
        self.fns[name](grid=(grid[0], grid[1], 1), block=(block, 1, 1), args=list(args))


def loader(cubin_arg: str, out_dir: str, source: str = "gather_gemv.cu"):
    """NVRTC through torch if it compiles the source, else nvcc + the driver API (or a given cubin)."""
    if not cubin_arg and hasattr(torch.cuda, "_compile_kernel"):
        try:
            nv = Nvrtc(source)
            if source != "gather_gemv.cu":
                print("kernels: NVRTC (torch.cuda._compile_kernel)", flush=True)
                return nv
            y = torch.zeros(256, device="cuda")
            nv.launch("reduce_parts", (1, 1), 256, [torch.ones(2, 256, device="cuda"), y, 256, 2])
            torch.cuda.synchronize()
            if float(y.sum()) == 512.0:
                print("kernels: NVRTC (torch.cuda._compile_kernel)", flush=True)
                return nv
            print("kernels: NVRTC gave a wrong sum; using nvcc", flush=True)
        except Exception as e:  # report, fall back
            print(f"kernels: NVRTC failed ({str(e).splitlines()[0][:200]}); using nvcc", flush=True)
    cubin = cubin_arg or build(out_dir, source)
    print(f"kernels: {cubin} through the driver API", flush=True)
    return Driver(cubin)


def build(out_dir: str, source: str = "gather_gemv.cu") -> str:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cubin = os.path.join(out_dir, source.replace(".cu", ".cubin"))
    r = subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", "-Xptxas", "-v", "-o", cubin,
                        os.path.join(HERE, source)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"nvcc failed:\n{r.stderr[-3000:]}")
    regs = [ln.strip() for ln in r.stderr.splitlines() if "Used" in ln or "Function properties" in ln]
    print("\n".join(regs), flush=True)
    return cubin


# ------------------------------------------------------------------------------------------------
# kept lists in the layout of wina's Triton compaction, and their float32 reference product
# ------------------------------------------------------------------------------------------------
def make_lists(xa: torch.Tensor, scales: torch.Tensor, thr: torch.Tensor, kps: int):
    """(scr, kept, n_split): scr[(s * n_split + j) * 2 * kps + r] = float(index), [... + kps + r] =
    value, for the kept inputs of K-chunk j under segment s; kept[s * n_split + j] = their number."""
    k = xa.numel()
    n_seg = scales.shape[0]
    n_split = -(-k // kps)
    scr = torch.zeros(n_seg * n_split * 2 * kps, dtype=torch.float32, device=xa.device)
    kept = torch.zeros(n_seg * n_split, dtype=torch.int32, device=xa.device)
    for s in range(n_seg):
        keep = xa.abs() * scales[s] > thr[s]
        for j in range(n_split):
            lo, hi = j * kps, min(k, (j + 1) * kps)
            idx = torch.nonzero(keep[lo:hi]).flatten() + lo
            base = (s * n_split + j) * 2 * kps
            scr[base:base + idx.numel()] = idx.float()
            scr[base + kps:base + kps + idx.numel()] = xa[idx]
            kept[s * n_split + j] = idx.numel()
    return scr, kept, n_split


def reference(w: torch.Tensor, xa: torch.Tensor, scales: torch.Tensor, thr: torch.Tensor, bounds) -> torch.Tensor:
    n = w.shape[1]
    edges = [0, *bounds, n]
    y = torch.empty(n, dtype=torch.float32, device=w.device)
    for s in range(scales.shape[0]):
        xs = torch.where(xa.abs() * scales[s] > thr[s], xa, torch.zeros_like(xa))
        y[edges[s]:edges[s + 1]] = xs @ w[:, edges[s]:edges[s + 1]].float()
    return y


def kept_bytes(kept: torch.Tensor, n_split: int, n: int, bounds) -> int:
    edges = [0, *bounds, n]
    per_seg = kept.view(-1, n_split).sum(1).tolist()
    return sum(int(c) * (edges[s + 1] - edges[s]) * 2 for s, c in enumerate(per_seg))


def split_buffers(drv, n_split: int, n: int):
    """(part [n_split, N], y [N], reduce): the per-K-chunk partial sums a gather writes, and the
    launch that adds them into y in chunk order."""
    part = torch.empty(n_split, n, dtype=torch.float32, device="cuda")
    y = torch.empty(n, dtype=torch.float32, device="cuda")

    def reduce():
        drv.launch("reduce_parts", (-(-n // 256), 1), 256, [part, y, n, n_split])
    return part, y, reduce


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cubin", default="", help="a prebuilt cubin (skips NVRTC and nvcc)")
    ap.add_argument("--kps", default="256,512,1024")
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    out = os.environ.get("OUT") or tempfile.mkdtemp()
    drv = loader(args.cubin, out)
    bw = copy_bandwidth("cuda")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []

    def check_and_time(key, wts, launch, reduce, y, ref, byts):
        """One variant: ``launch(w)`` per weight then ``reduce()``; checked against ``ref``, then timed
        alone and with the reduction. Appends a row (or the error) to ``rows``."""
        try:
            launch(wts[0])
            reduce()
            torch.cuda.synchronize()
            err = float((y - ref).norm() / ref.norm())
            t_g = time_graph(lambda: [launch(w) for w in wts]) / args.layers
            t_gr = time_graph(lambda: [(launch(w), reduce()) for w in wts]) / args.layers
        except Exception as e:  # report, go on
            rows.append(key + (None, None, "error " + str(e).splitlines()[0][:120]))
            return
        rows.append(key + (t_g, t_gr, f"err {err:.1e}, {byts / (t_g * 1e-6) / bw:.2f} of copy bw"))

    for case in CASES:
        name, role, k, n, bounds, pre, act, res_on = case
        wts, scales, x, ssq, res, xa = case_inputs(case, gen, args.layers)
        b1 = bounds[0] if bounds else n
        b2 = bounds[1] if len(bounds) > 1 else n
        for sp in (0.0, 0.5):
            thr = thresholds_at(xa, scales, sp)
            ref = reference(wts[0], xa, scales, thr, bounds)
            # the library's Triton launch on the same shape: whole, and with its lists made beforehand
            cfg = config_for(k, n, True, role)

            def triton_call(w, compacted, c=cfg):
                _gemv_triton(x, w, scales, thr, bounds, None, res, ssq, 1e-5, act, res is not None, True, c,
                             compacted=compacted)
            t_whole = time_graph(lambda: [triton_call(w, False) for w in wts]) / args.layers
            pre_cfg = replace(cfg, precompact=1)
            triton_call(wts[0], False, pre_cfg)                  # its lists, once
            t_cons = time_graph(lambda: [triton_call(w, True, pre_cfg) for w in wts]) / args.layers
            rows.append((name, sp, "triton (library config)", "-", t_whole, None, None))
            rows.append((name, sp, "triton consumer only (precompact)", "-", t_cons, None, None))
            res_t = res[0] if res is not None else torch.zeros(n, dtype=torch.bfloat16, device="cuda")
            want = ref + res_t.float()
            for kps in [int(v) for v in args.kps.split(",")]:
                scr, kept, n_split = make_lists(xa, scales, thr, kps)
                byts = kept_bytes(kept, n_split, n, bounds)
                part, y, reduce = split_buffers(drv, n_split, n)
                for var in VARIANTS:
                    bn, warps = int(var.split("_")[0]), int(var.split("_")[1])
                    if n % bn or any(b % bn for b in bounds):
                        continue

                    def gather(w, var=var, bn=bn, warps=warps, scr=scr, kept=kept, part=part, n_split=n_split,
                               kps=kps):
                        drv.launch(f"gather_gemv_{var}", (n // bn, n_split), warps * 32,
                                   [w, scr, kept, part, n, n_split, kps, b1, b2])
                    check_and_time((name, sp, var, kps), wts, gather, reduce, y, ref, byts)
                # one launch: the split reduction and the epilogue in the kernel (what would replace
                # the library's GEMV launch; compare with "triton consumer only")
                for var in FIN_VARIANTS:
                    bn, warps = int(var.split("_")[0]), int(var.split("_")[1])
                    if n % bn or any(b % bn for b in bounds):
                        continue
                    cnt = torch.zeros(n // bn, dtype=torch.int32, device="cuda")
                    yb = torch.empty(n, dtype=torch.bfloat16, device="cuda")
                    ssq_out = torch.empty(n // bn, dtype=torch.float32, device="cuda")

                    def fin(w, var=var, bn=bn, warps=warps, scr=scr, kept=kept, part=part, n_split=n_split, kps=kps,
                            cnt=cnt, yb=yb, ssq_out=ssq_out):
                        drv.launch(f"gather_fin_{var}", (n // bn, n_split), warps * 32,
                                   [w, scr, kept, part, n, n_split, kps, b1, b2, yb, res_t, res_t, ssq_out, cnt,
                                    1, 0, 1])

                    def fin_error(yb=yb, ssq_out=ssq_out, bn=bn):
                        ssq_ref = (yb.float() ** 2).view(-1, bn).sum(1)
                        return max(float((yb.float() - want).norm() / want.norm()),
                                   float((ssq_out - ssq_ref).abs().max() / ssq_ref.abs().max()))
                    try:
                        fin(wts[0])
                        torch.cuda.synchronize()
                        err = fin_error()
                        t_f = time_graph(lambda: [fin(w) for w in wts]) / args.layers
                        fin(wts[0])                      # the counters were reset by every replay
                        torch.cuda.synchronize()
                        err2 = fin_error()
                    except Exception as e:  # report, go on
                        rows.append((name, sp, "fin " + var, kps, None, None, "error " + str(e).splitlines()[0][:120]))
                        continue
                    rows.append((name, sp, "fin " + var, kps, t_f, None,
                                 f"err {err:.1e} / after replays {err2:.1e}, {byts / (t_f * 1e-6) / bw:.2f} of copy bw"))
            if sp == 0.0:
                # dense: cuBLAS, the library's dense Triton launch, and the same streaming with no lists
                xin = xa.to(torch.bfloat16)[None]
                t_cub = time_graph(lambda: [torch.matmul(xin, w) for w in wts]) / args.layers
                dcfg = config_for(k, n, False, role)
                t_tri = time_graph(lambda: [_gemv_triton(x, w, None, None, bounds, None, res, ssq, 1e-5, act,
                                                         res is not None, False, dcfg) for w in wts]) / args.layers
                dense_bytes = k * n * 2
                rows.append((name, "dense", "cublas", "-", t_cub, None,
                             f"{dense_bytes / (t_cub * 1e-6) / bw:.2f} of copy bw"))
                rows.append((name, "dense", "triton (library config)", "-", t_tri, None,
                             f"{dense_bytes / (t_tri * 1e-6) / bw:.2f} of copy bw"))
                for kps in [int(v) for v in args.kps.split(",")]:
                    n_split = -(-k // kps)
                    part, y, reduce = split_buffers(drv, n_split, n)
                    for var in VARIANTS:
                        bn, warps = int(var.split("_")[0]), int(var.split("_")[1])
                        if n % bn:
                            continue

                        def dense(w, var=var, bn=bn, warps=warps, part=part, n_split=n_split, kps=kps):
                            drv.launch(f"dense_gemv_{var}", (n // bn, n_split), warps * 32,
                                       [w, xa, part, n, n_split, kps, k])
                        check_and_time((name, "dense", var, kps), wts, dense, reduce, y, ref, dense_bytes)
    print(f"\n{'role':>8} {'sp':>4} {'variant':>34} {'kps':>5} {'us':>7} {'us+red':>7}  note")
    for name, sp, var, kps, t, t2, note in rows:
        ts = f"{t:7.2f}" if t is not None else "      -"
        t2s = f"{t2:7.2f}" if t2 is not None else "      -"
        print(f"{name:>8} {sp:>4} {var:>34} {kps:>5} {ts} {t2s}  {note or ''}", flush=True)


if __name__ == "__main__":
    main()
