"""The ``wina`` command line, through typer's CliRunner: each command's happy path on a tiny random
Llama (2 layers, hidden 64, a word-level tokenizer built in code, no downloads) and the bad inputs
(one red line, exit code 2, no traceback unless --debug)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wina.cli import app

WORDS = ("the a an and or of to in on at is was are be it this that with for as by from he she they "
         "we you i his her their my your not no yes what which who when where how why can will would "
         "there here one two three first last new old good bad big small long short man woman people "
         "time year day way thing world life hand part place case week work number water room mother "
         "city name story fact month lot right study book eye job word business issue side kind head "
         "house service friend father power hour game line end member law car question answer goal "
         "use make take put open").split()
TEXT = ("the man put the book on the table . she can open the door with her hand . "
        "what is the answer to the question ? the city was big and the water was cold . "
        "they will make a good game for the people of the world . ") * 40


def make_tiny(path: Path) -> Path:
    """A random 2-layer Llama (hidden 64) and a word-level tokenizer, saved with save_pretrained."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, decoders
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS + [".", "?", ",", "!"]:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= 128
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")          # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def invoke(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def ok(res):
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def user_error(res, *needles):
    """Exit 2, exactly one line on stderr starting with 'error:', no traceback."""
    assert res.exit_code == 2, (res.output, res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:"), lines
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --- fast: no model ---------------------------------------------------------------------------------

def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys; import wina.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'textual') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    res = ok(invoke("--help"))
    for cmd in ("models", "calibrate", "allocate", "eval", "ppl", "compare", "chat", "bench", "run", "tui"):
        assert cmd in res.stdout


def test_every_command_has_help_with_an_example():
    for cmd in ("models", "calibrate", "allocate", "eval", "ppl", "compare", "chat", "bench", "run"):
        res = ok(invoke(cmd, "--help"))
        assert "Example" in res.stdout, cmd


def test_version_and_no_command():
    assert "wina" in ok(invoke("--version")).stdout
    assert "Usage" in ok(invoke()).stdout


def test_models_lists_architectures_embedded_and_presets():
    res = ok(invoke("models"))
    for s in ("llama", "qwen2", "phi3", "smollm2-135m", "smollm2-quick", "llama2-7b"):
        assert s in res.stdout
    data = json.loads(ok(invoke("models", "--json")).stdout)
    assert set(data["architectures"]) >= {"llama", "mistral", "qwen2", "phi3"}
    assert data["embedded"]["name"] == "smollm2-135m"
    assert {p["name"] for p in data["presets"]} >= {"smollm2-quick", "smollm2-full", "llama2-7b",
                                                    "llama3-8b", "qwen2.5-7b", "phi4"}


def test_a_broken_preset_file_is_named_and_the_others_still_listed(tmp_path, monkeypatch):
    (tmp_path / "garbage.toml").write_bytes(b"\xff\xfe not toml")
    (tmp_path / "half.toml").write_text('name = "half"\nmodel = ')
    monkeypatch.setenv("WINA_PRESETS", str(tmp_path))
    res = ok(invoke("models"))
    assert "smollm2-quick" in res.stdout
    warned = [ln for ln in res.stderr.splitlines() if "skipped a preset" in ln]
    assert len(warned) == 2 and "garbage.toml" in warned[0] and "half.toml" in warned[1]
    data = json.loads(ok(invoke("models", "--json")).stdout)
    assert "smollm2-quick" in {p["name"] for p in data["presets"]} and len(data["broken_presets"]) == 2


def test_run_dry_run_quick_preset():
    res = ok(invoke("run", "smollm2-quick", "--dry-run"))
    assert "calibrate wina" in res.stdout and "compare" in res.stdout
    assert "dry run" in res.stdout
    # perplexity only: --limit (documents per task) would change nothing but the output folder
    user_error(invoke("run", "smollm2-quick", "--dry-run", "--limit", "2"), "has no tasks")
    assert "runs/smollm2-tasks-limit2" in ok(invoke("run", "smollm2-tasks", "--dry-run", "--limit", "2")).stdout
    res = ok(invoke("run", "smollm2-quick", "--dry-run", "--device", "cpu", "--gpus", "2"))
    assert "device: cpu (--device)" in res.stdout and "2 processes" in res.stdout
    user_error(invoke("run", "smollm2-quick", "--dry-run", "--device", "foo"), "unknown device 'foo'")


# --- bad inputs -------------------------------------------------------------------------------------

def test_unknown_model_path(text_file):
    user_error(invoke("ppl", "./no/such/model", "--text", text_file), "not found")


