"""Results store (atomic write, documented fields, loading) and the comparison table and chart,
rendered from result files written here."""
from __future__ import annotations

import json

import pytest

from wina.compare import chart_series, comparison_markdown, comparison_rows, comparison_table, quality_chart
from wina.errors import DataError, InvalidArgument
from wina.results import REQUIRED, load_run, load_runs, make_record, make_wina_block, write_run

TASKS = ("piqa", "arc_easy", "boolq")


def _record(method, sparsity, transform=False, accs=(0.6, 0.5, 0.55), ppl=40.0, date=None):
    """A run file's content as evaluate.run_evaluation builds it (lm-eval part reduced to results)."""
    results = {t: {"alias": t, ("acc_norm,none" if t != "boolq" else "acc,none"): a} for t, a in zip(TASKS, accs)}
    from wina.evaluate import headlines
    lm = {"results": results, "n-samples": {t: {"original": 100, "effective": 10} for t in TASKS}}
    w = make_wina_block(model_id="tiny", method=method, sparsity=sparsity, transform=transform,
                        allocation="uniform" if method != "dense" else None,
                        measured=sparsity * 0.98, headline=headlines(lm, TASKS),
                        eval_info={"tasks": list(TASKS), "limit": 10, "data_dir": "/data"},
                        perplexity={"file": "wiki.test.raw", "perplexity": ppl, "tokens": 1000})
    if date:
        w["date"] = date
    return make_record(lm, w)


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "runs"
    write_run(_record("dense", 0.0, accs=(0.70, 0.60, 0.62), ppl=36.0), d)
    for s, drop in ((0.25, 0.01), (0.5, 0.05), (0.65, 0.15)):
        write_run(_record("teal", s, accs=(0.70 - drop, 0.60 - drop, 0.62 - drop), ppl=36 * (1 + 4 * drop)), d)
        write_run(_record("teal", s, True, accs=(0.69 - drop, 0.58 - drop, 0.60 - drop), ppl=37 * (1 + 5 * drop)), d)
        write_run(_record("wina", s, True, accs=(0.71 - drop, 0.61 - drop, 0.60 - drop), ppl=36 * (1 + 3 * drop)), d)
    return d


def test_write_is_atomic_and_fields_documented(tmp_path):
    run = write_run(_record("wina", 0.5, True), tmp_path / "out" / "one.json")
    assert run.path == tmp_path / "out" / "one.json"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["one.json"]       # no temp file left
    data = json.loads(run.path.read_text())
    w = data["wina"]
    assert all(k in w for k in REQUIRED)
    assert w["method"] == "wina" and w["transform"] is True and w["nominal_sparsity"] == 0.5
    assert set(w["versions"]) >= {"wina", "torch", "transformers", "lm_eval", "python"}
    assert w["machine"]["cpu_count"] >= 1 and "T" in w["date"]
    assert data["results"]["piqa"]["acc_norm,none"] == 0.6
    assert load_run(run.path).label == "WINA-transform"
    # a folder: a name is made up from date, model, method and sparsity
    r2 = write_run(_record("teal", 0.4), tmp_path / "dir")
    assert r2.path.parent == tmp_path / "dir" and r2.path.name.endswith("_tiny_teal-s40.json")


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_run(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="not a JSON"):
        load_run(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"results": {}}))
    with pytest.raises(DataError, match="no 'wina' block"):
        load_run(tmp_path / "y.json")
    (tmp_path / "z.json").write_text(json.dumps({"wina": {"model": "m"}}))
    with pytest.raises(DataError, match="lacks"):
        load_run(tmp_path / "z.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no results files"):
        load_runs([tmp_path / "empty"])
    with pytest.raises(InvalidArgument):
        write_run({"results": {}}, tmp_path / "w.json")


def test_comparison_rows_shape(run_dir):
    cmp = comparison_rows(load_runs([run_dir]))
    assert cmp.acc_columns == ["piqa", "arc_easy", "boolq"] and cmp.low_columns == ["ppl"]
    labels = [(r.label, r.sparsity) for r in cmp.rows]
    assert labels[0] == ("dense", 0.0)
    assert labels[1:4] == [("TEAL", 0.25), ("TEAL-transform", 0.25), ("WINA-transform", 0.25)]
    assert len(labels) == 10
    dense = cmp.rows[0]
    assert dense.average == pytest.approx((0.70 + 0.60 + 0.62) / 3)
    assert any("limit 10" in n for n in cmp.notes)


