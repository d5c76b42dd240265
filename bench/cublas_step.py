"""Run 24 of docs/gpu-notes.md: would a dense decode step built on cuBLAS GEMVs beat the engine's
fused Triton step? (The kernel table has cuBLAS 5-12 % faster than the engine's dense GEMVs on every
llama-2-7b role, but a cuBLAS GEMV cannot take the fused RMSNorm, RoPE, SiLU·up and split-K tail with
it, so those come back as launches of their own.)

On the llama-2-7b shape (random weights, the engine's own weights, caches and RoPE tables; the RMSNorm
gains are folded into the engine's weights, so a norm is x·rstd), one decode step at position 256,
each form timed in a CUDA graph:
  engine  the engine's dense step (Triton: 5 launches per layer, RoPE in the q/k/v launch)
  cublas  rms → q/k/v (cuBLAS) → RoPE + cache → attention → o (cuBLAS addmm, residual as beta) →
          rms → gate/up (cuBLAS) → SiLU·up → down (cuBLAS addmm): 9 launches per layer; rms → head
  bound   the same without the rms and SiLU·up launches (wrong numbers, right GEMV inputs' shapes):
          what any cuBLAS step could reach if those three small ops were free
The cublas form's logits are checked against the engine's.
From the repo root on the GPU:  python3 bench/cublas_step.py   (on the CPU, a check only: --cpu)
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")
from wina.bench import _time_graph, copy_bandwidth, random_model, shape_config  # noqa: E402
from wina.engine import Engine  # noqa: E402
from wina.kernels import attn_decode, rope_cache  # noqa: E402


@triton.jit
def _rms_kernel(x_ptr, y_ptr, eps, D: tl.constexpr):
    """y = x · rsqrt(mean(x²) + eps), one row of D (a power of two or padded) values."""
    offs = tl.arange(0, D)
    x = tl.load(x_ptr + offs).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 0) / D + eps)
    tl.store(y_ptr + offs, (x * r).to(y_ptr.dtype.element_ty))


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, F, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < F
    g = tl.load(gu_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + F + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (g / (1.0 + tl.exp(-g)) * u).to(y_ptr.dtype.element_ty), mask=ok)


class CublasStep:
    """The decode step on cuBLAS GEMVs over ``eng``'s weights and caches (llama: no biases, no
    shortcuts, no sliding window), with preallocated outputs so that it captures in a graph."""

    def __init__(self, eng: Engine):
        self.eng = eng
        L0 = eng.layers[0]
        dev, dt = eng.device, eng.dtype
        self.d = eng.d
        self.f = L0.down.wt.shape[0]
        assert self.d & (self.d - 1) == 0, "the rms kernel takes a power-of-two width"
        assert all(L.s_attn is None and L.s_mlp is None and L.attn_in.bias is None for L in eng.layers)
        self.h0 = torch.randn(1, self.d, device=dev).to(dt)
        self.h = [torch.empty(1, self.d, dtype=dt, device=dev) for _ in range(2)]
        self.hn = torch.empty(1, self.d, dtype=dt, device=dev)
        self.qkv = torch.empty(1, L0.attn_in.wt.shape[1], dtype=dt, device=dev)
        self.gu = torch.empty(1, L0.mlp_in.wt.shape[1], dtype=dt, device=dev)
        self.act = torch.empty(1, self.f, dtype=dt, device=dev)
        self.logits = torch.empty(1, eng.head.shape[1], dtype=dt, device=dev)

    def rms(self, x):
        if not x.is_cuda:          # the CPU check (--cpu)
            xf = x.float()
            return self.hn.copy_(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eng.eps))
        _rms_kernel[(1,)](x, self.hn, self.eng.eps, D=self.d, num_warps=8)
        return self.hn

    def silu_mul(self):
        if not self.gu.is_cuda:
            g, u = self.gu[:, :self.f].float(), self.gu[:, self.f:].float()
            return self.act.copy_(torch.nn.functional.silu(g) * u)
        _silu_mul_kernel[(triton.cdiv(self.f, 1024),)](self.gu, self.act, self.f, BLOCK=1024, num_warps=4)
        return self.act

    def __call__(self, small_ops: bool = True) -> torch.Tensor:
        e = self.eng
        h = self.h0
        for L in e.layers:
            x = self.rms(h) if small_ops else h
            torch.mm(x, L.attn_in.wt, out=self.qkv)
            q = rope_cache(self.qkv, e.cos, e.sin, e._pos, L.k_cache, L.v_cache, e.n_heads, e.n_kv, e.head_dim)
            att = attn_decode(q, L.k_cache, L.v_cache, e._pos, L.window)
            h2 = torch.addmm(h, att, L.o.wt, out=self.h[0])
            x = self.rms(h2) if small_ops else h2
            torch.mm(x, L.mlp_in.wt, out=self.gu)
            a = self.silu_mul() if small_ops else self.gu[:, :self.f]
            h = torch.addmm(h2, a, L.down.wt, out=self.h[1])
        x = self.rms(h) if small_ops else h
        return torch.mm(x, e.head, out=self.logits)


@torch.no_grad()
def main() -> None:
    cpu = "--cpu" in sys.argv          # a local check of the cuBLAS step's arithmetic (2 layers, fp32)
    dev = "cpu" if cpu else "cuda"
    bw = copy_bandwidth(dev, 64 << 20 if cpu else 2 << 30)
    cfg = shape_config("llama-2-7b", 2 if cpu else None)
    model = random_model(cfg, dev, torch.float32 if cpu else torch.bfloat16, 0)
    eng = Engine.from_model(model, max_seq_len=400, use_sparsifier=False, use_graphs=not cpu)
    del model
    if not cpu:
        torch.cuda.empty_cache()
    wb = eng.weight_bytes()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (16 if cpu else 256,), generator=g).tolist()
    eng.prefill(prompt, sparse=False)
    eng._pos.fill_(len(prompt))
    eng._tok.fill_(prompt[-1])
    cb = CublasStep(eng)
    # check: the cuBLAS step from the engine's embedding of the token against the engine's logits
    cb.h0.copy_(eng.embed.index_select(0, eng._tok.view(-1)))
    ref = eng._forward(eng._tok.view(-1), eng._pos, False).float()
    got = cb().float()
    err = float((got - ref).norm() / ref.norm())
    top = bool(int(got.argmax()) == int(ref.argmax()))
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; weights {wb / 1e9:.2f} GB; floor {bw / wb:.0f} tok/s; "
          f"cuBLAS step vs engine logits: rel err {err:.2e}, same argmax {top}", flush=True)
    if cpu:
        return
    rows = [("engine (Triton, fused)", _time_graph(lambda: eng._forward(eng._tok.view(-1), eng._pos, False), reps=5)),
            ("cublas (9 launches per layer)", _time_graph(lambda: cb(True), reps=5)),
            ("bound (cuBLAS GEMVs + RoPE + attention only)", _time_graph(lambda: cb(False), reps=5))]
    print(f"\nllama-2-7b shape, one dense decode step at position 256 (CUDA graph), {torch.cuda.get_device_name()}")
    print(f"{'ms':>7} {'tok/s':>7} {'of floor':>8}  form")
    for label, t in rows:
        print(f"{t * 1e3:7.3f} {1 / t:7.1f} {wb / t / bw:8.3f}  {label}")


if __name__ == "__main__":
    main()