def test_unknown_model_hub_id(text_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    user_error(invoke("ppl", "nobody-xyz/no-such-model-123", "--text", text_file), "no-such-model-123")


def test_unknown_method(text_file):
    user_error(invoke("ppl", "smollm2-135m", "--method", "magic", "--text", text_file), "magic")
    user_error(invoke("calibrate", "smollm2-135m", "--method", "dense", "--out", "x"), "dense")


def test_sparsity_out_of_range(text_file):
    user_error(invoke("ppl", "smollm2-135m", "--sparsity", "1.5", "--text", text_file), "1.5")
    user_error(invoke("eval", "smollm2-135m", "--sparsity", "1.5", "--tasks", "piqa"), "1.5")


def test_missing_plan(text_file, tmp_path):
    user_error(invoke("ppl", "smollm2-135m", "--plan", tmp_path / "nope", "--text", text_file), "plan")
    user_error(invoke("allocate", tmp_path / "nope"), "plan")


def test_threshold_needs_plan(text_file):
    user_error(invoke("ppl", "smollm2-135m", "--sparsity", "0.5", "--gating", "threshold",
                      "--text", text_file), "plan")
    # without --sparsity the method defaults to dense: refused too, not a quiet dense run
    user_error(invoke("ppl", "smollm2-135m", "--gating", "threshold", "--text", text_file), "plan")
    user_error(invoke("chat", "smollm2-135m", "--gating", "threshold", "--prompt", "hi"), "plan")


def test_bad_option_value_is_one_line():
    user_error(invoke("ppl", "smollm2-135m", "--text", "x", "--max-tokens", "lots"), "--max-tokens")
    user_error(invoke("eval"), "model")
    user_error(invoke("nosuchcommand"))


def test_unknown_and_malformed_preset(tmp_path):
    user_error(invoke("run", "no-such-preset", "--dry-run"), "unknown preset", "smollm2-quick")
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "smollm2-135m"\n[eval]\nsparsities = [0.25, 1.5]\ntasks = ["piqa"]\n'
                   '[[variants]]\nmethod = "wina"\n')
    user_error(invoke("run", bad, "--dry-run"), str(bad), "eval.sparsities[1]")
    bad.write_text('model = "smollm2-135m"\ncolour = "red"\n')
    user_error(invoke("run", bad, "--dry-run"), "colour")
    bad.write_text('model = "smollm2-135m\n')
    user_error(invoke("run", bad), "TOML")


def test_eval_nothing_to_do_and_unknown_task(tiny, shared_data):
    user_error(invoke("eval", tiny, "--method", "dense"), "nothing to evaluate")
    user_error(invoke("eval", tiny, "--tasks", "nosuchtask", "--data-dir", shared_data), "nosuchtask")


def test_compare_bad_file(tmp_path):
    f = tmp_path / "x.json"
    f.write_text("{}")
    user_error(invoke("compare", f), "wina")
    user_error(invoke("compare", tmp_path / "missing.json"), "not found")


def test_debug_shows_traceback(text_file):
    res = invoke("--debug", "ppl", "./no/such/model", "--text", text_file)
    assert res.exit_code == 2
    assert "Traceback" in res.stderr
    res = invoke("ppl", "./no/such/model", "--text", text_file, "--debug")
    assert res.exit_code == 2 and "Traceback" in res.stderr


# --- happy paths on the tiny model ------------------------------------------------------------------

def test_ppl_json_dense_and_sparse(tiny, text_file):
    d = json.loads(ok(invoke("ppl", tiny, "--text", text_file, "--context", "64", "--json")).stdout)
    assert {"perplexity", "tokens", "measured_sparsity"} <= set(d)
    assert d["method"] == "dense" and d["measured_sparsity"] == 0.0 and d["tokens"] > 0
    s = json.loads(ok(invoke("ppl", tiny, "--text", text_file, "--context", "64", "--sparsity", "0.5",
                             "--json")).stdout)
    assert s["method"] == "wina" and s["sparsity"] == 0.5
    assert 0.4 < s["measured_sparsity"] < 0.6
    assert s["perplexity"] > 0 and s["perplexity"] != d["perplexity"]
    t = json.loads(ok(invoke("ppl", tiny, "--text", text_file, "--context", "64", "--method", "teal",
                             "--sparsity", "0.25", "--transform", "--max-tokens", "200", "--json")).stdout)
    assert t["transform"] is True and t["tokens"] == 3 * 63


