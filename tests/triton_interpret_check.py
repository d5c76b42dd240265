"""The Triton GEMV kernels run by Triton's interpreter on the CPU (TRITON_INTERPRET=1, fp32), against
the torch reference, for every code path of the single-row kernels: dense, per-program compaction,
two-tile pipeline, pre-compaction (incl. reusing the kept lists), with segments, fused RMSNorm and
SiLU·up, fused RoPE + cache write; the multi-row kernels (3 rows, dense and sparse); the
flash-decoding attention kernel and the RoPE + cache-write kernel (one row and a prefill's rows); the
prefill's gated-input and output passes (rows bounded on the host or on the device) and its causal
attention. Run as a script (the variable must be set before Triton is imported);
``tests/test_kernels.py::test_triton_kernel_in_the_interpreter`` does that where Triton is installed.
Prints the worst relative error and exits non-zero above 1e-5."""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton.runtime.interpreter as _interp  # noqa: E402

# Triton 3.6's interpreter turns a loop bound held in a 1-element array into an int with int(array),
# which numpy >= 2.4 refuses for arrays of one dimension; .item() works for every size-1 array.
_orig_patch = _interp._patch_lang_tensor


def _patch_lang_tensor(tensor, scope):
    _orig_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))


_interp._patch_lang_tensor = _patch_lang_tensor

from wina.kernels.attention import attn_decode_triton, attn_prefill_triton, rope_cache_triton  # noqa: E402
from wina.kernels.config import GemvConfig  # noqa: E402
from wina.kernels.gemv_launch import kept_lists, launch_gemv  # noqa: E402
from wina.kernels.reference import (attention_reference, gemv_reference, prepare_input,  # noqa: E402
                                   rope_cache_reference)
from wina.kernels.prefill import (prefill_input_reference, prefill_input_triton,  # noqa: E402
                                  prefill_output_reference, prefill_output_triton)
from wina.kernels.runtime import counters  # noqa: E402


