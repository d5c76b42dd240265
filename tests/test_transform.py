"""Transform invariance: float64 on tiny models of every architecture, float32 on the real model."""
import pytest
import torch
from torch import nn

from conftest import tiny_model
from wina.errors import TransformError
from wina.sparsify import sparsify
from wina.transform import shortcuts, transform


@pytest.fixture
def exact_rmsnorm(monkeypatch):
    """transformers' RMSNorm rounds through float32 by design; compute it in the input dtype so
    that a float64 model is float64 end to end and invariance can be checked to 1e-9."""
    import transformers.models.llama.modeling_llama as ml
    import transformers.models.mistral.modeling_mistral as mm
    import transformers.models.phi3.modeling_phi3 as mp
    import transformers.models.qwen2.modeling_qwen2 as mq

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    for cls in (ml.LlamaRMSNorm, mm.MistralRMSNorm, mp.Phi3RMSNorm, mq.Qwen2RMSNorm):
        monkeypatch.setattr(cls, "forward", forward)


@torch.no_grad()
def test_invariance_float64(arch, exact_rmsnorm):
    model = tiny_model(arch, dtype=torch.float64, tie_word_embeddings=(arch == "llama"))
    ids = torch.randint(3, 128, (2, 33), generator=torch.Generator().manual_seed(1))
    before = model(ids).logits
    info = transform(model)
    after = model(ids).logits
    delta = (before - after).abs().max().item()
    print(f"{arch}: max |dlogit| after transform = {delta:.2e}")
    assert delta <= 1e-9
    assert info.n_shortcuts == 2 * model.config.num_hidden_layers - 1
    # norm gains folded, embeddings untied
    assert torch.all(model.model.norm.weight == 1)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


@torch.no_grad()
def test_key_matrices_get_orthogonal_columns(arch):
    from wina.adapters import adapter_for, projection
    model = tiny_model(arch, dtype=torch.float64)
    transform(model)
    a = adapter_for(model)
    for key in (a.attn_key, a.mlp_key):
        w = projection(model, 0, key).weight
        gram = w.T @ w
        off = gram - torch.diag(torch.diag(gram))
        assert off.abs().max() < 1e-10 * gram.abs().max()


@torch.no_grad()
def test_gqa_dead_columns_are_dropped_for_free():
    model = tiny_model("llama", dtype=torch.float64)   # 4 heads, 2 kv heads: k_proj is 32×64
    transform(model)
    sp = sparsify(model, "wina", 0.25, dense_prefix=0.0)
    g = sp.gates[(0, "k_proj")]
    assert g.live is not None and int(g.live.sum()) == 32
    model(torch.randint(3, 128, (1, 16)))
    # top-k keeps 48 of 64 scores, but only 32 columns are live: at least half is dropped
    assert g.measured() >= 0.5


@torch.no_grad()
def test_transform_then_sparsify_and_shortcuts(arch):
    model = tiny_model(arch)
    transform(model)
    sc = shortcuts(model)
    n = model.config.num_hidden_layers
    assert sc[(n - 1, "mlp")] is None and sc[(0, "attn")] is not None
    s = sc[(0, "attn")]
    assert torch.allclose(s @ s.T, torch.eye(s.shape[0]), atol=1e-5)
    sparsify(model, "wina", 0.5)
    out = model(torch.randint(3, 128, (1, 10))).logits
    assert torch.isfinite(out).all()


def test_transform_errors():
    model = tiny_model("llama")
    model.model.layers[0].input_layernorm = nn.LayerNorm(64)
    with pytest.raises(TransformError, match="RMSNorm"):
        transform(model)
    model = tiny_model("llama")
    transform(model)
    with pytest.raises(TransformError, match="already"):
        transform(model)


@torch.no_grad()
@pytest.mark.parametrize("rotation", ["pca", "pca-block"])
def test_pca_rotations_are_exact(arch, rotation, exact_rmsnorm):
    """The activation-PCA rotations keep the outputs (float64, 1e-9); one basis needs no shortcuts
    and decorrelates the block inputs it was fitted on."""
    from wina.transform import block_input_moments
    model = tiny_model(arch, dtype=torch.float64, tie_word_embeddings=(arch == "llama"))
    ids = torch.randint(3, 128, (2, 33), generator=torch.Generator().manual_seed(2))
    before = model(ids).logits
    moments = block_input_moments(model, ids)
    info = transform(model, rotation=rotation, moments=moments)
    assert (model(ids).logits - before).abs().max().item() <= 1e-9
    n_blocks = 2 * model.config.num_hidden_layers
    if rotation == "pca":
        assert info.n_shortcuts == 0 and info.basis.shape == (64, 64)
        q = info.basis.double()
        assert torch.allclose(q.T @ q, torch.eye(64, dtype=torch.float64), atol=1e-6)
        c = q.T @ sum(moments) @ q                      # diagonal, eigenvalues descending
        assert (c - torch.diag(torch.diagonal(c))).abs().max() <= 1e-6 * c.abs().max()
        assert torch.all(torch.diagonal(c)[:-1] >= torch.diagonal(c)[1:] - 1e-9)
    else:
        assert info.n_shortcuts == n_blocks - 1 and info.basis.shape == (n_blocks, 64, 64)
        for m, q in zip(moments, info.basis.double()):  # each block's inputs decorrelated in its basis
            c = q.T @ m @ q
            assert (c - torch.diag(torch.diagonal(c))).abs().max() <= 1e-5 * c.abs().max()
        again = tiny_model(arch, dtype=torch.float64, tie_word_embeddings=(arch == "llama"))
        transform(again, rotation=rotation, basis=info.basis)   # what a plan gives back: the same model
        assert (again(ids).logits - model(ids).logits).abs().max().item() <= 1e-5


def test_pca_needs_calibration_text():
    model = tiny_model("llama")
    with pytest.raises(TransformError, match="basis or the block inputs"):
        transform(model, rotation="pca")
    with pytest.raises(TransformError, match="one basis per block"):
        transform(model, rotation="pca-block", basis=torch.eye(64))
    with pytest.raises(TransformError, match="unknown rotation"):
        transform(model, rotation="hadamard")
