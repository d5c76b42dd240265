"""The fault suite: every class of fault a user can meet ends as one red line and exit code 2, never
"internal error", and leaves nothing half-written, stale or lost on disk. Each test names the fault,
the command, and what the line must say. Tiny random Llama (tests/test_cli.py), no downloads."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from pathlib import Path

import pytest

import wina.errors

from test_cli import invoke, ok, text_file, tiny, user_error  # noqa: F401 (fixtures)
from test_runner import tiny_preset  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def plan(tiny, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults-plan") / "plan"
    ok(invoke("calibrate", tiny, "--method", "teal", "--data", text_file, "--samples", "2",
              "--seq-len", "32", "--out", out))
    return out


def _no_leftovers(folder: Path) -> None:
    bad = [p for p in folder.rglob("*") if p.suffix == ".tmp" or p.name.startswith(".wina-write-test")]
    assert bad == [], bad


# --- output locations ------------------------------------------------------------------------------

def test_out_is_an_existing_file_fails_before_loading(tiny, tmp_path, monkeypatch):
    f = tmp_path / "plan"
    f.write_text("not a folder")
    import wina.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(wina.models, "load", no_load)
    user_error(invoke("calibrate", tiny, "--out", f), "existing file")
    assert f.read_text() == "not a folder"


def test_model_cache_that_cannot_be_made(tmp_path, monkeypatch):
    """The GGUF's conversion cache (and its lock) under a file: one line, exit 2, before any conversion."""
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("WINA_CACHE", str(tmp_path / "file" / "wina"))
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    user_error(invoke("ppl", "smollm2-135m", "--text", text), "a part of the path is a file")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("code,needle", [(errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied")])
def test_output_folder_not_writable(tiny, text_file, tmp_path, monkeypatch, code, needle):
    import wina.files

    def refuse(*a, **k):
        raise OSError(code, os.strerror(code), str(tmp_path / "runs"))

    monkeypatch.setattr(wina.files.tempfile, "mkstemp", refuse)
    user_error(invoke("eval", tiny, "--ppl-text", text_file, "--output", tmp_path / "runs" / "r.json"), needle)
    assert not (tmp_path / "runs" / "r.json").exists()


def test_disk_full_while_writing_leaves_nothing(tiny, text_file, tmp_path, monkeypatch):
    import wina.files
    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, *a, **k):
        return Full(real(fd, *a, **k))

    out = tmp_path / "runs"
    ok(invoke("eval", tiny, "--ppl-text", text_file, "--ppl-max-tokens", "600", "--output", out / "first.json"))
    monkeypatch.setattr(wina.files.os, "fdopen", fdopen)
    line = user_error(invoke("eval", tiny, "--ppl-text", text_file, "--ppl-max-tokens", "600",
                            "--output", out / "first.json"), "no space left")
    assert str(out / "first.json") in line and "--out " not in line          # the file named
    monkeypatch.undo()
    json.loads((out / "first.json").read_text())              # the earlier file is intact
    _no_leftovers(tmp_path)


def test_files_get_the_users_umask(tiny, text_file, tmp_path):
    old = os.umask(0o022)
    try:
        ok(invoke("eval", tiny, "--ppl-text", text_file, "--ppl-max-tokens", "600", "--output", tmp_path / "r.json"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644


# --- inputs ------------------------------------------------------------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: what it guards must be refused before the model loads."""
    import wina.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(wina.models, "load", no_load)


def test_binary_file_is_not_text(tiny, tmp_path, no_model_load):
    b = tmp_path / "blob.txt"
    b.write_bytes(bytes(range(256)) * 8)
    user_error(invoke("ppl", tiny, "--text", b), "not UTF-8")
    user_error(invoke("eval", tiny, "--ppl-text", b, "--output", tmp_path / "r.json"), "not UTF-8")
    user_error(invoke("calibrate", tiny, "--data", b, "--samples", "1", "--seq-len", "16",
                      "--out", tmp_path / "p"), "not UTF-8")
    j = tmp_path / "blob.jsonl"
    j.write_bytes(b'{"text": "fine"}\n\xff\xfe\n')
    user_error(invoke("calibrate", tiny, "--data", j, "--out", tmp_path / "p"), "not UTF-8")
    j.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    user_error(invoke("calibrate", tiny, "--data", j, "--out", tmp_path / "p"), "blob.jsonl:2", "not valid JSON")
    assert not (tmp_path / "p").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("args,needles", [
    (("eval", "--ppl-protocol", "bogus"), ("bogus", "windows or seed")),
    (("eval", "--ppl-max-tokens", "100"), ("ppl_max_tokens", "at least 512", "100")),
    (("eval", "--ppl-max-tokens", "512", "--ppl-protocol", "seed"), ("ppl_max_tokens", "at least 513")),
    (("eval", "--num-fewshot", "-1"), ("num_fewshot", "-1")),
    (("eval", "--batch-size", "0"), ("batch_size", "at least 1")),
    (("ppl", "--protocol", "bogus"), ("bogus", "windows or seed")),
    (("ppl", "--max-tokens", "100"), ("max_tokens", "at least 512")),
    (("ppl", "--max-tokens", "100", "--context", "64"), None),
    (("ppl", "--context", "1"), ("context", "at least 2")),
])
def test_evaluation_settings_are_checked_before_the_model_loads(tiny, text_file, tmp_path, no_model_load,
                                                                args, needles):
    cmd, *rest = args
    text = ("--ppl-text",) if cmd == "eval" else ("--text",)
    res = invoke(cmd, tiny, *text, text_file, *rest, *(("--output", tmp_path / "r.json") if cmd == "eval" else ()))
    if needles is None:                          # a valid budget gets as far as loading the model
        assert "was loaded before the input was checked" in res.stderr, res.stderr
        return
    user_error(res, *needles)
    assert not (tmp_path / "r.json").exists()


def test_unknown_or_absent_device_is_one_line(tiny, text_file, tmp_path, no_model_load):
    import torch
    user_error(invoke("ppl", tiny, "--text", text_file, "--device", "tpu"), "unknown device 'tpu'")
    user_error(invoke("calibrate", tiny, "--device", "gpu0", "--out", tmp_path / "p"), "unknown device")
    if not torch.cuda.is_available():
        user_error(invoke("ppl", tiny, "--text", text_file, "--device", "cuda"), "device 'cuda'", "--device cpu")
        user_error(invoke("chat", tiny, "--prompt", "hi", "--device", "cuda:1"), "device 'cuda:1'")
    assert not (tmp_path / "p").exists()


def test_values_that_mean_nothing_are_refused(tiny, text_file, tmp_path, no_model_load):
    user_error(invoke("--threads", "0", "models"), "--threads")
    user_error(invoke("ppl", tiny, "--text", text_file, "--method", "dense", "--sparsity", "0.5"),
               "--method dense", "drop one")
    user_error(invoke("ppl", tiny, "--text", tmp_path), "is a folder")
    user_error(invoke("chat", tiny, "--prompt", "  "), "--prompt is empty")
    user_error(invoke("bench", "tiny-llama", "--layers", "0"), "--layers")


def test_model_folder_without_a_tokenizer(tiny, text_file, tmp_path):
    import shutil
    folder = tmp_path / "notok"
    folder.mkdir()
    for f in tiny.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    user_error(invoke("ppl", folder, "--text", text_file), "no tokenizer files")


def test_preset_on_a_device_that_is_not_here_leaves_no_folder(tiny_preset, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    f = tmp_path / "gpu.toml"
    f.write_text(tiny_preset.read_text().replace('device = "cpu"', 'device = "cuda"'), encoding="utf-8")
    (tmp_path / "text.txt").write_text((tiny_preset.parent / "text.txt").read_text())
    res = ok(invoke("run", f, "--out", tmp_path / "out", "--dry-run"))     # a dry run shows it
    assert "device: cuda: NOT AVAILABLE here" in res.stdout
    user_error(invoke("run", f, "--out", tmp_path / "out"), "device 'cuda'")
    assert not (tmp_path / "out").exists()


def test_empty_perplexity_text_is_refused_before_the_model_loads(tiny, tmp_path, no_model_load):
    e = tmp_path / "empty.txt"
    e.write_text("  \n\n", encoding="utf-8")
    user_error(invoke("eval", tiny, "--ppl-text", e, "--output", tmp_path / "r.json"), "is empty")
    assert not (tmp_path / "r.json").exists()


def test_chat_text_that_is_not_utf8(tiny, no_model_load):
    """Bytes that are not UTF-8 reach Python as lone surrogates (argv, a pipe): refused in one line."""
    user_error(invoke("chat", tiny, "--prompt", "hi \udcff\udcfe"), "--prompt", "not UTF-8", "character 3")
    user_error(invoke("chat", tiny, "--prompt", "hi", "--system", "\udcff"), "--system", "not UTF-8")


def test_chat_session_refuses_text_that_is_not_utf8_and_keeps_the_conversation(tiny):
    from wina import api
    from wina.errors import InvalidArgument
    loaded = api.load(str(tiny), device="cpu")
    s = api.ChatSession(loaded.model, loaded.tokenizer, max_new_tokens=2, backend="transformers")
    s.send("hello")
    before = list(s.messages)
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        s.send("bad \udcff")
    assert s.messages == before
    assert s.send("again").tokens >= 1
    with pytest.raises(InvalidArgument, match="system prompt"):
        api.ChatSession(loaded.model, loaded.tokenizer, system="\udcff")


def test_wikitext_calibration_without_a_data_folder(tiny, tmp_path, monkeypatch, no_model_load):
    import wina.data
    monkeypatch.delenv("WINA_DATA", raising=False)
    monkeypatch.delenv("WINA_DATA_DIR", raising=False)
    monkeypatch.setattr(wina.data, "candidates", lambda: [])
    user_error(invoke("calibrate", tiny, "--data", "wikitext", "--out", tmp_path / "p"), "wikitext", "WINA_DATA")
    assert not (tmp_path / "p").exists()


def test_failed_calibration_leaves_no_empty_plan_folder(tiny, tmp_path, monkeypatch):
    """A calibration that fails on its source after the model loaded (here: the text the model
    writes) leaves no plan folder holding only its lock file."""
    import wina.calibrate
    from wina.errors import DataError

    def fail(*a, **k):
        raise DataError("the calibration text could not be made")

    monkeypatch.setattr(wina.calibrate, "calibration_ids", fail)
    user_error(invoke("calibrate", tiny, "--samples", "1", "--seq-len", "16", "--out", tmp_path / "p"),
               "could not be made")
    assert not (tmp_path / "p").exists()
    (tmp_path / "q").mkdir()                          # a folder that was there before is left alone
    user_error(invoke("calibrate", tiny, "--samples", "1", "--seq-len", "16", "--out", tmp_path / "q"))
    assert (tmp_path / "q").is_dir()


def test_negative_max_tokens_is_refused(tiny, text_file):
    user_error(invoke("ppl", tiny, "--text", text_file, "--max-tokens", "-5"), "max_tokens")
    user_error(invoke("eval", tiny, "--ppl-text", text_file, "--ppl-max-tokens", "-5"), "max_tokens")


def test_preset_that_is_not_utf8(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_bytes(b'name = "x"\nmodel = "\xff\xfe"\n')
    user_error(invoke("run", p, "--dry-run"), "bad.toml")


def test_plan_json_with_wrong_types(plan, tiny, tmp_path):
    import shutil
    bad = tmp_path / "plan"
    shutil.copytree(plan, bad)
    meta = json.loads((bad / "plan.json").read_text())
    meta["n_layers"] = "two"
    (bad / "plan.json").write_text(json.dumps(meta))
    user_error(invoke("eval", tiny, "--plan", bad, "--sparsity", "0.5", "--ppl-text", bad / "plan.json"),
               "wrong type")


def test_calibration_text_edited_after_the_plan_is_refused(tiny, text_file, tmp_path):
    """The same command on an edited text is another calibration: refused, the plan kept as it was."""
    text = tmp_path / "cal.txt"
    text.write_text(text_file.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "plan"
    cmd = ("calibrate", tiny, "--method", "teal", "--data", text, "--samples", "2", "--seq-len", "32", "--out", out)
    ok(invoke(*cmd))
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".wina-lock"}
    ok(invoke(*cmd))                                  # unchanged text: the finished plan stands
    text.write_text("A new first sentence. " + text.read_text(encoding="utf-8"), encoding="utf-8")
    user_error(invoke(*cmd), "other arguments", "the text file has changed")
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".wina-lock"}
    assert after == before


def test_edited_plan_is_refused(plan, tiny, text_file, tmp_path):
    """A plan whose method was edited to dense used to give dense numbers labelled 50 %."""
    import shutil
    bad = tmp_path / "plan"
    shutil.copytree(plan, bad)
    meta = json.loads((bad / "plan.json").read_text())
    meta["method"] = "dense"
    (bad / "plan.json").write_text(json.dumps(meta))
    user_error(invoke("eval", tiny, "--plan", bad, "--sparsity", "0.5", "--ppl-text", text_file), "edited")


def test_results_file_with_wrong_types(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"results": {}, "wina": {"method": 5, "sparsity": "half", "headline": []}}))
    user_error(invoke("compare", f))


def test_results_file_of_a_newer_wina(tmp_path):
    """A results file a newer wina wrote: say so and to upgrade, not 'must be an integer in [1, 1]'."""
    from wina.results import SCHEMA
    f = _results_file(tmp_path)
    data = json.loads(f.read_text())
    data["wina"]["schema"] = SCHEMA + 1
    f.write_text(json.dumps(data))
    line = user_error(invoke("compare", f))
    assert line == (f"error: {f} was written by a newer wina (wina.schema {SCHEMA + 1}; this version reads "
                    f"schema {SCHEMA}): upgrade wina to read it"), line


def test_compare_given_a_run_folder_points_at_its_runs(tmp_path):
    """`wina compare R` on a `wina run` folder read its preset.json as a results file ('has no
    'wina' block'); it names the folder to compare."""
    run = tmp_path / "R"
    (run / "runs").mkdir(parents=True)
    _results_file(run / "runs")
    (run / "preset.json").write_text("{}")
    (run / "steps.json").write_text("{}")
    line = user_error(invoke("compare", run))
    assert line == f"error: {run} is a wina run folder: compare {run / 'runs'}", line
    ok(invoke("compare", run / "runs"))


def test_output_folder_that_refuses_new_files_is_named_once(tiny, tmp_path, monkeypatch, no_model_load):
    """'cannot write R: R: operation not permitted' named the folder twice."""
    import wina.files
    out = tmp_path / "plan"
    out.mkdir()

    def refuse(*a, **k):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(out))

    monkeypatch.setattr(wina.files.tempfile, "mkstemp", refuse)
    line = user_error(invoke("calibrate", tiny, "--out", out))
    assert line == f"error: cannot write {out}: operation not permitted", line
    line = user_error(invoke("calibrate", tiny, "--out", out / "sub"))          # the folder above: both named
    assert line == f"error: cannot write {out / 'sub'}: {out}: operation not permitted", line


def _results_file(folder: Path) -> Path:
    """A real results file, as `wina eval` writes it (lm-eval part reduced to its results)."""
    from wina.evaluate import headlines
    from wina.results import make_record, make_wina_block, write_run
    lm = {"results": {"piqa": {"alias": "piqa", "acc_norm,none": 0.61, "acc_norm_stderr,none": 0.01}}}
    w = make_wina_block(model_id="tiny", method="wina", sparsity=0.5, transform=True, allocation="greedy",
                        measured=0.49, headline=headlines(lm, ["piqa"]),
                        eval_info={"tasks": ["piqa"], "limit": 10, "data_dir": "/data"},
                        perplexity={"file": "wiki.test.raw", "perplexity": 40.0, "tokens": 1000})
    return write_run(make_record(lm, w), folder / "r.json").path


@pytest.mark.parametrize("key,value", [
    ("perplexity.perplexity", "big"), ("perplexity.perplexity", [1]), ("perplexity.perplexity", -3.0),
    ("perplexity.tokens", 1.5), ("measured_sparsity", 1e9), ("measured_sparsity", -0.2),
    ("nominal_sparsity", 2), ("nominal_sparsity", "half"), ("headline.piqa.value", 1.7),
    ("headline.piqa.value", "x"), ("headline.piqa.stderr", -1), ("headline.piqa", 3),
    ("headline.piqa.higher_is_better", "yes"), ("method", "sparse"), ("transform", "yes"),
    ("eval.limit", -5), ("eval.tasks", "piqa"), ("flops", [1]), ("schema", 99)])
def test_damaged_value_in_a_results_file(tmp_path, key, value):
    """A real results file with one value of the wrong type, or out of its range, nested or not:
    `wina compare` says which file and which key, one line, exit 2 (it used to be an internal
    error, or a measured sparsity of 100000000000.0 %)."""
    f = _results_file(tmp_path)
    ok(invoke("compare", f))
    data = json.loads(f.read_text())
    *parents, last = key.split(".")
    d = data["wina"]
    for k in parents:
        d = d[k]
    d[last] = value
    f.write_text(json.dumps(data))
    for args in ((), ("--markdown",)):
        line = user_error(invoke("compare", f, *args), f"wina.{key}")
        assert str(f) in line and "internal error" not in line


def test_truncated_weights(tiny, text_file, tmp_path):
    import shutil
    bad = tmp_path / "model"
    shutil.copytree(tiny, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    user_error(invoke("ppl", bad, "--text", text_file), "truncated or corrupt")


def test_pickle_that_is_not_plain_tensors_is_refused(tiny, text_file, tmp_path):
    import pickle
    import shutil
    bad = tmp_path / "model"
    shutil.copytree(tiny, bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Path("/etc")}))
    line = user_error(invoke("ppl", bad, "--text", text_file))
    assert "internal error" not in line


def test_messages_name_the_real_fault(tiny, text_file, tmp_path, no_model_load):
    """An existing file given as a model or a plan, and a folder that takes no files, each said as
    what it is (they read "model path not found", "plan.json is not valid JSON", "/proc: no such
    file or directory")."""
    user_error(invoke("ppl", text_file, "--text", text_file), str(text_file), "is a file, not a model")
    user_error(invoke("allocate", text_file), str(text_file), "is a file, not a plan")
    if Path("/proc/self").is_dir():
        user_error(invoke("eval", tiny, "--ppl-text", text_file, "--output", "/proc/foo.json"),
                   "/proc", "does not accept new files")


def test_remote_code_is_never_trusted():
    """Every from_pretrained call of the library and the benchmarks says trust_remote_code=False."""
    import ast
    repo = Path(__file__).resolve().parents[1]
    calls = []
    for f in sorted([*(repo / "wina").rglob("*.py"), *(repo / "bench").rglob("*.py")]):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                kws = {k.arg: k.value for k in node.keywords}
                explicit = isinstance(kws.get("trust_remote_code"), ast.Constant) and \
                    kws["trust_remote_code"].value is False
                via_kw = any(k.arg is None for k in node.keywords)         # **kw: checked below
                calls.append((f"{f.relative_to(repo)}:{node.lineno}", explicit or via_kw))
    assert calls and all(ok_ for _, ok_ in calls), [c for c, ok_ in calls if not ok_]
    src = (repo / "wina" / "models.py").read_text(encoding="utf-8")
    assert 'kw["trust_remote_code"] = False' in src          # the **kw of _from_dir_or_hub


# --- the network and missing data ---------------------------------------------------------------

def test_hub_model_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    user_error(invoke("eval", "someone/no-such-model", "--tasks", "piqa", "--limit", "5"),
               "no-such-model", "not in the Hugging Face cache")


def test_task_without_local_data_offline(tiny, monkeypatch):
    import wina.data
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WINA_DATA", raising=False)
    monkeypatch.delenv("WINA_DATA_DIR", raising=False)
    monkeypatch.setattr(wina.data, "candidates", lambda: [])
    user_error(invoke("eval", tiny, "--tasks", "winogrande", "--limit", "5"),
               "winogrande", "--data-dir")


def test_calibration_dataset_offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    user_error(invoke("calibrate", tiny, "--data", "tatsu-lab/alpaca", "--out", tmp_path / "p"),
               "tatsu-lab/alpaca", "hub is off")


def test_shipped_subsets_serve_the_quick_tasks_offline(monkeypatch):
    import wina.data
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WINA_DATA", raising=False)
    monkeypatch.delenv("WINA_DATA_DIR", raising=False)
    monkeypatch.setattr(wina.data, "candidates", lambda: [])
    src = wina.data.resolve("auto", ["piqa", "arc_easy"], 100)
    assert src.kind == "shipped" and src.path == wina.data.SHIPPED_DIR
    from wina.tasks import read_docs
    assert len(read_docs("piqa", src.path)) == 100 and len(read_docs("arc_easy", src.path)) == 100
    with pytest.raises(wina.errors.DataError, match="piqa"):
        wina.data.resolve("auto", ["piqa"], 101)               # more than is shipped


def test_damaged_shipped_file_is_detected(tmp_path, monkeypatch):
    import shutil
    import wina.data
    copy = tmp_path / "data"
    shutil.copytree(wina.data.SHIPPED_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    f = copy / "piqa" / "valid-labels.lst"
    f.write_text(f.read_text().replace("0", "1", 1))
    monkeypatch.setattr(wina.data, "SHIPPED_DIR", copy)
    with pytest.raises(wina.errors.DataError, match="damaged"):
        wina.data.verify_shipped()


# --- concurrent writers and replacing finished work ---------------------------------------------

def test_second_writer_of_a_plan_is_refused_before_loading(plan, tiny, tmp_path, no_model_load):
    """The plan folder is locked before the model loads: a second calibrate or allocate into it is
    refused at once (the lock held by another thread here; tests below use two processes)."""
    import shutil
    from test_runner import held_by_another_thread
    out = tmp_path / "plan"
    shutil.copytree(plan, out)
    for cmd in (("calibrate", tiny, "--samples", "1", "--seq-len", "16", "--data", "random", "--out", out),
                ("allocate", out, "--model", tiny)):
        with held_by_another_thread(out):
            user_error(invoke(*cmd), "being written by process")


@contextlib.contextmanager
def _held_by_another_process(path: Path, file: bool = False):
    """``path`` (a folder, or with ``file`` a results file) held for writing by another process, as
    wina's writers hold it, and killed (SIGKILL: its lock goes with it) after; yields its pid."""
    import subprocess
    import sys
    code = ("import sys, time\nfrom wina.files import locked, locked_file\n"
            f"with {'locked_file' if file else 'locked'}(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _cut_short(plan: Path, out: Path, allocated: bool) -> Path:
    """A copy of ``plan`` as a writer stopped half-way leaves it: allocated one of two layers
    (``allocated``), or calibrated one of two."""
    import shutil
    from wina.plan_meta import SEAL, seal
    shutil.copytree(plan, out)
    if allocated:
        ok(invoke("allocate", out, "--step", "0.2", "--max-sparsity", "0.8"))
    meta = json.loads((out / "plan.json").read_text())
    meta["status"]["allocated_layers" if allocated else "calibrated_layers"] = 1
    meta[SEAL] = seal(meta)                             # as the library writes a partial plan
    (out / "plan.json").write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize("allocated", [True, False])
def test_partial_plan_that_another_process_is_writing_says_wait(plan, tiny, text_file, tmp_path, allocated):
    """`wina eval --plan` on a plan another process is still allocating (or calibrating) names that
    process and says to wait (it said to re-run allocate, which that process's lock then refused);
    once no process holds it, the partial plan says how to finish it."""
    p = _cut_short(plan, tmp_path / "plan", allocated)
    cmd = ("eval", tiny, "--plan", p, "--sparsity", "0.5", "--ppl-text", text_file, "--ppl-max-tokens", "512",
           "--output", tmp_path / "r.json")
    with _held_by_another_process(p) as pid:
        line = user_error(invoke(*cmd))
    assert line == f"error: plan {p} is being written by process {pid}; wait for it to finish", line
    finish = "re-run allocate" if allocated else "re-run calibrate"
    user_error(invoke(*cmd), "partial plan", finish)
    assert not (tmp_path / "r.json").exists()


def test_second_evaluation_into_one_results_file_is_refused_at_once(tiny, text_file, tmp_path, monkeypatch):
    """Two `wina eval --output same.json` at once both ran, the last one silently replacing the
    other's results: the second now stops before loading the model, naming the writer; the file is
    free again once that writer is gone (a lock it leaves behind when killed is taken over and
    removed)."""
    import wina.models
    out = tmp_path / "runs" / "same.json"
    cmd = ("eval", tiny, "--ppl-text", text_file, "--ppl-max-tokens", "512", "--output", out)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the results file was held")

    with _held_by_another_process(out, file=True) as pid, monkeypatch.context() as m:
        m.setattr(wina.models, "load", no_load)
        line = user_error(invoke(*cmd))
    assert line == f"error: results file {out} is being written by process {pid}; wait for it to finish " \
                   "or stop it", line
    assert not out.exists()
    ok(invoke(*cmd))
    assert sorted(p.name for p in out.parent.iterdir()) == ["same.json"]    # the lock went with its writer


def test_reallocation_keeps_the_finished_allocation_until_the_new_one_is_done(plan, tiny, tmp_path):
    """`wina allocate` with new settings on an allocated plan, interrupted: the old allocation is
    still there and usable; run again, the new one replaces it."""
    import shutil
    from wina import api
    from wina.errors import Cancelled
    from wina.events import CancelToken
    p = tmp_path / "plan"
    shutil.copytree(plan, p)
    ok(invoke("allocate", p, "--step", "0.2", "--max-sparsity", "0.8"))
    before = json.loads((p / "plan.json").read_text())["allocation"]
    loaded = api.load(str(tiny), device="cpu")
    cancel = CancelToken()

    def stop(ev):
        if ev.stage == "allocate" and ev.done >= 1:
            cancel.cancel()

    with pytest.raises(Cancelled):
        api.allocate(loaded, p, api.Allocation(step=0.1, max_sparsity=0.8), on_event=stop, cancel=cancel)
    assert json.loads((p / "plan.json").read_text())["allocation"] == before
    api.plan_info(p)
    from wina.plan import Plan
    assert Plan.load(p).allocated                                 # still whole and usable
    # given up (allocated again with the finished allocation's own settings): no layer is redone
    import wina.allocate as allocate_mod
    greedy = allocate_mod._greedy_layer
    layers = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(allocate_mod, "_greedy_layer", lambda *a, **k: layers.append(a[2]) or greedy(*a, **k))
        api.allocate(loaded, p, api.Allocation(step=0.2, max_sparsity=0.8))
    assert layers == [] and json.loads((p / "plan.json").read_text())["allocation"] == before
    assert not (tmp_path / "plan.allocating").exists()
    cancel = CancelToken()                                        # stopped again, then finished
    with pytest.raises(Cancelled):
        api.allocate(loaded, p, api.Allocation(step=0.1, max_sparsity=0.8), on_event=stop, cancel=cancel)
    api.allocate(loaded, p, api.Allocation(step=0.1, max_sparsity=0.8))
    assert json.loads((p / "plan.json").read_text())["allocation"]["step"] == 0.1
    assert not (tmp_path / "plan.allocating").exists() and not (tmp_path / "plan.replaced").exists()
    # the command says what it replaces: a finished allocation with other settings, named
    res = ok(invoke("allocate", p, "--step", "0.2", "--max-sparsity", "0.8"))
    said = " ".join((res.stdout + res.stderr).split())
    assert "replaces the finished allocation (step 0.1 → 0.2)" in said, said
    assert "replaces" not in " ".join(ok(invoke("allocate", p, "--step", "0.2", "--max-sparsity", "0.8")).stdout.split())


# --- no "internal error" for environment faults ---------------------------------------------------

def test_user_error_translates_environment_faults():
    from wina.errors import user_error as translate
    assert "permission denied" in str(translate(PermissionError(errno.EACCES, "x", "/a/b")))
    assert "no space left" in str(translate(OSError(errno.ENOSPC, "x", "/a/b")))
    assert "not UTF-8" in str(translate(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")))
    import requests
    msg = str(translate(requests.exceptions.ConnectionError("Couldn't reach 'baber/piqa' on the Hub")))
    assert "hub" in msg and "offline" in msg
    assert translate(ValueError("a bug")) is None


# --- crash and resume -------------------------------------------------------------------------------

# A `wina run` whose plan layers are saved as usual, each followed by a pause (argv[1] seconds): a
# window in which the test's SIGKILL lands inside a calibrate or allocate step, between two layers.
SLOWED_RUN = r"""
import sys, time
import wina.plan
PAUSE = float(sys.argv[1])
for name in ("save_layer_histograms", "save_layer_trajectory"):
    def slowed(self, i, _real=getattr(wina.plan.Plan, name)):
        _real(self, i)
        time.sleep(PAUSE)
    setattr(wina.plan.Plan, name, slowed)
from wina.cli import main
sys.argv = ["wina"] + sys.argv[2:]
main()
"""


def _run_cmd(preset: Path, out: Path, pause=None) -> list[str]:
    import sys
    if pause is None:
        return [sys.executable, "-m", "wina.cli", "run", str(preset), "--out", str(out)]
    return [sys.executable, "-c", SLOWED_RUN, str(pause), "run", str(preset), "--out", str(out)]


def _plan_status(plan_dir: Path) -> dict:
    try:
        return json.loads((plan_dir / "plan.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return {}


def _wait_for(proc, ready, what: str, timeout: float = 600) -> None:
    import time
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_mid_calibrate_and_mid_allocate_resumes_to_the_same_outputs(tiny_preset, tmp_path):
    """`wina run` killed with SIGKILL inside a calibration (one of two layers saved), run again and
    killed inside the allocation of the same plan, then run to the end: each rerun resumes the step
    where it stopped (the saved layers are not made again), and the plans (byte for byte), the
    comparison table and the results equal those of a run that was never interrupted."""
    import signal
    import subprocess
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    r = subprocess.run(_run_cmd(tiny_preset, clean), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    teal = crashed / "plans" / "teal"

    # 1. killed inside `calibrate teal`: layer 1 of 2 saved
    proc = subprocess.Popen(_run_cmd(tiny_preset, crashed, pause=10), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for(proc, lambda: _plan_status(teal).get("calibrated_layers", 0) >= 1, "a calibrated layer")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _plan_status(teal)["calibrated_layers"] == 1 and not (crashed / "compare.md").exists()
    hist0 = (teal / "histograms" / "layer_000.safetensors").stat().st_mtime_ns

    # 2. run again: the calibration resumes in place; killed inside `allocate teal`: layer 1 of 2
    log = tmp_path / "second.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_run_cmd(tiny_preset, crashed, pause=10), stdout=f, stderr=subprocess.STDOUT)
        _wait_for(proc, lambda: _plan_status(teal).get("allocated_layers", 0) >= 1, "an allocated layer")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    st = _plan_status(teal)
    assert st["calibrated_layers"] == 2 and st["allocated_layers"] == 1
    assert (teal / "histograms" / "layer_000.safetensors").stat().st_mtime_ns == hist0   # resumed, not remade
    assert not (crashed / "plans" / "teal.new").exists() and "rerun" not in log.read_text()
    traj0 = (teal / "trajectories" / "layer_000.safetensors").stat().st_mtime_ns

    # 3. run to the end: the allocation resumes too; everything equals the uninterrupted run
    r = subprocess.run(_run_cmd(tiny_preset, crashed), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rerun" not in r.stdout + r.stderr
    assert (teal / "trajectories" / "layer_000.safetensors").stat().st_mtime_ns == traj0

    def tensors(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "plans").rglob("*.safetensors"))}

    assert tensors(crashed) == tensors(clean) and len(tensors(clean)) > 4
    assert (crashed / "compare.md").read_bytes() == (clean / "compare.md").read_bytes()
    for name in ("dense.json", "teal-s25.json", "teal-s50.json", "wina-s25.json", "wina-s50.json"):
        a = json.loads((clean / "runs" / name).read_text())["wina"]
        b = json.loads((crashed / "runs" / name).read_text())["wina"]
        assert a["perplexity"]["perplexity"] == b["perplexity"]["perplexity"], name
        assert a["measured_sparsity"] == b["measured_sparsity"], name
    _no_leftovers(crashed)
    assert sorted(p.name for p in (crashed / "plans").iterdir()) == ["teal", "wina"]


@pytest.mark.slow
def test_two_processes_writing_one_run_folder(tiny_preset, tmp_path):
    """While one `wina run` writes a run folder (here inside its first calibration), a second
    `wina run` into the same folder, and a `wina calibrate` into its plan folder, stop at once with
    one line naming the first process; once that process is gone (SIGKILL), the lock is free."""
    import signal
    import subprocess
    import sys
    from wina.files import locked
    out = tmp_path / "out"
    teal = out / "plans" / "teal"
    first = subprocess.Popen(_run_cmd(tiny_preset, out, pause=120), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        _wait_for(first, lambda: _plan_status(teal).get("calibrated_layers", 0) >= 1, "a calibrated layer")
        second = subprocess.run(_run_cmd(tiny_preset, out), capture_output=True, text=True, timeout=300)
        model = tiny_preset.parent / "model"
        third = subprocess.run([sys.executable, "-m", "wina.cli", "calibrate", str(model), "--method", "teal",
                                "--data", str(tiny_preset.parent / "text.txt"), "--samples", "2",
                                "--seq-len", "32", "--out", str(teal)],
                               capture_output=True, text=True, timeout=300)
        assert first.poll() is None                   # still running: the others stopped at once
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    for res, what in ((second, f"run folder {out}"), (third, f"plan {teal}")):
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert lines[0] == f"error: {what} is being written by process {first.pid}; wait for it to finish " \
                           "or stop it", lines[0]
    assert _plan_status(teal)["calibrated_layers"] == 1          # the second writers changed nothing
    with locked(out), locked(teal):                              # a killed writer leaves no lock behind
        pass


def test_dry_run_says_whether_a_hub_model_can_be_had_here(monkeypatch):
    """A hub id in a preset: the dry run says whether the local cache holds it, and when it does not
    and the hub cannot be reached (offline, or no answer), that the run would fail, and what to do."""
    import wina.hub as hub
    from wina.api import load_preset
    from wina.runner import describe
    preset = load_preset("llama2-7b")
    monkeypatch.setattr(hub, "cached", lambda repo, filename="config.json": True)
    assert "in the local Hugging Face cache" in describe(preset, strict=False)["model"]
    monkeypatch.setattr(hub, "cached", lambda repo, filename="config.json": False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = describe(preset, strict=False)["model"]
    assert "NOT AVAILABLE here" in line and "HF_HUB_OFFLINE" in line and "local model folder" in line
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "reachable", lambda: False)
    assert "does not answer" in describe(preset, strict=False)["model"]
    monkeypatch.setattr(hub, "reachable", lambda: True)
    assert "downloaded from the hub when run" in describe(preset, strict=False)["model"]


def test_an_atomic_write_names_the_file_asked_for(tmp_path, monkeypatch):
    """A write that fails names the file it was asked to write (not its temporary name, not "a
    file"), and a path through a file says which part is the file."""
    from wina.errors import DataError, user_error as translate
    from wina.files import write_text
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="afile is a file, not a folder"):
        write_text(tmp_path / "afile" / "sub" / "x.json", "{}")

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".x.json.abc.tmp"))
    monkeypatch.setattr("wina.files.tempfile.mkstemp", refuse)
    with pytest.raises(OSError) as e:
        write_text(tmp_path / "x.json", "{}")
    assert e.value.filename == str(tmp_path / "x.json")
    assert str(translate(e.value)) == f"{tmp_path / 'x.json'}: read-only file system"
    with pytest.raises(OSError):
        write_text(tmp_path / "new" / "deeper" / "x.json", "{}")
    assert not (tmp_path / "new").exists()                 # the folders the failed write made are gone


def test_a_folder_inside_one_another_process_writes_is_refused(tmp_path):
    """A run folder held by another process (a `wina run`): a calibrate into a plan folder inside it
    is refused at once, naming the run folder and its process; this process's own nesting (a run's
    steps) is fine. A folder a failed writer made holding only the lock and empty folders is removed."""
    import subprocess
    import sys
    from wina.errors import DataError
    from wina.files import locked
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from wina.files import locked\n"
        "with locked(%r):\n    print('held', flush=True); time.sleep(60)\n") % (str(Path(__file__).parents[1]), str(run))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataError, match=f"inside {run}, which process {holder.pid} is writing"):
            with locked(run / "plans" / "teal"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with locked(run):
        with locked(run / "plans" / "teal"):               # a run's own step
            (run / "plans" / "teal" / "x").write_text("1")
    assert (run / "plans" / "teal" / "x").exists()
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with locked(fresh):
            (fresh / "runs" / "deeper").mkdir(parents=True)
            raise RuntimeError("disk full")
    assert not fresh.exists()