def test_ppl_text_output(tiny, text_file):
    res = ok(invoke("ppl", tiny, "--text", text_file, "--context", "64", "--method", "teal",
                    "--sparsity", "0.4", "--max-tokens", "128"))
    assert "perplexity" in res.stdout and "measured" in res.stdout


def test_calibrate_allocate_and_use_the_plan(tiny, text_file, tmp_path):
    plan = tmp_path / "plan"
    ok(invoke("calibrate", tiny, "--method", "wina", "--data", text_file, "--samples", "2",
              "--seq-len", "32", "--out", plan))
    meta = json.loads((plan / "plan.json").read_text())
    assert meta["method"] == "wina" and meta["status"]["calibrated_layers"] == 2
    ok(invoke("allocate", plan, "--step", "0.1", "--max-sparsity", "0.8", "--out", tmp_path / "plan2"))
    assert json.loads((plan / "plan.json").read_text())["allocation"] is None      # left as it was
    assert json.loads((tmp_path / "plan2" / "plan.json").read_text())["allocation"]["step"] == 0.1
    done = (tmp_path / "plan2" / "plan.json").read_bytes()
    # the same command again: the finished allocation stands (an interrupted one would resume)
    ok(invoke("allocate", plan, "--step", "0.1", "--max-sparsity", "0.8", "--out", tmp_path / "plan2"))
    assert (tmp_path / "plan2" / "plan.json").read_bytes() == done
    import shutil
    shutil.copytree(plan, tmp_path / "plan3")         # what an allocation stopped after its copy leaves
    ok(invoke("allocate", plan, "--step", "0.1", "--max-sparsity", "0.8", "--out", tmp_path / "plan3"))
    assert json.loads((tmp_path / "plan3" / "plan.json").read_text())["allocation"]["step"] == 0.1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    user_error(invoke("allocate", plan, "--out", tmp_path / "other"), "is not a copy of")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    user_error(invoke("allocate", plan, "--gpus", "2", "--device", "cpu"), "--gpus 2 needs the model on a GPU")
    ok(invoke("allocate", plan, "--step", "0.1", "--max-sparsity", "0.8"))          # in place
    meta = json.loads((plan / "plan.json").read_text())
    assert meta["allocation"] is not None
    # a copy cut short by a kill (plan.json copied, a histogram not yet): made again, not an error
    partial = tmp_path / "plan.allocating"
    shutil.copytree(plan, partial)
    next(iter(sorted((partial / "histograms").iterdir()))).unlink()
    ok(invoke("allocate", plan, "--step", "0.2", "--max-sparsity", "0.8"))
    assert json.loads((plan / "plan.json").read_text())["allocation"]["step"] == 0.2
    assert not partial.exists()
    # a finished plan that is damaged: named as the user's plan, and no copy of it is left
    hist = next(iter(sorted((plan / "histograms").iterdir())))
    good = hist.read_bytes()
    hist.write_bytes(good[:len(good) // 2])
    line = user_error(invoke("allocate", plan, "--step", "0.1"), "corrupt plan", "does not match its checksum")
    assert ".allocating" not in line and not partial.exists()
    hist.write_bytes(good)
    ok(invoke("allocate", plan, "--step", "0.1", "--max-sparsity", "0.8"))
    d = json.loads(ok(invoke("ppl", tiny, "--plan", plan, "--sparsity", "0.5", "--text", text_file,
                             "--context", "64", "--json")).stdout)
    assert d["method"] == "wina" and d["plan"] == str(plan)
    assert 0.3 < d["measured_sparsity"] < 0.7
    user_error(invoke("ppl", tiny, "--plan", plan, "--method", "teal", "--sparsity", "0.5",
                      "--text", text_file), "does not match")
    # a results file carries what made its plan and its text, not just the path it was given
    ok(invoke("eval", tiny, "--plan", plan, "--sparsity", "0.5", "--ppl-text", text_file,
              "--ppl-max-tokens", "512", "--output", tmp_path / "r.json"))
    w = json.loads((tmp_path / "r.json").read_text())["wina"]
    ps = w["plan_settings"]
    assert ps["path"] == str(plan.resolve()) and ps["method"] == "wina"
    assert ps["calibration"]["samples"] == 2 and ps["calibration"]["seq_len"] == 32
    assert ps["calibration"]["source_sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
    assert ps["allocation"]["step"] == 0.1 and ps["allocation"]["max_sparsity"] == 0.8
    assert ps["plan_json_sha256"] == hashlib.sha256((plan / "plan.json").read_bytes()).hexdigest()
    assert w["perplexity"]["sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()


def test_calibrate_with_the_per_block_pca_rotation(tiny, text_file, tmp_path):
    """--rotation pca-block: the plan holds a basis per block and says so; a plan applied to the model
    as loaded transforms it (same logits as dense before gating: the rotation is exact); the label
    names the rotation."""
    plan = tmp_path / "pcab"
    ok(invoke("calibrate", tiny, "--method", "wina", "--rotation", "pca-block", "--data", text_file,
              "--samples", "2", "--seq-len", "32", "--out", plan))
    meta = json.loads((plan / "plan.json").read_text())
    assert meta["transform"] is True and meta["rotation"] == "pca-block"
    assert "rotation.safetensors" in meta["files"]
    dense = json.loads(ok(invoke("ppl", tiny, "--text", text_file, "--context", "64", "--json")).stdout)
    rot = json.loads(ok(invoke("ppl", tiny, "--plan", plan, "--sparsity", "0.0", "--text", text_file,
                               "--context", "64", "--json")).stdout)
    assert rot["transform"] is True and abs(rot["perplexity"] - dense["perplexity"]) < 1e-3 * dense["perplexity"]
    user_error(invoke("ppl", tiny, "--plan", plan, "--no-transform", "--sparsity", "0.5", "--text", text_file),
               "transformed model", "--no-transform")          # refused, not quietly transformed
    user_error(invoke("calibrate", tiny, "--rotation", "pca", "--no-transform", "--out", tmp_path / "y"),
               "--no-transform")
    user_error(invoke("calibrate", tiny, "--rotation", "hadamard", "--out", tmp_path / "x"), "unknown rotation")


def test_eval_and_compare(tiny, shared_data, tmp_path):
    outs = []
    for args in (["--method", "dense"], ["--method", "wina", "--sparsity", "0.5"],
                 ["--method", "teal", "--sparsity", "0.5"]):
        out = tmp_path / f"{args[1]}.json"
        res = ok(invoke("eval", tiny, *args, "--tasks", "piqa", "--limit", "2", "--data-dir", shared_data,
                        "--batch-size", "2", "--output", out))
        assert "piqa" in res.stdout and "measured sparsity" in res.stdout
        rec = json.loads(out.read_text())
        assert rec["wina"]["method"] == args[1] and "piqa" in rec["wina"]["headline"]
        outs.append(out)
    res = ok(invoke("compare", *outs))
    assert "WINA" in res.stdout and "TEAL" in res.stdout and "dense" in res.stdout
    res = ok(invoke("compare", tmp_path, "--plot"))
    assert "sparsity" in res.stdout
    res = invoke("compare", tmp_path, "--plot", "--y", "nosuch")
    user_error(res, "nothing to plot for 'nosuch'")
    assert res.stdout.strip() == ""                                       # no table before the error
    md = ok(invoke("compare", *outs, "--markdown")).stdout
    assert md.lstrip().startswith("| sparsity")


def test_chat_one_shot_and_interactive(tiny):
    res = ok(invoke("chat", tiny, "--prompt", "what is the answer ?", "--max-new-tokens", "5",
                    "--sparsity", "0.5"))
    assert "tokens/s" in res.stderr and "/exit" not in res.stderr        # one answer: no keys to learn
    res = ok(invoke("chat", tiny, "--max-new-tokens", "4",
                    input="hello there\n/reset\n/rest\n//slash\nthe city\n/exit\n"))
    assert res.stdout.count("bot>") == 3                                    # /rest is not sent, //slash is
    assert "conversation cleared" in res.stderr and "unknown command /rest" in res.stderr
    res = ok(invoke("chat", tiny, "--max-new-tokens", "3", input="hi\n"))        # EOF ends the chat
    assert res.stdout.count("bot>") == 1


def test_tui_command_is_wired():
    res = ok(invoke("tui", "--help"))          # the app's own options, passed on
    assert "wina-tui" in res.stdout and "--model" in res.stdout
    assert invoke("tui", "--no-such-option").exit_code == 2


def test_bench_tiny_shape_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    res = ok(invoke("bench", "tiny-llama", "--device", "cpu", "--prompt-len", "8",
                    "--new-tokens", "4", "--hf-new-tokens", "2", "--sparsities", "0.5", "--no-kernels",
                    "--json", out))
    assert "tiny-llama" in res.stdout
    data = json.loads(out.read_text())
    assert data["dtype"] == "float32"                   # --dtype auto: float32 on a CPU
    m = data["models"][0]
    assert "error" not in m, m.get("error")
    assert m["dense"]["decode_tokens_per_s"] > 0 and "0.50" in m["sparse"]
    user_error(invoke("bench", "tiny-llama", "--device", "cpu", "--sparsities", "half"), "--sparsities")
    user_error(invoke("bench", "tiny-llama", "--device", "cpu", "--sparsities", "1.5"), "1.5")
    user_error(invoke("bench", "tiny-llama", "--device", "cpu", "--hf-new-tokens", "-1"), "--hf-new-tokens")
    res = invoke("bench", tmp_path / "no-such-model", "--device", "cpu", "--no-kernels")
    user_error(res, "no-such-model")                    # one line, no table of the failure
    assert res.stdout.strip() == ""
    user_error(invoke("bench", "--chat", "tiny-llama", "--device", "cpu", "--tokenizer", tmp_path / "none"),
               "--tokenizer", "no such folder")


@pytest.mark.parametrize("args,needle", [
    (["--user-tokens", "-5"], "--user-tokens must be at least 1, got -5"),
    (["--turns", "0"], "--turns must be at least 1, got 0"),
    (["--new-tokens", "0"], "--new-tokens must be at least 2"),
    (["--count-every", "-1"], "--count-every must be >= 0"),
    (["--sparsity", "nan"], "--sparsity must be in (0, 1), got nan"),
    (["--method", "dense"], "--method must be wina or teal"),
    (["--prompt-len", "0"], "--prompt-len is not used with --chat"),
    (["--sparsities", "0.5", "--no-kernels"], "--sparsities, --kernels/--no-kernels are not used with --chat")])
def test_bench_chat_refuses_each_setting_it_cannot_use_by_name(args, needle):
    """Each bad --chat setting is its own line naming the value given (--turns and --new-tokens used
    to share one message, --user-tokens -5 ran); an option only the decode bench reads is refused
    with --chat, not ignored. All before any model is made."""
    line = user_error(invoke("bench", "--chat", "tiny-llama", "--device", "cpu", *args), needle)
    assert "and --new-tokens" not in line


def test_bench_refuses_chat_options_without_chat():
    user_error(invoke("bench", "tiny-llama", "--device", "cpu", "--turns", "2", "--plan", "p"),
               "--plan, --turns are only used with --chat")


def test_bench_chat_with_a_plan(tiny, text_file, tmp_path):
    """`wina bench --chat --plan` gates the chat with the plan's thresholds (it used to hand the plan
    check a stand-in for the model: 'unsupported architecture None'), as `wina chat --plan` applies a
    plan: a plan only calibrated at uniform sparsity, then allocated, and a TEAL plan of the
    transformed model; a --method that is not the plan's is refused."""
    def bench(plan, *extra):
        out = tmp_path / f"bench-{len(list(tmp_path.glob('bench-*.json')))}.json"
        ok(invoke("bench", "--chat", tiny, "--device", "cpu", "--plan", plan, "--turns", "2", "--user-tokens",
                  "12", "--new-tokens", "3", "--json", out, *extra))
        data = json.loads(out.read_text())
        assert all(0.05 < row["sparse"]["sparsity"] < 0.95 for row in data["turns_detail"]), data["turns_detail"]
        return data

    wina, teal = tmp_path / "wina", tmp_path / "teal"
    for plan, method, more in ((wina, "wina", []), (teal, "teal", ["--transform"])):
        ok(invoke("calibrate", tiny, "--method", method, *more, "--data", text_file, "--samples", "2",
                  "--seq-len", "32", "--out", plan))
    assert bench(wina)["gating"] == "wina threshold, nominal 50.0%"              # calibrated: uniform
    ok(invoke("allocate", wina, "--step", "0.2", "--max-sparsity", "0.8"))
    assert bench(wina, "--sparsity", "0.4")["gating"].startswith("wina threshold, nominal ")
    assert bench(teal)["gating"] == "teal threshold, nominal 50.0%"
    user_error(invoke("bench", "--chat", tiny, "--device", "cpu", "--plan", teal, "--method", "wina"),
               "does not match the plan's method teal")


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0 is greedy), got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0 (0 is greedy), got inf"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0")])
def test_chat_refuses_sampling_settings_it_cannot_sample_with(tiny, args, needle):
    """--temperature nan was an internal error at the first token ('invalid multinomial
    distribution'), inf was taken; the library's one rule refuses them before the model loads."""
    user_error(invoke("chat", tiny, "--prompt", "hi", *args), needle)
