"""Run 17b of docs/gpu-notes.md (prepared): the CUDA gather inside the decode engine, without
touching the library. Routes every single-row sparse GEMV that has no fused RoPE / compaction
(o, gate/up and down in a decode step) to Triton's compaction launch + one `gather_fin_*` launch
(bench/cuda_gather/gather_gemv.cu: gather, split reduction, bias, residual, per-block ssq), by
replacing `wina.kernels.kernels._gemv_triton` for the process; q/k/v (RoPE fused), prefill and
dense launches keep the Triton kernels. Then:
  1. correctness: a small llama on the GPU at 50 % (thresholds from the engine's calibration),
     logits of prefill + decode with and without the CUDA path against the fp32 reference;
  2. speed: `run_bench` on the llama-2-7b shape with and without it (decode tokens/s).
From the repo root on the GPU:
    python3 bench/cuda_gather/engine_probe.py [--variant 256_8_8_0_2] [--kps 0] [--models llama-2-7b]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe import loader  # noqa: E402  (bench/cuda_gather/probe.py)

import wina.kernels.kernels as K  # noqa: E402
from wina.bench import run_bench  # noqa: E402


def _auto_kps(k: int, n_blocks: int, programs: int = 264) -> int:
    """The largest power-of-two K-chunk (128..1024) that still gives ``programs`` blocks."""
    kps = 1024
    while kps > 128 and n_blocks * -(-k // kps) < programs:
        kps //= 2
    return kps


def cuda_gather_patch(drv, variant: str, kps_max: int):
    """A drop-in for K._gemv_triton that sends eligible launches to the CUDA kernel."""
    orig = K._gemv_triton
    bn, warps = int(variant.split("_")[0]), int(variant.split("_")[1])
    fname = f"gather_fin_{variant}"
    calls = {"cuda": 0, "triton": 0}

    def patched(x, wt, scales, thresholds, bounds, bias, res, ssq_in, eps, act, want_ssq, sparse, cfg,
                compacted=False, rope=None, next_compact=None, lists=None, info=None):
        k, n = wt.shape
        if (not sparse or x.shape[0] != 1 or rope is not None or next_compact is not None or lists is not None
                or compacted or info is not None or x.dtype != torch.bfloat16 or n % bn or len(bounds) > 2
                or any(int(b) % bn for b in bounds)):
            calls["triton"] += 1
            return orig(x, wt, scales, thresholds, bounds, bias, res, ssq_in, eps, act, want_ssq, sparse, cfg,
                        compacted, rope, next_compact, lists, info)
        calls["cuda"] += 1
        dev = x.device
        kps = min(kps_max, K._next_pow2(k)) if kps_max else _auto_kps(k, n // bn)
        split = -(-k // kps)
        n_seg = len(bounds) + 1
        scr = K._workspace(dev, n_seg * split * 2 * kps, "cg_scr")
        kept = K._workspace(dev, n_seg * split, "cg_kept", torch.int32, 4096)
        part = K._workspace(dev, split * n, "cg_part")
        cnt = K._workspace(dev, 1 << 16, "cg_cnt", torch.int32, 1 << 16)   # zeroed; the kernel resets it
        y = torch.empty(1, n, dtype=x.dtype, device=dev)
        ssq_out = torch.empty(1, n // bn if want_ssq else 0, dtype=torch.float32, device=dev)
        nb_in = ssq_in.shape[1] if ssq_in is not None else 1
        K._compact_kernel[(n_seg, split)](
            x, scales, thresholds, ssq_in if ssq_in is not None else y, scr, kept, k, nb_in, float(eps), split,
            KPS=kps, NB_P=max(2, K._next_pow2(nb_in)), ACT=int(act), PRE_NORM=ssq_in is not None, num_warps=4)
        b = [int(v) for v in bounds] + [n, n]
        drv.launch(fname, (n // bn, split), warps * 32,
                   [wt, scr, kept, part, n, split, kps, b[0], b[1], y, res if res is not None else y,
                    bias if bias is not None else y, ssq_out if want_ssq else part, cnt,
                    int(res is not None), int(bias is not None), int(want_ssq)])
        return y, ssq_out

    return orig, patched, calls


def correctness(patched, orig, calls) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from wina.engine import Engine
    from wina.sparsify import sparsify
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024)
    torch.manual_seed(0)
    m32 = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().cuda()
    with torch.no_grad():
        for name, p in m32.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    m16 = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    m16.load_state_dict(m32.state_dict())
    m16 = m16.to("cuda", torch.bfloat16)
    ids = torch.randint(0, 4096, (1, 40), generator=torch.Generator().manual_seed(12)).cuda()
    thr = Engine.from_model(m32, max_seq_len=64).calibrate(ids[0].tolist(), 0.5)
    sp32 = sparsify(m32, "wina", 0.5, gating="threshold", thresholds=thr)
    sp16 = sparsify(m16, "wina", 0.5, gating="threshold", thresholds=thr)
    with torch.no_grad():
        ref = m32(ids).logits[0].float()
        hf16 = m16(ids).logits[0].float()

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())
    K._gemv_triton = orig
    base = Engine.from_model(m16, max_seq_len=64).forward_logits(ids[0], prefill_len=30)
    K._gemv_triton = patched
    calls["cuda"] = 0
    cuda = Engine.from_model(m16, max_seq_len=64).forward_logits(ids[0], prefill_len=30)
    K._gemv_triton = orig
    print(f"correctness (4-layer llama, WINA 50 %): transformers bf16 {rel(hf16, ref):.4f}, engine Triton "
          f"{rel(base, ref):.4f}, engine CUDA gather {rel(cuda, ref):.4f} (decode positions: Triton "
          f"{rel(base[30:], ref[30:]):.4f}, CUDA {rel(cuda[30:], ref[30:]):.4f}; CUDA vs Triton "
          f"{rel(cuda[30:], base[30:]):.4f}); CUDA launches {calls['cuda']}", flush=True)
    sp32.remove()
    sp16.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="256_8_8_0_2")
    ap.add_argument("--kps", type=int, default=0, help="K-chunk of the kept lists (0: per shape, >= 264 blocks)")
    ap.add_argument("--models", default="llama-2-7b")
    ap.add_argument("--cubin", default="")
    args = ap.parse_args()
    drv = loader(args.cubin, os.environ.get("OUT") or tempfile.mkdtemp())
    orig, patched, calls = cuda_gather_patch(drv, args.variant, args.kps)
    correctness(patched, orig, calls)
    results = {}
    for label, fn in (("triton", orig), ("cuda gather", patched)):
        K._gemv_triton = fn
        for model in args.models.split(","):
            r = run_bench([model], hf_new_tokens=0, kernels=False)
            results[(label, model)] = r["models"][0]
        K._gemv_triton = orig
    print(f"\n{'path':>12} {'model':>12} {'dense':>7} " + " ".join(f"{s:>14}" for s in ("25%", "40%", "50%", "65%")))
    for (label, model), m in results.items():
        if "error" in m:
            print(f"{label:>12} {model:>12} error: {m['error']}")
            continue
        cells = [f"{v['decode_tokens_per_s']:6.0f} ({v['speedup_vs_dense']:.2f}x)" for _, v in sorted(m["sparse"].items())]
        print(f"{label:>12} {model:>12} {m['dense']['decode_tokens_per_s']:7.0f} " + " ".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main()
