"""``wina run``: the steps of a preset, a whole run on a tiny model, skipping and resuming, and the
quick embedded preset end to end (slow: the real SmolLM2-135M, a small --limit)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wina.cli import app
from wina.errors import Cancelled
from wina.events import CancelToken
from wina.presets import load_preset
from wina.runner import plan_steps, run_preset

from test_cli import make_tiny  # the same tiny Llama + word-level tokenizer
from conftest import DATA_DIR

TEXT = ("the man put the book in the room . she can see the water with her hand . "
        "what is the number of the week ? the city was big and the water was cold . ") * 40


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runner")
    model = make_tiny(root / "model")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    f = root / "tiny.toml"
    f.write_text(f'''
name = "tiny"
description = "a random 2-layer Llama"
model = "{model}"
device = "cpu"
dtype = "float32"

[calibration]
source = "text.txt"
samples = 2
seq_len = 32

[allocation]
mode = "layer"
step = 0.1
max_sparsity = 0.8

[eval]
sparsities = [0.25, 0.5]
ppl_text = "text.txt"
ppl_max_tokens = 1024
data_dir = "hub"

[[variants]]
name = "dense"
method = "dense"

[[variants]]
name = "wina"
method = "wina"
transform = true

[[variants]]
name = "teal"
method = "teal"
''')
    return f


def test_steps_order_and_outputs(tiny_preset, tmp_path):
    steps = plan_steps(load_preset(tiny_preset), tmp_path)
    assert [s.title for s in steps] == [
        "eval dense", "calibrate teal", "allocate teal", "eval teal @ 25%", "eval teal @ 50%",
        "calibrate wina", "allocate wina", "eval wina @ 25%", "eval wina @ 50%", "compare all runs"]
    assert steps[0].output == tmp_path / "runs" / "dense.json"
    assert steps[3].output == tmp_path / "runs" / "teal-s25.json"
    assert steps[1].output == steps[2].output == tmp_path / "plans" / "teal"
    assert steps[-1].output == tmp_path / "compare.md"
    assert len(steps[-1].inputs) == 5
    assert not any(s.done() for s in steps)


def test_seed_preset_steps():
    steps = plan_steps(load_preset("llama2-7b"), Path("/x"))
    kinds = [s.kind for s in steps]
    assert kinds.count("calibrate") == 3 and kinds.count("allocate") == 3
    assert kinds.count("eval") == 1 + 3 * 4 and kinds[-1] == "compare"
    # the untransformed variants come first: one model load, transformed once
    tr = [s.variant.transform for s in steps if s.variant is not None]
    assert tr == sorted(tr)


def test_run_skip_and_resume(tiny_preset, tmp_path, monkeypatch):
    preset = load_preset(tiny_preset)
    out = tmp_path / "out"

    # 1. interrupted after the fourth step (the cancel token is checked between steps)
    cancel = CancelToken()
    seen: list[tuple[str, str]] = []

    def on_step(step, status):
        seen.append((step.title, status))
        if status == "done" and sum(1 for _, s in seen if s == "done") == 4:
            cancel.cancel()

    with pytest.raises(Cancelled):
        run_preset(preset, out, on_step=on_step, cancel=cancel)
    assert (out / "runs" / "dense.json").is_file() and (out / "runs" / "teal-s25.json").is_file()
    assert not (out / "runs" / "teal-s50.json").exists() and not (out / "compare.md").exists()

    # 2. resumed: the four finished steps are skipped, the rest runs
    events = []
    s = run_preset(preset, out, on_event=events.append)
    assert [x.title for x in s.skipped] == ["eval dense", "calibrate teal", "allocate teal", "eval teal @ 25%"]
    assert [x.title for x in s.ran] == ["eval teal @ 50%", "calibrate wina", "allocate wina",
                                        "eval wina @ 25%", "eval wina @ 50%", "compare all runs"]
    assert {e.stage for e in events} >= {"calibrate", "allocate", "ppl"}
    assert len(s.runs) == 5
    files = sorted(p.name for p in (out / "runs").iterdir())
    assert files == ["dense.json", "teal-s25.json", "teal-s50.json", "wina-s25.json", "wina-s50.json"]
    rec = json.loads((out / "runs" / "wina-s50.json").read_text())["wina"]
    assert rec["method"] == "wina" and rec["transform"] is True and rec["allocation"] == "greedy"
    assert rec["perplexity"]["perplexity"] > 0 and 0.3 < rec["measured_sparsity"] < 0.7
    dense = json.loads((out / "runs" / "dense.json").read_text())["wina"]
    assert dense["measured_sparsity"] == 0.0
    md = (out / "compare.md").read_text()
    assert "| sparsity" in md and "WINA-transform" in md and "TEAL" in md
    assert json.loads((out / "preset.json").read_text())["name"] == "tiny"
    leftovers = [p for p in out.rglob("*") if (p.name.startswith(".") and p.name != ".wina-lock")
                 or p.suffix == ".tmp"]
    assert leftovers == []

    # 3. everything done: nothing runs, and the model is never loaded
    import wina.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded although every step was done")

    monkeypatch.setattr(wina.models, "load", no_load)
    # (what a re-calibration for other settings, stopped and then given up, leaves beside a plan)
    abandoned = out / "plans" / "teal.new"
    abandoned.mkdir()
    (abandoned / "plan.json").write_text("{}")
    s = run_preset(preset, out)
    assert s.ran == [] and len(s.skipped) == 10 and len(s.runs) == 5
    assert not abandoned.exists()                     # stale: the plan beside it is done
    monkeypatch.undo()

    # 4. one results file lost: only that evaluation and the comparison run again
    (out / "runs" / "teal-s50.json").unlink()
    s = run_preset(preset, out)
    assert [x.title for x in s.ran] == ["eval teal @ 50%", "compare all runs"]


def test_edited_preset_reruns_what_changed(tiny_preset, tmp_path):
    """Outputs know the settings that made them: after an edit, exactly the steps whose settings
    changed run again (and say why); the others are kept byte for byte."""
    out = tmp_path / "out"
    run_preset(load_preset(tiny_preset), out)
    before = {p.name: p.read_bytes() for p in (out / "runs").iterdir()}
    teal_hist = (out / "plans" / "teal" / "histograms" / "layer_000.safetensors").read_bytes()

    # 1. the perplexity budget changes: every evaluation reruns, no plan is touched
    edited = tmp_path / "tiny.toml"
    edited.write_text(tiny_preset.read_text().replace("ppl_max_tokens = 1024", "ppl_max_tokens = 512")
                      .replace('source = "text.txt"', f'source = "{tiny_preset.parent / "text.txt"}"')
                      .replace('ppl_text = "text.txt"', f'ppl_text = "{tiny_preset.parent / "text.txt"}"'))
    seen = []
    s = run_preset(load_preset(edited), out, on_step=lambda st, status: seen.append((st.title, status, st.why)))
    assert [x.title for x in s.ran] == ["eval dense", "eval teal @ 25%", "eval teal @ 50%", "eval wina @ 25%",
                                        "eval wina @ 50%", "compare all runs"]
    reasons = [w for _, status, w in seen if status == "rerun"]
    assert reasons and all("ppl_max_tokens 1024 → 512" in w for w in reasons)
    assert json.loads((out / "runs" / "dense.json").read_text())["wina"]["perplexity"]["max_tokens"] == 512

    # 2. the calibration of one variant changes: its plan, its evaluations; the rest is kept
    kept = {n: (out / "runs" / n).read_bytes() for n in ("dense.json", "teal-s25.json", "teal-s50.json")}
    edited.write_text(edited.read_text().replace("samples = 2\n", "samples = 3\n", 1))
    s = run_preset(load_preset(edited), out)
    ran = [x.title for x in s.ran]
    assert "calibrate teal" in ran and "calibrate wina" in ran and "eval dense" not in ran
    assert (out / "runs" / "dense.json").read_bytes() == kept["dense.json"]
    assert json.loads((out / "plans" / "teal" / "plan.json").read_text())["calibration"]["samples"] == 3
    assert (out / "plans" / "teal" / "histograms" / "layer_000.safetensors").read_bytes() != teal_hist
    assert not any(p.name.endswith((".new", ".replaced", ".allocating")) for p in (out / "plans").iterdir())

    # 3. unchanged: nothing runs
    s = run_preset(load_preset(edited), out)
    assert s.ran == []
    assert before.keys() == {p.name for p in (out / "runs").iterdir()}

    # 4. a sparsity and a variant taken out: their outputs are moved aside, with their ledger
    # entries, never left among the preset's results nor deleted; a user's own file stays
    (out / "runs" / "mine.json").write_text("{}")
    teal_plan = (out / "plans" / "teal" / "plan.json").read_bytes()
    wina25 = (out / "runs" / "wina-s25.json").read_bytes()
    fewer = tmp_path / "fewer.toml"
    text = edited.read_text().replace("sparsities = [0.25, 0.5]", "sparsities = [0.5]")
    fewer.write_text(text[:text.index('[[variants]]\nname = "teal"')])
    from typer.testing import CliRunner
    from wina.cli import app
    import wina.api as api_mod
    real_write = api_mod.atomic_write_text

    def ledger_refused(path, *a, **kw):                # steps.json cannot be replaced (an immutable file)
        if Path(path).name == "steps.json":
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_write(path, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api_mod, "atomic_write_text", ledger_refused)
        with pytest.raises(OSError):
            run_preset(load_preset(fewer), out)
    assert (out / "runs" / "wina-s25.json").read_bytes() == wina25 and not (out / "retired").exists()
    dry = CliRunner().invoke(app, ["run", str(fewer), "--out", str(out), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "no longer in the preset" in dry.stdout and "runs/teal-s50.json" in dry.stdout
    assert (out / "runs" / "teal-s50.json").exists()                   # a dry run moves nothing
    res = CliRunner().invoke(app, ["run", str(fewer), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "moved aside 4 output(s)" in " ".join(res.stdout.split()), res.stdout
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["dense.json", "mine.json", "wina-s50.json"]
    [where] = list((out / "retired").iterdir())
    assert sorted(p.name for p in (where / "runs").iterdir()) == ["teal-s25.json", "teal-s50.json", "wina-s25.json"]
    assert (where / "runs" / "wina-s25.json").read_bytes() == wina25
    assert (where / "plans" / "teal" / "plan.json").read_bytes() == teal_plan
    moved = json.loads((where / "steps.json").read_text())
    assert set(moved) == {"eval runs/teal-s25.json", "eval runs/teal-s50.json", "eval runs/wina-s25.json",
                          "calibrate plans/teal", "allocate plans/teal"}
    led = json.loads((out / "steps.json").read_text())
    assert not set(moved) & set(led)
    compare = (out / "compare.md").read_text()
    assert "TEAL" not in compare and "25 %" not in compare and "WINA" in compare
    s = run_preset(load_preset(fewer), out)                            # nothing left to move or run
    assert s.ran == [] and s.retired == [] and len(list((out / "retired").iterdir())) == 1
    # the comparison knows its inputs: one taken out of the folder by hand is noticed
    assert json.loads((out / "steps.json").read_text())["compare compare.md"]["settings"]["inputs"] == [
        "dense.json", "wina-s50.json"]
    # a table damaged (or edited) since it was written is made again
    (out / "compare.md").write_bytes(b"\x00\xff garbage")
    s = run_preset(load_preset(fewer), out)
    assert [x.title for x in s.ran] == ["compare all runs"] and (out / "compare.md").read_text() == compare


def _header_and_footer(res) -> tuple[tuple[int, int], tuple[int, int]]:
    """(steps, already done) from `wina run`'s header and (run, skipped) from its last line."""
    import re
    text = res.stdout + res.stderr
    head = re.search(r"\((\d+) steps, (\d+) already done\)", text)
    foot = re.search(r"finished: (\d+) steps run, (\d+) skipped", text)
    assert head and foot, text[-2000:]
    return (int(head[1]), int(head[2])), (int(foot[1]), int(foot[2]))


