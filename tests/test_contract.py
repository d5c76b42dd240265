"""The three front-ends build the same thing for the same settings: a plan made by the CLI
(`wina calibrate` + `wina allocate`), by a preset (`wina run`) and by the TUI's settings form, on the
embedded model, has byte-identical tensors files and the same plan.json (but for times and paths),
and the results rows they lead to carry the same labels. Each front-end only translates its own
settings into ``wina.api``'s; this test pins those translations."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_cli import invoke, ok

pytestmark = pytest.mark.slow

SAMPLES, SEQ_LEN, STEP, MAX = 2, 64, 0.3, 0.6
VOLATILE = {"created", "saved_at", "meta_sha256", "calibration_args", "calibration", "files"}


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
    """plan.json without times, paths and the calibration text's name."""
    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items()
                if k not in VOLATILE and not k.endswith("_at")}
    return clean(json.loads((plan / "plan.json").read_text()))


def _source_free(plan: Path) -> dict:
    """The calibration record without the text's path (the CLI and the preset name it differently)."""
    c = json.loads((plan / "plan.json").read_text())["calibration"]
    return {k: v for k, v in c.items() if k != "source"}


def test_cli_preset_and_tui_make_the_same_plan(embedded_ok, tmp_path):
    from wina import api
    from wina.presets import load_preset
    from wina.runner import run_preset
    from wina_tui.state import Settings

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

    # 3. the TUI's settings form, through the pipeline exactly as its calibrate worker calls it
    s = Settings(model="smollm2-135m", options=api.SparseOptions(method="wina", sparsity=0.5, transform=True),
                 allocation="layer", calib_source=str(text))
    loaded = api.load("smollm2-135m", device="cpu", dtype="float32")
    tui = tmp_path / "tui"
    api.calibrate(loaded, tui, s.calibration({"samples": SAMPLES, "seq_len": SEQ_LEN}))
    api.allocate(loaded, tui, s.allocation_settings({"step": STEP, "max_sparsity": MAX}))

    base = _files(cli)
    assert base and _files(runner_plan) == base and _files(tui) == base
    assert _meta(runner_plan) == _meta(cli) == _meta(tui)
    assert _source_free(runner_plan) == _source_free(cli) == _source_free(tui)

    # the results rows the plans lead to carry the same labels and sparsity (CLI and preset)
    out = tmp_path / "cli.json"
    ok(invoke("eval", "smollm2-135m", "--plan", cli, "--sparsity", "0.5", "--ppl-text", text,
              "--ppl-max-tokens", "600", "--dtype", "float32", "--device", "cpu", "--output", out))
    a = json.loads(out.read_text())["wina"]
    b = json.loads((run / "runs" / "wina-s50.json").read_text())["wina"]
    for k in ("method", "transform", "allocation", "nominal_sparsity", "measured_sparsity"):
        assert a[k] == b[k], k
    assert a["perplexity"]["perplexity"] == pytest.approx(b["perplexity"]["perplexity"], rel=1e-6)
