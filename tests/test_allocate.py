"""Greedy allocation: trajectory shape, quality against the uniform allocation, resume, events."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from conftest import tiny_model
from test_calibrate import CharTok
from wina.allocate import LayerTrials, allocate, global_order
from wina.calibrate import LayerRunner, calibrate
from wina.errors import Cancelled, InvalidArgument, PlanError
from wina.plan import Plan, apply_plan


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run faster on one thread



def _plan(arch="llama", layers=2, out=None, transform=False, method="wina", **kw):
    model = tiny_model(arch, num_hidden_layers=layers, **kw)
    if transform:
        from wina.transform import transform as tr
        tr(model)
    plan = calibrate(model, CharTok(), method=method, source="random", samples=4, seq_len=64, out=out)
    return model, plan


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_trajectory_rises_by_step_over_total_weight(arch):
    model, plan = _plan(arch)
    plan = allocate(model, CharTok(), plan, step=0.2, max_sparsity=0.9, lazy=False)
    w = plan.weights
    assert w[plan.projections[0]] == 1.0
    from wina.adapters import projection_shapes
    shapes = projection_shapes(model.config)
    q = shapes[plan.projections[0]]
    for p in plan.projections:                      # weights come from the shapes
        assert w[p] == pytest.approx(shapes[p][0] * shapes[p][1] / (q[0] * q[1]))
    rise = 0.2 / sum(w.values())
    for i, rows in enumerate(plan.trajectories):
        assert rows[0].effective == 0.0 and rows[0].error == pytest.approx(0.0, abs=1e-5)
        assert rows[-1].effective >= 0.9 - 1e-9
        assert rows[-2].effective < 0.9
        for a, b, m in zip(rows, rows[1:], plan.trajectory_steps[i][1:]):
            changed = [p for p in plan.projections if b.sparsities[p] != a.sparsities[p]]
            assert changed == [m]
            if b.sparsities[m] < 0.99 - 1e-9:       # not clipped at the per-matrix cap
                assert b.effective - a.effective == pytest.approx(rise, rel=1e-6)
                assert b.sparsities[m] - a.sparsities[m] == pytest.approx(0.2 / w[m])


def test_greedy_beats_uniform_and_errors_are_consistent():
    model, plan = _plan("llama", layers=2)
    plan = allocate(model, CharTok(), plan, step=0.2, lazy=False)
    runner = LayerRunner(model)
    h = runner.inputs(plan.calib_ids)
    ratios = []
    for i in range(plan.n_layers):
        y = runner.run(i, h)
        trials = LayerTrials(model, plan, runner, i, h, y, 0.01)
        try:
            rows = plan.trajectories[i]
            # the recorded errors are those of a plain evaluation of the row's configuration
            for r in (5, len(rows) // 2, len(rows) - 1):
                assert trials.errors([rows[r].sparsities])[0] == pytest.approx(rows[r].error, rel=1e-4)
            for s in (0.3, 0.5, 0.7):
                uni = trials.errors([{p: s for p in plan.projections}])[0]
                eff = [r.effective for r in rows]
                err = [r.error for r in rows]
                greedy = float(np.interp(s, eff, err))
                ratios.append(greedy / uni)
        finally:
            trials.close()
        h = y
    assert sum(ratios) / len(ratios) < 1.0, ratios



def _plain_greedy(model, plan, step, error):
    """The greedy written directly on LayerTrials.errors (a whole-layer evaluation of every trial):
    the reference the allocation's shared-work evaluator must reproduce step for step."""
    runner = LayerRunner(model)
    h = runner.inputs(plan.calib_ids)
    P, w = plan.projections, plan.weights
    out = []
    for i in range(plan.n_layers):
        y = runner.run(i, h)
        trials = LayerTrials(model, plan, runner, i, h, y, 0.01, error=error)
        try:
            cur = {p: plan.floor(i, p) for p in P}
            rows, steps = [trials.errors([cur])[0]], [None]
            while plan.effective(i, cur) < 0.9 - 1e-9:
                cands = [p for p in P if cur[p] < 0.99 - 1e-9]
                trial = {p: min(cur[p] + step / w[p], 0.99) for p in cands}
                errs = dict(zip(cands, trials.errors([{**cur, p: trial[p]} for p in cands])))
                best = min(cands, key=lambda p: (errs[p], P.index(p)))
                cur[best] = trial[best]
                rows.append(errs[best])
                steps.append(best)
        finally:
            trials.close()
        out.append((rows, steps))
        h = y
    return out


@pytest.mark.parametrize("arch,transform,method,error", [
    ("llama", False, "wina", "wina"), ("llama", True, "wina", "seed"), ("qwen2", False, "teal", "wina"),
    ("phi3", True, "wina", "wina"), ("mistral", False, "wina", "seed")])
