"""Fidelity to the seed (microsoft/wina @8153dbf): the pinned perplexities on the embedded model, and
the protocol settings that reproduce the seed where it is a choice of protocol (docs/seed-fidelity.md):
the greedy's error rule and step table, the perplexity protocol, and the presets that select them."""
from __future__ import annotations

import math
import os

import pytest
import torch

from conftest import DATA_DIR, tiny_model
from test_calibrate import CharTok
from wina.allocate import ERROR_RULES, LayerTrials, allocate, step_weights
from wina.calibrate import LayerRunner, calibrate
from wina.errors import InvalidArgument
from wina.perplexity import SEED_STRIDE, perplexity, seed_rows, seed_windows
from wina.presets import PresetError, load_preset, parse_preset

WIKI = DATA_DIR / "wikitext2" / "wiki.test.raw"

# Issue 23: the official code and this project, side by side on the embedded model (fp32, the first
# 8192 tokens of wikitext-2 test without BOS, 16 windows of 512, uniform top-k on all seven
# projections, WINA's column norms on k_proj and gate_proj only, one thread): identical figures.
# In float32 with top-k these figures depend on the machine's float arithmetic (which BLAS kernels
# run): a rounding difference of 1e-6 in an activation flips a top-k choice now and then, and the
# flips add up to ~1 % of perplexity at 50 %. So the figures are pinned per numerical environment,
# recognised by the dense figure (which moves only at 1e-5) and TEAL 25 %, to 1e-4; on an unknown environment
# they are held to a 2 % band, and the bit-identity with the official gating rule (which is what
# made the figures equal) is checked in the same process, where it does not depend on the machine.
PINNED = {
    # the environment of the side-by-side run (issue 23, shared/notes/reference-numbers.md)
    "issue 23": {("dense", 0.0): 36.00230, ("teal", 0.25): 37.81371, ("wina", 0.25): 37.75521,
                 ("teal", 0.50): 63.03291, ("wina", 0.50): 62.29772},
    # 2-core AMD EPYC VM, AVX2, torch 2.13.0+cpu (MKL), 2026-12-06 (docs/seed-fidelity.md)
    "epyc-avx2": {("dense", 0.0): 36.00201, ("teal", 0.25): 37.77228, ("wina", 0.25): 37.82035,
                  ("teal", 0.50): 62.36399, ("wina", 0.50): 62.28183},
    # 2-core Intel Xeon VM, AVX-512, torch 2.13.0+cpu, 2026-12-07: its dense figure is issue 23's
    "xeon-avx512": {("dense", 0.0): 36.00230, ("teal", 0.25): 37.78031, ("wina", 0.25): 37.74242,
                    ("teal", 0.50): 63.00438, ("wina", 0.50): 62.44168},
}
# Every pinned figure runs in CI. Two threads: on the machines we measured they give the one-thread
# figures bit for bit (the BLAS splits the output, not the sums) in about half the time.
CONFIGS = tuple(PINNED["issue 23"])
THREADS = min(2, os.cpu_count() or 1)


class _OfficialTopK:
    """The official top-k gate, written from its definition (microsoft/wina @8153dbf,
    utils/utils.py:63-71, wina/mlp.py:146-149, wina/self_attn.py:275-282): on the last int(0.99·L) positions keep
    the k = int(d·(1 − s)) inputs of largest |x| (|x|·‖W[:, i]‖ for k_proj and gate_proj under WINA),
    zero the rest; the first positions stay dense."""

    def __init__(self, model, method, s):
        from wina.adapters import iter_projections
        self.handles = []
        for _, proj, lin in iter_projections(model):
            scale = lin.weight.norm(dim=0) if method == "wina" and proj in ("k_proj", "gate_proj") else None
            self.handles.append(lin.register_forward_pre_hook(self._hook(scale, s)))

    @staticmethod
    def _hook(scale, s):
        def hook(module, args):
            x = args[0]
            L, d = x.shape[-2], x.shape[-1]
            n = int(0.99 * L)
            tail = x[..., L - n:, :]
            score = tail.abs() if scale is None else (tail * scale).abs()
            idx = score.topk(int(d * (1 - s)), dim=-1).indices
            mask = torch.zeros_like(tail).scatter(-1, idx, 1.0)
            return (torch.cat([x[..., :L - n, :], tail * mask], dim=-2), *args[1:])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ---- the pinned figures (one load of the embedded model; six perplexity passes on two threads) ----

def _environment(got: dict):
    """The pinned environment these figures come from: its dense figure to 2e-6 and its first sparse
    figure (TEAL 25 %) to 1e-4. The dense figure alone cannot tell two machines apart (issue 23's and
    the Xeon's agree to every pinned digit), the sparse one can; the other three figures are then checked."""
    first = ("teal", 0.25)
    return next((k for k, v in PINNED.items()
                 if abs(got[("dense", 0.0)] / v[("dense", 0.0)] - 1) < 2e-6
                 and abs(got[first] / v[first] - 1) < 1e-4), None)


