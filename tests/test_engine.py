"""The decode engine against the transformers forward: exact (fp32) on the CPU in CI, bf16 on a GPU
(skipped without CUDA)."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

from wina.bench import engine_sparsity, engine_thresholds
from wina.engine import Engine
from wina.generate import engine_available, engine_for, engine_stream_generate
from wina.errors import Cancelled, InvalidArgument
from wina.kernels import HAS_TRITON
from wina.sparsify import sparsify
from wina.transform import transform

CUDA = torch.cuda.is_available() and HAS_TRITON
_skip_no_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")


def gpu(f):
    """GPU test: marked ``gpu`` (pyproject) and skipped without CUDA + Triton."""
    return pytest.mark.gpu(_skip_no_cuda(f))

COMMON = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def tiny(kind, dtype=torch.float32, device="cpu", seed=0, **over):
    kw = {**COMMON, **over}
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig,
           "phi3": Phi3Config}[kind](**kw, **({"pad_token_id": 0, "eos_token_id": 1} if kind == "phi3" else {}))
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():          # non-trivial gains and biases so that folding is exercised
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.normal_(0, 0.1)
    return m.to(device=device, dtype=dtype)


def ids_for(n, vocab=128, seed=1):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "phi3"])
def test_dense_logits_equal_transformers(kind):
    m = tiny(kind)
    ids = ids_for(20)
    ref = m(ids).logits[0]
    eng = Engine.from_model(m, max_seq_len=48)
    out = eng.forward_logits(ids[0], prefill_len=11)     # prefill 11, then 9 single decode steps
    assert (out - ref).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["llama", "phi3"])
@pytest.mark.parametrize("transformed", [False, True])
def test_sparse_logits_equal_sparsified_transformers(kind, transformed):
    m = tiny(kind)
    if transformed:
        transform(m)
    ids = ids_for(20, seed=2)
    thr = engine_thresholds(Engine.from_model(m, max_seq_len=48), ids[0].tolist(), 0.5)
    sp = sparsify(m, "wina", 0.5, gating="threshold", thresholds=thr)
    ref = m(ids).logits[0]
    with sp.paused():
        dense_ref = m(ids).logits[0]
    eng = Engine.from_model(m, max_seq_len=48)          # picks up the sparsifier's gating
    assert eng.sparse
    out = eng.forward_logits(ids[0], prefill_len=12)
    assert (out - ref).abs().max() < 1e-4
    assert (ref - dense_ref).abs().max() > 1e-2          # the gating did something
    dense = eng.forward_logits(ids[0], prefill_len=12, sparse=False)
    assert (dense - dense_ref).abs().max() < 1e-4


def test_transformed_dense_equals_original():
    m = tiny("qwen2")
    ids = ids_for(16, seed=3)
    ref = m(ids).logits[0]
    transform(m)
    eng = Engine.from_model(m, max_seq_len=32)
    assert eng.layers[0].s_attn is not None and eng.layers[-1].s_mlp is None
    assert (eng.forward_logits(ids[0], prefill_len=8) - ref).abs().max() < 1e-3


def test_explicit_thresholds_and_set_sparsity():
    m = tiny("llama")
    ids = ids_for(12, seed=4)[0].tolist()
    eng = Engine.from_model(m, max_seq_len=32)
    assert not eng.sparse
    thr = engine_thresholds(eng, ids, 0.4)
    assert len(thr) == 2 * 7
    eng.set_sparsity(thr)
    assert eng.sparse
    s = engine_sparsity(eng, ids)
    assert 0.2 < s < 0.6
    eng.set_sparsity(None)
    assert not eng.sparse
    with pytest.raises(InvalidArgument):
        Engine.from_model(m, thresholds={(9, "q_proj"): 0.1})


def test_bench_weight_bytes_counts_every_decode_weight_once():
    """wina.bench.weight_bytes (the memory floor's bytes): every layer's four launches, the shortcuts
    of a transformed model and the head, not the embedding."""
    from wina.bench import weight_bytes
    m = tiny("qwen2")
    cfg = m.config
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    per_layer = d * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd + d * d + 2 * d * f + f * d
    want = (cfg.num_hidden_layers * per_layer + d * cfg.vocab_size) * 4
    assert weight_bytes(Engine.from_model(m, max_seq_len=16)) == want
    transform(m)
    eng = Engine.from_model(m, max_seq_len=16)
    shortcuts = sum(s.numel() for L in eng.layers for s in (L.s_attn, L.s_mlp) if s is not None)
    assert shortcuts > 0 and weight_bytes(eng) == want + 4 * shortcuts


def test_zero_thresholds_run_the_dense_kernel():
    """A threshold <= 0 keeps every input but exact zeros and dead columns: that launch computes the
    dense product, so it runs the dense kernel (bitwise the dense forward); a positive threshold in
    any segment of a fused launch makes the launch sparse again."""
    m = tiny("llama")
    ids = ids_for(12, seed=9)[0]
    eng = Engine.from_model(m, max_seq_len=32)
    dense = eng.forward_logits(ids, prefill_len=6, sparse=False)
    thr = engine_thresholds(eng, ids.tolist(), 0.5)
    zero = {k: 0.0 for k in thr}
    eng.set_sparsity(zero)
    assert eng.sparse and not any(g.gating for _, g in eng.groups())
    assert torch.equal(eng.forward_logits(ids, prefill_len=6), dense)
    mixed = {**zero, (1, "up_proj"): thr[(1, "up_proj")], (0, "q_proj"): -1.0}
    eng.set_sparsity(mixed)
    gating = {name: g.gating for name, g in eng.groups()}
    assert gating[(1, "mlp_in")] and sum(gating.values()) == 1
    ref_sp = sparsify(m, "wina", 0.5, gating="threshold", thresholds=mixed)
    ref = m(ids[None]).logits[0]
    ref_sp.remove()
    assert (eng.forward_logits(ids, prefill_len=6) - ref).abs().max() < 1e-4
    assert not torch.equal(eng.forward_logits(ids, prefill_len=6), dense)


def test_generate_greedy_streams_and_stops():
    m = tiny("llama")
    ids = ids_for(6, seed=5)
    eng = Engine.from_model(m, max_seq_len=40)
    seen = []
    r = eng.generate(ids, 10, on_token=seen.append, stop=())
    assert r.stopped == "length" and len(r.tokens) == 10 and seen == r.tokens
    # greedy equals transformers' greedy continuation
    hf = m.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert hf[0, 6:].tolist() == r.tokens
    # a stop token ends generation and is not emitted
    r2 = eng.generate(ids, 10, stop=[r.tokens[3]])
    assert r2.stopped == "stop" and r2.tokens == r.tokens[:r.tokens.index(r.tokens[3])]
    # cancellation from the callback

    def cancel(tok):
        raise Cancelled("stop")
    r3 = eng.generate(ids, 10, on_token=cancel, stop=())
    assert r3.stopped == "cancelled" and len(r3.tokens) == 1
    with pytest.raises(InvalidArgument):
        eng.generate(ids, 100)


def test_generate_sampled_is_seeded():
    m = tiny("qwen2")
    eng = Engine.from_model(m, max_seq_len=40)
    a = eng.generate([1, 2, 3], 12, temperature=0.8, top_p=0.9, seed=7, stop=()).tokens
    b = eng.generate([1, 2, 3], 12, temperature=0.8, top_p=0.9, seed=7, stop=()).tokens
    assert a == b and len(a) == 12


def test_chat_glue_on_cpu():
    m = tiny("llama")
    assert not engine_available(m)                   # CPU model: chat uses the portable path

    class Tok:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(i) for i in ids)
    eng = Engine.from_model(m, max_seq_len=32)
    parts = []
    g, res = engine_stream_generate(eng, Tok(), torch.tensor([[1, 2, 3]]), max_new_tokens=5, on_text=parts.append)
    assert res.new_tokens == 5
    assert g.tokens == 5 and "".join(parts) == g.text
    assert g.seconds > 0 and g.tokens_per_s > 0           # prefill + decode, set-up excluded
    from wina.generate import warm_up
    assert warm_up(m) is False                           # nothing to compile on the portable path
    # engine_for builds once per model and follows the attached sparsifier
    e1 = engine_for(m, max_seq_len=32)
    assert engine_for(m, max_seq_len=32) is e1 and not e1.sparse
    thr = engine_thresholds(e1, [1, 2, 3, 4, 5, 6], 0.5)
    sp = sparsify(m, "teal", 0.5, gating="threshold", thresholds=thr)
    assert engine_for(m, max_seq_len=32) is e1 and e1.sparse
    sp.remove()
    assert not engine_for(m, max_seq_len=32).sparse


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
def _gpu_model(kind, layers=4):
    over = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024)
    return tiny(kind, **over).to("cuda", torch.bfloat16)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@gpu
@pytest.mark.parametrize("kind", ["llama", "qwen2", "phi3"])
def test_gpu_engine_logits_match_transformers(kind):
    """bf16 engine (prefill + graph-replayed decode steps) against the fp32 transformers forward,
    held to the error of transformers' own bf16 forward; the fp32 engine on the GPU is exact."""
    m32 = _gpu_model(kind).float()
    m16 = _gpu_model(kind)
    ids = ids_for(40, vocab=4096, seed=11).cuda()
    with torch.no_grad():
        ref = m32(ids).logits[0].float()
        hf16 = m16(ids).logits[0].float()
    e_hf = _rel(hf16, ref)
    out = Engine.from_model(m16, max_seq_len=64).forward_logits(ids[0], prefill_len=30)
    e_pre, e_dec = _rel(out[:30], ref[:30]), _rel(out[30:], ref[30:])
    print(f"{kind}: transformers bf16 {e_hf:.4f}, engine prefill {e_pre:.4f}, engine decode {e_dec:.4f}")
    assert e_pre <= max(3e-2, 2 * e_hf) and e_dec <= max(3e-2, 2 * e_hf), (e_hf, e_pre, e_dec)
    out32 = Engine.from_model(m32, max_seq_len=64).forward_logits(ids[0], prefill_len=30)
    assert _rel(out32, ref) < 1e-3


@gpu
def test_gpu_sparse_engine_matches_sparsified_model():
    m32 = _gpu_model("llama").float()
    m16 = _gpu_model("llama")
    ids = ids_for(40, vocab=4096, seed=12).cuda()
    thr = engine_thresholds(Engine.from_model(m32, max_seq_len=64), ids[0].tolist(), 0.5)
    sp32 = sparsify(m32, "wina", 0.5, gating="threshold", thresholds=thr)
    sp16 = sparsify(m16, "wina", 0.5, gating="threshold", thresholds=thr)
    with torch.no_grad():
        ref = m32(ids).logits[0].float()
        hf16 = m16(ids).logits[0].float()
    out = Engine.from_model(m16, max_seq_len=64).forward_logits(ids[0], prefill_len=30)
    e_hf, e_eng = _rel(hf16, ref), _rel(out, ref)
    print(f"sparse 50%: transformers bf16 {e_hf:.4f}, engine {e_eng:.4f}")
    assert e_eng <= max(5e-2, 2 * e_hf), (e_hf, e_eng)
    sp32.remove()
    sp16.remove()


@gpu
def test_gpu_kernel_table_reports_programs_and_registers():
    """wina bench's kernel table on a small engine: every GEMV row timed, with the launch's
    programs and the compiled kernel's registers (the guard against run 11's register cliff)."""
    from wina.bench import kernel_table
    eng = Engine.from_model(_gpu_model("llama", layers=2), max_seq_len=64)
    rows = kernel_table(eng, [0.5], 4e12, n_layers=2)
    gemv_rows = [r for r in rows if r["variant"] in ("dense", "sparse")]
    assert {r["kernel"] for r in gemv_rows} == {"qkv", "o", "gate_up", "down", "lm_head"}
    for r in gemv_rows:
        assert "error" not in r and r["time_us"] > 0, r
        assert r["programs"] > 0 and 0 < r["regs"] <= 255 and r["spills"] >= 0, r


@gpu
def test_gpu_graph_generate_equals_eager_steps():
    m = _gpu_model("llama", layers=2)
    eng = Engine.from_model(m, max_seq_len=64)
    prompt = ids_for(10, vocab=4096, seed=13)[0].tolist()
    r = eng.generate(prompt, 20, stop=())
    eng.use_graphs = False
    r2 = eng.generate(prompt, 20, stop=())
    assert r.tokens == r2.tokens
    assert engine_available(m)


@gpu
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gpu_captured_prefill_equals_the_eager_one(kind):
    """A prompt replayed as a captured graph at its bucket length (padded rows, start, dense prefix
    and counted rows read on the device, attention by the prefill kernel) is as close to the fp32
    engine as the eager bf16 prefill is, for a first turn and a later one, dense and sparse, with
    the same gate counts (up to decisions that bf16 rounding flips)."""
    from wina.engine.decoder import PREFILL_BUCKETS
    m = _gpu_model(kind)
    thr = engine_thresholds(Engine.from_model(m, max_seq_len=64), ids_for(40, vocab=4096, seed=3)[0].tolist(), 0.5)
    seq = ids_for(120, vocab=4096, seed=14)[0].tolist()
    runs = {}
    for name, model, graphed in (("fp32", _gpu_model(kind).float(), False), ("graph", m, True), ("eager", m, False)):
        eng = Engine.from_model(model, max_seq_len=256, thresholds=thr)
        eng.graph_prefill = graphed
        eng.reset_counts()
        out = []
        for sparse in (False, True):
            out.append(eng.prefill(seq[:37], sparse, start=0, count=True, last_only=True).float())
            out.append(eng.prefill(seq[37:120], sparse, start=37, count=True, last_only=True).float())
        runs[name] = (out, eng._kept.clone().float(), eng._count_rows)
        if graphed:
            assert eng._prefill_bucket(37, 0) == 64 and eng._prefill_bucket(800, 0) == 0
            assert eng._prefill_bucket(40, 250) == 0               # the padding would pass the cache
            assert len([k for k in eng._graphs if k[0] == "prefill"]) == 2 * 2    # (64, 128) x (dense, sparse)
    errs = [(_rel(g, r), _rel(e, r)) for g, e, r in zip(runs["graph"][0], runs["eager"][0], runs["fp32"][0])]
    print(kind, "graph / eager relative error vs fp32:", [f"{g:.4f}/{e:.4f}" for g, e in errs])
    assert all(g <= 1.5 * e + 1e-2 for g, e in errs), errs
    assert runs["graph"][2] == runs["eager"][2] == 120 - 1           # the first position is dense
    got, want = runs["graph"][1], runs["eager"][1]
    assert want.sum() > 0 and float((got - want).abs().sum() / want.sum()) < 1e-2
    assert PREFILL_BUCKETS[-1] >= 640             # a chat turn of ~620 tokens is captured
    # captures in the middle of a long conversation leave its cache as it was (they write the last
    # slots of the cache, and put back those the conversation holds)
    outs = []
    for graphed in (False, True):
        eng = Engine.from_model(m, max_seq_len=256, thresholds=thr)
        eng.graph_prefill = False
        eng.prefill(seq[:100] + seq[:100] + seq[:40], False, start=0)
        eng.graph_prefill = graphed
        if graphed:
            assert eng.capture_prefill(False) == 6                # 16 .. 256 fit the cache
        outs.append(eng.prefill(seq[40:50], False, start=240, last_only=True).float())
    assert _rel(outs[1], outs[0]) < 3e-2                     # a lost cache slot would be far off


def test_engine_gate_counts_equal_the_sparsifier_counts():
    """The engine counts its gates on the device (prompt rows and counted decode steps); handed to
    the sparsifier they read as the portable path's own counts of the same positions."""
    from wina.generate import give_counts_to_sparsifier, stream_generate
    m = tiny("llama")

    class Tok:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(i) for i in ids)
    thr = engine_thresholds(Engine.from_model(m, max_seq_len=32), [1, 2, 3, 4, 5, 6], 0.5)
    sp = sparsify(m, "teal", 0.5, gating="threshold", thresholds=thr, dense_prefix=0.0)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    sp.reset_counters()
    g = stream_generate(m, Tok(), ids, max_new_tokens=6)
    portable = sp.measured()
    eng = Engine.from_model(m, max_seq_len=32)
    eng.reset_counts()
    r = eng.generate(ids, 6, stop=(), count_every=1)
    assert r.tokens == g.ids
    c = eng.gate_counts()
    assert c["rows"] == 5 + 5                           # 5 prompt rows, 5 decode steps
    sp.reset_counters()
    give_counts_to_sparsifier(m, eng)
    counted = sp.measured()
    assert all(abs(counted[k] - portable[k]) < 0.02 for k in portable)
    assert 0.2 < sp.measured_sparsity() < 0.8
    assert abs(c["sparsity"] - engine_sparsity(eng, ids[0].tolist() + r.tokens[:-1])) < 0.02
    # every 4th decode step: rows 5 + steps 0 and 4
    eng.reset_counts()
    eng.generate(ids, 6, stop=(), count_every=4)
    assert eng.gate_counts()["rows"] == 5 + 2


