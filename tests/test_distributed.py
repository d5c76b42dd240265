"""Data-parallel evaluation (issue 8): the merge logic, and 2 CPU processes through accelerate
launch giving the results of 1 process on the same --limit."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tiny_model
from wina import distributed
from wina.sparsify import sparsify


def test_single_process_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv(distributed.ENV_MARK, raising=False)
    w = distributed.world()
    assert (w.rank, w.size, w.is_main) == (0, 1, True)
    assert list(distributed.shard(5)) == [0, 1, 2, 3, 4]
    assert distributed.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert distributed.device_for_rank("cuda") == "cuda"


def test_shards_partition_the_windows():
    parts = [list(distributed.shard(11, distributed.World(r, 3))) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_launch_command_and_argv_stripping():
    from wina.cli.quality import _without_procs
    assert _without_procs(["eval", "m", "--procs", "2", "--limit", "4", "--gpus=3"]) == ["eval", "m", "--limit", "4"]
    cmd = distributed.launch_command(["eval", "m"], 2, cpu=True)
    assert cmd[-4:] == ["-m", "wina.cli", "eval", "m"] and "--cpu" in cmd and "2" in cmd
    assert "--multi_gpu" in distributed.launch_command(["eval"], 4, cpu=False)


@torch.no_grad()
def test_merge_gate_counters_single_process_keeps_counts():
    model = tiny_model("llama")
    sp = sparsify(model, "teal", 0.5, dense_prefix=0.0)
    model(torch.randint(3, 128, (1, 8)))
    before = sp.measured_sparsity()
    distributed.merge_gate_counters(sp)
    assert sp.measured_sparsity() == before == pytest.approx(0.5)


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path, data_dir):
    from test_cli import make_tiny
    model_dir = make_tiny(tmp_path / "model")
    base = [sys.executable, "-m", "wina.cli", "eval", str(model_dir), "--method", "wina",
            "--sparsity", "0.5", "--tasks", "arc_easy", "--limit", "12", "--data-dir", str(data_dir),
            "--batch-size", "4", "--ppl-text", str(data_dir / "wikitext2" / "wiki.test.raw"),
            "--ppl-max-tokens", "2048"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WINA_THREADS="1", PYTHONPATH=str(REPO))
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    r1 = subprocess.run(base + ["--output", str(one)], env=env, capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run(base + ["--output", str(two), "--procs", "2"], env=env, capture_output=True,
                        text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    ra, rb = a["results"]["arc_easy"], b["results"]["arc_easy"]
    for key in ("acc,none", "acc_norm,none"):
        assert ra[key] == pytest.approx(rb[key], abs=1e-9), key
    assert a["wina"]["perplexity"]["perplexity"] == pytest.approx(b["wina"]["perplexity"]["perplexity"], rel=1e-6)
    assert a["wina"]["perplexity"]["tokens"] == b["wina"]["perplexity"]["tokens"]
    ma, mb = a["wina"]["measured_sparsity"], b["wina"]["measured_sparsity"]
    assert ma == pytest.approx(mb, abs=0.02)        # batch padding differs between the shards
