"""Kernels: the torch reference against plain math (CPU, CI), the Triton kernels against the
reference on fresh random inputs with poisoned outputs (GPU only, skipped without CUDA)."""
import math

import pytest
import torch

from wina.errors import InvalidArgument
from wina.kernels import (ACT_NONE, ACT_SILU_MUL, HAS_TRITON, GemvConfig, attention_reference, attn_decode,
                          gemv, gemv_reference, plan_gemv, prepare_input, rope_cache, rope_cache_reference)
from wina.kernels.runtime import counters

CUDA = torch.cuda.is_available() and HAS_TRITON
_skip_no_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")


def gpu(f):
    """GPU test: marked ``gpu`` (pyproject) and skipped without CUDA + Triton."""
    return pytest.mark.gpu(_skip_no_cuda(f))


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _naive(x, wt, scales, thr, bounds, bias, res, ssq, eps, act, sparse):
    """Element-by-element statement of the gemv semantics, in float64."""
    k, n = wt.shape
    x = x.double()
    if act == ACT_SILU_MUL:
        g, u = x[:, :k], x[:, k:]
        x = g / (1 + torch.exp(-g)) * u
    if ssq is not None:
        x = x / torch.sqrt(ssq.double().sum(-1, keepdim=True) / k + eps)
    y = torch.zeros(x.shape[0], n, dtype=torch.float64)
    edges = [0, *bounds, n]
    for s in range(len(edges) - 1):
        a, b = edges[s], edges[s + 1]
        xs = x
        if sparse:
            xs = x * (x.abs() * scales[s].double() > float(thr[s]))
        y[:, a:b] = xs @ wt[:, a:b].double()
    if bias is not None:
        y += bias.double()
    if res is not None:
        y += res.double()
    return y


@pytest.mark.parametrize("m", [1, 3, 12])
@pytest.mark.parametrize("act", [ACT_NONE, ACT_SILU_MUL])
@pytest.mark.parametrize("sparse", [False, True])
def test_reference_matches_naive_math(m, act, sparse):
    g = torch.Generator().manual_seed(m * 10 + act + 100 * sparse)
    k, n, bounds = 48, 96, [32, 64]
    x = torch.randn(m, 2 * k if act else k, generator=g)
    wt = torch.randn(k, n, generator=g)
    scales = torch.rand(3, k, generator=g) + 0.5
    thr = torch.tensor([0.3, 0.6, 0.9])
    bias, res = torch.randn(n, generator=g), torch.randn(m, n, generator=g)
    ssq = torch.rand(m, 2, generator=g) * k
    y, s = gemv_reference(x, wt, scales, thr, bounds, bias, res, ssq, 1e-6, act, sparse)
    ref = _naive(x, wt, scales, thr, bounds, bias, res, ssq, 1e-6, act, sparse)
    assert rel(y, ref) < 1e-5
    assert torch.allclose(s[:, 0].double(), (ref ** 2).sum(-1), rtol=1e-4)
    # the custom op (CPU dispatch) is the same function
    y2, s2 = gemv(x, wt, scales=scales, thresholds=thr, bounds=bounds, bias=bias, res=res, ssq_in=ssq,
                  act=act, sparse=sparse, want_ssq=True)
    assert torch.equal(y, y2) and torch.equal(s, s2)


def test_sparse_rows_are_per_token():
    """Batch > 1: each row uses its own mask (not the union)."""
    k, n = 16, 8
    wt = torch.randn(k, n)
    x = torch.zeros(2, k)
    x[0, 0], x[1, 1] = 1.0, 1.0
    x[0, 1], x[1, 0] = 0.1, 0.1            # below threshold in each row
    y, _ = gemv(x, wt, scales=torch.ones(1, k), thresholds=torch.tensor([0.5]), sparse=True)
    assert torch.allclose(y[0], wt[0]) and torch.allclose(y[1], wt[1])


