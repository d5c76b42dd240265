"""Benchmark: calibration + greedy allocation, wall time and peak memory.

    python3 bench/calibrate_bench.py                                  # embedded model, its defaults, CPU
    python3 bench/calibrate_bench.py --shape llama-2-7b --device cuda # Llama-2-7B shape, random weights,
                                                                      # the seed's 20×2048, greedy to 0.9
Options: --method wina|teal, --transform, --mode layer|global, --threads N, --out DIR (plan dir),
--samples/--seq-len (calibration), --alloc-samples/--alloc-seq-len, --json FILE (append a result line).
Prints one JSON line: date, machine, settings, seconds per stage, peak RSS (GiB), peak GPU memory (GiB).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="embedded", choices=["embedded", *SHAPES])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--method", default="wina", choices=["wina", "teal"])
    ap.add_argument("--transform", action="store_true")
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

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
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
    last = {"t": 0.0}

    def on_event(ev):
        now = time.perf_counter()
        if now - last["t"] > 10 or ev.done == ev.total:
            last["t"] = now
            m = ev.metrics
            print(f"[{ev.stage}] {ev.done}/{ev.total} layer {ev.layer} "
                  f"{m.get('sparsity', '')!s:.6} {m.get('error', '')!s:.8} eta {ev.eta_s and round(ev.eta_s)}s",
                  file=sys.stderr, flush=True)

    t1 = time.perf_counter()
    plan = calibrate(model, tok, method=args.method, source=source, samples=samples, seq_len=seq_len,
                     out=out, model_id=model_id, on_event=on_event)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_cal = time.perf_counter() - t1
    t2 = time.perf_counter()
    plan = allocate(model, tok, plan, mode=args.mode, samples=a_samples, seq_len=a_seq,
                    max_sparsity=args.max_sparsity, on_event=on_event)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_alloc = time.perf_counter() - t2
    res = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(args.device), "shape": args.shape, "device": args.device,
        "method": args.method, "transform": args.transform, "mode": args.mode,
        "calibration": f"{plan.meta['calibration']['samples']}x{plan.meta['calibration']['seq_len']} {source}",
        "allocation_data": f"{plan.meta['allocation']['samples']}x{plan.meta['allocation']['seq_len']}",
        "rows_per_layer": sum(len(t) for t in plan.trajectories) / plan.n_layers,
        "load_s": round(t_load, 1), "calibrate_s": round(t_cal, 1), "allocate_s": round(t_alloc, 1),
        "calibrate_allocate_min": round((t_cal + t_alloc) / 60, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "plan": str(out),
    }
    if args.device.startswith("cuda"):
        res["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    line = json.dumps(res)
    print(line, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