@pytest.mark.slow
def test_pinned_perplexities_match_the_official_code(embedded):
    if not WIKI.is_file():
        pytest.skip(f"wikitext-2 test text not found at {WIKI} (../shared/data, or set WINA_DATA_DIR): "
                    f"the pinned figures need it")
    from wina.sparsify import sparsify
    from wina.transform import is_transformed
    model, tok = embedded.model, embedded.tokenizer
    assert next(model.parameters()).dtype == torch.float32
    assert not is_transformed(model)
    text = WIKI.read_text(encoding="utf-8")
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    got, official = {}, {}
    try:
        for method, s in CONFIGS:
            sp = None if method == "dense" else sparsify(model, method, s, gating="topk", weighted="default")
            try:
                r = perplexity(model, tok, text, context=512, max_tokens=8192)
            finally:
                if sp is not None:
                    sp.remove()
            assert (r.windows, r.tokens) == (16, 16 * 511)
            got[(method, s)] = r.perplexity
            if (method, s) == ("wina", 0.5):   # the official rule, same process: bit-identical
                ref = _OfficialTopK(model, method, s)
                try:
                    official[(method, s)] = perplexity(model, tok, text, context=512, max_tokens=8192).perplexity
                finally:
                    ref.remove()
    finally:
        torch.set_num_threads(old)
    env = _environment(got)
    print(f"\npinned perplexities, environment {env or 'unknown'}:",
          {f"{m} {s:g}": round(v, 5) for (m, s), v in got.items()}, "official rule:", official)
    for key, value in official.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    for key in CONFIGS:
        if env is not None:
            assert got[key] == pytest.approx(PINNED[env][key], rel=1e-4), (env, key)
        else:                                    # another machine's float32 arithmetic
            assert got[key] == pytest.approx(PINNED["issue 23"][key], rel=2e-2), key


# ---- allocation: error rule ---------------------------------------------------------------------

def _calibrated(arch="llama", layers=2, **kw):
    model = tiny_model(arch, num_hidden_layers=layers, **kw)
    plan = calibrate(model, CharTok(), method="wina", source="random", samples=3, seq_len=32)
    return model, plan


@pytest.mark.usefixtures("one_thread")
def test_error_rules_exact_math():
    """Both rules on one known layer-output difference: "wina" = mean over positions of the L2 norm
    over channels; "seed" = per sequence, mean over channels of the L2 norm over positions (then the
    mean over sequences)."""
    model, plan = _calibrated()
    runner = LayerRunner(model)
    h = runner.inputs(plan.calib_ids)
    y = runner.run(0, h)
    errs = {}
    for rule in ERROR_RULES:
        trials = LayerTrials(model, plan, runner, 0, h, y, 0.01, error=rule)
        try:
            B, L4, d = trials.y_tail.shape
            trials.y_tail = torch.randn(B, L4, d, generator=torch.Generator().manual_seed(3))
            h1 = torch.randn(1, B, L4, d, generator=torch.Generator().manual_seed(4))
            errs[rule] = trials.mlp_errors(h1, [{p: 0.0 for p in plan.projections}])[0]   # gates open
            with torch.no_grad():
                diff = (h1[0] + trials.mlp(trials.mlp_norm(h1[0])) - trials.y_tail).double()
        finally:
            trials.close()
        if rule == "wina":
            want = sum(float(diff[b, t].norm()) for b in range(B) for t in range(L4)) / (B * L4)
        else:
            want = sum(float(diff[b, :, c].norm()) for b in range(B) for c in range(d)) / (B * d)
        assert errs[rule] == pytest.approx(want, rel=1e-5), rule
    assert errs["wina"] != pytest.approx(errs["seed"], rel=1e-3)


@pytest.mark.usefixtures("one_thread")
def test_error_rule_recorded_and_changing_it_restarts_the_allocation():
    model, plan = _calibrated()
    a = allocate(model, CharTok(), plan, step=0.25, lazy=False)
    meta = dict(a.meta["allocation"])
    assert "error_rule" not in meta and "step_norm" not in meta      # defaults: plans stay as before
    assert meta["error"] == "mean L2 of layer output, last 25% of positions"
    errs_wina = [[r.error for r in t] for t in a.trajectories]
    b = allocate(model, CharTok(), plan, step=0.25, lazy=False, error="seed")
    assert b.meta["allocation"]["error_rule"] == "seed"
    assert b.meta["allocation"]["error"].startswith("seed:")
    errs_seed = [[r.error for r in t] for t in b.trajectories]
    assert errs_seed != errs_wina                                      # re-allocated, other values
    assert all(t[0] == pytest.approx(0.0, abs=1e-5) for t in errs_seed)
    with pytest.raises(InvalidArgument, match="error rule"):
        allocate(model, CharTok(), plan, step=0.25, error="l1")
    with pytest.raises(InvalidArgument, match="step normalisation"):
        allocate(model, CharTok(), plan, step=0.25, step_norm="q")