def test_text_inputs_by_content_and_outputs_without_a_ledger(tiny_preset, tmp_path):
    """The ledger records text inputs by their content: editing the perplexity text (same path)
    reruns the evaluations, editing the calibration text reruns the plans made from it and their
    evaluations, and the header's counts agree with the last line. A run folder whose steps.json
    is gone is not adopted: every output is made again, each step saying why."""
    root = tmp_path / "preset"
    root.mkdir()
    (root / "cal.txt").write_text(TEXT, encoding="utf-8")
    (root / "ppl.txt").write_text(TEXT, encoding="utf-8")
    f = root / "tiny.toml"
    f.write_text(tiny_preset.read_text().replace('source = "text.txt"', 'source = "cal.txt"')
                 .replace('ppl_text = "text.txt"', 'ppl_text = "ppl.txt"'))
    out = tmp_path / "out"

    def run():
        res = CliRunner().invoke(app, ["run", str(f), "--out", str(out)])
        assert res.exit_code == 0, (res.output, res.exception)
        (n, done), (ran, skipped) = _header_and_footer(res)
        assert n == ran + skipped == 10 and done == skipped, (n, done, ran, skipped)
        return res, ran

    run()
    dense = (out / "runs" / "dense.json").read_bytes()

    # 1. the perplexity text is edited in place: every evaluation and the comparison run again
    (root / "ppl.txt").write_text(TEXT.replace("cold", "warm"), encoding="utf-8")
    res, ran = run()
    assert ran == 6 and "ppl_text_sha256" in res.stdout + res.stderr
    assert (out / "runs" / "dense.json").read_bytes() != dense
    dense = (out / "runs" / "dense.json").read_bytes()

    # 2. the calibration text is edited: both plans, their allocations and evaluations, the comparison
    (root / "cal.txt").write_text(TEXT.replace("water", "room"), encoding="utf-8")
    res, ran = run()
    assert ran == 9 and "source_sha256" in res.stdout + res.stderr
    assert (out / "runs" / "dense.json").read_bytes() == dense            # not made from the plans
    s = run_preset(load_preset(f), out)
    assert s.ran == []

    # 3. the ledger is lost: nothing proves how the outputs were made, so all of them are made again
    (out / "steps.json").unlink()
    seen = []
    s = run_preset(load_preset(f), out, on_step=lambda st, status: seen.append((st.title, status, st.why)))
    assert len(s.ran) == 10 and s.skipped == []
    reruns = {t: w for t, status, w in seen if status == "rerun"}
    assert set(reruns) == {x.title for x in s.ran if x.kind != "compare"}
    assert all("unknown settings" in w for w in reruns.values()), reruns
    assert not any(p.name.endswith((".new", ".replaced", ".allocating")) for p in (out / "plans").iterdir())
    assert run_preset(load_preset(f), out).ran == []
    # what was there is not overwritten but kept aside (the run cannot tell it from a user's own file)
    kept = list((out / "retired").glob("*/runs/dense.json"))
    assert len(kept) == 1 and kept[0].read_bytes() == dense
    assert len(list((out / "retired").glob("*/plans/*/plan.json"))) == 2
    assert all("kept in" in w for t, w in reruns.items() if not t.startswith("allocate")), reruns