def test_latest_run_wins(tmp_path):
    write_run(_record("teal", 0.5, accs=(0.1, 0.1, 0.1), date="2026-01-01T00:00:00+00:00"), tmp_path / "a.json")
    write_run(_record("teal", 0.5, accs=(0.9, 0.9, 0.9), date="2026-02-01T00:00:00+00:00"), tmp_path / "b.json")
    cmp = comparison_rows(load_runs([tmp_path]))
    assert len(cmp.rows) == 1 and cmp.rows[0].average == pytest.approx(0.9)


def test_table_renders(run_dir):
    from rich.console import Console
    table = comparison_table(load_runs([run_dir]))
    con = Console(width=160, record=True, color_system=None)
    con.print(table)
    text = con.export_text()
    for s in ("sparsity", "method", "piqa", "arc-e", "boolq", "avg", "ppl", "dense", "TEAL",
              "TEAL-transform", "WINA-transform", "25 %", "50 %", "65 %", "64.00"):
        assert s in text, s
    assert table.row_count == 10
    md = comparison_markdown(load_runs([run_dir]))
    assert md.count("\n") == 11 and md.startswith("| sparsity | method | piqa")


def test_chart_renders(run_dir):
    runs = load_runs([run_dir])
    series = chart_series(runs, "avg")
    assert list(series) == ["dense", "TEAL", "TEAL-transform", "WINA-transform"]
    assert series["TEAL"][0] == (0.0, pytest.approx(64.0))            # every line starts at dense
    assert [x for x, _ in series["WINA-transform"]] == [0.0, 25.0, 50.0, 65.0]
    txt = quality_chart(runs, y="avg", width=70, height=18, color=False)
    assert "TEAL" in txt and "WINA-transform" in txt and "sparsity" in txt
    assert "\x1b[" not in txt
    assert len(txt.splitlines()) >= 18 - 2
    colored = quality_chart(runs, y="ppl", width=70, height=18, color=True)
    assert "\x1b[" in colored
    assert "piqa" in quality_chart(runs, y="piqa", color=False)
    with pytest.raises(InvalidArgument, match="nothing to plot"):
        quality_chart(runs, y="mmlu")


# --- `wina compare` never drops a value: files merged per model × method × sparsity ------------------

def _ppl_only(model="tiny", ppl=27.53, method="dense", sparsity=0.0, date=None):
    """A results file as `wina ppl --output` writes it: no lm-eval part, no headline."""
    w = make_wina_block(model_id=model, method=method, sparsity=sparsity, measured=sparsity,
                        eval_info={"tasks": [], "limit": None, "data_dir": None, "num_fewshot": None},
                        perplexity={"file": "wiki.test.raw", "perplexity": ppl, "tokens": 1000})
    if date:
        w["date"] = date
    return make_record(None, w)


def _piqa_only(model="tiny", acc=0.40, date=None):
    """A results file as `wina eval --tasks piqa` (no --ppl-text) writes it: no perplexity."""
    from wina.evaluate import headlines
    lm = {"results": {"piqa": {"alias": "piqa", "acc_norm,none": acc}},
          "n-samples": {"piqa": {"original": 100, "effective": 10}}}
    w = make_wina_block(model_id=model, method="dense", headline=headlines(lm, ("piqa",)),
                        eval_info={"tasks": ["piqa"], "limit": 10, "data_dir": "/data"}, perplexity=None)
    if date:
        w["date"] = date
    return make_record(lm, w)


def _cli(*args):
    from typer.testing import CliRunner
    from wina.cli import app
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res.stdout


@pytest.mark.parametrize("ppl_first", [True, False])
def test_compare_merges_ppl_and_eval_files_of_one_config(tmp_path, ppl_first):
    a = write_run(_ppl_only(date="2026-01-01T00:00:00+00:00"), tmp_path / "a.json").path
    b = write_run(_piqa_only(date="2026-02-01T00:00:00+00:00"), tmp_path / "b.json").path
    files = [a, b] if ppl_first else [b, a]
    cmp = comparison_rows(load_runs(files))
    assert cmp.acc_columns == ["piqa"] and cmp.low_columns == ["ppl"] and not cmp.warnings
    assert len(cmp.rows) == 1
    row = cmp.rows[0]
    assert row.label == "dense" and row.values == {"piqa": pytest.approx(0.40), "ppl": pytest.approx(27.53)}
    assert {r.path for r in row.runs} == {a, b}
    for out in (_cli("compare", *files), _cli("compare", *files, "--markdown"), comparison_markdown(load_runs(files))):
        assert "40.00" in out and "27.53" in out, out
        assert "warning" not in out
    assert "27.53" in _cli("compare", tmp_path)