# ---- allocation: step normalisation -------------------------------------------------------------

@pytest.mark.usefixtures("one_thread")
def test_step_norm_seed_steps_relative_to_o_proj_on_phi3():
    """tiny phi3: qkv_proj is (64 + 2·32) × 64, o_proj 64 × 64, so o_proj-relative steps ("seed", the
    official table) are half the qkv-relative ones ("wina") in every matrix."""
    model, plan = _calibrated("phi3")
    w = plan.weights
    assert w["qkv_proj"] == 1.0 and w["o_proj"] == pytest.approx(0.5)
    sw = step_weights(plan, "seed")
    assert sw["o_proj"] == 1.0
    for p in plan.projections:
        assert sw[p] == pytest.approx(w[p] / w["o_proj"])
    step = 0.2
    a = allocate(model, CharTok(), plan, step=step, lazy=False, max_sparsity=0.6, step_norm="seed")
    assert a.meta["allocation"]["step_norm"] == "seed"
    rise = step * w["o_proj"] / sum(w.values())                  # effective rise of one seed step
    for i, rows in enumerate(a.trajectories):
        for r0, r1, m in zip(rows, rows[1:], a.trajectory_steps[i][1:]):
            if r1.sparsities[m] < 0.99 - 1e-9:
                assert r1.sparsities[m] - r0.sparsities[m] == pytest.approx(step / sw[m])
                assert r1.effective - r0.effective == pytest.approx(rise, rel=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_step_norm_is_the_same_where_q_and_o_have_one_shape():
    model, plan = _calibrated("llama")
    assert step_weights(plan, "seed") == pytest.approx(step_weights(plan, "wina"))
    a = allocate(model, CharTok(), plan, step=0.3, lazy=False, max_sparsity=0.6)
    ta = [list(t) for t in a.trajectories]
    b = allocate(model, CharTok(), plan, step=0.3, lazy=False, max_sparsity=0.6, step_norm="seed")
    assert [[r.sparsities for r in t] for t in b.trajectories] == [[r.sparsities for r in t] for t in ta]


# ---- perplexity protocol ------------------------------------------------------------------------

def _rows_text(n=60):
    lines = []
    for i in range(n):
        lines.append("" if i % 3 == 0 else f" row {i} : some words of text number {i * 7} . ")
    return "\n".join(lines) + "\n"


def test_seed_rows_are_wikitext_rows_shuffled_as_datasets_does():
    text = _rows_text(2000)
    rows = seed_rows(text, rows=1000, seed=42)
    raw = text.split("\n")[:-1]
    assert len(rows) == 1000
    assert all(r == "" or (r.endswith("\n") and r[:-1] in raw) for r in rows)
    assert sum(r == "" for r in rows) > 0
    import numpy as np
    perm = np.random.default_rng(42).permutation(2000)
    want = [(raw[i] + "\n") if raw[i].strip() else "" for i in perm[:1000]]
    assert rows == want
    datasets = pytest.importorskip("datasets")      # the official code's own shuffle, where installed
    ds = datasets.Dataset.from_dict({"text": [(r + "\n") if r.strip() else "" for r in raw]})
    assert list(ds.shuffle(seed=42).select(range(1000))["text"]) == rows


def test_seed_windows():
    assert seed_windows(1000) == [(0, 1000)]                       # one short window, last 512 scored
    assert seed_windows(3000) == [(0, 2560)]                       # 3000 → 2560 usable; ends there
    assert seed_windows(3100) == [(0, 2560), (512, 3072)]
    w = seed_windows(10000)
    assert len(w) == 15 and w[0] == (0, 2560) and w[-1] == (7168, 9728)
    assert all(e - b == 2560 and b % 512 == 0 for b, e in w)


class _BosCharTok(CharTok):
    """Adds a BOS id when special tokens are asked for (as Llama's tokenizer does)."""

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        r = super().__call__(text)
        ids = ([self.bos_token_id] if add_special_tokens else []) + r.input_ids
        r.input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return r


@pytest.mark.usefixtures("one_thread")
def test_seed_perplexity_is_the_mean_of_window_losses():
    """Against transformers' own loss with labels masked to the last 512 tokens of each window (the
    official script's ``outputs.loss``), averaged over windows, on a tiny model."""
    model = tiny_model("llama", max_position_embeddings=4096).eval()
    tok = _BosCharTok()
    text = _rows_text(400)
    res = perplexity(model, tok, text, protocol="seed", max_tokens=4000)
    body = "".join(r + "\n\n" for r in seed_rows(text))
    ids = tok(body, return_tensors="pt").input_ids[0][:4000]
    assert int(ids[0]) == tok.bos_token_id
    losses = []
    with torch.no_grad():
        for b, e in seed_windows(ids.numel()):
            x = ids[b:e].unsqueeze(0)
            labels = x.clone()
            labels[:, :-SEED_STRIDE] = -100
            losses.append(float(model(x, labels=labels).loss))
    assert len(losses) == res.windows == 3
    assert res.perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert res.protocol == "seed" and res.tokens == 3 * SEED_STRIDE and res.context == 2560
    plain = perplexity(model, tok, text, max_tokens=4000)
    assert plain.protocol == "windows" and plain.perplexity != pytest.approx(res.perplexity, rel=1e-3)
    with pytest.raises(InvalidArgument, match="protocol"):
        perplexity(model, tok, text, protocol="sliding")


# ---- presets --------------------------------------------------------------------------------------

SEED_PRESETS = ("llama2-7b", "llama3-8b", "qwen2.5-7b", "phi4")


@pytest.mark.parametrize("name", SEED_PRESETS)
def test_seed_presets_select_the_seed_protocol(name):
    p = load_preset(name)
    assert p.protocol() == {"allocation.error": "seed", "allocation.step_norm": "seed",
                            "eval.ppl_protocol": "seed", "dtype": "float16", "eval.batch_size": 8}


@pytest.mark.parametrize("name", ["smollm2-quick", "smollm2-full"])
def test_other_presets_keep_the_defaults(name):
    p = load_preset(name)
    assert p.allocation.error == "wina" and p.allocation.step_norm == "wina"
    assert p.eval.ppl_protocol == "windows"


def test_protocol_keys_are_validated():
    base = {"model": "smollm2-135m", "eval": {"tasks": ["piqa"]}, "variants": [{"method": "teal"}]}
    p = parse_preset({**base, "allocation": {"error": "seed", "step_norm": "seed"},
                      "eval": {"tasks": ["piqa"], "ppl_protocol": "seed"}}, name="x")
    assert (p.allocation.error, p.allocation.step_norm, p.eval.ppl_protocol) == ("seed", "seed", "seed")
    for table, key, bad in (("allocation", "error", "l1"), ("allocation", "step_norm", "q_proj"),
                            ("eval", "ppl_protocol", "sliding")):
        doc = {**base, table: {**base.get(table, {}), key: bad}}
        with pytest.raises(PresetError, match=rf"{table}\.{key}: must be one of"):
            parse_preset(doc, name="x")


# ---- what a results file records ----------------------------------------------------------------

@pytest.mark.usefixtures("one_thread")
def test_results_record_the_corrections_and_the_protocol(tmp_path):
    from wina.results import make_wina_block
    from wina.sparsify import sparsify
    from wina.transform import transform
    model = tiny_model("llama", tie_word_embeddings=True)
    dense = make_wina_block(model_id="tiny", model=model)["seed_fidelity"]
    assert dense["corrections"] == {"exact_transform": False, "untied_embeddings": False,
                                    "live_column_topk": False, "measured_sparsity_all_positions": True}
    assert dense["protocol"] == {"dtype": "float32"}
    transform(model)                                   # GQA: k_proj gets dead columns; ties are cut
    sp = sparsify(model, "teal", 0.5)
    block = make_wina_block(model_id="tiny", sparsifier=sp, perplexity={"protocol": "seed"})["seed_fidelity"]
    assert block["corrections"] == {"exact_transform": True, "untied_embeddings": True,
                                    "live_column_topk": True, "measured_sparsity_all_positions": True}
    assert block["protocol"]["ppl_protocol"] == "seed"
    sp.remove()
    plan = calibrate(model, CharTok(), method="teal", source="random", samples=2, seq_len=32,
                     out=tmp_path / "plan")
    allocate(model, CharTok(), plan, step=0.3, max_sparsity=0.5, error="seed")
    block = make_wina_block(model_id="tiny", model=model, plan=str(tmp_path / "plan"))["seed_fidelity"]
    assert block["protocol"]["allocation_error"] == "seed"
    assert block["protocol"]["allocation_step_norm"] == "wina"


@pytest.mark.parametrize("name", ["llama2-7b", "llama3-8b", "qwen2.5-7b", "phi4"])
def test_seed_presets_dry_run_shows_the_seed_protocol(name):
    from typer.testing import CliRunner
    from wina.cli import app
    res = CliRunner().invoke(app, ["run", name, "--dry-run"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("protocol:"))
    for want in ("allocation.error=seed", "allocation.step_norm=seed", "eval.ppl_protocol=seed", "dtype=float16"):
        assert want in line, line
