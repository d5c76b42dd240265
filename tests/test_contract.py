"""The three front-ends build the same thing for the same settings: a plan made by the CLI
(`wina calibrate` + `wina allocate`), by a preset (`wina run`) and by the TUI (its session's own
translation of its form, called as its calibrate and evaluate workers call it), on the embedded
model, has byte-identical tensors files and the same plan.json (but for times), and the results
rows they lead to carry the same labels and numbers, and make one row in `wina compare`. Each
front-end only translates its own settings into ``wina.api``'s; this test pins those translations."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_cli import invoke, ok

pytestmark = pytest.mark.slow

SAMPLES, SEQ_LEN, STEP, MAX = 2, 64, 0.3, 0.6
VOLATILE = {"created", "saved_at", "meta_sha256"}     # times, and the seal over them


@pytest.fixture(scope="module")
def embedded_ok():
    try:
        from wina.models import embedded_gguf
        embedded_gguf()
    except Exception as e:
        pytest.skip(f"embedded model unavailable: {e}")


def _files(plan: Path) -> dict[str, bytes]:
    return {str(p.relative_to(plan)): p.read_bytes() for p in sorted(plan.rglob("*.safetensors"))}


def _meta(plan: Path) -> dict:
    """plan.json without its times (and the checksum of the file, which covers them)."""
    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items()
                if k not in VOLATILE and not k.endswith("_at")}
    return clean(json.loads((plan / "plan.json").read_text()))


def test_cli_preset_and_tui_make_the_same_plan(embedded_ok, tmp_path):
    from wina import api
    from wina.presets import load_preset
    from wina.runner import run_preset
    from wina_tui.state import Session, Settings

    text = tmp_path / "text.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog while the city sleeps. " * 60), encoding="utf-8")

    # 1. the CLI
    cli = tmp_path / "cli"
    ok(invoke("calibrate", "smollm2-135m", "--method", "wina", "--transform", "--data", text, "--samples",
              SAMPLES, "--seq-len", SEQ_LEN, "--dtype", "float32", "--device", "cpu", "--out", cli))
    ok(invoke("allocate", cli, "--step", STEP, "--max-sparsity", MAX, "--dtype", "float32", "--device", "cpu"))

    # 2. a preset through wina run (calibration and allocation steps only: no tasks)
    preset = tmp_path / "p.toml"
    preset.write_text(f'''
name = "contract"
model = "smollm2-135m"
dtype = "float32"
device = "cpu"
[calibration]
source = "{text}"
samples = {SAMPLES}
seq_len = {SEQ_LEN}
[allocation]
mode = "layer"
step = {STEP}
max_sparsity = {MAX}
[eval]
sparsities = [0.5]
ppl_text = "{text}"
ppl_max_tokens = 600
[[variants]]
name = "wina"
method = "wina"
transform = true
''')
    run = tmp_path / "run"
    run_preset(load_preset(preset), run)
    runner_plan = run / "plans" / "wina"

    # 3. the TUI: its session translates the form, called as the calibrate worker calls it
    #    (wina_tui/screens/calibrate.py, run_calibration)
    session = Session(lambda spec: api.load(spec, device="cpu", dtype="float32"), state_dir=tmp_path / "tui-state")
    session.settings = Settings(model="smollm2-135m", options=api.SparseOptions(method="wina", sparsity=0.5,
                                                                                transform=True),
                                allocation="layer", calib_source=str(text))
    session.calibrate_options = {"samples": SAMPLES, "seq_len": SEQ_LEN}
    session.allocate_options = {"step": STEP, "max_sparsity": MAX}
    settings = session.settings
    tui, calib = session.calibration_for(settings)
    with session.using("calibrate"), api.locked(tui, f"plan {tui}"):
        loaded = session.load_for_calibration(settings)
        plan = api.calibrate(loaded, tui, calib)
        alloc = session.allocation_for(settings)
        assert alloc is not None
        plan = api.allocate(loaded, tui, alloc)
        session.adopt_plan(settings, tui, plan)

    base = _files(cli)
    assert base and _files(runner_plan) == base and _files(tui) == base
    assert _meta(runner_plan) == _meta(cli) == _meta(tui)

    # the results rows the plans lead to: the CLI's, the preset's, and the TUI's (as its evaluate
    # worker runs one job: wina_tui/screens/evaluate.py, run_jobs)
    out = tmp_path / "cli.json"
    ok(invoke("eval", "smollm2-135m", "--plan", cli, "--sparsity", "0.5", "--ppl-text", text,
              "--ppl-max-tokens", "600", "--dtype", "float32", "--device", "cpu", "--output", out))
    runner_out = run / "runs" / "wina-s50.json"
    ev = api.Evaluation(ppl_text=str(text), ppl_max_tokens=600).validate()
    with session.using("evaluate"):
        loaded = session.ensure_loaded(settings.model, settings.options.transform)
        session.drop_sparsifier()
        tui_run = api.evaluate(loaded, session.eval_options("wina", 0.5), ev, out=session.results_dir)
    tui_out = Path(tui_run.path)

    a = json.loads(out.read_text())["wina"]
    b = json.loads(runner_out.read_text())["wina"]
    c = json.loads(tui_out.read_text())["wina"]
    for k in ("method", "transform", "allocation", "nominal_sparsity", "measured_sparsity"):
        assert a[k] == b[k] == c[k], k
    assert a["allocation"] == "greedy"               # the plan's within-layer allocation, not uniform
    for r in (b, c):
        assert r["perplexity"]["perplexity"] == pytest.approx(a["perplexity"]["perplexity"], rel=1e-6)

    # `wina compare` on the three files: one row for the variant at 50 %, not one per front-end
    runs = api.load_runs([out, runner_out, tui_out])
    assert len({r.label for r in runs}) == 1
    rows = api.comparison_rows(runs).rows
    assert [(row.label, row.sparsity) for row in rows] == [(runs[0].label, 0.5)]
