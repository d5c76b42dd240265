"""Presets: every shipped file parses, validates and resolves (dry run); the seed reproductions say
what the seed's scripts do; malformed files fail with the file and the key in one message."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from wina.cli import app
from wina.presets import PresetError, find_data_dir, list_presets, load_preset

REPO = Path(__file__).resolve().parents[1]
FILES = sorted((REPO / "presets").glob("*.toml"))
SEED = {"llama2-7b": "meta-llama/Llama-2-7b-hf", "llama3-8b": "meta-llama/Meta-Llama-3-8B",
        "qwen2.5-7b": "Qwen/Qwen2.5-7B", "phi4": "microsoft/phi-4"}
SEED_TASKS = ["piqa", "winogrande", "hellaswag", "arc_challenge", "mmlu", "gsm8k"]

GOOD = '''
model = "smollm2-135m"
[eval]
tasks = ["piqa"]
[[variants]]
method = "dense"
[[variants]]
method = "wina"
transform = true
'''


def test_presets_folder_is_not_empty():
    names = {f.stem for f in FILES}
    assert set(SEED) <= names
    assert {"smollm2-quick", "smollm2-full"} <= names


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_every_preset_parses_and_resolves_with_dry_run(path):
    p = load_preset(path)
    assert p.name == path.stem and p.variants
    from wina.models import resolve_source
    resolve_source(p.model)                  # hub ids (dots included) and the embedded name resolve
    res = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "dry run" in res.stdout and "compare all runs" in res.stdout
    # by name too
    assert CliRunner().invoke(app, ["run", path.stem, "--dry-run"]).exit_code == 0


@pytest.mark.parametrize("name", sorted(SEED))
def test_seed_reproduction_presets(name):
    p = load_preset(name)
    assert p.model == SEED[name]
    assert p.calibration.source == "tatsu-lab/alpaca" and p.calibration.samples == 20
    assert p.calibration.seq_len == 2048
    assert p.allocation.mode == "layer" and p.allocation.step == 0.025
    assert p.eval.sparsities == [0.25, 0.40, 0.50, 0.65]
    assert p.eval.gating == "topk"
    assert p.eval.tasks == SEED_TASKS
    v = {x.name: (x.method, x.transform, x.allocation) for x in p.variants}
    assert v == {"dense": ("dense", False, "greedy"), "teal": ("teal", False, "greedy"),
                 "teal_transform": ("teal", True, "greedy"), "wina": ("wina", True, "greedy")}


def test_embedded_presets():
    quick, tasks, full = load_preset("smollm2-quick"), load_preset("smollm2-tasks"), load_preset("smollm2-full")
    assert quick.model == tasks.model == full.model == "smollm2-135m"
    for p in (quick, tasks):                            # offline: no data folder, no network
        assert p.calibration.source == "self" and p.eval.sparsities == [0.5]
        assert p.eval.ppl_text == "{data}/wikitext2/wiki.test.raw" and p.eval.ppl_max_tokens <= 4096
    assert not quick.eval.tasks                         # perplexity only: the 3-minute quick start
    assert tasks.eval.tasks == ["piqa", "arc_easy"] and tasks.eval.limit == 100   # the shipped documents
    assert full.eval.sparsities == [0.25, 0.40, 0.50, 0.65] and full.eval.limit is None
    assert set(SEED_TASKS) <= set(full.eval.tasks)


def test_list_presets_and_unknown_name():
    names = [p.name for p in list_presets()]
    assert names == sorted(names) and "smollm2-quick" in names
    with pytest.raises(PresetError, match="unknown preset 'nope'.*smollm2-quick"):
        load_preset("nope")
    with pytest.raises(PresetError, match="not found"):
        load_preset("/no/such/file.toml")


def test_presets_dir_from_environment(tmp_path, monkeypatch):
    (tmp_path / "mine.toml").write_text(GOOD)
    monkeypatch.setenv("WINA_PRESETS", str(tmp_path))
    p = load_preset("mine")
    assert p.name == "mine" and p.path == tmp_path / "mine.toml"
    assert "mine" in [x.name for x in list_presets()]


def test_defaults_and_variant_names(tmp_path):
    f = tmp_path / "ok.toml"
    f.write_text(GOOD)
    p = load_preset(f)
    assert [v.name for v in p.variants] == ["dense", "wina_transform"]
    assert p.eval.sparsities == [0.25, 0.40, 0.50, 0.65] and p.eval.gating == "topk"
    assert p.allocation.mode == "layer" and p.calibration.source == "self"
    assert p.variants[1].needs_plan and not p.variants[0].needs_plan


def test_paths_resolve_relative_to_the_preset(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    f = tmp_path / "p.toml"
    f.write_text(GOOD.replace('[eval]\n', '[eval]\ndata_dir = "data"\nppl_text = "{data}/t.txt"\n')
                 .replace('model = "smollm2-135m"', 'model = "smollm2-135m"\n[calibration]\nsource = "c.txt"'))
    p = load_preset(f)
    assert p.resolved_data_dir() == (tmp_path / "data").resolve()
    assert p.resolved_ppl_text() == (tmp_path / "data" / "t.txt").resolve()
    assert p.resolved_source() == str((tmp_path / "c.txt").resolve())
    f.write_text(GOOD.replace('[eval]\n', '[eval]\ndata_dir = "hub"\n'))
    assert load_preset(f).resolved_data_dir() is None
    monkeypatch.setenv("WINA_DATA_DIR", str(tmp_path / "data"))
    assert find_data_dir() == (tmp_path / "data").resolve()


BAD = [
    ('colour = "red"\n' + GOOD, "colour", "unknown key"),
    (GOOD.replace("[eval]\n", "[eval]\nsparsities = [0.25, 1.5]\n"), "eval.sparsities[1]", "[0, 1)"),
    (GOOD.replace("[eval]\n", "[eval]\nsparsities = [0.5, 0.5]\n"), "eval.sparsities[1]", "twice"),
    (GOOD.replace("[eval]\n", "[eval]\nsparsitys = [0.5]\n"), "eval.sparsitys", "unknown key"),
    (GOOD.replace("[eval]\n", "[eval]\ngating = \"magic\"\n"), "eval.gating", "topk, threshold"),
    (GOOD.replace("[eval]\n", "[eval]\nlimit = 0\n"), "eval.limit", "at least 1"),
    (GOOD.replace("[eval]\n", "[eval]\nlimit = \"ten\"\n"), "eval.limit", "number"),
    (GOOD.replace("[eval]\n", "[eval]\nbatch_size = true\n"), "eval.batch_size", "integer"),
    (GOOD.replace('method = "wina"', 'method = "magic"'), "variants[1].method", "dense, teal, wina"),
    (GOOD.replace('transform = true', 'transform = "yes"'), "variants[1].transform", "boolean"),
    (GOOD.replace('transform = true', 'transfrom = true'), "variants[1].transfrom", "unknown key"),
    (GOOD.replace('method = "wina"\ntransform = true', 'method = "dense"'), "variants[1].name", "two variants"),
    (GOOD.replace('model = "smollm2-135m"', ''), "model", "missing"),
    (GOOD.replace('model = "smollm2-135m"', 'model = 7'), "model", "string"),
    (GOOD.replace('[eval]\ntasks = ["piqa"]\n', '[eval]\ntasks = []\n'), "eval.tasks", "nothing to evaluate"),
    (GOOD + '[allocation]\nmode = "sideways"\n', "allocation.mode", "layer, global"),
    (GOOD + '[allocation]\nstep = 0\n', "allocation.step", "(0, 1)"),
    (GOOD + '[calibration]\nsamples = 0\n', "calibration.samples", "at least 1"),
    ('dtype = "int3"\n' + GOOD, "dtype", "one of"),
    ('model = "m"\n[eval]\ntasks=["piqa"]\n', "variants", "missing"),
    ('model = "m"\nvariants = []\n[eval]\ntasks=["piqa"]\n', "variants", "at least one"),
    ('model = "m"\neval = 3\n[[variants]]\nmethod="dense"\n', "eval", "table"),
    (GOOD.replace("[eval]\n", "[eval]\ngating = \"threshold\"\n").replace(
        'transform = true', 'transform = true\nallocation = "uniform"'), "eval.gating", "calibration plan"),
    # names become folders and files (runs/<preset>, plans/<variant>): never '.', '..' or hidden
    ('name = ".."\n' + GOOD, "name", "must not start with '.'"),
    ('name = "."\n' + GOOD, "name", "must not start with '.'"),
    ('name = ""\n' + GOOD, "name", "non-empty"),
    ('name = "a/b"\n' + GOOD, "name", "letters, digits"),
    (GOOD.replace('method = "dense"', 'name = ".."\nmethod = "dense"'), "variants[0].name", "start with '.'"),
    (GOOD.replace('method = "dense"', 'name = "."\nmethod = "dense"'), "variants[0].name", "start with '.'"),
    (GOOD.replace('method = "dense"', 'name = ".dense"\nmethod = "dense"'), "variants[0].name", "start with '.'"),
    (GOOD.replace('method = "dense"', 'name = "teal.new"\nmethod = "dense"'), "variants[0].name", "work folders"),
    # a perplexity budget shorter than one window fails at load, not after the model loaded
    (GOOD.replace("[eval]\n", '[eval]\nppl_text = "t.txt"\nppl_max_tokens = 256\n'), "eval.ppl_max_tokens",
     "at least 512"),
    (GOOD.replace("[eval]\n", '[eval]\nppl_text = "t.txt"\nppl_max_tokens = 512\nppl_protocol = "seed"\n'),
     "eval.ppl_max_tokens", "at least 513"),
]


@pytest.mark.parametrize("text,key,msg", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_malformed_presets_name_file_and_key(tmp_path, text, key, msg):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(PresetError) as e:
        load_preset(f)
    s = str(e.value)
    assert s.startswith(f"{f}: "), s
    assert key in s and msg in s, s
    res = CliRunner().invoke(app, ["run", str(f), "--dry-run"])
    assert res.exit_code == 2 and key in res.stderr and "Traceback" not in res.output


def test_toml_syntax_error(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text('model = "smollm2-135m\n')
    with pytest.raises(PresetError, match=r"broken\.toml: not valid TOML"):
        load_preset(f)


def test_dry_run_checks_what_it_can(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text(GOOD.replace('[eval]\n', '[eval]\ndata_dir = "nowhere"\n'))
    res = CliRunner().invoke(app, ["run", str(f), "--dry-run"])
    assert res.exit_code == 2 and "nowhere" in res.stderr
    f.write_text(GOOD.replace('model = "smollm2-135m"', 'model = "./no/such/model"'))
    res = CliRunner().invoke(app, ["run", str(f), "--dry-run"])
    assert res.exit_code == 2 and "not found" in res.stderr
    f.write_text(GOOD.replace('model = "smollm2-135m"', 'model = "smollm2-135m"\n[calibration]\nsource = "nope.txt"'))
    res = CliRunner().invoke(app, ["run", str(f), "--dry-run"])
    assert res.exit_code == 2 and "nope.txt" in res.stderr


def test_two_variants_writing_the_same_file(tmp_path):
    """A dense variant named wina-s25 and a wina variant at 25 % would write the same results file."""
    f = tmp_path / "p.toml"
    f.write_text(GOOD.replace('method = "dense"', 'name = "wina-s25"\nmethod = "dense"')
                 .replace("[eval]\n", "[eval]\nsparsities = [0.25]\n").replace('transform = true', 'name = "wina"'))
    res = CliRunner().invoke(app, ["run", str(f), "--dry-run"])
    assert res.exit_code == 2 and "runs/wina-s25.json" in res.stderr and "Traceback" not in res.output