def test_greedy_matches_a_plain_evaluation_step_for_step(arch, transform, method, error):
    """The allocation reuses projection outputs between trials and runs o_proj and the MLP on the
    error's positions only; in float64 it must take the plain greedy's every step with its errors.
    A small chunk size makes every stage run in several chunks."""
    model = tiny_model(arch, dtype=torch.float64, num_hidden_layers=2)
    if transform:
        from wina.transform import transform as tr
        tr(model)
    plan = calibrate(model, CharTok(), method=method, source="random", samples=4, seq_len=64)
    got = allocate(model, CharTok(), plan, step=0.2, max_sparsity=0.9, lazy=False, error=error,
                   samples=4, seq_len=64, chunk_tokens=40)
    want = _plain_greedy(model, plan, 0.2, error)
    for i, (errs, steps) in enumerate(want):
        assert got.trajectory_steps[i] == steps
        assert [r.error for r in got.trajectories[i]] == pytest.approx(errs, rel=1e-9, abs=1e-12)

def test_lazy_greedy_close_to_full():
    model, plan = _plan("qwen2")
    full = allocate(model, CharTok(), plan, step=0.2, lazy=False)
    errs_full = [[r.error for r in t] for t in full.trajectories]
    lazy = allocate(model, CharTok(), plan, step=0.2, lazy=True)
    assert lazy.meta["allocation"]["lazy"] is True
    for a, b in zip(errs_full, lazy.trajectories):
        for s in (0.3, 0.5, 0.7):
            i = min(range(len(a)), key=lambda r: abs(r * 0.2 / sum(plan.weights.values()) - s))
            assert b[i].error <= 1.25 * a[i] + 1e-6


def test_resume_after_interruption_is_identical(tmp_path):
    model, plan_a = _plan("mistral", layers=3, out=tmp_path / "a")
    full = allocate(model, CharTok(), plan_a, step=0.3, lazy=False)
    _, plan_b = _plan("mistral", layers=3, out=tmp_path / "b")

    def stop(ev):
        if ev.stage == "allocate" and ev.layer == 1 and ev.metrics.get("row") == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        allocate(model, CharTok(), plan_b, step=0.3, lazy=False, on_event=stop)
    with pytest.raises(PlanError, match="partial"):
        Plan.load(tmp_path / "b")
    part = Plan.load(tmp_path / "b", allow_partial=True)
    assert part.n_allocated == 1
    resumed = allocate(model, CharTok(), part, step=0.3, lazy=False)
    again = Plan.load(tmp_path / "b")
    for t in (resumed, again):
        assert t.trajectories == full.trajectories
        assert t.trajectory_steps == full.trajectory_steps



def test_layers_on_several_devices_give_the_same_plan_and_resume(tmp_path):
    """Layers' greedies in parallel (one per device; "cpu:0" makes the layer move and back): the
    same trajectories as one device, saved in layer order, and a run cancelled in one worker
    resumes to the same plan."""
    model, plan_a = _plan("llama", layers=4, out=tmp_path / "a")
    one = allocate(model, CharTok(), plan_a, step=0.3, lazy=False)
    devices = ["cpu", "cpu:0", "cpu"]
    _, plan_b = _plan("llama", layers=4, out=tmp_path / "b")
    events = []
    many = allocate(model, CharTok(), plan_b, step=0.3, lazy=False, devices=devices, on_event=events.append)
    for t in (many, Plan.load(tmp_path / "b")):
        assert t.trajectories == one.trajectories and t.trajectory_steps == one.trajectory_steps
    dones = [e.done for e in events if e.stage == "allocate"]
    assert dones == sorted(dones) and dones[-1] == events[-1].total
    assert {e.layer for e in events if "error" in e.metrics} == {0, 1, 2, 3}
    for p in model.parameters():                        # every layer went back home
        assert p.device == torch.device("cpu")

    _, plan_c = _plan("llama", layers=4, out=tmp_path / "c")

    def stop(ev):
        if ev.stage == "allocate" and ev.layer == 2 and ev.metrics.get("row") == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        allocate(model, CharTok(), plan_c, step=0.3, lazy=False, devices=devices, on_event=stop)
    part = Plan.load(tmp_path / "c", allow_partial=True)
    assert part.n_allocated <= 2
    assert part.trajectories[:part.n_allocated] == one.trajectories[:part.n_allocated]
    resumed = allocate(model, CharTok(), part, step=0.3, lazy=False, devices=devices)
    assert resumed.trajectories == one.trajectories
    with pytest.raises(InvalidArgument):
        allocate(model, CharTok(), plan_c, step=0.3, devices=[])

