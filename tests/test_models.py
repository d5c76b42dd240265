import pytest

from wina.accounting import flops_per_token
from wina.errors import ModelLoadError, UnsupportedArchitecture
from wina.models import load


def test_flops_match_paper_table5_llama2_7b():
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    dense = flops_per_token(cfg, 0.0)
    half = flops_per_token(cfg, 0.5)
    assert round(dense.dense / 1e9, 2) == 6.61
    assert round(half.sparse / 1e9, 2) == 3.37
    tr = flops_per_token(cfg, 0.5, transform=True)
    assert tr.shortcut == 63 * 4096 ** 2          # stated separately, never hidden
    assert tr.sparse == half.sparse


def test_flops_unknown_architecture():
    from transformers import GPT2Config
    with pytest.raises(UnsupportedArchitecture):
        flops_per_token(GPT2Config(), 0.5)


def test_bad_model_specs(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="not found"):
        load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="dtype"):
        load("smollm2-135m", dtype="int3")


def test_local_directory_roundtrip(tmp_path):
    import torch
    from conftest import tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)} | {"[UNK]": 127}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2").save_pretrained(tmp_path)
    loaded = load(str(tmp_path), dtype="float32")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    assert loaded.tokenizer.pad_token is not None
