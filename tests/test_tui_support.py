"""Helpers for the TUI tests: a tiny random Llama model with a byte-level tokenizer built in code, and
the app on it (small calibrate/allocate options, a fixed terminal size, waiting on a pilot).

No downloads: the tokenizer is a tokenizers-library BPE without merges over the 256 byte symbols
(plus the chat special tokens), wrapped in PreTrainedTokenizerFast with a ChatML-style template.
``tiny_llama`` (a random 2-layer Llama sized to any tokenizer) serves test_evaluate too.
bench/tui_latency.py imports ``tiny_loader`` from here.
"""
from __future__ import annotations

import functools
import time

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

SIZE = (100, 30)                                   # the terminal of every TUI test and snapshot
CALIB = {"samples": 2, "seq_len": 32}             # the app's calibrate / allocate options in tests
ALLOC = {"samples": 1, "seq_len": 32, "step": 0.2, "max_sparsity": 0.6}


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token=None,
                                  additional_special_tokens=SPECIALS[1:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(tok, seed: int = 0, **kw):
    """A random 2-layer Llama (hidden 64) sized to ``tok``'s vocabulary and special tokens; ``kw``
    override the config (intermediate 128 and 512 positions unless told)."""
    from transformers import LlamaConfig
    from wina.models import from_config
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg.update(kw)
    return from_config(LlamaConfig(**cfg), seed=seed)


def tiny_loaded(spec: str = "tiny", seed: int = 0):
    from wina.api import Loaded
    tok = tiny_tokenizer()
    return Loaded(tiny_llama(tok, seed, tie_word_embeddings=False), tok, spec, "random (tests)")


def tiny_loader(spec: str):
    """A loader for WinaApp: any spec gives a fresh tiny model (like loading from disk)."""
    return tiny_loaded(spec)


def tiny_app(tmp_path, **kw):
    """A WinaApp on the tiny model, its state under ``tmp_path`` (the settings file in
    ``tmp_path/config``, never the user's), with the small :data:`CALIB` and :data:`ALLOC`
    options; ``kw`` go to WinaApp (results_dir, data_dir, max_new_tokens, ...)."""
    from wina_tui.app import WinaApp
    kw.setdefault("config_dir", tmp_path / "config")
    app = WinaApp(loader=tiny_loader, state_dir=tmp_path / "state", **kw)
    app.session.calibrate_options = dict(CALIB)
    app.session.allocate_options = dict(ALLOC)
    return app


async def wait_for(pilot, cond, timeout: float = 60.0, step: float = 0.05) -> None:
    """Let the app run until ``cond()`` holds (an AssertionError after ``timeout`` seconds)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(step)


def set_greedy(app, source: str = "random", allocation: str = "layer") -> None:
    """Setup form: a greedy allocation calibrated on ``source``."""
    from textual.widgets import Input, Select
    setup = app.setup_screen
    setup.query_one("#allocation", Select).value = allocation
    setup.query_one("#calib-source", Input).value = source


# --- tests of the session and the app's edges (here, beside the helpers they use) ----------------

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def torch_one_thread():
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _pca_plan(out: Path) -> Path:
    from wina import api
    api.calibrate(tiny_loaded(), out, api.Calibration(method="wina", transform=True, rotation="pca",
                                                      source="random", samples=2, seq_len=32))
    return out


def test_session_prepares_a_pca_plan_through_the_api(tmp_path, torch_one_thread):
    """A plan calibrated with the pca rotation: the session leaves the transform to api.apply (the
    plan's own rotation); a model that carries another transform is loaded again, not refused."""
    from wina import api
    from wina_tui.state import Session, Settings
    plan = _pca_plan(tmp_path / "pca")
    s = Session(tiny_loader, state_dir=tmp_path / "state")
    settings = Settings(model="tiny", options=api.SparseOptions(method="wina", sparsity=0.5, transform=True))
    s.ensure_loaded("tiny", True)
    assert s.prepare(settings, plan_path=plan) is not None
    assert s.loaded.model._wina_transform.rotation == "pca"
    assert s.applied.options.plan == str(plan)
    first = s.loaded
    s.prepare(settings)                                 # uniform top-k with the (svd) transform
    assert s.loaded is not first and s.loaded.model._wina_transform.rotation == "svd"
    s.prepare(settings, plan_path=plan)                 # and the pca plan again
    assert s.loaded.model._wina_transform.rotation == "pca" and s.sparsifier is not None
