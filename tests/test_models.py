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


def _load_in_process(q, start, cache):
    """Child: convert-or-read the cache with a slow converter that counts its calls in a file."""
    import os
    import time
    from pathlib import Path

    import wina.models as m
    os.environ["WINA_CACHE"] = cache

    def slow(gguf, target):
        with open(Path(cache) / "conversions", "a") as f:
            f.write("x")
        tmp = target.parent / (target.name + ".tmp")
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        time.sleep(0.5)                               # a reader racing in now must wait, not read
        (tmp / "model.safetensors").write_text("w")
        os.replace(tmp, target)

    m._convert_gguf = slow
    start.wait(timeout=60)                            # all three ask at the same moment
    folder = m._converted(Path(cache) / "model.gguf")
    q.put(sorted(p.name for p in folder.iterdir()))


def test_gguf_conversion_once_across_processes(tmp_path):
    """Several processes loading one GGUF at once (lm-eval runs side by side): one converts, the others
    wait on the lock and then read the finished folder; none reads a folder being written or removed."""
    import multiprocessing as mp
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    ctx = mp.get_context("spawn")
    q, start = ctx.Queue(), ctx.Barrier(3)
    procs = [ctx.Process(target=_load_in_process, args=(q, start, str(tmp_path))) for _ in range(3)]
    for p in procs:
        p.start()
    seen = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert seen == [["config.json", "model.safetensors"]] * 3
    assert (tmp_path / "conversions").read_text() == "x"


def test_a_gguf_copied_elsewhere_is_converted_once(tmp_path, monkeypatch):
    """The conversion cache is keyed by the GGUF's content, not its path or time: the same file in a
    new clone's venv (or reinstalled) reuses the converted folder; a changed file gets its own."""
    import os
    import shutil
    import wina.models as m
    monkeypatch.setenv("WINA_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "a" / "model.gguf"
    a.parent.mkdir()
    a.write_bytes(b"GGUF" + bytes(range(256)) * 90000)          # ~23 MiB: head and tail read apart
    b = tmp_path / "b" / "model.gguf"
    b.parent.mkdir()
    shutil.copy(a, b)
    os.utime(b, (1, 1))
    assert m._gguf_cache_path(a) == m._gguf_cache_path(b)
    data = bytearray(b.read_bytes())
    data[-1] ^= 1                                                 # the last tensor's last byte
    b.write_bytes(bytes(data))
    assert m._gguf_cache_path(a) != m._gguf_cache_path(b)
    data[-1] ^= 1
    data[5] ^= 1                                                  # the header
    b.write_bytes(bytes(data))
    assert m._gguf_cache_path(a) != m._gguf_cache_path(b)
