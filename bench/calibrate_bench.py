"""Benchmark: calibration + greedy allocation, wall time and peak memory.

    python3 bench/calibrate_bench.py                                  # embedded model, its defaults, CPU
    python3 bench/calibrate_bench.py --shape llama-2-7b --device cuda # Llama-2-7B shape, random weights,
                                                                      # the seed's 20×2048, greedy to 0.9
Options: --method wina|teal, --transform (the seed's SVD rotation) or --rotation pca (the basis from
the calibration text, made inside the calibration and timed with it), --no-allocate (calibration
only), --mode layer|global, --threads N, --out DIR (plan dir), --samples/--seq-len (calibration),
--alloc-samples/--alloc-seq-len, --json FILE (append a result line).
Prints one JSON line: date, machine, settings, seconds per stage, peak RSS (GiB), peak GPU memory (GiB).

Resumable across processes: with --out DIR, the plan is saved layer by layer (as `wina calibrate`
does) and the seconds spent so far go to DIR/bench-timing.json after every finished layer. Run the
same command again after an interruption (e.g. a per-command time limit) and the times add up:
work done before the interruption counts once, the layer that was cut off counts only when it is
redone, and each restart's set-up (load, re-propagation to the first unfinished layer) counts too.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wina.plan_meta import PLAN_ROTATIONS  # noqa: E402  (torch-free)

SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096),
}


class _Tok:
    bos_token_id, eos_token_id = 1, 2


def machine(device: str) -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    s = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.startswith("cuda"):
        s += f", {torch.cuda.get_device_name(0)}"
    return s


def compare(args) -> None:
    """Within-layer vs cross-layer (and uniform) allocation on the embedded model: wikitext perplexity.

    One method per run (--method, --transform); the self-sampled calibration ids are shared through
    --ids-file so that every run calibrates on the same text. One JSON line per measurement.
    """
    import torch
    from wina.allocate import allocate
    from wina.calibrate import calibrate, default_sizes, sample_self
    from wina.models import load
    from wina.perplexity import perplexity
    from wina.plan import apply_plan
    from wina.transform import transform

    loaded = load("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    d = default_sizes(model.config)
    ids_file = Path(args.ids_file)
    if ids_file.exists():
        ids = torch.load(ids_file)
    else:
        ids = sample_self(model, tok, d["samples"], d["seq_len"], seed=0)
        torch.save(ids, ids_file)
    data = Path(args.data) / "wikitext2" / "wiki.test.raw"
    text = data.read_text(encoding="utf-8")
    out = Path(args.out or tempfile.mkdtemp(prefix="wina-cmp-"))

    def emit(**kw):
        kw.update(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  method=args.method, transform=args.transform, ppl_tokens=args.ppl_tokens)
        line = json.dumps(kw)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")

    def ppl():
        return round(perplexity(model, tok, text, context=512, max_tokens=args.ppl_tokens).perplexity, 3)

    if args.dense:
        emit(kind="dense", perplexity=ppl())
    t0 = time.perf_counter()
    if args.transform:
        transform(model)
    t1 = time.perf_counter()
    plan = calibrate(model, tok, method=args.method, source="self", input_ids=ids, out=out,
                     model_id="smollm2-135m")
    t2 = time.perf_counter()
    emit(kind="timing", transform_s=round(t1 - t0, 1), calibrate_s=round(t2 - t1, 1))
    targets = (0.4, 0.5, 0.65)
    t3 = time.perf_counter()
    plan = allocate(model, tok, plan, mode="layer")
    t4 = time.perf_counter()
    plan = allocate(model, tok, plan, mode="global")       # reuses the within-layer trajectories
    emit(kind="timing", allocate_layer_s=round(t4 - t3, 1), allocate_global_extra_s=round(time.perf_counter() - t4, 1),
         allocation=plan.meta["allocation"])
    for mode in ("uniform", "layer", "global"):
        for s_ in targets:
            sp = apply_plan(model, plan, s_, mode=mode)          # refined thresholds (the default)
            emit(kind=f"{mode}-threshold-refined", target=s_, nominal=round(plan.effective_at(s_, mode), 4),
                 perplexity=ppl(), measured=round(sp.measured_sparsity(), 4))
            sp.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compare", action="store_true", help="perplexity comparison (see compare())")
    ap.add_argument("--ids-file", default="/tmp/wina-calib-ids.pt")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--shape", default="embedded", choices=["embedded", *SHAPES])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--method", default="wina", choices=["wina", "teal"])
    ap.add_argument("--transform", action="store_true")
    ap.add_argument("--rotation", default=None, choices=PLAN_ROTATIONS,
                    help="transform inside the calibration (timed with it); pca: its basis from the calibration text")
    ap.add_argument("--no-allocate", action="store_true", help="time the calibration only")
    ap.add_argument("--mode", default="layer", choices=["layer", "global"])
    ap.add_argument("--source", default=None, help="default: self (embedded), random (random-weight shapes)")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--alloc-samples", type=int, default=None)
    ap.add_argument("--alloc-seq-len", type=int, default=None)
    ap.add_argument("--max-sparsity", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    if args.transform and args.rotation:
        ap.error("--transform is the svd rotation before the calibration; give --rotation alone")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        return compare(args)
    from wina.allocate import allocate
    from wina.calibrate import calibrate
    from wina.transform import transform

    t0 = time.perf_counter()
    if args.shape == "embedded":
        from wina.models import load
        loaded = load("smollm2-135m", device=args.device, dtype=args.dtype)
        model, tok, model_id = loaded.model, loaded.tokenizer, "smollm2-135m"
        source = args.source or "self"
        samples, seq_len = args.samples, args.seq_len
        a_samples, a_seq = args.alloc_samples, args.alloc_seq_len
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig
        from wina.models import resolve_dtype
        cfg = LlamaConfig(**SHAPES[args.shape])
        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=resolve_dtype(args.dtype, args.device)).eval()
        tok, model_id = _Tok(), f"random-{args.shape}"
        source = args.source or "random"
        samples, seq_len = args.samples or 20, args.seq_len or 2048           # the seed's settings
        a_samples, a_seq = args.alloc_samples or samples, args.alloc_seq_len or seq_len
    if args.transform:
        transform(model)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_load = time.perf_counter() - t0

    out = args.out or tempfile.mkdtemp(prefix="wina-plan-")
    Path(out).mkdir(parents=True, exist_ok=True)
    timing_file = Path(out) / "bench-timing.json"
    prev = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    acc = {"calibrate_s": prev.get("calibrate_s", 0.0), "allocate_s": prev.get("allocate_s", 0.0),
           "runs": prev.get("runs", 0) + 1, "peak_gpu_gib": prev.get("peak_gpu_gib", 0.0),
           "load_s": prev.get("load_s", 0.0) + t_load}
    last = {"t": 0.0, "layer": None}

    def save_timing(**kw) -> None:
        acc.update(kw)
        if args.device.startswith("cuda"):
            acc["peak_gpu_gib"] = max(acc["peak_gpu_gib"], round(torch.cuda.max_memory_allocated() / 2**30, 2))
        tmp = timing_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(acc))
        os.replace(tmp, timing_file)

    def on_event(ev):
        now = time.perf_counter()
        if ev.stage == "allocate" and ev.layer is not None and ev.layer != last["layer"]:
            if last["layer"] is not None:          # the previous layer's trajectory is saved
                save_timing(allocate_s=alloc0 + now - t_alloc0["t"])
            last["layer"] = ev.layer
        if now - last["t"] > 10 or ev.done == ev.total:
            last["t"] = now
            m = ev.metrics
            print(f"[{ev.stage}] {ev.done}/{ev.total} layer {ev.layer} "
                  f"{m.get('sparsity', '')!s:.6} {m.get('error', '')!s:.8} eta {ev.eta_s and round(ev.eta_s)}s",
                  file=sys.stderr, flush=True)

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    alloc0 = acc["allocate_s"]
    t_alloc0 = {"t": time.perf_counter()}
    c1 = cpu()
    t1 = time.perf_counter()
    plan = calibrate(model, tok, method=args.method, source=source, samples=samples, seq_len=seq_len,
                     out=out, model_id=model_id, on_event=on_event, rotation=args.rotation)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_cal = time.perf_counter() - t1
    save_timing(calibrate_s=acc["calibrate_s"] + t_cal)
    c2 = cpu()
    t2 = time.perf_counter()
    t_alloc0["t"] = t2
    if not args.no_allocate:
        plan = allocate(model, tok, plan, mode=args.mode, samples=a_samples, seq_len=a_seq,
                        max_sparsity=args.max_sparsity, on_event=on_event)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_alloc = time.perf_counter() - t2
    save_timing(allocate_s=alloc0 + t_alloc)
    c3 = cpu()
    res = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(args.device), "shape": args.shape, "device": args.device,
        "method": args.method, "transform": args.transform or args.rotation is not None,
        "rotation": args.rotation or ("svd" if args.transform else None),
        "mode": None if args.no_allocate else args.mode,
        "calibration": f"{plan.meta['calibration']['samples']}x{plan.meta['calibration']['seq_len']} {source}",
        "allocation_data": (None if args.no_allocate else
                            f"{plan.meta['allocation']['samples']}x{plan.meta['allocation']['seq_len']}"),
        "rows_per_layer": None if args.no_allocate else sum(len(t) for t in plan.trajectories) / plan.n_layers,
        "load_s": round(t_load, 1), "calibrate_s": round(acc["calibrate_s"], 1),
        "allocate_s": round(acc["allocate_s"], 1), "runs": acc["runs"],
        "calibrate_allocate_min": round((acc["calibrate_s"] + acc["allocate_s"]) / 60, 2),
        "calibrate_cpu_s": round(c2 - c1, 1), "allocate_cpu_s": round(c3 - c2, 1),
        "load_avg_at_end": os.getloadavg()[0],
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "plan": str(out),
    }
    if args.device.startswith("cuda"):
        res["peak_gpu_gib"] = acc["peak_gpu_gib"]
    line = json.dumps(res)
    print(line, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
