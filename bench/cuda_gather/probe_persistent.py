"""Run 18 of docs/gpu-notes.md: persistent warps for the sparse GEMV's consumer half
(`pgather_*` / `pdense_*` in gather_gemv.cu). A warp owns whole (256-column block, K-chunk) items
and fetches the next item's kept count and first indices while it streams the current one, so the
count -> index -> row chain that run 17 found in every sparse block start is paid once per warp.
For each llama-2-7b role at 50 % and 0 % (and dense, no lists), K-chunks of 64/128/256, grids of
one wave of resident warps ("persistent") or one warp per item, the split reduction in the kernel
(fin=1, a counter per column block) or in a second launch (`reduce_fin`), items in column-block-major
or K-chunk-major order (run 18b: warps running together on the same rows or on different ones): checked against a
float32 reference (y in bf16 + the per-block ssq, also after graph replays) and timed with the
epilogue included, next to the library's Triton launch (whole, and consumer only).
From the repo root on the GPU:  python3 bench/cuda_gather/probe_persistent.py [--kps 64,128,256]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace

import torch

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe import kept_bytes, loader, make_lists, reference  # noqa: E402  (bench/cuda_gather/probe.py)

from bench.probe_gemv import CASES, case_inputs, thresholds_at, time_graph  # noqa: E402
from wina.bench import copy_bandwidth  # noqa: E402
from wina.kernels.kernels import _gemv_triton, config_for  # noqa: E402

PVARIANTS = [(8, 4, 6), (16, 4, 4), (16, 8, 2), (32, 4, 2)]    # U, warps, blocks per SM (launch bounds)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kps", default="64,128,256")
    ap.add_argument("--orders", default="0,1", help="item order: 0 column-block-major, 1 K-chunk-major")
    ap.add_argument("--fin", default="0,1")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--cases", default="qkv,o,gate_up,down")
    ap.add_argument("--cubin", default="")
    args = ap.parse_args()
    drv = loader(args.cubin, os.environ.get("OUT") or tempfile.mkdtemp())
    bw = copy_bandwidth("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, {sms} SMs", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for case in CASES:
        name, role, k, n, bounds, pre, act, res_on = case
        if name not in args.cases.split(","):
            continue
        wts, scales, x, ssq, res, xa = case_inputs(case, gen, args.layers)
        b1 = bounds[0] if bounds else n
        b2 = bounds[1] if len(bounds) > 1 else n
        res_t = res[0] if res is not None else torch.zeros(n, dtype=torch.bfloat16, device="cuda")
        for sp in (0.5, 0.0, "dense"):
            if sp == "dense":
                ref = xa @ wts[0].float()
                byts = k * n * 2
                cfg = config_for(k, n, False, role)
                t_whole = time_graph(lambda: [_gemv_triton(x, w, None, None, bounds, None, res, ssq, 1e-5, act,
                                                           res is not None, False, cfg) for w in wts]) / args.layers
                rows.append((name, sp, "triton dense (library)", "-", t_whole, f"{byts / (t_whole * 1e-6) / bw:.2f} of copy bw"))
            else:
                thr = thresholds_at(xa, scales, sp)
                ref = reference(wts[0], xa, scales, thr, bounds)
                cfg = config_for(k, n, True, role)

                def triton_call(w, compacted, c=cfg, thr=thr):
                    _gemv_triton(x, w, scales, thr, bounds, None, res, ssq, 1e-5, act, res is not None, True, c,
                                 compacted=compacted)
                t_whole = time_graph(lambda: [triton_call(w, False) for w in wts]) / args.layers
                pre_cfg = replace(cfg, precompact=1)
                triton_call(wts[0], False, pre_cfg)
                t_cons = time_graph(lambda: [triton_call(w, True, pre_cfg) for w in wts]) / args.layers
                rows.append((name, sp, "triton whole (library)", "-", t_whole, ""))
                rows.append((name, sp, "triton consumer only", "-", t_cons, ""))
            want = ref + res_t.float()
            for kps in [int(v) for v in args.kps.split(",")]:
                n_split = -(-k // kps)
                if sp == "dense":
                    scr, kept = xa, None
                else:
                    scr, kept, n_split = make_lists(xa, scales, thr, kps)
                    byts = kept_bytes(kept, n_split, n, bounds)
                n_items = (n // 256) * n_split
                part = torch.empty(n_split, n, dtype=torch.float32, device="cuda")
                yb = torch.empty(n, dtype=torch.bfloat16, device="cuda")
                ssq_out = torch.empty(n // 256, dtype=torch.float32, device="cuda")
                cnt = torch.zeros(n // 256, dtype=torch.int32, device="cuda")
                for u, warps, minb in PVARIANTS:
                    for grid_mode in ("persistent", "per-item"):
                        grid = sms * minb if grid_mode == "persistent" else -(-n_items // warps)
                        grid = min(grid, -(-n_items // warps))
                        if grid_mode == "per-item" and grid == sms * minb:
                            continue
                        for fin, order in [(f, o) for f in map(int, args.fin.split(",")) for o in map(int, args.orders.split(","))]:
                            kname = f"{'pdense' if sp == 'dense' else 'pgather'}_{u}_{warps}_{minb}"
                            ep = [yb, res_t, res_t, ssq_out, cnt, 1, 0, 1, fin, order]

                            def launch(w, kname=kname, grid=grid, warps=warps, kps=kps, n_split=n_split, scr=scr,
                                       kept=kept, part=part, ep=ep, fin=fin):
                                if kept is None:
                                    drv.launch(kname, (grid, 1), warps * 32, [w, scr, part, n, n_split, kps, k, *ep])
                                else:
                                    drv.launch(kname, (grid, 1), warps * 32,
                                               [w, scr, kept, part, n, n_split, kps, b1, b2, *ep])
                                if not fin:
                                    drv.launch("reduce_fin", (n // 256, 1), 1024,
                                               [part, n, n_split, yb, res_t, res_t, ssq_out, 1, 0, 1])

                            def error():
                                ssq_ref = (yb.float() ** 2).view(-1, 256).sum(1)
                                return max(float((yb.float() - want).norm() / want.norm()),
                                           float((ssq_out - ssq_ref).abs().max() / ssq_ref.abs().max()))
                            label = f"{kname} {grid_mode} g{grid} {'fin' if fin else '+reduce'} o{order}"
                            try:
                                yb.fill_(float("nan"))
                                launch(wts[0])
                                torch.cuda.synchronize()
                                err = error()
                                t = time_graph(lambda: [launch(w) for w in wts]) / args.layers
                                yb.fill_(float("nan"))
                                launch(wts[0])
                                torch.cuda.synchronize()
                                err2 = error()
                            except Exception as e:  # report, go on
                                rows.append((name, sp, label, kps, None, "error " + str(e).splitlines()[0][:120]))
                                continue
                            rows.append((name, sp, label, kps, t, f"err {err:.1e}/{err2:.1e}, "
                                         f"{byts / (t * 1e-6) / bw:.2f} of copy bw"))
                print(f"{name} {sp} kps {kps} done", flush=True)
    print(f"\n{'role':>8} {'sp':>5} {'variant':>44} {'kps':>5} {'us':>7}  note")
    for name, sp, var, kps, t, note in rows:
        ts = f"{t:7.2f}" if t is not None else "      -"
        print(f"{name:>8} {sp!s:>5} {var:>44} {kps:>5} {ts}  {note}", flush=True)
    print("\nbest per role (epilogue included):")
    best = {}
    for name, sp, var, kps, t, note in rows:
        if t is None or var.startswith("triton") or "error" in note or float(note.split()[1].split("/")[0]) > 2e-2:
            continue
        if (name, sp) not in best or t < best[(name, sp)][0]:
            best[(name, sp)] = (t, var, kps, note)
    tri = {(r[0], r[1], r[2]): r[4] for r in rows if r[2].startswith("triton")}
    for (name, sp), (t, var, kps, note) in best.items():
        ref_t = tri.get((name, sp, "triton whole (library)")) or tri.get((name, sp, "triton dense (library)"))
        print(f"{name:>8} {sp!s:>5} {t:7.2f} us  ({var}, kps {kps}; {note})   triton {ref_t:.2f} us")


if __name__ == "__main__":
    main()