def main() -> int:
    g = torch.Generator().manual_seed(0)
    k, n = 512, 192
    worst = 0.0
    configs = (GemvConfig(64, 32, 8, 4), GemvConfig(64, 32, 8, 4, precompact=1),
               GemvConfig(32, 32, 40, 4, pipeline=1, precompact=1), GemvConfig(64, 32, 4, 4, pipeline=1),
               GemvConfig(32, 32, 40, 4, pipeline=1, precompact=1, min_ctas=3),
               GemvConfig(256, 16, 40, 4))      # dense, one segment: 32 splits, summed 16 rows at a time
    for act in (0, 1):
        for pre in (False, True):
            for bounds in ([], [64, 128]):
                for sparse in (False, True):
                    for ci, cfg in enumerate(configs):
                        for m in ((1, 3) if ci == 0 else (1,)):        # 3 rows: the multi-row kernels
                            x = torch.randn(m, 2 * k if act else k, generator=g)
                            wt = torch.randn(k, n, generator=g) * 0.05
                            s = len(bounds) + 1
                            sc = torch.rand(s, k, generator=g) + 0.5
                            ssq = torch.rand(m, 3, generator=g) * k if pre else None
                            res = torch.randn(m, n, generator=g)
                            xf = prepare_input(x, k, ssq, 1e-6, act)
                            # segment 0 keeps everything (a matrix at 0 % in a fused launch), then 60 / 80 %
                            thr = torch.tensor([-1.0] + [float(torch.quantile((xf.abs() * sc[j]).flatten(), q))
                                                         for j, q in enumerate((0.6, 0.8)[:s - 1], 1)])
                            if s == 1 and cfg.block_n == 64:     # the one-segment cases: 30 % and (above) 0 %
                                thr = torch.tensor([float(torch.quantile((xf.abs() * sc[0]).flatten(), 0.3))])
                            y, ss = launch_gemv(x, wt, sc, thr, bounds, None, res, ssq, 1e-6, act, True, sparse, cfg)
                            ref, rs = gemv_reference(x, wt, sc, thr, bounds, None, res, ssq, 1e-6, act, sparse)
                            worst = max(worst, float((y - ref).norm() / ref.norm()),
                                        float((ss.sum(-1) - rs[:, 0]).abs().max() / rs.abs().max()))
                            if sparse and m == 1 and cfg.precompact:    # the kept lists, made apart, read as they are
                                lists = kept_lists(x, wt, sc, thr, bounds, ssq, 1e-6, act, cfg)
                                y2, _ = launch_gemv(x, wt, sc, thr, bounds, None, res, ssq, 1e-6, act, True, True,
                                                    cfg, lists=lists)
                                if not torch.equal(y, y2):
                                    print("the GEMV launch on lists made apart differs")
                                    return 1
                            if int(counters(x.device).abs().sum()):
                                print("arrival counters not reset", cfg, m)
                                return 1
    # flash-decoding attention: MHA and GQA, one to several sequence splits (some of them empty),
    # with and without a sliding window
    for n_heads, n_kv, hd in ((2, 2, 16), (8, 2, 32)):
        for pos_v in (0, 37, 150):
            for n_split in (1, 3, 7):
                for window in (0, 40):
                    s_max = 160
                    q = torch.randn(1, n_heads * hd, generator=g)
                    kc = torch.randn(1, n_kv, s_max, hd, generator=g)
                    vc = torch.randn(1, n_kv, s_max, hd, generator=g)
                    pos = torch.tensor([pos_v])
                    out = attn_decode_triton(q, kc, vc, pos, window, n_split)
                    ref = attention_reference(q, kc, vc, pos, window)
                    worst = max(worst, float((out - ref).norm() / ref.norm()))
    # q/k/v GEMV with RoPE + cache write fused into the finishing programs: MHA and GQA, full and
    # partial rotary, blocks of one and of two heads, dense and sparse (in-kernel and pre-compaction)
    for n_heads, n_kv, hd, rot in ((2, 2, 32, 32), (4, 2, 32, 16)):
        n = (n_heads + 2 * n_kv) * hd
        bounds = [n_heads * hd, (n_heads + n_kv) * hd]
        for cfg in (GemvConfig(32, 32, 16, 4), GemvConfig(64, 32, 8, 4),
                    GemvConfig(32, 32, 40, 4, pipeline=1, precompact=1)):
            for sparse in (False, True):
                s_max, p = 24, 13
                x = torch.randn(1, k, generator=g)
                wt = torch.randn(k, n, generator=g) * 0.05
                sc = torch.rand(3, k, generator=g) + 0.5
                thr = torch.tensor([0.3, 0.5, 0.7])
                bias = torch.randn(n, generator=g)
                ssq = torch.rand(1, 2, generator=g) * k
                cos = torch.randn(s_max, rot, generator=g)
                sin = torch.randn(s_max, rot, generator=g)
                pos = torch.tensor([p])
                caches = [torch.randn(1, n_kv, s_max, hd, generator=g) for _ in range(2)]
                caches += [c.clone() for c in caches]
                q = launch_gemv(x, wt, sc, thr, bounds, bias, None, ssq, 1e-6, 0, False, sparse, cfg,
                                rope=(cos, sin, pos, caches[0], caches[1], n_heads, n_kv, hd))[0]
                y, _ = gemv_reference(x, wt, sc, thr, bounds, bias, None, ssq, 1e-6, 0, sparse)
                ref_q = rope_cache_reference(y, cos, sin, pos, caches[2], caches[3], n_heads, n_kv, hd)
                worst = max(worst, float((q - ref_q).norm() / ref_q.norm()),
                            float((caches[0] - caches[2]).norm() / caches[2].norm()),
                            float((caches[1] - caches[3]).norm() / caches[3].norm()))
        # RoPE + cache write on its own: one row (rope_cache) and a prefill's 5 rows from position 7
        for rows in (1, 5):
            qkv = torch.randn(rows, n, generator=g)
            cos, sin = torch.randn(24, rot, generator=g), torch.randn(24, rot, generator=g)
            caches = [torch.randn(1, n_kv, 24, hd, generator=g) for _ in range(2)]
            caches += [c.clone() for c in caches]
            pos = torch.tensor([7])
            q = rope_cache_triton(qkv, cos, sin, pos, caches[0], caches[1], n_heads, n_kv, hd)
            ref_q = rope_cache_reference(qkv, cos, sin, pos, caches[2], caches[3], n_heads, n_kv, hd)
            worst = max(worst, float((q - ref_q).norm() / ref_q.norm()),
                        float((caches[0] - caches[2]).norm() / caches[2].norm()),
                        float((caches[1] - caches[3]).norm() / caches[3].norm()))
    worst = max(worst, check_prefill_passes(g))
    worst = max(worst, check_prefill_attention(g))
    print(f"worst relative error {worst:.2e}")
    return 0 if worst < 1e-5 else 1


