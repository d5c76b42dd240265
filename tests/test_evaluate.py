"""lm-eval bridge: headline metric, an end-to-end run of a tiny model with --limit (progress,
measured sparsity, results file), cancellation, and bad input (one clear error, nothing written)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_tui_support import tiny_llama   # a random 2-layer Llama sized to a tokenizer
from wina.errors import Cancelled, DataError, InvalidArgument
from wina.evaluate import evaluate, headline_metric, headlines, run_evaluation
from wina.events import CancelToken

REPO = Path(__file__).resolve().parents[1]
CORPUS = ("Question: How do I ready a guinea pig cage? Answer: bedding, water and food. "
          "The quick brown fox jumps over the lazy dog. Janet's ducks lay 16 eggs per day. "
          "= Robert Boulter = Robert Boulter is an English film, television and theatre actor. "
          "0123456789 yes no true false A B C D . , ; : ? ! ' \" ( ) $ # @ - \n") * 4


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama with a small byte-level BPE tokenizer built here (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([CORPUS], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    model = tiny_llama(tok, intermediate_size=96, max_position_embeddings=1024)
    model.generation_config.max_length = 1024
    return model, tok


def test_headline_metric_follows_the_seed():
    r = {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.05}
    assert headline_metric(r) == {"metric": "acc_norm", "filter": "none", "value": 0.6, "stderr": 0.05,
                                  "higher_is_better": True}
    g = {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2,
         "exact_match_stderr,flexible-extract": "N/A"}
    h = headline_metric(g)
    assert (h["metric"], h["filter"], h["value"], h["stderr"]) == ("exact_match", "flexible-extract", 0.2, None)
    assert headline_metric({"acc,none": 0.3})["metric"] == "acc"
    w = headline_metric({"word_perplexity,none": 30.0, "bits_per_byte,none": 0.9})
    assert w["metric"] == "word_perplexity" and w["higher_is_better"] is False
    assert headline_metric({"alias": "x"}) is None
    res = {"results": {"mmlu": {"acc,none": 0.25}, "mmlu_anatomy": {"acc,none": 0.3}},
           "group_subtasks": {"mmlu": ["mmlu_anatomy"]}}
    assert list(headlines(res)) == ["mmlu"]


def test_end_to_end_tiny_model_with_limit(tiny, shared_data, tmp_path):
    from wina.results import REQUIRED, load_run
    from wina.sparsify import sparsify
    model, tok = tiny
    sp = sparsify(model, "teal", 0.5)
    events = []
    text = tmp_path / "t.txt"
    text.write_text(CORPUS * 8)
    try:
        run = run_evaluation(model, tok, "piqa,boolq,wikitext,gsm8k", model_id="tiny-llama", sparsifier=sp,
                             allocation="uniform", limit=2, data_dir=shared_data, out=tmp_path / "runs",
                             ppl_file=text, ppl_context=64, batch_size=4, on_event=events.append,
                             gen_kwargs={"max_gen_toks": 8})
    finally:
        sp.remove()
    # the file: lm-eval's results plus the wina block with the documented fields
    assert run.path.parent == tmp_path / "runs" and run.path.suffix == ".json"
    data = json.loads(run.path.read_text())
    w = data["wina"]
    assert all(k in w for k in REQUIRED)
    assert w["model"] == "tiny-llama" and w["method"] == "teal" and w["transform"] is False
    assert w["allocation"] == "uniform" and w["nominal_sparsity"] == pytest.approx(0.5)
    assert 0.3 < w["measured_sparsity"] <= 0.5
    assert w["flops"]["sparse"] < w["flops"]["dense"]
    assert w["versions"]["lm_eval"] and w["versions"]["torch"] and w["date"] and w["machine"]["cpu_count"]
    assert w["eval"]["limit"] == 2 and w["eval"]["offline"] is True
    for t in ("piqa", "boolq", "gsm8k"):
        assert 0.0 <= w["headline"][t]["value"] <= 1.0
    assert w["headline"]["piqa"]["metric"] == "acc_norm"
    assert w["headline"]["boolq"]["metric"] == "acc"
    assert (w["headline"]["gsm8k"]["metric"], w["headline"]["gsm8k"]["filter"]) == ("exact_match", "flexible-extract")
    assert w["headline"]["wikitext"]["metric"] == "word_perplexity" and w["headline"]["wikitext"]["value"] > 1
    assert w["perplexity"]["perplexity"] > 1 and w["perplexity"]["tokens"] > 0
    assert data["n-samples"]["piqa"]["effective"] == 2 and data["n-shot"]["gsm8k"] == 5
    assert {"results", "configs", "versions", "n-shot", "config"} <= set(data)
    assert load_run(run.path).label == "TEAL"
    # progress: requests done / total, per task, ending complete
    ev = [e for e in events if e.stage == "evaluate" and e.total]
    assert ev and ev[-1].done == ev[-1].total
    assert [e.done for e in ev] == sorted(e.done for e in ev)
    per = ev[-1].metrics["tasks"]
    assert set(per) == {"piqa", "boolq", "wikitext", "gsm8k"}
    assert per["piqa"] == (4, 4) and per["gsm8k"] == (2, 2) and per["boolq"] == (4, 4)
    assert any(e.stage == "ppl" for e in events)


def test_evaluate_cancel(tiny, shared_data):
    model, tok = tiny
    token = CancelToken()

    def on_event(e):
        if e.stage == "evaluate" and e.total:
            token.cancel()

    with pytest.raises(Cancelled):
        evaluate(model, tok, ["piqa"], limit=3, data_dir=shared_data, on_event=on_event, cancel=token)


def test_bad_input_one_error_nothing_written(tiny, shared_data, tmp_path):
    model, tok = tiny
    out = tmp_path / "runs"
    with pytest.raises(InvalidArgument, match="unknown task 'nosuch'.*arc_challenge.*winogrande"):
        run_evaluation(model, tok, ["piqa", "nosuch"], model_id="m", limit=1, data_dir=shared_data, out=out)
    with pytest.raises(DataError, match=str(tmp_path / "empty" / "piqa" / "valid.jsonl")):
        (tmp_path / "empty").mkdir()
        run_evaluation(model, tok, ["piqa"], model_id="m", limit=1, data_dir=tmp_path / "empty", out=out)
    with pytest.raises(DataError, match="text file not found"):
        run_evaluation(model, tok, [], model_id="m", ppl_file=tmp_path / "none.txt", out=out)
    with pytest.raises(InvalidArgument, match="limit"):
        run_evaluation(model, tok, ["piqa"], model_id="m", limit=0, data_dir=shared_data, out=out)
    with pytest.raises(InvalidArgument, match="nothing to evaluate"):
        run_evaluation(model, tok, None, model_id="m", out=out)
    assert not out.exists()


def test_offline_switches_restored():
    from wina.evaluate import offline
    import datasets.config
    before = (os.environ.get("HF_DATASETS_OFFLINE"), datasets.config.HF_DATASETS_OFFLINE)
    with offline():
        assert os.environ["HF_DATASETS_OFFLINE"] == "1" and datasets.config.HF_DATASETS_OFFLINE is True
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert (os.environ.get("HF_DATASETS_OFFLINE"), datasets.config.HF_DATASETS_OFFLINE) == before


@pytest.mark.slow
def test_wina_ppl_json_parses(shared_data):
    """`wina ppl --json` prints one JSON object with perplexity, tokens and measured_sparsity."""
    try:
        from wina.models import embedded_gguf
        embedded_gguf()
    except Exception as e:
        pytest.skip(f"embedded model unavailable: {e}")
    cmd = [sys.executable, "-c", "from wina.cli import main; main()", "ppl", "smollm2-135m",
           "--method", "teal", "--sparsity", "0.5", "--text", str(shared_data / "wikitext2" / "wiki.test.raw"),
           "--max-tokens", "1024", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    obj = json.loads(p.stdout)
    assert obj["tokens"] == 2 * 511 and obj["perplexity"] > 1
    assert 0.45 < obj["measured_sparsity"] <= 0.5


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3"])
@pytest.mark.parametrize("method", ["dense", "teal"])
@pytest.mark.parametrize("chunk", ["whole", "one row"])
def test_shared_context_scores_equal_one_pass_per_choice(arch, method, chunk, monkeypatch):
    """Choices that share a context run it once; the log-likelihoods and greedy flags are those of one
    whole forward pass per (context + continuation), dense and sparsified (the dense prefix stays in
    the context), whether the continuations are scored all at once or one per chunk."""
    import torch
    from conftest import tiny_model
    import wina.evaluate
    from wina.evaluate import shared_context_scores
    from wina.sparsify import sparsify
    if chunk == "one row":
        monkeypatch.setattr(wina.evaluate, "_SCORE_ELEMENTS", 1)
    m = tiny_model(arch)
    sp = sparsify(m, "teal", 0.5) if method == "teal" else None
    ctxs = [[1, 5, 9, 11, 3], [1, 7, 8], [1, 4, 4, 4, 4, 4, 4, 4]]
    conts = [[[20, 21, 22], [30], [40, 41]], [[50, 51, 52, 53, 54], [60, 61]], [[70], [71, 72]]]
    got = shared_context_scores(m, ctxs, conts)
    for c, cs, g in zip(ctxs, conts, got):
        assert len(g) == len(cs)
        for cont, (lp, greedy) in zip(cs, g):
            with torch.no_grad():
                lg = m(torch.tensor([c + cont[:-1]])).logits.float().log_softmax(-1)[0, len(c) - 1:]
            want = torch.tensor(cont)
            assert lp == pytest.approx(float(lg.gather(1, want.unsqueeze(1)).sum()), abs=1e-4)
            assert greedy == bool((lg.argmax(-1) == want).all())
    if sp is not None:
        sp.remove()


def test_a_cancel_stops_inside_a_long_forward_within_one_layer(tiny):
    """One unit of work can be a single long forward (a wikitext document on a CPU): a cancel set
    while it runs stops it before the next decoder layer, and no hook is left on the model."""
    from wina.perplexity import perplexity
    model, tok = tiny
    token = CancelToken()
    layers = model.model.layers
    ran: list[int] = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    hooks.append(layers[0].register_forward_hook(lambda m, a, o: token.cancel()))   # mid-forward
    try:
        with pytest.raises(Cancelled):
            perplexity(model, tok, CORPUS, context=256, cancel=token)
        assert ran == [0]
    finally:
        for h in hooks:
            h.remove()
    assert not any(layer._forward_pre_hooks for layer in layers)


def test_wikitext_reports_progress_per_document(tiny, shared_data):
    """lm-eval's wikitext scores whole documents (many windows each): progress moves per document,
    not once for the whole task."""
    model, tok = tiny
    events = []
    evaluate(model, tok, ["wikitext"], limit=3, data_dir=shared_data, on_event=events.append)
    done = [e.metrics["task_done"] for e in events if e.stage == "evaluate" and e.total]
    assert done == [0, 1, 2, 3]
