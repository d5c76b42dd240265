"""Where evaluation data comes from (wina.data): the shipped wikitext-2 excerpt behind a preset's
"{data}/..." perplexity text when there is no data folder."""
from __future__ import annotations

import pytest

import wina.data
from conftest import DATA_DIR
from wina.errors import DataError
from wina.presets import PresetError, parse_preset

TEXT = "wikitext2/wiki.test.raw"


@pytest.fixture
def no_data_folder(monkeypatch):
    monkeypatch.delenv("WINA_DATA", raising=False)
    monkeypatch.delenv("WINA_DATA_DIR", raising=False)
    monkeypatch.setattr(wina.data, "candidates", lambda: [])


def test_shipped_excerpt_serves_a_short_perplexity(no_data_folder):
    """The excerpt is the first 100 lines of the test text, unedited, and serves up to 4096 tokens."""
    f = wina.data.data_text(TEXT, None, 2048)
    assert f == wina.data.SHIPPED_DIR / "wikitext2" / "wiki.test.raw"
    lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 100 and lines[1] == " = Robert Boulter = \n"
    full = DATA_DIR / TEXT
    if full.is_file():
        assert "".join(full.read_text(encoding="utf-8").splitlines(keepends=True)[:100]) == "".join(lines)


def test_more_than_the_excerpt_needs_a_data_folder(no_data_folder, tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        wina.data.data_text(TEXT, None, 8192)
    with pytest.raises(DataError, match="no token limit"):
        wina.data.data_text(TEXT, None, None)
    assert wina.data.data_text(TEXT, tmp_path, 8192) == (tmp_path / TEXT).resolve()


def _preset(max_tokens: int):
    return parse_preset({"name": "p", "model": "smollm2-135m",
                         "eval": {"ppl_text": "{data}/" + TEXT, "ppl_max_tokens": max_tokens},
                         "variants": [{"name": "dense", "method": "dense"}]})


def test_preset_perplexity_text_falls_back_to_the_excerpt(no_data_folder):
    assert _preset(4096).resolved_ppl_text() == wina.data.SHIPPED_DIR / "wikitext2" / "wiki.test.raw"
    with pytest.raises(PresetError, match="ppl_text.*4096"):
        _preset(8192).resolved_ppl_text()


def test_the_excerpt_gives_the_full_texts_token_ids():
    """A perplexity over the excerpt's first 4096 tokens reads the same ids as over the full file's."""
    full = DATA_DIR / TEXT
    if not full.is_file():
        pytest.skip(f"{full} not found: the comparison needs the full text")
    from wina.models import load
    tok = load().tokenizer
    ex = (wina.data.SHIPPED_DIR / TEXT).read_text(encoding="utf-8")
    a = tok(ex, add_special_tokens=False).input_ids[:4096]
    b = tok(full.read_text(encoding="utf-8")[:len(ex) + 2000], add_special_tokens=False).input_ids[:4096]
    assert len(a) == 4096 and a == b
