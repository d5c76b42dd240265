"""Time the sparse GEMV launches of one decode-step role with the library's configs, on the
Llama-2-7B shapes (8 layers' worth of random weights, CUDA-graph timing as in wina bench).
Used to bisect kernel regressions across commits (docs/gpu-notes.md, run 11) and to try configs:
    PYTHONPATH=<a copy of the package> python3 bench/probe_gemv.py TAG
    PROBE_MIN_CTAS=2,3  PROBE_CONFIGS="512,32,264,8,0,1;256,64,264,8,1"  PROBE_DUMP=dir (PTX)
    PROBE_COMPACT_WARPS=8  PROBE_CASES=gate_up,down"""
import dataclasses
import os
import statistics
import sys

import torch

from wina.kernels import ACT_SILU_MUL, gemv
from wina.kernels.kernels import GemvConfig, _prepare_input, config_for


def time_graph(fn, reps=20, trials=5):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(trials):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); g.replay(); e1.record(); e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3 / reps)
    return statistics.median(ts)


CASES = [  # name, role, K, N, bounds, pre-norm, act, residual
    ("qkv", "attn_in", 4096, 12288, [4096, 8192], True, 0, False),
    ("o", "o", 4096, 4096, [], False, 0, True),
    ("gate_up", "mlp_in", 4096, 22016, [11008], True, 0, False),
    ("down", "down", 11008, 4096, [], False, ACT_SILU_MUL, True),
]


def case_inputs(case, gen: torch.Generator, layers: int = 8):
    """Random inputs of one CASES row, on the generator's device (bf16): ``layers`` weights (several
    times the L2 together), scales [S, K], x, ssq_in (pre-norm roles), the residual (roles with
    one) and the GEMV's input as the kernel sees it (normalised / SiLU·up), a float32 [K] vector."""
    name, role, k, n, bounds, pre, act, res_on = case
    dev, dt = gen.device, torch.bfloat16
    wts = [torch.randn(k, n, generator=gen, device=dev).to(dt) for _ in range(layers)]
    scales = torch.rand(len(bounds) + 1, k, generator=gen, device=dev) + 0.5
    x = torch.randn(1, 2 * k if act else k, generator=gen, device=dev).to(dt)
    ssq = (x.float() ** 2).sum(-1, keepdim=True) if pre else None
    res = torch.randn(1, n, generator=gen, device=dev).to(dt) if res_on else None
    return wts, scales, x, ssq, res, _prepare_input(x, k, ssq, 1e-5, act)[0]


def thresholds_at(xa: torch.Tensor, scales: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-segment thresholds that drop ``sparsity`` of the scores |x_i|·c_i (0: keep every input)."""
    return torch.tensor([-1.0 if sparsity == 0 else float(torch.quantile((xa.abs() * c).float(), sparsity))
                         for c in scales], device=xa.device)


@torch.no_grad()
def main(tag: str, layers: int = 8, min_ctas=(None,), configs=()):
    """min_ctas: also time each case with GemvConfig.min_ctas set to these values (None: as
    configured); configs: also time each case with these GemvConfigs."""
    from dataclasses import replace
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = []
    only = [c for c in os.environ.get("PROBE_CASES", "").split(",") if c]
    for case in CASES:
        name, role, k, n, bounds, pre, act, res_on = case
        if only and name not in only:
            continue
        wts, c, x, ssq, res, xa = case_inputs(case, gen, layers)
        base = config_for(k, n, True, role)
        variants = [(mc, base if mc is None else replace(base, min_ctas=mc)) for mc in min_ctas]
        variants += [(",".join(str(v) for v in dataclasses.astuple(cf)), cf) for cf in configs]
        for (mc, cfg), s in [(v, s) for v in variants for s in (0.0, 0.5)]:
            thr = thresholds_at(xa, c, s)

            def fn():
                for w in wts:
                    gemv(x, w, scales=c, thresholds=thr, bounds=bounds, res=res, ssq_in=ssq, eps=1e-5,
                         act=act, sparse=True, want_ssq=res is not None, config=cfg)
            try:
                out.append((name, "variant", mc, s, round(time_graph(fn) / layers, 2)))
            except Exception as e:  # a config this shape cannot take: report, go on
                out.append((name, "variant", mc, s, "error " + str(e).splitlines()[0][:100]))
        out.append((name, "cfg", str(base)))
    for r in out:
        print(tag, *r, flush=True)


def dump_compiled(tag: str, outdir=None) -> None:
    """Registers and spills of every compiled _gemv_kernel variant, and its PTX into ``outdir``."""
    from wina.kernels import kernels as K
    if outdir:
        os.makedirs(outdir, exist_ok=True)
    for dev_cache in K._gemv_kernel.device_caches.values():
        for i, (key, ck) in enumerate(dev_cache[0].items()):
            ck._init_handles()
            md = ck.metadata
            print(tag, "compiled", i, "regs", ck.n_regs, "spills", ck.n_spills, "shared", md.shared,
                  "warps", md.num_warps, "maxnreg", getattr(md, "maxnreg", None), flush=True)
            if outdir:
                with open(os.path.join(outdir, f"{tag}-{i}.ptx"), "w") as f:
                    f.write(str(key) + "\n" + ck.asm["ptx"])


if __name__ == "__main__":
    tag = sys.argv[1] if len(sys.argv) > 1 else "head"
    if os.environ.get("PROBE_COMPACT_WARPS"):       # warps of the precompact launch (kernels.COMPACT_WARPS)
        from wina.kernels import kernels as _kk
        _kk.COMPACT_WARPS = int(os.environ["PROBE_COMPACT_WARPS"])
    mcs = os.environ.get("PROBE_MIN_CTAS")
    cfgs = [GemvConfig(*[int(v) for v in c.split(",")]) for c in os.environ.get("PROBE_CONFIGS", "").split(";") if c]
    main(tag, min_ctas=[None] + [int(v) for v in mcs.split(",")] if mcs else [None], configs=cfgs)
    dump_compiled(tag, os.environ.get("PROBE_DUMP"))
