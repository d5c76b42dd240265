"""``wina bench``: decode speed of transformers generate, the dense engine and the sparse engine.

One call of :func:`run_bench` measures, on the current GPU (or CPU, slowly):

* the device-to-device copy bandwidth (bytes read + written), the ceiling everything is held to;
* per model (a hub id / path, or a shape-only config with random weights: ``llama-2-7b``,
  ``llama-3-8b``, ``qwen-2.5-7b``, ``phi-4``): tokens/s of ``model.generate`` (transformers, greedy),
  of the engine dense, and of the engine sparse at each target sparsity (thresholds calibrated on
  the prompt so that each matrix drops that fraction of its scores), next to the memory floor
  (every weight read once per token at the copy bandwidth);
* per kernel (first layers of the first model): time, bytes actually read (weight rows kept plus
  vectors) and achieved bandwidth against the copy bandwidth, for cuBLAS (``x @ Wᵀ``), our dense
  GEMV, our sparse GEMV at 0 % and at each sparsity.

It returns a JSON-serialisable dict and can print rich tables. The CLI's ``wina bench`` is a thin
wrapper around :func:`run_bench`.
"""
from __future__ import annotations

import datetime as _dt
import json
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import InvalidArgument
from .events import Progress

SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rope_theta=10000.0),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0),
    "qwen-2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                        max_position_embeddings=32768, rope_theta=1000000.0),
    "phi-4": dict(model_type="phi3", hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=10, vocab_size=100352,
                  max_position_embeddings=16384, rope_theta=250000.0, pad_token_id=100349,
                  eos_token_id=100265, bos_token_id=100257),
}
SHAPES["tiny-llama"] = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                           max_position_embeddings=512, rope_theta=10000.0)   # tests, CPU smoke runs
DEFAULT_SPARSITIES = (0.25, 0.40, 0.50, 0.65)


