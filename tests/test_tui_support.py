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


async def start_calibration(app, pilot, **greedy):
    """Setup form: a greedy allocation (:func:`set_greedy`'s options), then ctrl+b; the calibrate screen."""
    set_greedy(app, **greedy)
    await pilot.pause()
    await pilot.press("ctrl+b")
    return app.calibrate_screen


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

pytestmark = pytest.mark.usefixtures("empty_cwd")         # conftest: the TUI lists ./runs too


@pytest.fixture
def torch_one_thread():
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _pca_plan(out: Path, rotation: str = "pca") -> Path:
    from wina import api
    api.calibrate(tiny_loaded(), out, api.Calibration(method="wina", transform=True, rotation=rotation,
                                                      source="random", samples=2, seq_len=32))
    return out


@pytest.mark.parametrize("rotation", ["pca", "pca-block"])
def test_session_prepares_a_pca_plan_through_the_api(tmp_path, torch_one_thread, rotation):
    """A plan calibrated with a pca rotation: the session leaves the transform to api.apply (the
    plan's own rotation); a model that carries another transform is loaded again, not refused."""
    from wina import api
    from wina_tui.state import Session, Settings
    plan = _pca_plan(tmp_path / "pca", rotation)
    s = Session(tiny_loader, state_dir=tmp_path / "state")
    settings = Settings(model="tiny", options=api.SparseOptions(method="wina", sparsity=0.5, transform=True))
    s.ensure_loaded("tiny", True)
    assert s.prepare(settings, plan_path=plan) is not None
    assert s.loaded.model._wina_transform.rotation == rotation
    assert s.applied.options.plan == str(plan)
    first = s.loaded
    s.prepare(settings)                                 # uniform top-k with the (svd) transform
    assert s.loaded is not first and s.loaded.model._wina_transform.rotation == "svd"
    s.prepare(settings, plan_path=plan)                 # and the pca plan again
    assert s.loaded.model._wina_transform.rotation == rotation and s.sparsifier is not None


def _app(tmp_path: Path, **kw):
    kw.setdefault("max_new_tokens", 4)
    return tiny_app(tmp_path, results_dir=tmp_path / "runs", **kw)


# --- the wikitext calibration source needs its data folder -------------------------------------------

async def test_wikitext_source_is_offered_only_with_its_data_folder(tmp_path, monkeypatch, torch_one_thread):
    from textual.widgets import Input, Label, Static
    empty = tmp_path / "empty-data"
    empty.mkdir()
    monkeypatch.setenv("WINA_DATA", str(empty))
    app = _app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        setup = app.setup_screen
        src = setup.query_one("#calib-source", Input)
        assert "wikitext" not in src.placeholder.split("(")[0] and "no data folder" in src.placeholder
        set_greedy(app, source="wikitext")
        await pilot.pause()
        err = str(setup.query_one("#err-calib-source", Label).render())
        assert "wikitext2/wiki.test.raw" in err and "not found" in err
        await pilot.press("ctrl+b")                     # refused, with the reason
        await pilot.pause()
        assert app.calibrate_screen.state == "idle"
    (tmp_path / "data" / "wikitext2").mkdir(parents=True)
    (tmp_path / "data" / "wikitext2" / "wiki.test.raw").write_text(" = T = \n text \n", encoding="utf-8")
    monkeypatch.setenv("WINA_DATA", str(tmp_path / "data"))
    app = _app(tmp_path / "second")
    async with app.run_test(size=SIZE) as pilot:
        setup = app.setup_screen
        assert setup.query_one("#calib-source", Input).placeholder == "self | wikitext | path"
        set_greedy(app, source="wikitext")
        await pilot.pause()
        assert not setup.query_one("#err-calib-source", Label).has_class("-shown")
        summary = str(setup.query_one("#summary", Static).render())
        assert "calibrate on wikitext" in summary and "evaluation text" in summary


# --- damaged results files -----------------------------------------------------------------------------

def _results_file(path: Path, **over) -> Path:
    wina = {"schema": 1, "model": "tiny", "method": "dense", "transform": False, "allocation": None,
            "nominal_sparsity": 0.0, "measured_sparsity": 0.0, "flops": None, "eval": {"limit": 20},
            "headline": {"piqa": {"metric": "acc_norm", "value": 0.6, "stderr": 0.01, "higher_is_better": True}},
            "perplexity": None, "date": "2026-11-29T00:00:00+00:00", "versions": {}, "machine": {}}
    wina.update(over)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"wina": wina}), encoding="utf-8")
    return path


