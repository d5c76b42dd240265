"""End-to-end check of `wina chat` through the CLI on a small random Llama with a real tokenizer.

    python3 bench/chat_check.py --tokenizer DIR [--device cuda] [--dtype bfloat16] [--hidden 256]

Builds a random-weight Llama (the tokenizer's vocabulary, tied embeddings) in a temp folder, then
runs, as a user would: `wina calibrate` (self-sampled text), `wina allocate`, `wina chat --prompt`
dense and sparse (threshold gating from the plan: on CUDA in bf16/fp16 that is the decode engine's
path). Prints each command's stderr status lines (backend, tokens/s, measured sparsity) and a
one-line JSON summary. Meant for the device machine, where the embedded model's package is absent
(the tokenizer folder is carried: `tokenizer.save_pretrained(DIR)` of the embedded model).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(tok_dir: Path, out: Path, hidden: int, layers: int, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def wina(*args: str, env=None) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "wina.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    return r.returncode, r.stdout, r.stderr, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wina-chat-"))
    model_dir, plan = work / "model", work / "plan"
    build_model(Path(args.tokenizer), model_dir, args.hidden, args.layers, 0)
    env = {**os.environ, "WINA_CACHE": str(work / "cache")}
    dev = ["--device", args.device, "--dtype", args.dtype]
    summary: dict = {"device": args.device, "dtype": args.dtype, "hidden": args.hidden, "layers": args.layers}
    steps = [
        ("calibrate", ["calibrate", str(model_dir), "--method", "wina", "--data", "self", "--samples", "4",
                       "--seq-len", "64", "--out", str(plan), *dev]),
        ("allocate", ["allocate", str(plan), "--step", "0.1", *dev]),
        ("chat-dense", ["chat", str(model_dir), "--prompt", "Hello! Who are you?", "--max-new-tokens",
                        str(args.tokens), *dev]),
        ("chat-sparse", ["chat", str(model_dir), "--plan", str(plan), "--sparsity", "0.5", "--gating",
                         "threshold", "--prompt", "Hello! Who are you?", "--max-new-tokens", str(args.tokens), *dev]),
    ]
    ok = True
    for name, cmd in steps:
        rc, out, err, secs = wina(*cmd, env=env)
        lines = [l for l in err.splitlines() if l.strip()]
        print(f"== {name}: rc {rc}, {secs:.1f} s", flush=True)
        for l in lines[-4:]:
            print("   ", l[:300], flush=True)
        if name.startswith("chat"):
            print("    reply:", repr(out.strip()[:120]), flush=True)
            m = re.search(r"\[(\d+) tokens, ([\d.]+) tokens/s, stop: (\w+)(?:, measured sparsity ([\d.]+)%)?", err)
            b = re.search(r"— (engine|transformers)\.", err)
            summary[name] = {"rc": rc, "backend": b.group(1) if b else None,
                             "tokens": int(m.group(1)) if m else None,
                             "tokens_per_s": float(m.group(2)) if m else None,
                             "measured_sparsity": float(m.group(4)) / 100 if m and m.group(4) else None}
        else:
            summary[name] = {"rc": rc, "seconds": round(secs, 1)}
        ok &= rc == 0
    print(json.dumps(summary), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
