"""Calibration: histogram thresholds, data sources, layer-by-layer collection, resume, events."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from wina.calibrate import (N_BINS, bin_scores, calibrate, calibration_ids, hist_threshold,
                            matrix_threshold, nucleus_sample, sample_self)
from wina.errors import Cancelled, DataError, InvalidArgument, PlanError
from wina.events import CancelToken, Reporter
from wina.plan import Plan, apply_plan


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run faster on one thread


class CharTok:
    """A character-level stand-in tokenizer (ids 3..130), enough for the data sources."""
    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        class R:
            pass
        r = R()
        r.input_ids = [3 + (ord(c) % 120) for c in text]
        return r


@pytest.mark.parametrize("dist", ["lognormal", "halfnormal", "heavy"])
def test_histogram_threshold_matches_quantile(dist):
    g = torch.Generator().manual_seed(0)
    n = 400_000
    if dist == "lognormal":
        x = torch.exp(2.0 * torch.randn(n, generator=g))
    elif dist == "halfnormal":
        x = torch.randn(n, generator=g).abs()
    else:
        x = torch.randn(n, generator=g).abs() / torch.rand(n, generator=g).clamp_min(1e-3) ** 0.7
    counts = bin_scores(x)
    assert counts.shape == (N_BINS,) and counts.sum() == n
    for q in (0.05, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9, 0.99):
        t = hist_threshold(counts, q)
        ref = float(x.kthvalue(int(q * n)).values)           # the exact empirical quantile
        assert abs(t - ref) / ref < 0.005, (q, t, ref)
        frac = float((x <= t).double().mean())
        assert abs(frac - q) < 0.005
        # and torch.quantile on a subsample agrees to sampling noise
        sub = x[:100_000]
        assert abs(t - float(torch.quantile(sub, q))) / ref < 0.03


def test_histogram_edges():
    x = torch.tensor([0.0, 0.0, 1e-30, 1.0, 2.0, 1e30])
    c = bin_scores(x)
    assert c[0] == 3 and c[-1] == 1 and c.sum() == 6
    assert hist_threshold(c, 0.0) == 0.0
    assert hist_threshold(c, 0.4) == 0.0                # inside the zeros
    assert 0.99 < hist_threshold(c, 4.0 / 6) <= 1.01
    # dead columns: a matrix with 1/3 dead inputs starts at sparsity 1/3, threshold 0 there
    assert matrix_threshold(c, 0.3, n_live=2, in_features=3) == 0.0
    assert matrix_threshold(c, 1 / 3 + (2 / 3) * 0.6, 2, 3) == pytest.approx(hist_threshold(c, 0.6))


def _measure(model, plan, s, ids, mode="uniform"):
    sp = apply_plan(model, plan, s, mode=mode)
    with torch.no_grad():
        model(ids, use_cache=False)
    m = sp.measured_sparsity()
    sp.remove()
    return m


@pytest.mark.parametrize("method", ["wina", "teal"])
def test_threshold_sparsity_on_calibration_like_data(arch, method):
    model = tiny_model(arch)
    plan = calibrate(model, CharTok(), method=method, source="random", samples=4, seq_len=128, seed=0)
    assert plan.calibrated and plan.meta["architecture"] == arch
    ids = calibration_ids(model, CharTok(), "random", 4, 128, seed=1)
    for s in (0.25, 0.5, 0.7):
        m = _measure(model, plan, s, ids)
        assert abs(m - s) < 0.02, (arch, method, s, m)


def test_threshold_sparsity_transformed_gqa():
    from wina.transform import transform
    model = tiny_model("llama")
    transform(model)
    plan = calibrate(model, CharTok(), source="random", samples=4, seq_len=128)
    assert plan.meta["transform"] is True
    # k_proj (kv 32 of 64 rows) has only 32 live columns of 64 after the transform
    assert plan.floor(0, "k_proj") == pytest.approx(0.5)
    assert plan.floor(0, "q_proj") == 0.0
    ids = calibration_ids(model, CharTok(), "random", 4, 128, seed=1)
    sp = apply_plan(model, plan, 0.6)
    with torch.no_grad():
        model(ids, use_cache=False)
    meas = sp.measured()
    assert abs(sp.measured_sparsity() - 0.6) < 0.02
    for (i, p), s in sp.sparsities.items():          # each matrix too, looser (few tokens per matrix)
        assert abs(meas[(i, p)] - s) < 0.08, (i, p, s, meas[(i, p)])
    assert meas[(0, "k_proj")] >= 0.5                # its dead half is always dropped
    sp.remove()


def test_sources(tmp_path, monkeypatch):
    model = tiny_model("llama")
    tok = CharTok()
    txt = tmp_path / "c.txt"
    txt.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    ids = calibration_ids(model, tok, str(txt), 3, 64)
    assert ids.shape == (3, 64)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"body": f"record {i} " * 20}) for i in range(20)))
    assert calibration_ids(model, tok, str(jl), 4, 32, field="body").shape == (4, 32)
    with pytest.raises(DataError, match="no .text. field"):
        calibration_ids(model, tok, str(jl), 4, 32)
    with pytest.raises(DataError, match="fewer than"):
        calibration_ids(model, tok, str(txt), 100, 64)
    with pytest.raises(DataError, match="not found"):
        calibration_ids(model, tok, str(tmp_path / "nope.txt"), 2, 32)
    with pytest.raises(InvalidArgument):
        calibration_ids(model, tok, "random", 0, 32)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="calibration dataset .* hub is off"):
        calibration_ids(model, tok, "hub:tatsu-lab/alpaca", 2, 32)


def test_self_source_deterministic():
    model = tiny_model("qwen2")
    a = sample_self(model, CharTok(), 3, 24, seed=5, batch_size=2)
    b = sample_self(model, CharTok(), 3, 24, seed=5, batch_size=2)
    assert a.shape == (3, 24) and torch.equal(a, b)
    assert (a[:, 0] == 1).all() and not (a[:, 1:] == 2).any()     # starts at BOS, no EOS


def _full_sort_nucleus(probs, top_p, gen):
    """The recipe every earlier calibration text was drawn with: sort the whole vocabulary."""
    sp_, si = probs.sort(-1, descending=True)
    keep = (sp_.cumsum(-1) - sp_) < top_p
    sp_ = sp_ * keep
    choice = torch.multinomial(sp_ / sp_.sum(-1, keepdim=True), 1, generator=gen)
    return si.gather(-1, choice)


def test_nucleus_sample_matches_the_full_sort():
    """Same tokens and same generator state as the full sort: peaked and flat rows (nuclei past every
    top-k), tied probabilities, small and SmolLM2-sized vocabularies."""
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        nb, V = 1 + trial % 8, (50, 3000, 49152)[trial % 3]
        logits = torch.randn(nb, V, generator=g) * (0.5 + 8 * float(torch.rand(1, generator=g)))
        if trial % 4 == 0:
            logits = (logits * 2).round() / 2            # many exact ties
        if trial % 5 == 0:
            logits[0] = 0.0                              # a flat row: the nucleus is most of the vocabulary
        logits[:, 0] = -float("inf")
        probs = torch.softmax(logits, -1)
        ga, gb = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
        assert torch.equal(nucleus_sample(probs, 0.95, ga), _full_sort_nucleus(probs, 0.95, gb)), trial
        assert torch.equal(ga.get_state(), gb.get_state())


def test_self_sampling_stops_within_a_token_of_a_cancel():
    model = tiny_model("llama")
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    token = CancelToken()
    events = []

    def on_event(ev):                                    # the first event (token 1) asks for a cancel
        events.append(ev)
        token.cancel()

    rep = Reporter("calibrate", 2, on_event, token)
    with pytest.raises(Cancelled):
        sample_self(model, CharTok(), 2, 200, batch_size=2, reporter=rep)
    assert len(events) == 1 and len(forwards) == 1       # not the 64 tokens to the next event


def test_resume_after_interruption_is_identical(tmp_path):
    model = tiny_model("mistral", num_hidden_layers=4)
    full = calibrate(model, CharTok(), source="random", samples=3, seq_len=64, out=tmp_path / "a")

    def stop_at_layer_2(ev):
        if ev.stage == "calibrate" and ev.layer == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        calibrate(model, CharTok(), source="random", samples=3, seq_len=64, out=tmp_path / "b",
                  on_event=stop_at_layer_2)
    with pytest.raises(PlanError, match="partial"):
        Plan.load(tmp_path / "b")
    part = Plan.load(tmp_path / "b", allow_partial=True)
    assert part.n_calibrated == 2
    seen = []
    resumed = calibrate(model, CharTok(), source="random", samples=3, seq_len=64, out=tmp_path / "b",
                        on_event=seen.append)
    assert resumed.calibrated
    for i in range(4):
        assert torch.equal(full.histograms[i], resumed.histograms[i])
    assert torch.equal(full.calib_ids, resumed.calib_ids)
    # different arguments on the same directory are refused
    with pytest.raises(PlanError, match="other arguments"):
        calibrate(model, CharTok(), source="random", samples=2, seq_len=64, out=tmp_path / "b")


def test_events_and_cancel():
    model = tiny_model("phi3", num_hidden_layers=3)
    events = []
    calibrate(model, CharTok(), source="random", samples=2, seq_len=32, on_event=events.append)
    layer_events = [e for e in events if e.stage == "calibrate" and e.layer is not None]
    assert {e.layer for e in layer_events} == {0, 1, 2}
    assert all(e.n_layers == 3 for e in layer_events)
    assert events[-1].done == events[-1].total == 3
    tok = CancelToken()
    tok.cancel()
    with pytest.raises(Cancelled):
        calibrate(model, CharTok(), source="random", samples=2, seq_len=32, cancel=tok)
    with pytest.raises(InvalidArgument):
        calibrate(model, CharTok(), method="dense", source="random", samples=2, seq_len=32)


@pytest.mark.slow
def test_embedded_threshold_sparsity(embedded, data_dir, tmp_path):
    """Calibrate the embedded model on one half of wikitext, measure on windows of the other half."""
    model, tok = embedded.model, embedded.tokenizer
    text = (data_dir / "wikitext2" / "wiki.test.raw").read_text()
    (tmp_path / "a.txt").write_text(text[: len(text) // 2])
    (tmp_path / "b.txt").write_text(text[len(text) // 2:])
    plan = calibrate(model, tok, method="wina", source=str(tmp_path / "a.txt"), samples=8, seq_len=256)
    ids = calibration_ids(model, tok, str(tmp_path / "b.txt"), 4, 256)
    for s in (0.4, 0.5, 0.65):
        m = _measure(model, plan, s, ids)
        assert abs(m - s) < 0.02, (s, m)


def test_refined_thresholds_hit_the_target_on_calibration_data():
    model = tiny_model("llama", num_hidden_layers=3)
    plan = calibrate(model, CharTok(), source="random", samples=4, seq_len=128)
    worst = {}
    for refine in (False, True):
        sp = apply_plan(model, plan, 0.7, refine=refine)
        with torch.no_grad():
            model(plan.calib_ids[:4, :128], use_cache=False)
        meas = sp.measured()
        sp.remove()
        worst[refine] = max(abs(v * 128 / 127 - 0.7) for v in meas.values())   # 1 of 128 positions dense
    assert worst[True] < 0.01, worst
    assert worst[False] > 2 * worst[True], worst      # the dense thresholds miss; refining is what hits


def test_durations_read_as_people_read_them():
    """The one rule for ETAs and wall times: tenths below 10 s, whole seconds below a minute, and
    what would round to "60 s" reads 1:00."""
    from wina.events import format_duration
    cases = {None: "", -1.0: "", float("inf"): "", float("nan"): "", 0.04: "0.0 s", 9.94: "9.9 s",
             9.96: "10 s", 42.4: "42 s", 59.4: "59 s", 59.6: "1:00", 187.0: "3:07", 3725.0: "1:02:05"}
    assert {s: format_duration(s) for s in cases} == cases