async def test_a_damaged_results_file_is_one_notice_and_listed_as_damaged(tmp_path, monkeypatch, torch_one_thread):
    from textual.widgets import DataTable, SelectionList
    import wina.api
    from wina_tui.screens.load_runs import LoadRunsScreen
    runs = tmp_path / "runs"
    good = _results_file(runs / "dense.json")
    odd = _results_file(runs / "odd.json", method="wina", nominal_sparsity=0.5, headline={},
                        perplexity={"perplexity": "n/a"})     # read, but no number to show
    broken = runs / "broken.json"
    broken.write_text('{"wina": {"schema": 1, "model"', encoding="utf-8")
    app = _app(tmp_path, start="evaluate")
    notices: list[tuple[str, str]] = []
    async with app.run_test(size=SIZE) as pilot:
        real = app.notify
        app.notify = lambda msg, *a, severity="information", **kw: (notices.append((str(msg), severity)),
                                                                     real(msg, *a, severity=severity, **kw))
        ev = app.evaluate_screen
        await pilot.pause()
        ev.load_paths([str(good), str(odd), str(broken)])        # no exception
        await pilot.pause()
        # a file the reader lets through but the table cannot show: the same single notice
        real_load = wina.api.load_run
        monkeypatch.setattr(wina.api, "load_run", lambda p: wina.api.Run(Path(p), json.loads(
            Path(p).read_text())) if Path(p).name == "odd.json" else real_load(p))
        ev.load_paths([str(good), str(odd)])
        monkeypatch.setattr(wina.api, "load_run", real_load)
        await pilot.pause()
        errors = [m for m, sev in notices if sev == "error"]
        assert len(errors) == 3, notices                          # one each time for odd and broken
        assert "damaged results file" in errors[-1] and "odd.json" in errors[-1]
        assert any("odd.json" in m for m in errors) and any("broken.json" in m for m in errors)
        assert [r.path.name for r in ev.runs] == ["dense.json"]
        assert ev.query_one("#results", DataTable).row_count == 1

        ev.action_load_runs()
        await wait_for(pilot, lambda: isinstance(app.screen, LoadRunsScreen)
                       and bool(app.screen.query(SelectionList)), timeout=10)
        browser = app.screen
        assert set(browser.damaged) == {str(odd), str(broken)}
        assert "not a JSON results file" in browser.damaged[str(broken)]
        assert str(tmp_path) not in browser.damaged[str(broken)]     # one short line
        sel = browser.query_one(SelectionList)
        options = [sel.get_option_at_index(i) for i in range(sel.option_count)]
        listed = {o.value: o for o in options}
        assert set(listed) == {str(good), str(odd), str(broken)}
        assert listed[str(broken)].disabled and not listed[str(good)].disabled
        assert "damaged" in str(listed[str(broken)].prompt)
        await pilot.press("ctrl+a")
        await pilot.pause()
        browser._load()                                            # the damaged ones are not loaded
        await pilot.pause()
        assert [r.path.name for r in ev.runs] == ["dense.json"]


# --- leaving in every state: ctrl+q (Pilot) and SIGINT (the real process) ------------------------------

def _hold(monkeypatch, module, name: str, ready: threading.Event) -> None:
    """Replace ``module.name`` with a long step that only notices its cancel token (a greedy step or
    an evaluation chunk that takes long): ``ready`` is set once it holds."""
    def held(*a, cancel=None, **kw):
        ready.set()
        t0 = time.monotonic()
        while not (cancel is not None and cancel.cancelled) and time.monotonic() - t0 < 30:
            time.sleep(0.01)
        cancel.check()
    monkeypatch.setattr(module, name, held)


async def _confirm_quit(app, pilot, question: str) -> float:
    """ctrl+q asks while long work runs; a second ctrl+q answers yes. Returns the time of the answer."""
    from wina_tui.screens.confirm import ConfirmScreen
    await pilot.press("ctrl+q")
    await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), timeout=5)
    assert question in app.screen.question
    t0 = time.perf_counter()
    await pilot.press("ctrl+q")
    return t0


