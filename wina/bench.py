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

It returns a JSON-serialisable dict; the CLI's ``wina bench`` is a thin wrapper around :func:`run_bench`
that renders it (``wina.cli.bench_tables``). The chat path's benchmark (``--chat``) is
:mod:`wina.chat_bench`.
"""
from __future__ import annotations

import datetime as _dt
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import InvalidArgument
from .events import Progress
from .files import write_json

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
              json_path: Optional[str] = None) -> dict:
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
        raise InvalidArgument("no CUDA device here: --device cpu runs a (slow) CPU benchmark")
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
            write_json(json_path, out)
        emit(Progress("bench", mi + 1, len(models), message=f"{spec}: done"))
    out["targets"] = evaluate_targets(out)
    if json_path:
        write_json(json_path, out)
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