def test_threshold_minus_inf_is_dense():
    x, wt = torch.randn(1, 32), torch.randn(32, 16)
    y, _ = gemv(x, wt, scales=torch.ones(1, 32), thresholds=torch.tensor([float("-inf")]), sparse=True)
    yd, _ = gemv(x, wt)
    assert torch.equal(y, yd)


def test_bad_arguments():
    x, wt = torch.randn(1, 32), torch.randn(32, 16)
    with pytest.raises(InvalidArgument):
        gemv(torch.randn(1, 31), wt)
    with pytest.raises(InvalidArgument):
        gemv(x, wt, sparse=True)
    with pytest.raises(InvalidArgument):
        gemv(x, wt, scales=torch.ones(2, 32), thresholds=torch.zeros(2), sparse=True)
    with pytest.raises(InvalidArgument):
        gemv(x, wt, scales=torch.ones(2, 32), thresholds=torch.zeros(2), bounds=[20], sparse=True)


def test_config_launch_options_cap_registers_for_min_ctas():
    assert GemvConfig(128, 64, 528, 4).launch_options() == {"num_warps": 4}
    # 3 programs of 128 threads in 64K registers: 170 each, rounded down to a multiple of 8
    assert GemvConfig(128, 64, 528, 4, min_ctas=3).launch_options()["maxnreg"] == 168
    assert GemvConfig(128, 64, 528, 8, min_ctas=2).launch_options()["maxnreg"] == 128
    assert GemvConfig(128, 64, 528, 4, min_ctas=1).launch_options()["maxnreg"] == 255   # the hardware's cap
    # the custom ops carry the config as ints: every field survives the round trip
    from wina.kernels.config import config_ints
    cfg = GemvConfig(128, 32, 264, 8, pipeline=1, precompact=1, min_ctas=3)
    assert GemvConfig(*config_ints(cfg)) == cfg


def test_config_precedence_exact_shape_then_role_then_default(monkeypatch):
    from wina.kernels import config as kk
    monkeypatch.setattr(kk, "_CONFIGS", dict(kk._CONFIGS))
    monkeypatch.setattr(kk, "_ROLE_CONFIGS", dict(kk._ROLE_CONFIGS))
    c1, c2 = GemvConfig(64, 32, 8, 4), GemvConfig(32, 32, 16, 4)
    with pytest.raises(InvalidArgument, match="unknown GEMV role"):
        kk.set_role_config("lm", c1, sparse=True)
    assert kk.config_for(123, 456, True) == kk.DEFAULT_SPARSE_CONFIG
    assert kk.config_for(123, 456, False, "down") == kk.DEFAULT_CONFIG
    kk.set_role_config("down", c1, sparse=True)
    assert kk.config_for(123, 456, True, "down") == c1          # the role's entry
    assert kk.config_for(123, 456, False, "down") == kk.DEFAULT_CONFIG   # only for sparse launches
    assert kk.config_for(123, 456, True, "o") == kk._ROLE_CONFIGS[("o", True)]
    kk.set_config(123, 456, c2, sparse=True)
    assert kk.config_for(123, 456, True, "down") == c2          # an exact shape wins over the role
    assert kk.config_for(123, 456, False, "down") == kk.DEFAULT_CONFIG
    x, wt = torch.randn(1, 123), torch.randn(123, 456)
    y, _ = gemv(x, wt, role="down")                              # the CPU path takes a role too
    assert torch.allclose(y, x @ wt, atol=1e-4)


def test_plan_splits_k_and_respects_segments():
    bm, bn, bk, nb, split, kps = plan_gemv(1, 4096, 12288, [4096, 8192], GemvConfig(128, 64, 1056, 4))
    assert bm == 1 and bn == 128 and bk == 64 and nb == 96 and kps % 64 == 0 and split * kps >= 4096
    assert (split - 1) * kps < 4096
    _, bn, _, _, _, _ = plan_gemv(1, 64, 96, [32, 64], GemvConfig(128, 64, 1056, 4))
    assert bn == 32
    bm, bn, bk, _, _, kps = plan_gemv(5, 4096, 4096, [], GemvConfig(128, 64, 1056, 4))
    assert bm == 8 and bm * bk * bn <= 16384 and kps % bk == 0