@contextlib.contextmanager
def held_by_another_thread(folder: Path):
    """``folder``'s writer lock held by another thread for the duration (the thread that holds a lock
    may take it again; any other writer is refused)."""
    import threading
    from wina.files import locked
    ready, release = threading.Event(), threading.Event()

    def hold():
        with locked(folder):
            ready.set()
            release.wait()

    t = threading.Thread(target=hold)
    t.start()
    assert ready.wait(10)
    try:
        yield
    finally:
        release.set()
        t.join()


def test_second_writer_is_refused(tiny_preset, tmp_path, monkeypatch):
    from wina.errors import DataError
    import wina.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the run folder's lock was taken")

    monkeypatch.setattr(wina.models, "load", no_load)
    out = tmp_path / "out"
    with held_by_another_thread(out):
        with pytest.raises(DataError, match="is being written by process"):
            run_preset(load_preset(tiny_preset), out)


def test_cli_run_tiny_preset(tiny_preset, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["run", str(tiny_preset), "--out", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "finished" in res.stdout and "WINA" in res.stdout
    assert (out / "compare.md").is_file()
    res = CliRunner().invoke(app, ["run", str(tiny_preset), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0 and res.stdout.count("done, skipped") == 10
    res = CliRunner().invoke(app, ["run", str(tiny_preset), "--out", str(out)])
    assert res.exit_code == 0 and "0 steps run, 10 skipped" in res.stdout


@pytest.mark.slow
def test_quick_preset_offline_from_a_copy_without_shared_data(tmp_path):
    """The quick start as a new user meets it: `wina run smollm2-quick`, unchanged, from a copy of the
    package with no ../shared beside it, no $WINA_DATA and the hub off. The perplexity text is the
    excerpt shipped in wina/data, every step runs, and the table and the stage times are printed;
    the perplexities equal those of the same run with the full text when that is here."""
    import os
    import shutil
    import subprocess
    import sys
    try:
        from wina.models import embedded_gguf
        embedded_gguf()
    except Exception as e:
        pytest.skip(f"embedded model unavailable: {e}")
    repo = Path(__file__).resolve().parents[1]
    copy = tmp_path / "clone"
    shutil.copytree(repo / "wina", copy / "wina", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "presets", copy / "presets")
    assert not (copy.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("WINA_DATA", "WINA_DATA_DIR")}
    env.update(PYTHONPATH=str(copy), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WINA_PRESETS="",
               COLUMNS="200")
    out = copy / "runs" / "quick"
    res = subprocess.run([sys.executable, "-m", "wina.cli", "run", "smollm2-quick", "--out", str(out)],
                         cwd=copy, env=env, capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert runs == ["dense.json", "teal-s50.json", "wina-s50.json"]
    ppl = {}
    for name in runs:
        w = json.loads((out / "runs" / name).read_text())["wina"]
        p = w["perplexity"]
        assert Path(p["file"]) == copy / "wina" / "data" / "wikitext2" / "wiki.test.raw"
        assert p["tokens"] == 2048 - 4 and p["windows"] == 4          # 4 windows of 512, 511 scored
        ppl[name] = p["perplexity"]
        if name != "dense.json":
            assert w["allocation"].startswith("greedy") and 0.45 < w["measured_sparsity"] < 0.55
    assert ppl["dense.json"] < ppl["wina-s50.json"] and ppl["dense.json"] < ppl["teal-s50.json"]
    table = (out / "compare.md").read_text()
    assert "WINA" in table and "TEAL" in table
    assert "finished" in res.stdout
    for stage in ("calibrate teal", "allocate wina", "eval dense", "total"):
        assert stage in res.stdout                  # the stage-times table
    full = DATA_DIR / "wikitext2" / "wiki.test.raw"
    if full.is_file():                              # the excerpt gives the full text's figure
        from wina.perplexity import perplexity
        from wina.models import load
        m = load(dtype="float32")
        want = perplexity(m.model, m.tokenizer, full.read_text(encoding="utf-8"), max_tokens=2048)
        assert ppl["dense.json"] == pytest.approx(want.perplexity, rel=1e-4)


@pytest.mark.slow
def test_parallel_eval_steps_match_one_process(tiny_preset, tmp_path, monkeypatch):
    """`wina run --gpus 2` on a CPU: every eval step in 2 gloo processes under accelerate launch
    gives the perplexities of the single-process run; rank 0's progress reaches on_event."""
    import shutil
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WINA_THREADS", "1")
    preset = load_preset(tiny_preset)
    one, two = tmp_path / "one", tmp_path / "two"
    run_preset(preset, one)
    shutil.copytree(one / "plans", two / "plans")       # the same plans: only the evaluations differ
    shutil.copy(one / "steps.json", two / "steps.json")   # with the record of how they were made
    events = []
    s = run_preset(preset, two, procs=2, on_event=events.append)
    assert [x.title for x in s.ran if x.kind == "eval"] == [
        "eval dense", "eval teal @ 25%", "eval teal @ 50%", "eval wina @ 25%", "eval wina @ 50%"]
    assert any(e.stage == "ppl" for e in events)
    for name in ("dense", "teal-s50", "wina-s25"):
        a = json.loads((one / "runs" / f"{name}.json").read_text())["wina"]
        b = json.loads((two / "runs" / f"{name}.json").read_text())["wina"]
        assert b["perplexity"]["perplexity"] == pytest.approx(a["perplexity"]["perplexity"], rel=1e-6), name
        assert b["perplexity"]["tokens"] == a["perplexity"]["tokens"]
        assert b["measured_sparsity"] == pytest.approx(a["measured_sparsity"], abs=0.02)
        assert b["extra"] == a["extra"] and b["extra"]["variant"] == name.split("-")[0]
    assert (two / "logs" / "wina-s50.log").is_file()
    assert (two / "compare.md").is_file()


def test_parallel_eval_step_failure_is_one_clear_error(tiny_preset, tmp_path, monkeypatch):
    """A failing data-parallel group gives one error naming the step and the log, not a traceback."""
    import wina.distributed as dist
    from wina.errors import WinaError
    monkeypatch.setattr(dist, "launch_command", lambda argv, n, cpu: [
        __import__("sys").executable, "-c", "import sys; print('boom: no such thing'); sys.exit(3)"])
    preset = load_preset(tiny_preset)
    with pytest.raises(WinaError, match=r"eval dense: the 2 data-parallel processes failed \(exit 3\): "
                                         r"boom: no such thing"):
        run_preset(preset, tmp_path / "out", procs=2)
    assert not (tmp_path / "out" / "runs" / "dense.json").exists()


def _piqa_folder(root: Path, flip: bool = False) -> Path:
    """A data folder holding the shipped piqa subset (``flip``: every label swapped)."""
    import shutil
    import wina.data
    shutil.copytree(wina.data.SHIPPED_DIR / "piqa", root / "piqa")
    if flip:
        labels = root / "piqa" / "valid-labels.lst"
        labels.write_text("".join(f"{1 - int(x)}\n" for x in labels.read_text().split()))
    return root


def _piqa_acc(path: Path) -> float:
    return json.loads(path.read_text())["results"]["piqa"]["acc,none"]


def test_another_data_folder_reruns_the_evaluations(tiny_preset, tmp_path, monkeypatch):
    """The ledger records the data folder an evaluation read (``auto`` resolved), not the preset's
    "auto": pointing $WINA_DATA at another folder reruns the evaluations, saying so; a ledger from
    before (which recorded "auto") is judged by the folder its results file says was read."""
    from wina.runner import _key
    a, b = _piqa_folder(tmp_path / "a"), _piqa_folder(tmp_path / "b", flip=True)
    f = tmp_path / "tasks.toml"
    f.write_text(f'name = "tasks"\nmodel = "{load_preset(tiny_preset).model}"\ndevice = "cpu"\n'
                 'dtype = "float32"\n[eval]\nsparsities = [0.5]\ntasks = ["piqa"]\nlimit = 2\n'
                 'data_dir = "auto"\n[[variants]]\nname = "dense"\nmethod = "dense"\n')
    out, dense = tmp_path / "out", tmp_path / "out" / "runs" / "dense.json"

    def run(folder: Path):
        monkeypatch.setenv("WINA_DATA", str(folder))
        seen = []
        s = run_preset(load_preset(f), out, on_step=lambda st, status: seen.append((st.title, status, st.why)))
        return [x.title for x in s.ran], {t: w for t, status, w in seen if status == "rerun"}

    assert run(a)[0] == ["eval dense", "compare all runs"]
    assert json.loads(dense.read_text())["wina"]["eval"]["data_dir"] == str(a.resolve())
    acc_a = _piqa_acc(dense)
    assert run(a) == ([], {})

    # 1. another folder: the evaluation reads it (its labels are flipped: every answer's score flips)
    ran, why = run(b)
    assert ran == ["eval dense", "compare all runs"]
    assert why["eval dense"].startswith("settings changed: eval.data_dir '") and "/a' → '" in why["eval dense"]
    assert why["eval dense"].endswith("/b'"), why
    assert json.loads(dense.read_text())["wina"]["eval"]["data_dir"] == str(b.resolve())
    assert _piqa_acc(dense) == pytest.approx(1 - acc_a)
    assert run(b) == ([], {})

    # 2. a ledger written before data folders were resolved ("auto"): the results file decides
    led = json.loads((out / "steps.json").read_text())
    entry = led["eval runs/dense.json"]
    assert entry["settings"]["eval"]["data_dir"] == str(b.resolve())
    entry["settings"]["eval"]["data_dir"] = "auto"
    entry["key"] = _key(entry["settings"])
    (out / "steps.json").write_text(json.dumps(led))
    assert run(b) == ([], {})                          # results of b, asked for b: kept
    ran, why = run(a)
    assert ran == ["eval dense", "compare all runs"] and "/b' → '" in why["eval dense"], why
    assert _piqa_acc(dense) == pytest.approx(acc_a)


def test_a_perplexity_only_run_names_only_the_setting_that_changed(tiny_preset, tmp_path):
    """A preset without tasks reads no data folder: its "auto" is not compared with a folder the
    results file never names (the reason once said eval.data_dir 'hub' → 'auto' as well)."""
    text = tiny_preset.read_text().replace('data_dir = "hub"', 'data_dir = "auto"')
    text = text.replace("sparsities = [0.25, 0.5]", "sparsities = [0.5]")
    text = text[:text.index("[[variants]]")] + '[[variants]]\nname = "wina"\nmethod = "wina"\n'
    f = tiny_preset.parent / "ppl-only.toml"
    f.write_text(text)
    out = tmp_path / "out"
    assert len(run_preset(load_preset(f), out).ran) == 4
    f.write_text(text.replace("step = 0.1", "step = 0.2"))
    seen = []
    run_preset(load_preset(f), out, on_step=lambda st, status: seen.append((st.title, status, st.why)))
    why = {t: w for t, status, w in seen if status == "rerun"}
    assert why["eval wina @ 50%"] == "settings changed: allocation.step 0.1 → 0.2", why


def test_damaged_outputs_are_made_again(tiny_preset, tmp_path):
    """A results file or a plan file damaged after its step finished is not "done": the dry run shows
    the step as a rerun and the run makes it again, each saying why (no late "not a JSON results
    file" error); what was there is kept in retired/, never overwritten."""
    from wina import api
    from wina.plan import Plan
    f = tmp_path / "tiny.toml"
    f.write_text(tiny_preset.read_text().replace('name = "wina"\nmethod = "wina"\ntransform = true\n',
                                                 'name = "teal2"\nmethod = "teal"\n')
                 .replace('source = "text.txt"', f'source = "{tiny_preset.parent / "text.txt"}"')
                 .replace('ppl_text = "text.txt"', f'ppl_text = "{tiny_preset.parent / "text.txt"}"')
                 .replace("sparsities = [0.25, 0.5]", "sparsities = [0.5]"))
    out = tmp_path / "out"
    assert len(run_preset(load_preset(f), out).ran) == 8

    def run():
        seen = []
        s = run_preset(load_preset(f), out, on_step=lambda st, status: seen.append((st.title, status, st.why)))
        return [x.title for x in s.ran], {t: w for t, status, w in seen if status == "rerun"}

    # 1. a truncated results file: the dry run and the run redo that evaluation (and the comparison)
    dense = out / "runs" / "dense.json"
    with open(dense, "r+b") as fh:
        fh.truncate(100)
    res = CliRunner().invoke(app, ["run", str(f), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "damaged" in res.stdout and res.stdout.count("done, skipped") == 6, res.stdout
    truncated = dense.read_bytes()
    ran, why = run()
    assert ran == ["eval dense", "compare all runs"]
    assert "results file is damaged" in why["eval dense"] and "not a JSON results file" in why["eval dense"]
    assert json.loads(dense.read_text())["wina"]["method"] == "dense"
    [kept] = (out / "retired").glob("*/runs/dense.json")          # kept aside, not overwritten
    assert kept.read_bytes() == truncated and str(kept.parent.parent) in why["eval dense"]

    # 2. a plan file that no longer matches its checksum: that plan is made again, and the
    #    evaluations made from it (their results name the plan they were made with); the damaged
    #    plan is kept aside
    hist = out / "plans" / "teal" / "histograms" / "layer_001.safetensors"
    data = bytearray(hist.read_bytes())
    data[-1] ^= 0xFF
    hist.write_bytes(bytes(data))
    ran, why = run()
    assert ran == ["calibrate teal", "allocate teal", "eval teal @ 50%", "compare all runs"], ran
    assert "histograms/layer_001.safetensors does not match its checksum" in why["calibrate teal"], why
    assert why["eval teal @ 50%"] == "its plan is made again"
    assert not any(p.name.endswith((".new", ".replaced", ".allocating")) for p in (out / "plans").iterdir())
    assert Plan.load(out / "plans" / "teal").allocated
    assert [p.read_bytes() for p in (out / "retired").glob("*/plans/teal/histograms/layer_001.safetensors")] == [
        bytes(data)]
    sha = api.file_sha256(out / "plans" / "teal" / "plan.json")
    assert json.loads((out / "runs" / "teal-s50.json").read_text())["wina"]["plan_settings"]["plan_json_sha256"] == sha

    # 3. an unreadable plan.json: the same
    (out / "plans" / "teal2" / "plan.json").write_text("{")
    ran, why = run()
    assert ran == ["calibrate teal2", "allocate teal2", "eval teal2 @ 50%", "compare all runs"], ran
    assert "plan is damaged" in why["calibrate teal2"] and "not valid JSON" in why["calibrate teal2"], why
    assert Plan.load(out / "plans" / "teal2").allocated
    assert run() == ([], {})

    # 4. a plan allocated again by hand with other settings: its allocation and evaluations run again,
    #    and the dry run says why
    loaded = api.load(load_preset(f).model, device="cpu")
    api.allocate(loaded, out / "plans" / "teal", api.Allocation(mode="layer", step=0.2, max_sparsity=0.8))
    res = CliRunner().invoke(app, ["run", str(f), "--out", str(out), "--dry-run"])
    assert "made again outside this run" in " ".join(res.stdout.split()), res.stdout
    ran, why = run()
    assert ran == ["allocate teal", "eval teal @ 50%", "compare all runs"], ran

    # 5. the comparison edited by hand: kept aside, made again
    (out / "compare.md").write_text("my notes\n")
    ran, why = run()
    assert ran == ["compare all runs"] and "kept in" in why["compare all runs"]
    assert [p.read_text() for p in (out / "retired").glob("*/compare.md")] == ["my notes\n"]


def _edited(tiny_preset, path, old, new):
    path.write_text(tiny_preset.read_text().replace(old, new)
                    .replace('"text.txt"', f'"{tiny_preset.parent / "text.txt"}"'))
    return load_preset(path)


def _killed_in(preset, out, title, stage=None):
    """Run ``preset`` into ``out`` and cancel it at the step ``title``'s first progress event of
    ``stage`` (default: the step's kind: after the model's load)."""
    cancel, current = CancelToken(), {}

    def on_event(ev):
        if current.get("title") == title and ev.stage == (stage or title.split()[0]):
            cancel.cancel()

    with pytest.raises(Cancelled):
        run_preset(preset, out, on_step=lambda st, status: current.update(title=st.title),
                   on_event=on_event, cancel=cancel)


def test_a_plan_made_again_for_other_settings_resumes_or_is_kept(tiny_preset, tmp_path):
    """A plan calibrated or allocated again with other settings is made beside the finished one. Killed,
    it resumes where it stopped when run again (never moved aside as if the preset had dropped it);
    given up (the preset goes back), the finished plan is still done and nothing runs."""
    from safetensors.torch import load_file
    out = tmp_path / "out"
    run_preset(load_preset(tiny_preset), out)

    def leftovers():
        led = json.loads((out / "steps.json").read_text())
        return ([p.name for p in (out / "plans").iterdir() if p.name.endswith((".new", ".allocating"))],
                [k for k in led if k.endswith((".new", ".allocating"))])

    # 1. a re-allocation killed, then given up: the old allocation is still the plan's, nothing runs
    wider = _edited(tiny_preset, tmp_path / "wider.toml", "max_sparsity = 0.8", "max_sparsity = 0.7")
    _killed_in(wider, out, "allocate teal")
    assert leftovers() == (["teal.allocating"], ["allocate plans/teal.allocating"])
    assert (out / "compare.md").exists()                     # no result has changed yet
    s = run_preset(load_preset(tiny_preset), out)
    assert s.ran == [] and s.retired == [] and leftovers() == ([], [])

    # 2. killed again, then run with the new settings: it is finished, and replaces the old one
    _killed_in(wider, out, "allocate teal")
    _killed_in(wider, out, "eval teal @ 25%", stage="ppl")
    # the table of the old results went before the first evaluation ran: none is left beside new results
    assert not (out / "compare.md").exists() and "compare compare.md" not in json.loads((out / "steps.json").read_text())
    s = run_preset(wider, out)
    assert [x.title for x in s.ran][:2] == ["eval teal @ 25%", "eval teal @ 50%"] and s.retired == []
    assert json.loads((out / "plans" / "teal" / "plan.json").read_text())["allocation"]["max_sparsity"] == 0.7
    assert leftovers() == ([], []) and run_preset(wider, out).ran == []

    # 3. a re-calibration killed, then run again: it resumes beside the plan (not moved aside), and
    #    gives the histograms of an uninterrupted calibration with those settings
    more = _edited(tiny_preset, tmp_path / "more.toml", "samples = 2\n", "samples = 3\n")
    _killed_in(more, out, "calibrate teal")
    assert leftovers() == (["teal.new"], ["calibrate plans/teal.new"])
    s = run_preset(more, out)
    assert s.retired == [] and "calibrate teal" in [x.title for x in s.ran] and leftovers() == ([], [])
    whole = tmp_path / "whole"
    run_preset(more, whole)
    for name in ("layer_000", "layer_001"):
        got = load_file(out / "plans" / "teal" / "histograms" / f"{name}.safetensors")
        want = load_file(whole / "plans" / "teal" / "histograms" / f"{name}.safetensors")
        assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)


def test_a_folder_it_cannot_write_stops_the_run_before_the_model_loads(tiny_preset, tmp_path, monkeypatch):
    """runs/ read-only (or on a full disk): the run stops on one line before the model loads, not
    after an evaluation whose result it then cannot write."""
    import errno
    import os
    import wina.files
    import wina.models
    out = tmp_path / "out"
    run_preset(load_preset(tiny_preset), out)
    (out / "runs" / "teal-s50.json").unlink()
    real = wina.files.tempfile.mkstemp

    def refuse(*a, dir=None, **k):
        if Path(dir).name == "runs":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*a, dir=dir, **k)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the folder was checked")

    monkeypatch.setattr(wina.files.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(wina.models, "load", no_load)
    from wina.errors import DataError
    with pytest.raises(DataError, match="read-only file system"):
        run_preset(load_preset(tiny_preset), out)


def test_retire_moves_what_it_can_and_keeps_every_record_after_a_failure(tiny_preset, tmp_path, monkeypatch):
    """A move that fails (a read-only folder, say) is one clear error; what was moved before it is
    in retired/ with its ledger entries, and what was not is still recorded where it is."""
    import errno
    import os
    from wina.errors import DataError
    from wina.runner import LEDGER, plan_steps, retire
    out = tmp_path / "out"
    steps = plan_steps(load_preset(tiny_preset), out)
    (out / "runs").mkdir(parents=True)
    led = {s.rel: {"key": s.key, "settings": {}} for s in steps if s.kind == "eval"}
    for name in ("old-s10.json", "old-s20.json"):
        (out / "runs" / name).write_text('{"x": 1}')
        led[f"eval runs/{name}"] = {"key": "k", "settings": {"sparsity": name}}
    (out / LEDGER).write_text(json.dumps(led))
    real = os.replace

    def replace(src, dst):
        if str(src).endswith("old-s20.json"):
            raise OSError(errno.EROFS, "Read-only file system", str(src))
        return real(src, dst)
    monkeypatch.setattr("wina.runner.os.replace", replace)
    with pytest.raises(DataError, match=r"cannot move .*old-s20.json, which the preset no longer makes, "
                                        r"to .*retired/.*: Read-only file system"):
        retire(out, steps)
    [where] = list((out / "retired").iterdir())
    assert (where / "runs" / "old-s10.json").read_text() == '{"x": 1}'
    assert json.loads((where / LEDGER).read_text()) == {"eval runs/old-s10.json": led["eval runs/old-s10.json"]}
    now = json.loads((out / LEDGER).read_text())
    assert "eval runs/old-s10.json" not in now and "eval runs/old-s20.json" in now
    assert (out / "runs" / "old-s20.json").exists()
    monkeypatch.setattr("wina.runner.os.replace", real)
    later, moved = retire(out, steps)                                  # the next run moves the rest
    assert moved == ["runs/old-s20.json"] and later != where and (later / "runs" / "old-s20.json").exists()


def test_a_changed_list_setting_names_what_went_and_what_came():
    """A rerun's reason for a list (tasks, the comparison's inputs) names the items, not a cut repr."""
    from wina.runner import _diff
    old = {"inputs": ["dense.json", "teal-s25.json", "teal-s50.json", "wina-s50.json"], "eval": {"tasks": ["piqa"]}}
    new = {"inputs": ["dense.json", "wina-s50.json"], "eval": {"tasks": ["piqa", "mmlu"]}}
    assert _diff(old, new) == ["eval.tasks +'mmlu'", "inputs −'teal-s25.json', −'teal-s50.json'"]
    assert _diff({"a": [1, 2]}, {"a": [2, 1]}) == ["a [1, 2] → [2, 1]"]       # only the order changed