def check_prefill_passes(g) -> float:
    """The prefill's gated input (every flag: SiLU·up, RMSNorm, 1-3 segments, dense prefix, counts
    from a row on) and its output pass (bias, residual, sums of squares) against their references;
    the kept decisions and counts must agree exactly (scores away from the thresholds)."""
    worst = 0.0
    t, k = 11, 600
    for act in (0, 1):
        for pre in (False, True):
            for n_seg in (0, 1, 3):
                x = torch.randn(t, 2 * k if act else k, generator=g)
                ssq = torch.rand(t, 1, generator=g) * k + 1.0 if pre else None
                sc = torch.rand(n_seg, k, generator=g) + 0.5 if n_seg else None
                thr = torch.rand(n_seg, generator=g) * 0.5 + 0.2 if n_seg else None
                kept, kept_ref = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
                args = (x, k, ssq, 1e-6, act, torch.float32, sc, thr, 3, kept if n_seg else None, 4)
                out = prefill_input_triton(*args)
                ref = prefill_input_reference(*args[:9], kept_ref if n_seg else None, 4)
                assert out.shape == ref.shape, (out.shape, ref.shape)
                assert torch.equal(out != 0, ref != 0) and torch.equal(kept, kept_ref), (act, pre, n_seg)
                worst = max(worst, float((out - ref).norm() / ref.norm()))
                if n_seg:
                    # the captured graph's form: prefix and counted rows (4 .. 9 of 11) read on the device
                    rows = torch.tensor([3, 4, 9])
                    kept, kept_ref = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
                    out = prefill_input_triton(*args[:9], kept, 0, rows)
                    ref = prefill_input_reference(*args[:9], kept_ref, 0, rows)
                    assert torch.equal(out != 0, ref != 0) and torch.equal(kept, kept_ref), (act, pre, n_seg)
                    assert 0 < int(kept.sum()) < int(kept_ref.new_tensor(5 * k * n_seg)), int(kept.sum())
                    worst = max(worst, float((out - ref).norm() / ref.norm()))
    y = torch.randn(t, 300, generator=g)
    for bias in (None, torch.randn(300, generator=g)):
        for res in (None, torch.randn(t, 300, generator=g)):
            for want in (False, True):
                o, s = prefill_output_triton(y, bias, res, want, torch.float32)
                ro, rs = prefill_output_reference(y, bias, res, want, torch.float32)
                worst = max(worst, float((o - ro).norm() / ro.norm()))
                if want:
                    worst = max(worst, float((s - rs).norm() / rs.norm()))
    return worst


def check_prefill_attention(g) -> float:
    """A prompt's causal attention from a start read on the device: grouped-query heads, a head size
    that is not a power of two, a sliding window, a start past the first key block."""
    worst = 0.0
    for hd, nh, nkv, t, start, window in ((64, 4, 2, 11, 0, 0), (64, 4, 2, 70, 5, 0), (96, 3, 1, 9, 130, 0),
                                           (64, 2, 2, 80, 40, 16), (32, 4, 4, 3, 200, 0)):
        kc = torch.randn(1, nkv, 300, hd, generator=g)
        vc = torch.randn(1, nkv, 300, hd, generator=g)
        q = torch.randn(t, nh * hd, generator=g)
        pos = torch.tensor([start])
        o = attn_prefill_triton(q, kc, vc, pos, window)
        r = attention_reference(q, kc, vc, pos, window)
        worst = max(worst, float((o - r).norm() / r.norm()))
    return worst


if __name__ == "__main__":
    sys.exit(main())