def test_rope_and_attention_references_match_plain_math():
    torch.manual_seed(0)
    nh, nkv, hd, s = 4, 2, 8, 32
    qkv = torch.randn(3, (nh + 2 * nkv) * hd)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    f = torch.arange(s).float()[:, None] * inv[None]
    cos, sin = torch.cat((f, f), -1).cos(), torch.cat((f, f), -1).sin()
    kc, vc = torch.zeros(1, nkv, s, hd), torch.zeros(1, nkv, s, hd)
    pos = torch.tensor([5])
    q = rope_cache(qkv, cos, sin, pos, kc, vc, nh, nkv, hd)
    # position 6, head 1 of q, by hand: rotate pairs (i, i + hd/2) by angle pos * inv[i]
    x = qkv[1, hd:2 * hd]
    ang = 6 * inv
    a, b = x[:hd // 2], x[hd // 2:]
    want = torch.cat((a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()))
    assert torch.allclose(q[1, hd:2 * hd], want, atol=1e-5)
    assert torch.equal(vc[0, 1, 7], qkv[2, (nh + nkv + 1) * hd:(nh + nkv + 2) * hd])
    out = attn_decode(q, kc, vc, pos)
    # row 0 (position 5) attends over cache positions 0..5 (0..4 still zeros) with GQA
    qh = q[0, :hd]
    sc = kc[0, 0, :6] @ qh / math.sqrt(hd)
    want0 = torch.softmax(sc, 0) @ vc[0, 0, :6]
    assert torch.allclose(out[0, :hd], want0, atol=1e-5)
    # sliding window keeps the last `window` positions
    outw = attention_reference(q[2:], kc, vc, torch.tensor([7]), window=2)
    sc = kc[0, 1, 6:8] @ q[2, 3 * hd:4 * hd] / math.sqrt(hd)
    assert torch.allclose(outw[0, 3 * hd:], torch.softmax(sc, 0) @ vc[0, 1, 6:8], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# GPU: Triton against the reference
# ------------------------------------------------------------------------------------------------
def _poison(shape, dtype):
    """Leave NaNs in the caching allocator's free block of this size: an output element that the
    kernel does not write stays NaN."""
    p = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    del p


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("case", ["plain", "qkv", "down", "dense_res"])
def test_triton_gemv_matches_reference(dtype, m, case):
    g = torch.Generator(device="cuda").manual_seed(hash((str(dtype), m, case)) % 2 ** 31)
    k, n, bounds, act, sparse, pre, res_on = 1024, 1536, [], ACT_NONE, True, False, False
    if case == "qkv":
        bounds, pre = [512, 1024], True
    elif case == "down":
        act, res_on = ACT_SILU_MUL, True
    elif case == "dense_res":
        sparse, res_on, pre = False, True, True
    for trial in range(2):                      # fresh inputs each time
        x = torch.randn(m, 2 * k if act else k, generator=g, device="cuda").to(dtype)
        wt = (torch.randn(k, n, generator=g, device="cuda") * 0.05).to(dtype)
        s = len(bounds) + 1
        scales = torch.rand(s, k, generator=g, device="cuda") + 0.5
        bias = torch.randn(n, generator=g, device="cuda").to(dtype) if case == "qkv" else None
        res = torch.randn(m, n, generator=g, device="cuda").to(dtype) if res_on else None
        ssq = (torch.rand(m, 3, generator=g, device="cuda") * k) if pre else None
        xf = prepare_input(x, k, ssq, 1e-6, act)
        thr = torch.tensor([float(torch.quantile((xf.abs() * scales[j]).flatten(), q))
                            for j, q in enumerate((0.3, 0.5, 0.7)[:s])], device="cuda")
        if trial == 1 and case == "qkv":
            thr[0] = -1.0                       # q at 0 %: every input of its K-chunks kept
        for cfg in (GemvConfig(128, 64, 1056, 4), GemvConfig(64, 32, 132, 8), GemvConfig(256, 64, 64, 4),
                    GemvConfig(128, 32, 264, 8, pipeline=1), GemvConfig(256, 64, 264, 8, pipeline=1),
                    GemvConfig(128, 64, 528, 4, precompact=1), GemvConfig(128, 32, 264, 8, pipeline=1, precompact=1),
                    GemvConfig(128, 64, 528, 4, pipeline=1, precompact=1, min_ctas=3)):
            _poison((m, n), dtype)
            y, ss = gemv(x, wt, scales=scales, thresholds=thr, bounds=bounds, bias=bias, res=res, ssq_in=ssq,
                         act=act, sparse=sparse, want_ssq=True, config=cfg)
            torch.cuda.synchronize()
            assert torch.isfinite(y).all(), "unwritten or non-finite output"
            ref, rs = gemv_reference(x, wt, scales, thr, bounds, bias, res, ssq, 1e-6, act, sparse)
            assert rel(y, ref) <= 1e-2, (cfg, rel(y, ref))
            assert rel(ss.sum(-1), rs[:, 0]) <= 1e-2
            assert int(counters(x.device).abs().sum()) == 0, "arrival counters not reset"
            y2, _ = gemv(x, wt, scales=scales, thresholds=thr, bounds=bounds, bias=bias, res=res, ssq_in=ssq,
                         act=act, sparse=sparse, want_ssq=True, config=cfg)
            assert torch.equal(y, y2), "not deterministic"


@gpu
def test_triton_precompacted_lists_are_read_as_they_are():
    """A pre-compacting sparse launch equals, bitwise, the same GEMV launch reading lists that its
    compaction launch made apart (what the kernel table's "consumer only" row times)."""
    from wina.kernels.gemv_launch import kept_lists, launch_gemv
    g = torch.Generator(device="cuda").manual_seed(5)
    k, n, bounds = 1024, 1536, [512, 1024]
    x = torch.randn(1, k, generator=g, device="cuda").to(torch.bfloat16)
    wt = (torch.randn(k, n, generator=g, device="cuda") * 0.05).to(torch.bfloat16)
    sc = torch.rand(3, k, generator=g, device="cuda") + 0.5
    ssq = torch.rand(1, 3, generator=g, device="cuda") * k
    xf = prepare_input(x, k, ssq, 1e-6, ACT_NONE)
    thr = torch.tensor([float(torch.quantile(xf.abs() * sc[j], q)) for j, q in enumerate((0.3, 0.5, 0.7))],
                       device="cuda")
    for cfg in (GemvConfig(128, 64, 528, 4, pipeline=1, precompact=1, min_ctas=3),
                GemvConfig(256, 64, 264, 4, precompact=1)):
        y, ss = launch_gemv(x, wt, sc, thr, bounds, None, None, ssq, 1e-6, ACT_NONE, True, True, cfg)
        lists = kept_lists(x, wt, sc, thr, bounds, ssq, 1e-6, ACT_NONE, cfg)
        y2, ss2 = launch_gemv(x, wt, sc, thr, bounds, None, None, ssq, 1e-6, ACT_NONE, True, True, cfg, lists=lists)
        torch.cuda.synchronize()
        assert torch.equal(y, y2) and torch.equal(ss, ss2)
        ref, _ = gemv_reference(x, wt, sc, thr, bounds, None, None, ssq, 1e-6, ACT_NONE, True)
        assert rel(y, ref) <= 1e-2, (cfg, rel(y, ref))


@gpu
def test_triton_gemv_large_batch_falls_back():
    x = torch.randn(20, 256, device="cuda", dtype=torch.bfloat16)
    wt = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    c, t = torch.ones(1, 256, device="cuda"), torch.tensor([0.5], device="cuda")
    y, _ = gemv(x, wt, scales=c, thresholds=t, sparse=True)
    ref, _ = gemv_reference(x, wt, c, t, sparse=True)
    assert rel(y, ref) <= 1e-2


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nh,nkv,hd,window", [(8, 8, 64, 0), (32, 8, 128, 0), (28, 4, 128, 100), (40, 10, 128, 0)])
def test_triton_rope_and_attention(dtype, nh, nkv, hd, window):
    torch.manual_seed(nh + hd)
    s = 1024
    for length in (1, 77, 700):
        qkv = torch.randn(1, (nh + 2 * nkv) * hd, device="cuda").to(dtype)
        f = torch.randn(s, hd, device="cuda")
        cos, sin = f.cos(), f.sin()
        kc = torch.randn(1, nkv, s, hd, device="cuda").to(dtype)
        vc = torch.randn(1, nkv, s, hd, device="cuda").to(dtype)
        kc2, vc2 = kc.clone(), vc.clone()
        pos = torch.tensor([length - 1], device="cuda")
        _poison((1, nh * hd), dtype)
        q = rope_cache(qkv, cos, sin, pos, kc, vc, nh, nkv, hd)
        qr = rope_cache_reference(qkv, cos, sin, pos, kc2, vc2, nh, nkv, hd)
        assert torch.isfinite(q).all()
        assert rel(q, qr) <= 1e-2 and rel(kc, kc2) <= 1e-2 and torch.equal(vc, vc2)
        orf = attention_reference(q.float(), kc.float(), vc.float(), pos, window)
        for n_split in (0, 5, 40):               # 0: the default split; 40: many empty splits
            _poison((1, nh * hd), dtype)
            o = attn_decode(q, kc, vc, pos, window, n_split)
            torch.cuda.synchronize()
            assert torch.isfinite(o).all()
            assert rel(o, orf) <= 1e-2, (n_split, rel(o, orf))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nh,nkv,hd", [(32, 32, 128), (28, 4, 128), (8, 2, 64)])
def test_triton_qkv_gemv_with_fused_rope(dtype, nh, nkv, hd):
    """gemv_rope (RoPE + cache write in the GEMV's finishing programs) against the reference GEMV
    followed by the reference RoPE, dense and sparse, for configs with and without split-K."""
    from wina.kernels import gemv_rope
    from wina.kernels.config import rope_fuses
    g = torch.Generator(device="cuda").manual_seed(nh * 1000 + hd)
    k, s = 1024, 256
    n = (nh + 2 * nkv) * hd
    bounds = [nh * hd, (nh + nkv) * hd]
    f = torch.randn(s, hd, device="cuda")
    cos, sin = f.cos(), f.sin()
    for cfg in (GemvConfig(128, 64, 528, 4), GemvConfig(256, 32, 528, 4),
                GemvConfig(128, 64, 528, 4, pipeline=1, precompact=1),
                GemvConfig(256, 64, 66, 4), GemvConfig(64, 32, 264, 4)):    # the last: hd 128 does not fuse
        for sparse in (False, True):
            x = torch.randn(1, k, generator=g, device="cuda").to(dtype)
            wt = (torch.randn(k, n, generator=g, device="cuda") * 0.05).to(dtype)
            sc = torch.rand(3, k, generator=g, device="cuda") + 0.5
            bias = torch.randn(n, generator=g, device="cuda").to(dtype)
            ssq = torch.rand(1, 3, generator=g, device="cuda") * k
            xf = prepare_input(x, k, ssq, 1e-6, 0)
            thr = torch.tensor([float(torch.quantile((xf.abs() * sc[j]).flatten(), q))
                                for j, q in enumerate((0.3, 0.5, 0.7))], device="cuda")
            kc = torch.randn(1, nkv, s, hd, generator=g, device="cuda").to(dtype)
            vc = torch.randn(1, nkv, s, hd, generator=g, device="cuda").to(dtype)
            kc2, vc2 = kc.clone(), vc.clone()
            pos = torch.tensor([100], device="cuda")
            _poison((1, nh * hd), dtype)
            q = gemv_rope(x, wt, cos, sin, pos, kc, vc, nh, nkv, hd, scales=sc, thresholds=thr, bounds=bounds,
                          bias=bias, ssq_in=ssq, sparse=sparse, config=cfg)
            torch.cuda.synchronize()
            y, _ = gemv_reference(x, wt, sc, thr, bounds, bias, None, ssq, 1e-6, 0, sparse)
            qr = rope_cache_reference(y, cos, sin, pos, kc2, vc2, nh, nkv, hd)
            assert rope_fuses(1, k, n, bounds, cfg, sparse, hd) == (cfg.block_n % hd == 0)
            assert torch.isfinite(q).all(), "unwritten q"
            assert rel(q, qr) <= 1e-2 and rel(kc, kc2) <= 1e-2 and rel(vc, vc2) <= 1e-2, (cfg, sparse)


def test_triton_kernel_in_the_interpreter():
    """The Triton GEMV's every single-row path on the CPU through Triton's interpreter (fp32)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (the CPU CI has no Triton; GPU runs test the kernels for real)")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tests" / "triton_interpret_check.py")], cwd=root,
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_gate_rows_reference_rule():
    """The whole-tensor gate (allocation trials): the score |x|·c rounded to x's dtype against each
    copy's threshold, dead columns off, the dense prefix kept."""
    from wina.kernels.masking import gate_rows, gate_rows_reference
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * 3, 5, 8, generator=g)                 # 2 copies of 3 sequences of 5 positions
    c = torch.rand(8, generator=g) + 0.5
    live = torch.tensor([True] * 6 + [False] * 2)
    thr = torch.tensor([0.5, 1.0])
    out = gate_rows(x, thr, c, live, 2)
    assert torch.equal(out, gate_rows_reference(x, thr, c, live, 2))
    for r in range(6):
        for t in range(5):
            for i in range(8):
                keep = t < 2 or (abs(float(x[r, t, i])) * float(c[i]) > float(thr[r // 3]) and i < 6)
                assert float(out[r, t, i]) == (float(x[r, t, i]) if keep else 0.0)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_gate_rows_matches_reference_bit_for_bit(dtype):
    from wina.kernels.masking import gate_rows, gate_rows_reference
    g = torch.Generator(device="cuda").manual_seed(1)
    for n, b, L, K, start, has_scale, has_live in [(1, 20, 64, 4096, 1, True, False), (3, 2, 33, 1000, 0, True, True),
                                                   (2, 1, 7, 11008, 3, False, False), (1, 4, 16, 576, 0, False, True)]:
        x = torch.randn(n * b, L, K, device="cuda", generator=g).to(dtype)
        scale = (torch.rand(K, device="cuda", generator=g) * 3).to(dtype) if has_scale else None
        live = (torch.rand(K, device="cuda", generator=g) > 0.3) if has_live else None
        thr = torch.rand(n, device="cuda", generator=g) * 1.5
        thr[0] = -1.0 if n > 1 else thr[0]
        a = gate_rows(x, thr, scale, live, start)
        want = gate_rows_reference(x, thr, scale, live, start)
        assert torch.equal(a != 0, want != 0) and torch.equal(a, want), (n, b, L, K, start)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_prefill_passes_match_reference(dtype):
    """The prefill's gated input (one pass for every segment, counts from a row on) and its output
    pass against the torch rule, on 7B-like widths; the multi-row RoPE + cache write likewise."""
    from wina.kernels.prefill import (prefill_input, prefill_input_reference, prefill_output,
                                      prefill_output_reference)
    g = torch.Generator(device="cuda").manual_seed(3)
    for t, k, act, pre, n_seg in [(512, 4096, 0, True, 3), (37, 11008, 1, False, 1), (120, 4096, 0, False, 1),
                                  (9, 576, 0, True, 2), (64, 1536, 1, False, 0)]:
        x = torch.randn(t, 2 * k if act else k, device="cuda", generator=g).to(dtype)
        ssq = (torch.rand(t, 1, device="cuda", generator=g) * k + 1.0) if pre else None
        sc = torch.rand(n_seg, k, device="cuda", generator=g) + 0.5 if n_seg else None
        thr = torch.rand(n_seg, device="cuda", generator=g) * 0.6 + 0.1 if n_seg else None
        kept = torch.zeros(3, dtype=torch.long, device="cuda")
        kept_ref = kept.clone()
        out = prefill_input(x, k, ssq, 1e-6, act, dtype, sc, thr, 5, kept if n_seg else None, 7)
        ref = prefill_input_reference(x, k, ssq, 1e-6, act, dtype, sc, thr, 5, kept_ref if n_seg else None, 7)
        assert out.shape == ref.shape == (max(n_seg, 1), t, k)
        # decisions may differ only where SiLU or 1/RMS round differently right at a threshold
        assert float((out != 0).ne(ref != 0).float().mean()) < 1e-4
        assert rel(out, ref) <= 1e-2
        assert (kept - kept_ref).abs().max() <= max(2, int(1e-4 * t * k))
    for t, n, has_bias in [(512, 4096, False), (33, 12288, True), (7, 576, True)]:
        y = torch.randn(t, n, device="cuda", generator=g).to(dtype)
        bias = torch.randn(n, device="cuda", generator=g).to(dtype) if has_bias else None
        res = torch.randn(t, n, device="cuda", generator=g).to(dtype)
        for r in (None, res):
            o, s = prefill_output(y, bias, r, True, dtype)
            ro, rs = prefill_output_reference(y, bias, r, True, dtype)
            assert torch.equal(o, ro) and rel(s, rs) <= 1e-5
            o2, s2 = prefill_output(y, bias, r, False, dtype)
            assert torch.equal(o2, ro) and s2 is None
    from wina.kernels.attention import rope_cache_triton
    nh, nkv, hd, s_max = 32, 8, 128, 1024
    for p0, t in [(0, 300), (517, 64)]:
        qkv = torch.randn(t, (nh + 2 * nkv) * hd, device="cuda", generator=g).to(dtype)
        f = torch.randn(s_max, hd, device="cuda", generator=g)
        cos, sin = f.cos(), f.sin()
        kc = torch.randn(1, nkv, s_max, hd, device="cuda", generator=g).to(dtype)
        vc = torch.randn(1, nkv, s_max, hd, device="cuda", generator=g).to(dtype)
        kc2, vc2 = kc.clone(), vc.clone()
        pos = torch.tensor([p0], device="cuda")
        q = rope_cache_triton(qkv, cos, sin, pos, kc, vc, nh, nkv, hd)
        qr = rope_cache_reference(qkv, cos, sin, pos, kc2, vc2, nh, nkv, hd)
        assert rel(q, qr) <= 1e-2 and rel(kc, kc2) <= 1e-2 and torch.equal(vc, vc2)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_prefill_attention_matches_reference(dtype):
    """A prompt's causal attention with the start read on the device (the captured prefill's): 7B
    heads with and without grouped queries, a first turn and a later one, a sliding window."""
    from wina.kernels.attention import attn_prefill_triton
    g = torch.Generator(device="cuda").manual_seed(4)
    for nh, nkv, hd, t, p0, window in [(32, 32, 128, 300, 0, 0), (32, 8, 128, 640, 1420, 0),
                                       (28, 4, 128, 17, 3, 0), (32, 8, 128, 200, 900, 256), (9, 3, 64, 77, 40, 0)]:
        s_max = 4096
        q = torch.randn(t, nh * hd, device="cuda", generator=g).to(dtype)
        kc = torch.randn(1, nkv, s_max, hd, device="cuda", generator=g).to(dtype)
        vc = torch.randn(1, nkv, s_max, hd, device="cuda", generator=g).to(dtype)
        pos = torch.tensor([p0], device="cuda")
        out = attn_prefill_triton(q, kc, vc, pos, window)
        ref = attention_reference(q.float(), kc.float(), vc.float(), pos, window)
        assert rel(out, ref) <= 1e-2, (nh, nkv, t, p0, window, rel(out, ref))