async def test_quit_while_allocating_asks_then_exits_within_2s(tmp_path, monkeypatch, torch_one_thread):
    import wina.allocate
    ready = threading.Event()
    _hold(monkeypatch, wina.allocate, "allocate", ready)
    app = _app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        cal = await start_calibration(app, pilot)
        await wait_for(pilot, lambda: ready.is_set() and cal.phase == "allocation")
        t0 = await _confirm_quit(app, pilot, "allocation running: quit anyway?")
    assert app.wait_idle(2.0), "the allocation worker still holds the model"
    assert time.perf_counter() - t0 < 2.0
    assert cal.cancel.cancelled
    assert json.loads((tmp_path / "config" / "settings.json").read_text())["setup"]["allocation"] == "layer"


async def test_quit_while_evaluating_asks_then_exits_within_2s(tmp_path, monkeypatch, torch_one_thread):
    import wina.api
    ready = threading.Event()
    _hold(monkeypatch, wina.api, "evaluate", ready)
    app = _app(tmp_path, start="evaluate")
    async with app.run_test(size=SIZE) as pilot:
        ev = app.evaluate_screen
        await pilot.pause()
        assert ev.action_run()
        await wait_for(pilot, ready.is_set)
        t0 = await _confirm_quit(app, pilot, "evaluation running: quit anyway?")
    assert app.wait_idle(2.0), "the evaluation worker still holds the model"
    assert time.perf_counter() - t0 < 2.0
    assert ev.cancel.cancelled
    assert (tmp_path / "config" / "settings.json").exists()


async def test_quit_while_the_model_loads_exits_within_2s(tmp_path, torch_one_thread):
    """A model load has no cancel check: ctrl+q does not ask, the app exits at once (run_app then
    ends the process without the load, see the SIGINT test)."""
    loading, release = threading.Event(), threading.Event()

    def slow_loader(spec):
        loading.set()
        release.wait(30)
        return tiny_loader(spec)
    app = _app(tmp_path)
    app.session.loader = slow_loader
    try:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+g")                 # uniform top-k: load, prepare, chat
            await wait_for(pilot, lambda: loading.is_set() and app.session.busy == "loading")
            t0 = time.perf_counter()
            await pilot.press("ctrl+q")                 # a load does not ask
        assert time.perf_counter() - t0 < 2.0
        assert app.quitting and (tmp_path / "config" / "settings.json").exists()
    finally:
        release.set()


QUIT_CHILD = r"""
import sys, time
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_tui_support import tiny_app
from wina_tui.app import run_app

def stuck(*a, **kw):                       # a long op that never reaches a cancel check
    Path({ready!r}).write_text("held")
    time.sleep(600)

tmp = Path({tmp!r})
stage = {stage!r}
app = tiny_app(tmp, handle_signals=True, results_dir=tmp / "runs",
               start="calibrate" if stage == "allocation" else "setup")
if stage == "allocation":
    import wina.allocate
    wina.allocate.allocate = stuck
    def go():
        s = app.session.settings
        app.calibrate_screen.start(replace(s, allocation="layer", calib_source="random"))
elif stage == "evaluation":
    import wina.api
    wina.api.evaluate = stuck
    go = app._run_eval
else:                                      # the model load
    app.session.loader = stuck
    go = lambda: app._from_setup("chat")
app.call_later(lambda: app.set_timer(0.3, go))
code = run_app(app, headless=True)
print("exited", code, flush=True)
"""


def signal_child(code: str, tmp_path: Path, sig, what: str):
    """Start the headless app process ``code`` (it touches ``tmp_path/"ready"`` once its worker is
    stuck), send it ``sig`` and wait for it: (seconds until it ended, exit code, stdout, stderr)."""
    ready = tmp_path / "ready"
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
    try:
        t0 = time.monotonic()
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - t0 < 120, f"the child never reached {what}"
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
        return time.monotonic() - t0, proc.returncode, out, err
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("stage", ["allocation", "evaluation", "model load"])
def test_sigint_ends_the_process_within_2s(tmp_path, stage):
    """The real (headless) process with a worker stuck in an op that never checks its token: SIGINT
    (as SIGTERM and SIGHUP) cancels, saves the settings, and the process ends within 2 s."""
    code = QUIT_CHILD.format(tests=str(Path(__file__).parent), ready=str(tmp_path / "ready"), tmp=str(tmp_path),
                             stage=stage)
    elapsed, rc, out, err = signal_child(code, tmp_path, signal.SIGINT, f"the {stage}")
    assert elapsed < 2.0, (elapsed, err[-2000:])
    assert rc == 0, err[-2000:]
    assert "exited" not in out                          # ended by run_app without waiting for the worker
    assert "KeyboardInterrupt" not in err
    assert (tmp_path / "config" / "settings.json").exists()