def shape_config(name: str, num_hidden_layers: Optional[int] = None):
    """A transformers config of one of :data:`SHAPES` (optionally with fewer layers)."""
    from transformers import AutoConfig
    if name not in SHAPES:
        raise InvalidArgument(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    kw = dict(SHAPES[name])
    mt = kw.pop("model_type")
    theta = kw.pop("rope_theta")
    if num_hidden_layers:
        kw["num_hidden_layers"] = int(num_hidden_layers)
    cfg = AutoConfig.for_model(mt, **kw)
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        rp["rope_theta"] = theta
    else:
        cfg.rope_theta = theta
    return cfg


@torch.no_grad()
def random_model(config, device: str = "cuda", dtype=torch.bfloat16, seed: int = 0):
    """A randomly initialised causal LM built directly on ``device`` (no CPU round trip)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device="cuda", nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = nbytes // 2
    a = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    _sync(device)
    times = []
    if torch.device(device).type == "cuda":
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            b.copy_(a)
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
    else:
        for _ in range(reps):
            t = time.perf_counter()
            b.copy_(a)
            times.append(time.perf_counter() - t)
    del a, b
    return 2 * n * 2 / statistics.median(times)


def _hf_generate_tps(model, prompt: torch.Tensor, new_tokens: int) -> dict:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        kw["pad_token_id"] = 0
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                   **{k: v for k, v in kw.items() if k == "pad_token_id"})
    _sync(prompt.device)
    t = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    _sync(prompt.device)
    dt = time.perf_counter() - t
    n = out.shape[1] - prompt.shape[1]
    return {"tokens": int(n), "seconds": dt, "tokens_per_s": n / dt}


def engine_tps(engine, prompt: list[int], new_tokens: int, sparse: bool, repeats: int = 2) -> dict:
    """Decode speed of ``engine`` after ``prompt``: a short warm-up generate (it captures the graph),
    then the best of ``repeats`` generates of ``new_tokens`` (eos ignored)."""
    engine.generate(prompt, min(8, new_tokens), sparse=sparse, stop=())   # capture + warm up
    best = None
    runs = []
    for _ in range(repeats):
        r = engine.generate(prompt, new_tokens, sparse=sparse, stop=())
        runs.append(r.decode_tokens_per_s)
        if best is None or r.decode_tokens_per_s > best.decode_tokens_per_s:
            best = r
    return {"decode_tokens_per_s": best.decode_tokens_per_s, "tokens_per_s": best.tokens_per_s,
            "prefill_s": best.prefill_s, "decode_s": best.decode_s, "new_tokens": best.new_tokens,
            "runs": runs, "tokens": best.tokens[:16]}


def weight_bytes(engine) -> int:
    """Bytes of the weights one dense decode step of ``engine`` reads (embedding row excluded): the
    memory floor's numerator."""
    n = engine.head.numel()
    for L in engine.layers:
        n += sum(g.wt.numel() for g in (L.attn_in, L.o, L.mlp_in, L.down))
        n += sum(s.numel() for s in (L.s_attn, L.s_mlp) if s is not None)
    return n * engine.head.element_size()


def scales_for(model, method: str) -> dict:
    """The engine's score scales for ``method``: WINA's column norms of each projection's weight
    ({(layer, proj): [K]}), none for TEAL (|x| alone)."""
    from .adapters import iter_projections
    if method == "teal":
        return {}
    return {(l, p): lin.weight.detach().float().norm(dim=0) for l, p, lin in iter_projections(model)}


# ------------------------------------------------------------------------------------------------
# thresholds and sparsity of an engine (benchmarks on random weights: no calibration plan)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def engine_thresholds(engine, ids: Sequence[int], sparsity: float) -> dict[tuple[int, str], float]:
    """Per-matrix thresholds for ``engine`` such that a fraction ``sparsity`` of the scores
    |x_i|·c_i seen in a dense forward of ``ids`` falls at or below them (uniform sparsity); give
    them to :meth:`wina.engine.Engine.set_sparsity`."""
    from .kernels import prepare_input
    if not 0.0 <= sparsity < 1.0:
        raise InvalidArgument(f"sparsity must be in [0, 1), got {sparsity}")
    neg_inf = float("-inf")
    out: dict[tuple[int, str], float] = {}

    def record(g, x, ssq_in, act):
        xf = prepare_input(x, g.wt.shape[0], ssq_in, engine.eps, act)
        for j, p in enumerate(g.projs):
            sc = xf.abs() * g.scales[j]
            sc = (sc if g.live[j] is None else sc[:, g.live[j]]).flatten()
            if sc.numel() > 8_000_000:
                sc = sc[torch.randperm(sc.numel(), device=sc.device)[:8_000_000]]
            out[(g.layer, p)] = float(torch.quantile(sc.float(), sparsity)) if sparsity > 0 else neg_inf

    x = torch.tensor(list(ids), dtype=torch.long, device=engine.device)
    pos = torch.zeros(1, dtype=torch.long, device=engine.device)
    engine._forward(x, pos, False, 0, record=record)
    return {k: v for k, v in out.items() if v != neg_inf}


@torch.no_grad()
def engine_sparsity(engine, ids: Sequence[int]) -> float:
    """Fraction of the sparsifiable weight bytes a token skips in ``engine`` at its current
    thresholds, averaged over a sparse forward of ``ids`` (each matrix weighted by its size; rows of
    the dense prefix excluded)."""
    from .kernels import prepare_input
    num = den = 0.0
    d0 = engine._dense_rows(len(ids))

    def record(g, x, ssq_in, act):
        nonlocal num, den
        xf = prepare_input(x, g.wt.shape[0], ssq_in, engine.eps, act)[d0:]
        edges = [0, *g.bounds, g.wt.shape[1]]
        for j in range(len(g.projs)):
            n_out = edges[j + 1] - edges[j]
            keep = (xf.abs() * g.scales[j] > g.thresholds[j]).float().mean()
            num += float(1.0 - keep) * n_out * g.wt.shape[0]
            den += n_out * g.wt.shape[0]

    x = torch.tensor(list(ids), dtype=torch.long, device=engine.device)
    pos = torch.zeros(1, dtype=torch.long, device=engine.device)
    engine._forward(x, pos, True, d0, record=record)
    return num / den if den else 0.0


# ------------------------------------------------------------------------------------------------
# per-kernel timings
# ------------------------------------------------------------------------------------------------
def _time_graph(fn: Callable[[], None], reps: int = 20, trials: int = 5) -> float:
    """Median seconds of one call of ``fn`` (which may launch several kernels), via a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(trials):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3 / reps)
    del g
    return statistics.median(ts)


def _kernel_cases(engine, n_layers: int = 8):
    """(name, groups, flags) for the kinds of GEMV in a decode step, over the first layers."""
    from .kernels import ACT_SILU_MUL
    ls = engine.layers[:n_layers]
    return [
        ("qkv", [L.attn_in for L in ls], dict(pre=True)),
        ("o", [L.o for L in ls], dict(res=True)),
        ("gate_up", [L.mlp_in for L in ls], dict(pre=True)),
        ("down", [L.down for L in ls], dict(res=True, act=ACT_SILU_MUL)),
        ("lm_head", [None], dict(pre=True)),
    ]


@torch.no_grad()
def kernel_table(engine, sparsities: Sequence[float], copy_bw: float, n_layers: int = 8,
                 seed: int = 0, precompact_at: Optional[float] = None) -> list[dict]:
    """Time each GEMV kind of a decode step (over ``n_layers`` layers' weights, so that the data is
    several times the L2) for cuBLAS, our dense kernel, our sparse kernel at 0 % and at each
    sparsity; bytes read count the weight rows actually loaded plus the vectors.
    ``precompact_at``: also time, at that sparsity, the pre-compaction variant (two launches) and
    its GEMV launches alone (``GemvConfig.precompact``)."""
    from dataclasses import replace

    from .kernels import config_for, gemv, prepare_input
    from .kernels.gemv_launch import kept_lists, launch_gemv
    dev, dt = engine.device, engine.dtype
    gen = torch.Generator(device=dev).manual_seed(seed)
    rows = []
    for name, groups, fl in _kernel_cases(engine, n_layers):
        if groups == [None]:
            wts, biases = [engine.head], [None]
            scl = [torch.ones(1, engine.head.shape[0], device=dev)]
            bounds = []
        else:
            wts = [g.wt for g in groups]
            biases = [g.bias for g in groups]
            scl = [g.scales for g in groups]
            bounds = groups[0].bounds
        k, n = wts[0].shape
        role = "head" if groups == [None] else groups[0].name       # the engine's group names are the roles
        act = fl.get("act", 0)
        x = torch.randn(1, 2 * k if act else k, generator=gen, device=dev).to(dt)
        ssq = (x.float() ** 2).sum(-1, keepdim=True) if fl.get("pre") else None
        res = torch.randn(1, n, generator=gen, device=dev).to(dt) if fl.get("res") else None
        xf = prepare_input(x, k, ssq, engine.eps, act)
        n_seg = len(bounds) + 1
        edges = [0, *bounds, n]
        vec_bytes = x.numel() * x.element_size() + n * x.element_size() * (2 if res is not None else 1)

        def run_ours(sparse, thr_list):
            def fn():
                for w, b, c, t in zip(wts, biases, scl, thr_list):
                    gemv(x, w, scales=c, thresholds=t, bounds=bounds, bias=b, res=res, ssq_in=ssq,
                         eps=engine.eps, act=act, sparse=sparse, want_ssq=res is not None, role=role)
            return fn

        def run_variant(thr_list, consumer_only: bool = False, **changes):
            # docs/gpu-notes.md run 6: the sparse config with ``changes`` (precompact=1: compaction
            # in its own small launch; with consumer_only, the kept lists are computed once (first
            # matrix's scales) and only the GEMV launches are timed: what compaction fused into the
            # producer could reach)
            cfg = replace(config_for(k, n, True, role), **changes)
            lists = kept_lists(x, wts[0], scl[0], thr_list[0], bounds, ssq, engine.eps, act, cfg) \
                if consumer_only else None

            def fn():
                for w, b, c, t in zip(wts, biases, scl, thr_list):
                    launch_gemv(x, w, c, t, bounds, b, res, ssq, engine.eps, act, res is not None, True, cfg,
                                lists=lists)
            return fn

        xin = xf.to(dt)

        def run_cublas():
            for w in wts:
                torch.matmul(xin, w)

        settings = [("cublas", None, None), ("dense", False, None)]
        if name != "lm_head":
            settings += [("sparse", True, 0.0)] + [("sparse", True, float(s)) for s in sparsities]
            if precompact_at is not None:
                settings += [("precompact", True, float(precompact_at)),
                             ("consumer only", True, float(precompact_at))]
        for label, sparse, s in settings:
            thr_list = [None] * len(wts)
            rows_kept = k
            if sparse:
                thr_list, kept = [], []
                for c in scl:
                    ts = []
                    for j in range(n_seg):
                        sc = xf.abs()[0] * c[j]
                        ts.append(-1.0 if s == 0.0 else float(torch.quantile(sc.float(), s)))
                    thr = torch.tensor(ts, device=dev, dtype=torch.float32)
                    thr_list.append(thr)
                    kept.append(sum(int((xf.abs()[0] * c[j] > thr[j]).sum()) * (edges[j + 1] - edges[j])
                                    for j in range(n_seg)) / n)
                rows_kept = statistics.mean(kept)
            if label == "cublas":
                fn = run_cublas
            elif label in ("precompact", "consumer only"):
                fn = run_variant(thr_list, consumer_only=label == "consumer only", precompact=1)
            else:
                fn = run_ours(bool(sparse), thr_list)
            try:
                t = _time_graph(fn) / len(wts)
            except Exception as e:  # report, keep going
                rows.append({"kernel": name, "K": k, "N": n, "variant": label, "sparsity": s,
                             "error": str(e).splitlines()[0][:200]})
                continue
            launch = {}
            if label in ("dense", "sparse"):
                # the launch's programs and registers (a register count past a residency step is
                # a silent 25 % on the same code, docs/gpu-notes.md run 11)
                try:
                    launch_gemv(x, wts[0], scl[0] if sparse else None, thr_list[0], bounds, biases[0], res, ssq,
                                engine.eps, act, res is not None, bool(sparse), config_for(k, n, bool(sparse), role),
                                info=launch)
                except Exception:  # the table is still worth printing without it
                    launch = {}
            wbytes = rows_kept * n * wts[0].element_size()
            if label == "cublas":
                wbytes = k * n * wts[0].element_size()
            byts = wbytes + vec_bytes + (n_seg * k * 4 if sparse else 0)
            rows.append({"kernel": name, "K": k, "N": n, "variant": label,
                         "sparsity": None if s is None else s, "time_us": t * 1e6,
                         "bytes_read": int(byts), "rows_kept": rows_kept / k,
                         "tb_per_s": byts / t / 1e12, "of_copy_bw": byts / t / copy_bw, **launch})
    rows += _glue_rows(engine, copy_bw, n_layers)
    return rows


def _glue_rows(engine, copy_bw: float, n_layers: int, positions: Sequence[int] = (256, 2048)) -> list[dict]:
    """The decode step's other kernels, timed like the GEMVs: RoPE + cache write on its own (what
    the fused q/k/v launch saves) and flash-decoding attention at each of ``positions`` that fits
    the cache (a chat's later turns decode at a few thousand; attention costs dense and sparse steps
    alike, so its share sets how far sparse can get ahead there)."""
    from .kernels import attn_decode, rope_cache
    ls = engine.layers[:n_layers]
    dev, dt = engine.device, engine.dtype
    hd, nh, nkv = engine.head_dim, engine.n_heads, engine.n_kv
    at = [p for p in positions if p < engine.max_seq_len] or [engine.max_seq_len - 1]
    pos0 = torch.tensor([at[0]], device=dev)
    qkv = torch.randn(1, (nh + 2 * nkv) * hd, device=dev).to(dt)
    saved = [(L.k_cache.clone(), L.v_cache.clone()) for L in ls]
    q = rope_cache(qkv, engine.cos, engine.sin, pos0, ls[0].k_cache, ls[0].v_cache, nh, nkv, hd)
    out = []
    cases = [("rope", at[0], lambda p: [rope_cache(qkv, engine.cos, engine.sin, p, L.k_cache, L.v_cache, nh, nkv, hd)
                                        for L in ls], qkv.numel() * qkv.element_size() * 2)]
    cases += [("attention", position, lambda p: [attn_decode(q, L.k_cache, L.v_cache, p, L.window) for L in ls],
               2 * nkv * (position + 1) * hd * dt.itemsize) for position in at]
    for name, position, fn, byts in cases:
        pos = torch.tensor([position], device=dev)
        try:
            t = _time_graph(lambda: fn(pos)) / len(ls)
        except Exception as e:  # report, keep going
            out.append({"kernel": name, "K": hd, "N": nh, "variant": f"pos {position}",
                        "error": str(e).splitlines()[0][:200]})
            continue
        out.append({"kernel": name, "K": hd, "N": nh, "variant": f"pos {position}", "sparsity": None,
                    "time_us": t * 1e6, "bytes_read": int(byts), "tb_per_s": byts / t / 1e12,
                    "of_copy_bw": byts / t / copy_bw})
    for L, (k, v) in zip(ls, saved):
        L.k_cache.copy_(k)
        L.v_cache.copy_(v)
    return out


@torch.no_grad()
def tune_gemv(device, dtype, shapes: Sequence[tuple[int, int]], configs, sparsity: float = 0.5,
              n_mats: int = 6, on_row: Optional[Callable[[dict], None]] = None,
              modes: Sequence[bool] = (False, True)) -> list[dict]:
    """Time each GemvConfig on each (K, N) shape, dense (False) and/or at ``sparsity`` (True)."""
    from .kernels import gemv
    rows = []
    for (k, n) in shapes:
        ws = [torch.randn(k, n, device=device, dtype=torch.float32).to(dtype) for _ in range(n_mats)]
        x = torch.randn(1, k, device=device).to(dtype)
        c = torch.ones(1, k, device=device)
        thr = torch.tensor([float(torch.quantile(x.float().abs(), sparsity))], device=device)
        for cfg in configs:
            for sp in modes:
                def fn():
                    for w in ws:
                        gemv(x, w, scales=c, thresholds=thr, sparse=sp, config=cfg)
                try:
                    t = _time_graph(fn, reps=5, trials=3) / n_mats
                    byts = k * n * 2 * ((1 - sparsity) if sp else 1.0)
                    row = {"K": k, "N": n, "sparse": sp, "config": list(cfg.__dict__.values()),
                           "time_us": t * 1e6, "tb_per_s": byts / t / 1e12}
                except Exception as e:
                    row = {"K": k, "N": n, "sparse": sp, "config": list(cfg.__dict__.values()),
                           "error": str(e).splitlines()[0][:200]}
                rows.append(row)
                if on_row:
                    on_row(row)
        ws.clear()                # frees the weights before empty_cache (the closures hold the list)
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
def run_bench(models: Sequence[str] = ("llama-2-7b",), *, sparsities: Sequence[float] = DEFAULT_SPARSITIES,
              method: str = "wina", prompt_len: int = 128, new_tokens: int = 256,
              hf_new_tokens: Optional[int] = None, device: str = "cuda", dtype: str = "bfloat16",
              kernels: bool = True, kernel_layers: int = 8, num_hidden_layers: Optional[int] = None,
              precompact_at: Optional[float] = None, copy_bw: Optional[float] = None,
              seed: int = 0, on_event: Optional[Callable[[Progress], None]] = None,
              print_tables: bool = False, console=None, json_path: Optional[str] = None) -> dict:
    """Benchmark decode speed; returns a JSON-serialisable dict (see the module docstring).

    ``models``: shape names from :data:`SHAPES` (random weights) and/or model ids / paths loaded
    through :func:`wina.models.load`. ``hf_new_tokens``: tokens for the transformers baseline
    (default ``new_tokens``; 0 skips it). ``num_hidden_layers``: shrink shape-only configs (tests).
    ``copy_bw``: bytes/s to take as the copy bandwidth instead of measuring it (on the H200 a copy
    measured after minutes of load came out ~10 % lower than one measured first in the process).
    ``method``: "wina" (column-norm scores) or "teal" (|x| alone)."""
    from .engine import Engine
    from .models import resolve_dtype
    if method not in ("wina", "teal"):
        raise InvalidArgument(f"method must be 'wina' or 'teal', got {method!r}")
    for s in sparsities:
        if not 0.0 < float(s) < 1.0:
            raise InvalidArgument(f"sparsities must be in (0, 1), got {s}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument("no CUDA device: use device='cpu'")
    tdtype = resolve_dtype(dtype, device)
    emit = on_event or (lambda ev: None)
    hf_new = new_tokens if hf_new_tokens is None else int(hf_new_tokens)
    out: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "dtype": str(tdtype).replace("torch.", ""), "method": method,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "sparsities": list(sparsities),
        "models": [], "kernels": []}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    if copy_bw is None:
        emit(Progress("bench", 0, len(models), message="copy bandwidth"))
        bw = copy_bandwidth(device, (2 << 30) if device.startswith("cuda") else (64 << 20))
    else:
        bw = float(copy_bw)
    out["copy_bw_tb_s"] = bw / 1e12

    for mi, spec in enumerate(models):
        emit(Progress("bench", mi, len(models), message=f"{spec}: building"))
        rec: dict[str, Any] = {"model": spec}
        try:
            if spec in SHAPES:
                cfg = shape_config(spec, num_hidden_layers)
                model = random_model(cfg, device, tdtype, seed)
                rec["weights"] = "random"
            else:
                from .models import load
                model = load(spec, dtype=tdtype, device=device).model
                rec["weights"] = "loaded"
            cfgm = model.config
            vocab = cfgm.vocab_size
            g = torch.Generator().manual_seed(seed)
            prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)
            if hf_new > 0:
                emit(Progress("bench", mi, len(models), message=f"{spec}: transformers generate"))
                rec["hf"] = _hf_generate_tps(model, prompt.to(device), hf_new)
            scales = scales_for(model, method)
            eng = Engine.from_model(model, scales=scales, max_seq_len=prompt_len + new_tokens + 8,
                                    use_sparsifier=False)
            rec["params"] = sum(p.numel() for p in model.parameters())
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            wb = weight_bytes(eng)
            rec["weight_bytes"] = wb
            rec["floor_tokens_per_s"] = bw / wb
            ids = prompt[0].tolist()
            emit(Progress("bench", mi, len(models), message=f"{spec}: dense engine"))
            rec["dense"] = engine_tps(eng, ids, new_tokens, sparse=False)
            rec["dense"]["of_floor"] = rec["dense"]["decode_tokens_per_s"] / rec["floor_tokens_per_s"]
            sparsifiable = sum(gr.wt.numel() for _, gr in eng.groups()) * eng.head.element_size()
            rec["sparse"] = {}
            for s in sparsities:
                emit(Progress("bench", mi, len(models), message=f"{spec}: sparse {s:.0%}"))
                thr = engine_thresholds(eng, ids, float(s))
                eng.set_sparsity(thr)
                r = engine_tps(eng, ids, new_tokens, sparse=True)
                r["realized_sparsity"] = engine_sparsity(eng, ids)
                r["speedup_vs_dense"] = r["decode_tokens_per_s"] / rec["dense"]["decode_tokens_per_s"]
                floor_bytes = wb - sparsifiable * r["realized_sparsity"]
                r["floor_tokens_per_s"] = bw / floor_bytes
                r["of_floor"] = r["decode_tokens_per_s"] / r["floor_tokens_per_s"]
                rec["sparse"][f"{s:.2f}"] = r
            if kernels and mi == 0 and device.startswith("cuda"):
                emit(Progress("bench", mi, len(models), message=f"{spec}: kernels"))
                out["kernels"] = kernel_table(eng, sparsities, bw, kernel_layers, seed,
                                              precompact_at=precompact_at)
                out["kernel_model"] = spec
            eng.set_sparsity(None)
            del eng
        except Exception as e:  # keep the other models' numbers
            import traceback
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            rec["traceback"] = traceback.format_exc()[-2000:]
        finally:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        out["models"].append(rec)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(out, f, indent=1)
        emit(Progress("bench", mi + 1, len(models), message=f"{spec}: done"))
    out["targets"] = evaluate_targets(out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
    if print_tables:
        print_bench(out, console)
    return out


def evaluate_targets(res: dict) -> dict:
    """The issue's targets (Llama-2-7B shape) against a run's numbers."""
    t: dict[str, Any] = {}
    m = next((r for r in res.get("models", []) if r.get("model") == "llama-2-7b" and "dense" in r), None)
    if m is not None:
        t["dense_of_floor>=0.85"] = (round(m["dense"]["of_floor"], 3), m["dense"]["of_floor"] >= 0.85)
        for s, need in (("0.50", 1.75), ("0.40", 1.5), ("0.25", 1.25)):
            if s in m.get("sparse", {}):
                v = m["sparse"][s]["speedup_vs_dense"]
                t[f"sparse@{s}>={need}x"] = (round(v, 3), v >= need)
    ks = res.get("kernels", [])
    if ks:
        for name in sorted({r["kernel"] for r in ks}):
            dense = next((r for r in ks if r["kernel"] == name and r["variant"] == "dense" and "time_us" in r), None)
            s0 = next((r for r in ks if r["kernel"] == name and r["variant"] == "sparse" and r["sparsity"] == 0.0
                       and "time_us" in r), None)
            s50 = next((r for r in ks if r["kernel"] == name and r["variant"] == "sparse" and r["sparsity"] == 0.5
                        and "time_us" in r), None)
            if dense and s0:
                v = s0["time_us"] / dense["time_us"]
                t[f"{name}: sparse@0 / dense <= 1.05"] = (round(v, 3), v <= 1.05)
            if s50:
                t[f"{name}: sparse@0.5 of copy bw >= 0.85"] = (round(s50["of_copy_bw"], 3), s50["of_copy_bw"] >= 0.85)
    return t


def print_bench(res: dict, console=None) -> None:
    """Rich tables of a :func:`run_bench` result."""
    from rich.console import Console
    from rich.table import Table
    con = console or Console()
    con.print(f"[bold]wina bench[/] {res['date']} · {res['device']} · {res['dtype']} · method {res['method']} · "
              f"copy bandwidth {res['copy_bw_tb_s']:.2f} TB/s · prompt {res['prompt_len']} · new {res['new_tokens']}")
    tab = Table(title="decode tokens/s (batch 1)")
    for c in ["model", "floor", "transformers", "dense", "dense/floor",
              *[f"sparse {float(s):.0%}" for s in res["sparsities"]]]:
        tab.add_column(c, justify="right")
    for r in res["models"]:
        if "error" in r:
            tab.add_row(r["model"], f"[red]{r['error'][:60]}[/]")
            continue
        cells = [r["model"], f"{r['floor_tokens_per_s']:.0f}",
                 f"{r['hf']['tokens_per_s']:.1f}" if "hf" in r else "-",
                 f"{r['dense']['decode_tokens_per_s']:.0f}", f"{r['dense']['of_floor']:.2f}"]
        for s in res["sparsities"]:
            x = r["sparse"].get(f"{float(s):.2f}")
            cells.append(f"{x['decode_tokens_per_s']:.0f} ({x['speedup_vs_dense']:.2f}×, "
                         f"{x['realized_sparsity']:.0%})" if x else "-")
        tab.add_row(*cells)
    con.print(tab)
    if res.get("kernels"):
        kt = Table(title=f"GEMV kernels ({res.get('kernel_model')}, batch 1)")
        for c in ["kernel", "K×N", "variant", "time µs", "MB read", "TB/s", "of copy bw", "programs", "regs"]:
            kt.add_column(c, justify="right")
        for r in res["kernels"]:
            v = r["variant"] + ("" if r.get("sparsity") is None else f" {r['sparsity']:.0%}")
            if "error" in r:
                kt.add_row(r["kernel"], f"{r['K']}×{r['N']}", v, f"[red]{r['error'][:40]}[/]")
                continue
            kt.add_row(r["kernel"], f"{r['K']}×{r['N']}", v, f"{r['time_us']:.1f}", f"{r['bytes_read'] / 1e6:.1f}",
                       f"{r['tb_per_s']:.2f}", f"{r['of_copy_bw']:.2f}", str(r.get("programs", "")),
                       str(r.get("regs", "")) + (f" ({r['spills']} spilled)" if r.get("spills") else ""))
        con.print(kt)
    _print_targets(con, res, "targets")


# ------------------------------------------------------------------------------------------------
# the user's path: a scripted multi-turn chat through wina.chat.ChatSession, dense and sparse side
# by side on one engine, against the engine alone at the same context
# ------------------------------------------------------------------------------------------------
_WORDS = ("the river city light stone bridge market morning evening garden window story music "
          "winter summer road friend teacher question answer letter paper table island forest "
          "mountain village harbor station library museum kitchen history science number").split()


def chat_script(tokenizer, turns: int = 5, first_tokens: int = 90, user_tokens: int = 500,
                seed: int = 0) -> list[str]:
    """User messages of about ``first_tokens`` (the first) and ``user_tokens`` tokens (the rest)."""
    import random
    rng = random.Random(seed)
    out = []
    for t in range(turns):
        want = first_tokens if t == 0 else user_tokens
        words = [f"Turn {t + 1}: please read this and answer."]
        text = " ".join(words)
        while _n_ids(tokenizer(text).input_ids) < want:
            words.extend(rng.choice(_WORDS) for _ in range(16))
            text = " ".join(words)
        out.append(text)
    return out


def _n_ids(x) -> int:
    return int(x.shape[-1]) if hasattr(x, "shape") else len(x)


def _threshold_sparsifier(model, method: str, sparsity: float, ids: list[int], max_seq_len: int):
    """Attach threshold gating at ``sparsity`` calibrated on ``ids`` (uniform per matrix: each
    drops that fraction of its scores in a dense forward), as run_bench does for the engine alone."""
    from .engine import Engine
    from .sparsify import sparsify
    tmp_sp = sparsify(model, method, sparsity, gating="topk")
    scales = tmp_sp.scales
    tmp_sp.remove()
    tmp = Engine.from_model(model, scales=scales, max_seq_len=max(len(ids) + 8, 64), use_sparsifier=False)
    thr = engine_thresholds(tmp, ids, sparsity)
    del tmp
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return sparsify(model, method, sparsity, gating="threshold", thresholds=thr)


def run_chat_bench(model, tokenizer, *, turns: int = 5, new_tokens: int = 200, first_tokens: int = 90,
                   user_tokens: int = 500, sparsity: float = 0.5, method: str = "wina",
                   max_seq_len: int = 4096, one_copy: bool = True, count_every: Optional[int] = None,
                   seed: int = 0, label: str = "", on_event: Optional[Callable[[Progress], None]] = None,
                   json_path: Optional[str] = None) -> dict:
    """A scripted conversation (``turns`` user messages, the context growing past 2k tokens) through
    :class:`wina.chat.ChatSession`, dense and sparse side by side (one engine, two KV caches), greedy,
    ``new_tokens`` per reply (eos ignored). Per turn and mode: time to first token, decode tokens/s,
    the tokens prefilled, the measured sparsity; then the engine alone at each turn's context (a
    generate from that turn's prompt, the same ids, and the prefill of that turn's new tokens), and
    the ratios.
    Also: peak GPU memory against the weight and KV-cache bytes, and a 512-token prefill dense vs
    sparse. If the model has no active sparsifier, one is attached (threshold gating, each matrix at
    ``sparsity``, calibrated on the script). Returns a JSON-serialisable dict."""
    from .chat import ChatSession
    from .generate import engine_available
    emit = on_event or (lambda ev: None)
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    script = chat_script(tokenizer, turns, first_tokens, user_tokens, seed)
    out: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
        "model": label, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "turns": turns, "new_tokens": new_tokens, "turns_detail": []}
    sp = getattr(model, "_wina_sparsifier", None)
    if sp is None or not sp.enabled or sp.method == "dense":
        emit(Progress("chat-bench", 0, turns, message=f"calibrating thresholds at {sparsity:.0%}"))
        ids = chat_script_ids(tokenizer, script)
        sp = _threshold_sparsifier(model, method, sparsity, ids[:2048], max_seq_len)
        out["gating"] = f"{method} threshold, {sparsity:.0%} per matrix (calibrated on the script)"
    else:
        out["gating"] = f"{sp.method} {sp.gating}, nominal {sp.nominal_sparsity():.1%}"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    kw = dict(max_new_tokens=new_tokens, max_seq_len=max_seq_len, one_copy=one_copy, ignore_eos=True)
    if count_every is not None:
        kw["count_every"] = count_every
    dense, sparse = ChatSession.pair(model, tokenizer, **kw)
    if sparse is None:
        raise InvalidArgument("the model has no active sparsifier")
    out["backend"] = dense.backend
    # the engine counts the prompt and every count_every-th step; the portable path's gates count every row
    out["count_every"] = sparse.count_every if dense.backend == "engine" else 1
    t = time.perf_counter()
    dense.warm_up(emit)
    sparse.warm_up(emit)
    out["warm_up_s"] = time.perf_counter() - t
    prompts: dict[tuple[int, str], list[int]] = {}      # each turn's prompt ids, for the engine alone
    for i, text in enumerate(script):
        emit(Progress("chat-bench", i, turns, message=f"turn {i + 1}"))
        row: dict[str, Any] = {"turn": i + 1}
        for name, s in (("dense", dense), ("sparse", sparse)):
            r = s.send(text)
            prompts[(i, name)] = list(s.context_ids()[:r.context_tokens])
            row[name] = {"context": r.context_tokens, "prefilled": r.prefill_tokens, "tokens": r.tokens,
                         "ttft_s": r.ttft_s, "prepare_s": r.prepare_s, "decode_s": r.decode_s,
                         "decode_tokens_per_s": r.decode_tokens_per_s,
                         "stopped": r.stopped, "sparsity": r.sparsity, "counted": r.counted_tokens,
                         "truncated": r.truncated}
        row["sparse_over_dense"] = sparse_over_dense(row)
        out["turns_detail"].append(row)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(out, f, indent=1)
    eng = dense.engine
    if cuda:
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        wb = weight_bytes(eng) + eng.embed.numel() * eng.embed.element_size()
        kv = dense._cache.nbytes() + sparse._cache.nbytes()
        out["memory"] = {"peak_allocated_gib": peak / 2**30, "peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / 2**30,
                         "weight_gib": wb / 2**30, "kv_caches_gib": kv / 2**30,
                         "peak_over_weights_plus_kv": peak / (wb + kv),
                         "peak_minus_kv_over_weights": (peak - kv) / wb}
    # the engine alone, at each turn's context, on a scratch cache
    if engine_available(model) or dense.backend == "engine":
        emit(Progress("chat-bench", turns, turns, message="the engine alone at the same contexts"))
        with scratch_cache(dense) as eng:
            engine_alone(eng, out["turns_detail"], prompts)
            # 512-token prefill, dense vs sparse
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, eng.vocab, (512,), generator=g).tolist()
            p_d = _time_prefill(eng, ids, 0, False)
            p_s = _time_prefill(eng, ids, 0, True)
            out["prefill_512"] = {"dense_s": p_d, "sparse_s": p_s, "sparse_over_dense": p_s / p_d if p_d else None}
    out["targets"] = chat_targets(out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
    return out


def sparse_over_dense(row: dict) -> Optional[float]:
    """A chat turn's sparse decode rate over its dense one (None where either is unknown)."""
    d, s = row["dense"].get("decode_tokens_per_s"), row["sparse"].get("decode_tokens_per_s")
    return s / d if d and s else None