def test_engine_caches_and_continuation():
    """A second KV cache leaves the first intact; a continuation prefill (start > 0) equals the
    prefill of the whole sequence."""
    m = tiny("llama")
    eng = Engine.from_model(m, max_seq_len=48)
    seq = ids_for(20, seed=5)[0].tolist()
    full = eng.prefill(seq, start=0)
    other = eng.new_cache()
    first = eng.cache
    eng.prefill(seq[:12], start=0)
    eng.bind(other)
    eng.prefill(ids_for(30, seed=6)[0].tolist(), start=0)    # scribbles on the other cache only
    eng.bind(first)
    cont = eng.prefill(seq[12:], start=12)
    assert (cont - full[12:]).abs().max() < 1e-4
    last = eng.prefill(seq[12:], start=12, last_only=True)   # what generation asks for
    assert last.shape[0] == 1 and (last[0] - full[-1]).abs().max() < 1e-4
    r1 = eng.generate(seq[12:], 5, start=12, stop=())
    r2 = eng.generate(seq, 5, stop=())
    assert r1.tokens == r2.tokens and r1.prompt_tokens == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_linear_equals_the_kernel_reference(dtype):
    """The engine's prefill launches compute exactly gemv_reference in the model's dtype (dense,
    sparse, with a dense prefix, with bias/residual/RMSNorm/SiLU·up)."""
    from wina.kernels import ACT_SILU_MUL, gemv_reference
    m = tiny("qwen2").to(dtype)                        # q/k/v biases
    e = Engine.from_model(m, max_seq_len=64)
    e.set_sparsity(engine_thresholds(e, list(range(3, 40)), 0.5))
    torch.manual_seed(3)
    for g in (e.layers[0].attn_in, e.layers[1].mlp_in, e.layers[0].down, e.layers[1].o):
        k = g.wt.shape[0]
        act = ACT_SILU_MUL if g.name == "down" else 0
        x = torch.randn(9, 2 * k if act else k).to(dtype)
        ssq = torch.rand(9, 2) * 50 if g.name in ("attn_in", "mlp_in") else None
        res = torch.randn(9, g.wt.shape[1]).to(dtype)
        for sp, d in ((False, 0), (True, 0), (True, 2)):
            a = e._prefill_lin(x, g, sp, d, ssq, res, act, want_ssq=True)
            b = gemv_reference(x, g.wt, g.scales, g.thresholds, g.bounds, g.bias, res, ssq, e.eps, act, sp,
                               compute_dtype=dtype, dense_rows=d)
            assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1])