def test_compare_keeps_rows_of_different_models(tmp_path):
    t = write_run(_ppl_only(model="tiny", ppl=27.53), tmp_path / "tiny.json").path
    s = write_run(_ppl_only(model="smol", ppl=15.25), tmp_path / "smol.json").path
    cmp = comparison_rows(load_runs([t, s]))
    assert cmp.models == ["smol", "tiny"] and not cmp.warnings
    assert [(r.model, r.label, r.values["ppl"]) for r in cmp.rows] == [("smol", "dense", 15.25),
                                                                       ("tiny", "dense", 27.53)]
    out = _cli("compare", t, s)
    assert "model" in out and "27.53" in out and "15.25" in out
    assert any("tiny" in line and "27.53" in line for line in out.splitlines())
    assert any("smol" in line and "15.25" in line for line in out.splitlines())
    md = comparison_markdown(load_runs([t, s]))
    assert md.startswith("| model | sparsity | method")
    assert "| tiny | 0 % | dense | 27.53 |" in md and "| smol | 0 % | dense | 15.25 |" in md
    # the chart: one line per model and method, each sparse line from its own model's dense value
    write_run(_ppl_only(model="tiny", ppl=40.0, method="wina", sparsity=0.5), tmp_path / "tw.json")
    write_run(_ppl_only(model="smol", ppl=20.0, method="wina", sparsity=0.5), tmp_path / "sw.json")
    series = chart_series(load_runs([tmp_path]), "ppl")
    assert series == {"smol: dense": [(0.0, 15.25)], "smol: WINA": [(0.0, 15.25), (50.0, 20.0)],
                      "tiny: dense": [(0.0, 27.53)], "tiny: WINA": [(0.0, 27.53), (50.0, 40.0)]}
    assert "tiny: WINA" in quality_chart(load_runs([tmp_path]), y="ppl", color=False)
    # one model: no model column, as before
    assert comparison_markdown(load_runs([t])).startswith("| sparsity | method")


def test_compare_warns_when_files_disagree_on_a_cell(tmp_path):
    old = write_run(_ppl_only(ppl=27.53, date="2026-01-01T00:00:00+00:00"), tmp_path / "old.json").path
    new = write_run(_ppl_only(ppl=30.00, date="2026-02-01T00:00:00+00:00"), tmp_path / "new.json").path
    for files in ([old, new], [new, old]):
        cmp = comparison_rows(load_runs(files))
        assert len(cmp.rows) == 1 and cmp.rows[0].values["ppl"] == 30.0     # the latest
        assert len(cmp.warnings) == 1
        w = cmp.warnings[0]
        assert str(old) in w and str(new) in w and "ppl" in w and "dense" in w
        out = "".join(_cli("compare", *files).split())         # the caption wraps long paths anywhere
        assert "30.00" in out and "warning" in out and "old.json" in out and "new.json" in out
        md = comparison_markdown(load_runs(files))
        assert "> warning:" in md and str(old) in md
    # the same value (as shown) in two files: one row, no warning
    write_run(_ppl_only(ppl=30.0000001, date="2026-03-01T00:00:00+00:00"), tmp_path / "again.json")
    cmp = comparison_rows(load_runs([new, tmp_path / "again.json"]))
    assert len(cmp.rows) == 1 and not cmp.warnings


def test_compare_says_how_the_perplexities_were_measured_and_warns_when_they_differ(tmp_path):
    """One perplexity setting: a note says it (tokens, text, window). Two (say, a run over 1,000
    tokens beside one over 2,000): a warning says the column does not compare."""
    a = write_run(_ppl_only(ppl=27.53), tmp_path / "a.json").path
    b = write_run(_ppl_only(ppl=40.0, method="wina", sparsity=0.5), tmp_path / "b.json").path
    cmp = comparison_rows(load_runs([a, b]))
    assert "ppl over 1000 tokens of wiki.test.raw" in cmp.notes and not cmp.warnings
    rec = _ppl_only(ppl=41.0, method="teal", sparsity=0.5)
    rec["wina"]["perplexity"]["tokens"] = 2000
    c = write_run(rec, tmp_path / "c.json").path
    cmp = comparison_rows(load_runs([a, b, c]))
    assert len(cmp.warnings) == 1 and "not measured alike" in cmp.warnings[0]
    assert "1000 tokens" in cmp.warnings[0] and "2000 tokens" in cmp.warnings[0]
    assert "not measured alike" in " ".join(_cli("compare", a, b, c).split())