@contextmanager
def scratch_cache(session):
    """``session``'s engine bound to a scratch KV cache for the duration (the session's cache, and
    the conversation in it, are left alone and bound again after)."""
    eng = session.engine
    scratch = eng.new_cache()
    eng.bind(scratch)
    try:
        yield eng
    finally:
        eng.bind(session._cache)
        eng.drop_cache(scratch)


def engine_alone(eng, rows: list[dict], prompts: dict) -> None:
    """The engine alone at each chat turn's context: for ``rows`` (a chat bench's ``turns_detail``:
    per mode ``tokens``, ``prefilled``, ``decode_tokens_per_s``, ``ttft_s``) and ``prompts`` ((turn
    index, mode) → that turn's prompt ids), a generate from the same ids (a sparse step's time
    depends on what it keeps) and the prefill of the turn's new tokens alone; adds
    ``engine_decode_tokens_per_s``, ``decode_ratio``, ``engine_prefill_s`` and ``ttft_over_prefill`` per
    mode. ``eng`` is bound to a scratch cache
    (:func:`scratch_cache`)."""
    for i, row in enumerate(rows):
        for name in ("dense", "sparse"):
            c = row[name]
            ids = prompts[(i, name)]
            res = eng.generate(ids, c["tokens"] if c["tokens"] > 1 else 2, sparse=(name == "sparse"), stop=())
            alone = res.decode_tokens_per_s
            n = c["prefilled"]
            pre = _time_prefill(eng, ids[-n:], len(ids) - n, name == "sparse")
            c["engine_decode_tokens_per_s"] = alone
            c["decode_ratio"] = c["decode_tokens_per_s"] / alone if alone and c["decode_tokens_per_s"] else None
            c["engine_prefill_s"] = pre
            c["ttft_over_prefill"] = c["ttft_s"] / pre if pre else None