def test_events_for_the_live_plot():
    model, plan = _plan("llama")
    events = []
    allocate(model, CharTok(), plan, step=0.3, on_event=events.append)
    live = [e for e in events if e.stage == "allocate" and "error" in e.metrics]
    assert {e.layer for e in live} == {0, 1}
    assert all(e.n_layers == 2 and {"sparsity", "error", "matrix"} <= set(e.metrics) for e in live)
    first = [e for e in live if e.metrics["row"] == 0]
    assert all(e.metrics["matrix"] is None for e in first)
    assert all(e.metrics["matrix"] in plan.projections for e in live if e.metrics["row"] > 0)
    assert events[-1].done == events[-1].total
    assert all(e.eta_s is None or e.eta_s >= 0 for e in events)
    with pytest.raises(InvalidArgument):
        allocate(model, CharTok(), plan, mode="magic")


def test_transformed_gqa_starts_at_dead_column_floor():
    model, plan = _plan("llama", transform=True)
    plan = allocate(model, CharTok(), plan, step=0.3)
    row0 = plan.trajectories[0][0]
    assert row0.sparsities["k_proj"] == pytest.approx(0.5)        # kv 32 of 64 columns live
    assert row0.effective == pytest.approx(0.5 * plan.weights["k_proj"] / sum(plan.weights.values()))
    assert all(r.sparsities["k_proj"] >= 0.5 for r in plan.trajectories[1])


def test_global_mode():
    model, plan = _plan("llama", layers=3)
    plan = allocate(model, CharTok(), plan, step=0.3, mode="global", grid=(0.5, 0.8))
    assert plan.sensitivity.shape == (3, 3, 2)
    assert (plan.sensitivity[1] >= 0).all()
    order = plan.global_order.tolist()
    assert sorted(set(order)) == [0, 1, 2]
    for l in range(3):                              # the order walks every layer to its end
        assert order.count(l) == len(plan.trajectories[l]) - 1
    assert torch.equal(global_order(plan), plan.global_order)
    for s in (0.3, 0.5, 0.7):
        assert abs(plan.effective_at(s, "global") - s) < 0.02
        assert abs(plan.effective_at(s, "layer") - s) < 0.02
    sp = apply_plan(model, plan, 0.5, mode="global")
    with torch.no_grad():
        model(plan.calib_ids, use_cache=False)
    assert abs(sp.measured_sparsity() - 0.5) < 0.03
    sp.remove()
    # switching the mode reuses the trajectories
    layer_plan = allocate(model, CharTok(), plan, step=0.3, mode="layer")
    assert layer_plan.global_order is None and layer_plan.allocated
    assert not math.isnan(layer_plan.effective_at(0.4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_allocation_threads_give_the_same_plan():
    """On a GPU (bf16, the Triton gate): the greedy in worker threads, one of them moving its layers
    ("cuda" is not "cuda:0"), gives the trajectories of the single-device run."""
    model = tiny_model("llama", dtype=torch.bfloat16, num_hidden_layers=4).cuda()
    plan = calibrate(model, CharTok(), method="wina", source="random", samples=4, seq_len=64)
    one = allocate(model, CharTok(), plan, step=0.2, lazy=False, devices=["cuda:0"])
    want = ([list(t) for t in one.trajectories], [list(s) for s in one.trajectory_steps])
    many = allocate(model, CharTok(), plan, step=0.2, lazy=False, max_sparsity=0.85, devices=["cuda:0", "cuda"])
    again = allocate(model, CharTok(), many, step=0.2, lazy=False, devices=["cuda:0", "cuda"])
    assert (again.trajectories, again.trajectory_steps) == want
    assert all(p.device.type == "cuda" for p in model.parameters())



def test_replaying_keeps_a_module_s_own_forward_wrapper():
    """A replayed module whose forward was already wrapped on the instance (accelerate's hooks do
    that) gets that wrapper back."""
    from wina.allocate import _replaying
    lin = torch.nn.Linear(3, 2)
    wrapped = lambda x: lin.__class__.forward(lin, x) * 2         # noqa: E731
    lin.forward = wrapped
    x = torch.randn(4, 3)
    with _replaying({lin: torch.zeros(4, 2)}):
        assert torch.equal(lin(x), torch.zeros(4, 2))
    assert lin.forward is wrapped
    plain = torch.nn.Linear(3, 2)
    with _replaying({plain: torch.ones(1)}):
        assert torch.equal(plain(x), torch.ones(1))
    assert "forward" not in plain.__dict__ and plain(x).shape == (4, 2)
