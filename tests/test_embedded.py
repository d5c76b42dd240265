"""The real embedded model (SmolLM2-135M-Instruct): invariance in float32 and perplexity."""
import copy

import pytest
import torch

from wina.perplexity import perplexity, read_text
from wina.sparsify import sparsify
from wina.transform import transform

pytestmark = pytest.mark.slow


@torch.no_grad()
def test_embedded_transform_invariance_float32(embedded):
    model = copy.deepcopy(embedded.model)
    ids = embedded.tokenizer("The capital of France is Paris. It is known for", return_tensors="pt").input_ids
    before = model(ids).logits
    transform(model)
    after = model(ids).logits
    delta = (before - after).abs().max().item()
    print(f"\nembedded model, float32: max |dlogit| after transform = {delta:.2e}")
    assert delta <= 1e-3
    assert model.config.tie_word_embeddings is False


def test_embedded_perplexity(embedded, data_dir):
    torch.set_num_threads(2)
    text = read_text(data_dir / "wikitext2" / "wiki.test.raw")
    model, tok = copy.deepcopy(embedded.model), embedded.tokenizer
    n = 2048
    dense = perplexity(model, tok, text, max_tokens=n, batch_size=4).perplexity
    res = {"dense": dense}
    for method in ("teal", "wina"):
        sp = sparsify(model, method, 0.5)
        res[method] = perplexity(model, tok, text, max_tokens=n, batch_size=4).perplexity
        res[method + "_measured"] = sp.measured_sparsity()
        sp.remove()
    transform(model)
    res["dense_transformed"] = perplexity(model, tok, text, max_tokens=n, batch_size=4).perplexity
    sp = sparsify(model, "wina", 0.5)
    res["wina_transform"] = perplexity(model, tok, text, max_tokens=n, batch_size=4).perplexity
    print("\nembedded perplexity, first 2048 wikitext tokens, 512-token windows:", res)
    assert 20 < dense < 60                                    # reference: 36.0 on 8192 tokens
    assert abs(res["dense_transformed"] - dense) < 0.01 * dense
    for key in ("teal", "wina", "wina_transform"):
        assert dense < res[key] < 50 * dense                  # sparsity costs quality, not sanity
    assert 0.45 < res["wina_measured"] < 0.5                  # 1 % of positions kept dense