def chat_script_ids(tokenizer, script: Sequence[str]) -> list[int]:
    ids: list[int] = []
    for text in script:
        x = tokenizer(text).input_ids
        ids.extend(int(v) for v in (x[0].tolist() if hasattr(x, "shape") else x))
    return ids


def _time_prefill(eng, ids: list[int], start: int, sparse: bool, reps: int = 3) -> float:
    sync = (lambda: torch.cuda.synchronize(eng.device)) if eng.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        eng.prefill(ids, sparse, start=start, last_only=True)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def chat_targets(res: dict) -> dict:
    """Issue 19's targets against a chat bench."""
    t: dict[str, Any] = {}
    rows = res.get("turns_detail", [])
    if not rows:
        return t
    if "engine_decode_tokens_per_s" in rows[0]["dense"]:
        worst = min(min(r[m]["decode_ratio"] or 0 for m in ("dense", "sparse")) for r in rows)
        t["chat decode / engine decode >= 0.95 (worst turn)"] = (round(worst, 3), worst >= 0.95)
        sod = min(r["sparse_over_dense"] or 0 for r in rows)
        t["sparse / dense decode in chat >= 1.5x (worst turn)"] = (round(sod, 3), sod >= 1.5)
        later = [r[m]["ttft_over_prefill"] for r in rows[1:] for m in ("dense", "sparse")
                 if r[m].get("ttft_over_prefill")]
        if later:
            w = max(later)
            t["later TTFT <= 1.2x prefill of the new tokens (worst)"] = (round(w, 3), w <= 1.2)
    first = rows[0]["sparse"]["ttft_s"]
    t[f"first TTFT ({rows[0]['sparse']['context']}-token prompt) <= 150 ms (sparse)"] = (
        round(first * 1000, 1), first <= 0.150)
    if res.get("prefill_512"):
        v = res["prefill_512"]["sparse_over_dense"]
        t["512-token prefill sparse / dense <= 1.2"] = (round(v, 3), v <= 1.2)
    if res.get("memory"):
        v = res["memory"]["peak_minus_kv_over_weights"]
        t["peak GPU memory - KV caches <= 1.15 x weight bytes"] = (round(v, 3), v <= 1.15)
    return t


