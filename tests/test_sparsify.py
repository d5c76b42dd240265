"""Exact math of the gates on tiny random models of every supported architecture."""
import math

import pytest
import torch

from conftest import tiny_model
from wina.adapters import adapter_for, iter_projections
from wina.errors import InvalidArgument, UnsupportedArchitecture
from wina.sparsify import sparsify


def _ids(n=2, length=24, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_sparsity_zero_is_dense_bit_for_bit(arch):
    model = tiny_model(arch)
    ids = _ids()
    dense = model(ids).logits
    for method in ("teal", "wina"):
        sp = sparsify(model, method, 0.0)
        assert torch.equal(model(ids).logits, dense)
        sp.remove()


@torch.no_grad()
def test_remove_and_pause_restore_dense(arch):
    model = tiny_model(arch)
    ids = _ids()
    dense = model(ids).logits
    sp = sparsify(model, "wina", 0.5)
    sparse = model(ids).logits
    assert not torch.allclose(sparse, dense)
    with sp.paused():
        assert torch.equal(model(ids).logits, dense)
    assert torch.equal(model(ids).logits, sparse)
    sp.remove()
    assert torch.equal(model(ids).logits, dense)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.65])
@torch.no_grad()
def test_topk_keeps_exactly_k_per_token(arch, sparsity):
    model = tiny_model(arch)
    sp = sparsify(model, "teal", sparsity, dense_prefix=0.0)
    counts = {}

    def counter(key):
        def hook(module, args):
            counts.setdefault(key, []).append((args[0] != 0).sum(-1).flatten())
        return hook

    handles = [lin.register_forward_pre_hook(counter((i, p))) for i, p, lin in iter_projections(model)]
    model(_ids())
    for h in handles:
        h.remove()
    assert len(counts) == len(sp.gates)
    for key, kept in counts.items():
        d = sp.gates[key].in_features
        k = math.floor(d * (1 - sparsity))
        assert torch.all(torch.cat(kept) == k), key


@pytest.mark.parametrize("weighted", ["default", "all"])
@torch.no_grad()
def test_wina_mask_is_topk_of_abs_x_times_column_norm(arch, weighted):
    model = tiny_model(arch)
    adapter = adapter_for(model)
    sp = sparsify(model, "wina", 0.5, weighted=weighted, dense_prefix=0.0)
    seen = {}
    handles = []
    for i, p, lin in iter_projections(model):
        def before(module, args, key=(i, p)):
            seen[key] = [args[0].clone()]
        def after(module, args, key=(i, p)):
            seen[key].append(args[0].clone())
        handles.append(lin.register_forward_pre_hook(before, prepend=True))
        handles.append(lin.register_forward_pre_hook(after))
    model(_ids())
    for h in handles:
        h.remove()
    for (i, p, lin) in iter_projections(model):
        x, y = seen[(i, p)]
        weighted_here = weighted == "all" or p in adapter.weighted_default
        c = lin.weight.norm(dim=0) if weighted_here else torch.ones(lin.in_features)
        score = x.abs() * c
        k = lin.in_features // 2
        idx = score.topk(k, dim=-1).indices
        expected = torch.zeros_like(x).scatter(-1, idx, 1.0) * x
        assert torch.equal(y, expected), (i, p)


@torch.no_grad()
def test_dense_prefix_and_single_token():
    model = tiny_model("llama")
    sp = sparsify(model, "teal", 0.5)                 # default: first 1 % of positions dense
    ids = _ids(1, 200)
    model(ids)
    # 200 tokens: int(0.99 * 200) = 198 sparsified, the first 2 dense
    g = sp.gates[(0, "q_proj")]
    assert int(g.dropped) == 198 * 32
    sp.reset_counters()
    model(ids[:, :1])                                 # one decode token is always sparsified
    assert g.measured() == pytest.approx(0.5)


@pytest.mark.parametrize("gating", ["topk", "threshold"])
@torch.no_grad()
def test_dense_prefix_rows_pass_unchanged_and_the_rest_is_the_reference_gate(gating):
    from wina.sparsify import gate_reference
    model = tiny_model("llama")
    sp = sparsify(model, "wina", 0.5, gating=gating, dense_prefix=0.05)
    if gating == "threshold":
        sp.set_thresholds({k: 0.3 for k in sp.gates})
    key = (1, "down_proj")
    lin, gate = sp._modules[key], sp.gates[key]
    seen = {}
    lin.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].clone()), prepend=True)
    lin.register_forward_pre_hook(lambda m, a: seen.__setitem__("out", a[0].clone()))
    model(_ids(2, 100))
    x, y = seen["in"], seen["out"]
    start = 100 - int(0.95 * 100)                     # 5 dense positions
    assert torch.equal(y[:, :start], x[:, :start])
    tail, dropped = gate_reference(x[:, start:], gate, gating)
    assert torch.equal(y[:, start:], tail)
    assert int(gate.dropped) == int(dropped) > 0
    assert int(gate.seen) == x.numel()


@torch.no_grad()
def test_per_matrix_sparsity_and_report():
    model = tiny_model("llama")
    spec = {(0, "q_proj"): 0.5, (1, "down_proj"): 0.25}
    sp = sparsify(model, "wina", spec, dense_prefix=0.0)
    model(_ids())
    measured = sp.measured()
    assert measured[(0, "q_proj")] == pytest.approx(0.5)
    assert measured[(1, "down_proj")] == pytest.approx(0.25)
    assert measured[(0, "k_proj")] == 0.0
    rep = sp.report()
    assert rep.measured == pytest.approx(rep.nominal)
    assert rep.flops_measured.sparse < rep.flops_measured.dense


def test_bad_inputs():
    model = tiny_model("llama")
    for s in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(InvalidArgument, match="sparsity"):
            sparsify(model, "teal", s)
    with pytest.raises(InvalidArgument, match="method"):
        sparsify(model, "magic", 0.5)
    with pytest.raises(InvalidArgument, match="no projection"):
        sparsify(model, "teal", {(7, "q_proj"): 0.5})
    from transformers import GPT2Config
    from wina.models import from_config
    gpt2 = from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitecture, match="supported: llama, mistral, qwen2, phi3"):
        sparsify(gpt2, "teal", 0.5)


@torch.no_grad()
def test_threshold_gating_needs_thresholds():
    model = tiny_model("llama")
    sp = sparsify(model, "teal", 0.5, gating="threshold")
    with pytest.raises(InvalidArgument, match="threshold"):
        model(_ids())
    sp.set_thresholds({k: 0.5 for k in sp.gates})
    model(_ids())
    assert 0 < sp.measured_sparsity() < 1
