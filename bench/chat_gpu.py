"""One device call for the chat path (issue 19): GPU tests, `wina bench --chat`, the gate-count cost,
and `wina chat --prompt` on a 7B-shaped random model folder.

    python3 bench/chat_gpu.py --tokenizer .devtok [--skip-tests] [--skip-folder] [--turns 5]

The tokenizer folder (the embedded SmolLM2's, `tokenizer.save_pretrained(DIR)`) is carried: the
device has no network. Steps, each logged with its time; outputs under $OUT (chat.json, probe.json,
pytest.log, *.log):
1. `wina bench --chat llama-2-7b --tokenizer DIR` (random weights of the Llama-2-7B shape, the vocabulary
   grown to the tokenizer's 49152): 5 turns, dense and sparse side by side, vs the engine alone;
2. GPU tests of the chat sessions (``--tests`` to add the engine's);
3. in process: decode tokens/s at a 2k context with the gate counting off / every 8th / every step,
   and the 512-token prefill dense vs sparse;
4. a model folder of that shape (save_pretrained), then `wina calibrate` (self, 4 x 64) and
   `wina chat --prompt` dense and sparse (`--plan --gating threshold --sparsity 0.5`).
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.getcwd())
OUT = os.environ.get("OUT", "/tmp/out")
os.makedirs(OUT, exist_ok=True)
ap = argparse.ArgumentParser()
ap.add_argument("--tokenizer", required=True)
ap.add_argument("--skip-tests", action="store_true")
ap.add_argument("--tests", default="tests/test_chat.py")
ap.add_argument("--skip-folder", action="store_true")
ap.add_argument("--skip-probe", action="store_true")
ap.add_argument("--turns", type=int, default=5)
ap.add_argument("--new-tokens", type=int, default=200)
ap.add_argument("--shape", default="llama-2-7b")
ap.add_argument("--layers", type=int, default=None)
args = ap.parse_args()
T0 = time.time()
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def stamp(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def run(name, cmd, tail=40):
    stamp(f"{name}: {' '.join(cmd)}")
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    with open(f"{OUT}/{name}.log", "w") as f:
        f.write(r.stdout + "\n--- stderr ---\n" + r.stderr)
    lines = (r.stdout + r.stderr).strip().splitlines()
    print("\n".join(lines[-tail:]), flush=True)
    stamp(f"{name}: rc {r.returncode}, {time.time() - t:.1f} s")
    return r


stamp(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip())
import torch  # noqa: E402
import transformers  # noqa: E402
import triton  # noqa: E402
stamp(f"python {sys.version.split()[0]} torch {torch.__version__} triton {triton.__version__} "
      f"transformers {transformers.__version__}")
for mod in ("typer", "rich", "tokenizers", "xdist"):
    try:
        __import__(mod)
    except ImportError:
        stamp(f"missing: {mod}")

layers = ["--layers", str(args.layers)] if args.layers else []
run("bench_chat", [sys.executable, "-m", "wina.cli", "--debug", "bench", "--chat", args.shape, "--tokenizer", args.tokenizer,
                   "--turns", str(args.turns), "--new-tokens", str(args.new_tokens), "--json", f"{OUT}/chat.json",
                   *layers], tail=45)

try:
    from wina.chat_bench import chat_bench_markdown  # noqa: E402
    with open(f"{OUT}/chat.json") as f:
        _res = json.load(f)
    print(chat_bench_markdown(_res), flush=True)
    print(json.dumps({k: _res.get(k) for k in ("memory", "prefill_512", "targets", "warm_up_s", "gating")},
                     indent=1), flush=True)
except Exception as e:  # noqa: BLE001
    stamp(f"no chat.json table: {e}")

if not args.skip_tests:
    run("pytest", [sys.executable, "-m", "pytest", "-q", "-rP", "-p", "no:cacheprovider", "-m", "gpu",
                   *args.tests.split()], tail=12)

if not args.skip_probe:
    stamp("probe: gate-count cost and 512-token prefill")
    from wina.bench import engine_thresholds, random_model, shape_config, weight_bytes  # noqa: E402
    from wina.engine import Engine  # noqa: E402
    from wina.sparsify import sparsify  # noqa: E402
    cfg = shape_config(args.shape, args.layers)
    model = random_model(cfg, "cuda", torch.bfloat16, 0)
    sp = sparsify(model, "wina", 0.5, gating="topk")
    scales = sp.scales
    sp.remove()
    eng = Engine.from_model(model, scales=scales, max_seq_len=4096, use_sparsifier=False)
    del model
    torch.cuda.empty_cache()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, cfg.vocab_size, (2048,), generator=g).tolist()
    eng.set_sparsity(engine_thresholds(eng, ctx[:512], 0.5))
    probe = {}
    for every in (0, 64, 32, 8, 1):
        eng.generate(ctx[:64], 8, stop=(), count_every=every)            # capture
        r = eng.generate(ctx, 128, stop=(), count_every=every)
        probe[f"sparse_decode_count_every_{every}"] = r.decode_tokens_per_s
        probe[f"sparse_prefill_2048_s_count_{every}"] = r.prefill_s
    eng.generate(ctx[:64], 8, stop=(), sparse=False)
    probe["dense_decode"] = eng.generate(ctx, 128, stop=(), sparse=False).decode_tokens_per_s

    def tp(ids, sparse, reps=5):
        ts = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            eng.prefill(ids, sparse, last_only=True)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[reps // 2]
    for n in (128, 512, 2048):
        d, s = tp(ctx[:n], False), tp(ctx[:n], True)
        probe[f"prefill_{n}"] = {"dense_ms": d * 1e3, "sparse_ms": s * 1e3, "ratio": s / d}
    probe["weight_gib"] = weight_bytes(eng) / 2**30
    print(json.dumps(probe, indent=1), flush=True)
    with open(f"{OUT}/probe.json", "w") as f:
        json.dump(probe, f, indent=1)
    del eng
    torch.cuda.empty_cache()

if not args.skip_folder:
    stamp("model folder")
    sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
    from tui_chat import model_folder  # noqa: E402
    folder = model_folder(args.shape, args.tokenizer, "/tmp/m7b", args.layers)
    torch.cuda.empty_cache()
    stamp("folder written")
    plan = "/tmp/plan7b"
    run("calibrate", [sys.executable, "-m", "wina.cli", "calibrate", folder, "--method", "wina", "--data", "self",
                      "--samples", "4", "--seq-len", "64", "--out", plan], tail=5)
    prompt = "Hello! Tell me a long story about a river, a city and a bridge."
    run("chat_dense", [sys.executable, "-m", "wina.cli", "chat", folder, "--prompt", prompt,
                       "--max-new-tokens", "200"], tail=4)
    run("chat_sparse", [sys.executable, "-m", "wina.cli", "chat", folder, "--plan", plan, "--sparsity", "0.5",
                        "--gating", "threshold", "--prompt", prompt, "--max-new-tokens", "200"], tail=4)
stamp("done")