def _count_note(every) -> str:
    if every is None:
        return ""
    if every == 0:
        return "gates not counted · "
    return "gates counted on every decode step · " if every == 1 else f"gates counted once every {every} decode steps · "


def print_chat_bench(res: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    con = console or Console()
    con.print(f"[bold]wina bench --chat[/] {res['date']} · {res['device']} · {res['dtype']} · {res.get('model', '')} · "
              f"{res['gating']} · {res['new_tokens']} new tokens per reply · backend {res.get('backend')} · "
              f"{_count_note(res.get('count_every'))}warm-up {res.get('warm_up_s', 0):.1f} s")
    tab = Table(title="per turn (side by side: dense, then sparse, one engine)")
    for c in ["turn", "context", "prefilled", "mode", "TTFT ms", "of which ids ms", "prefill alone ms", "decode tok/s",
              "engine tok/s", "chat/engine", "sparsity", "sparse/dense"]:
        tab.add_column(c, justify="right")
    for r in res["turns_detail"]:
        for m in ("dense", "sparse"):
            c = r[m]
            pa = c.get("engine_prefill_s")
            tab.add_row(str(r["turn"]) if m == "dense" else "", str(c["context"]), str(c["prefilled"]), m,
                        f"{c['ttft_s'] * 1000:.1f}", f"{c.get('prepare_s', 0) * 1000:.1f}",
                        f"{pa * 1000:.1f}" if pa else "-",
                        f"{c['decode_tokens_per_s']:.1f}",
                        f"{c['engine_decode_tokens_per_s']:.1f}" if c.get("engine_decode_tokens_per_s") else "-",
                        f"{c['decode_ratio']:.3f}" if c.get("decode_ratio") else "-",
                        "-" if c["sparsity"] is None else f"{c['sparsity']:.1%}",
                        f"{r['sparse_over_dense']:.2f}×" if (m == "sparse" and r.get("sparse_over_dense")) else "")
    con.print(tab)
    if res.get("memory"):
        mm = res["memory"]
        con.print(f"peak GPU memory {mm['peak_allocated_gib']:.2f} GiB allocated ({mm['peak_reserved_gib']:.2f} reserved) · "
                  f"weights {mm['weight_gib']:.2f} GiB · two KV caches {mm['kv_caches_gib']:.2f} GiB · "
                  f"(peak − KV) / weights {mm['peak_minus_kv_over_weights']:.3f}")
    if res.get("prefill_512"):
        p = res["prefill_512"]
        con.print(f"512-token prefill: dense {p['dense_s'] * 1000:.1f} ms, sparse {p['sparse_s'] * 1000:.1f} ms "
                  f"({p['sparse_over_dense']:.2f}×)")
    _print_targets(con, res, "targets (issue 19)")


def chat_bench_markdown(res: dict) -> str:
    """The per-turn table of :func:`run_chat_bench` as GitHub markdown (docs/gpu-results.md)."""
    def f(v, fmt, scale=1.0):
        return "-" if v is None else format(v * scale, fmt)
    lines = ["| turn | context | prefilled | mode | TTFT ms | of which ids ms | prefill alone ms | decode tok/s "
             "| engine alone tok/s | chat / engine | measured sparsity | sparse / dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("turns_detail", []):
        for m in ("dense", "sparse"):
            c = r[m]
            sod = f(r.get("sparse_over_dense"), ".2f") + "×" if m == "sparse" else ""
            cells = [str(r["turn"]) if m == "dense" else "", str(c["context"]), str(c["prefilled"]), m,
                     f(c["ttft_s"], ".1f", 1000), f(c.get("prepare_s"), ".1f", 1000),
                     f(c.get("engine_prefill_s"), ".1f", 1000), f(c["decode_tokens_per_s"], ".1f"),
                     f(c.get("engine_decode_tokens_per_s"), ".1f"),
                     f(c.get("decode_ratio"), ".3f"), f(c["sparsity"], ".1%"), sod]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _print_targets(con, res: dict, title: str) -> None:
    """The ``targets`` block of a benchmark result as a table: value and whether it is met."""
    if not res.get("targets"):
        return
    from rich.table import Table
    tt = Table(title=title)
    tt.add_column("target")
    tt.add_column("value", justify="right")
    tt.add_column("met")
    for k, (v, ok) in res["targets"].items():
        tt.add_row(k, f"{v}", "[green]yes[/]" if ok else "[red]no[/]")
    con.print(tt)
