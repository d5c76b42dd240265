"""The plan directory: round trip, validation (mismatch, version, corrupt, partial), apply_plan."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from test_calibrate import CharTok
from wina.allocate import allocate
from wina.calibrate import calibrate
from wina.errors import InvalidArgument, PlanError
from wina.plan import THRESHOLD_TARGETS, Plan, apply_plan
from wina.plan_meta import SEAL, seal
from wina.transform import is_transformed, transform


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run faster on one thread



@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan") / "p"
    model = tiny_model("llama")
    plan = calibrate(model, CharTok(), source="random", samples=3, seq_len=64, out=d, model_id="tiny")
    plan = allocate(model, CharTok(), plan, step=0.3, mode="global")
    return model, plan, d


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_round_trip(made, tmp_path):
    model, plan, d = made
    loaded = Plan.load(d)
    assert loaded.meta["model_id"] == "tiny" and loaded.meta["architecture"] == "llama"
    for k in ("config_hash", "method", "transform", "calibration", "package_version", "created", "weighted"):
        assert loaded.meta[k] == plan.meta[k]
    assert torch.equal(loaded.calib_ids, plan.calib_ids)
    for a, b in zip(plan.histograms, loaded.histograms):
        assert torch.equal(a, b)
    assert loaded.trajectories == plan.trajectories
    assert loaded.trajectory_steps == plan.trajectory_steps
    assert torch.equal(loaded.global_order, plan.global_order)
    for s in (0.0, 0.4, 0.65):
        for mode in ("uniform", "layer", "global"):
            assert loaded.thresholds_at(s, mode) == plan.thresholds_at(s, mode)
            assert loaded.sparsities_at(s, mode) == plan.sparsities_at(s, mode)
    # an in-memory plan saved elsewhere reads back the same
    plan2 = Plan.load(d)
    plan2.save(tmp_path / "copy")
    again = Plan.load(tmp_path / "copy")
    assert again.trajectories == plan.trajectories
    # thresholds for kernels are stored too, and no temporary files are left behind
    from safetensors.torch import load_file
    th = load_file(str(d / "thresholds.safetensors"))
    assert th["targets"].tolist() == list(THRESHOLD_TARGETS)
    assert th["layer/thresholds"].shape == (len(THRESHOLD_TARGETS), plan.n_layers, len(plan.projections))
    assert not [p for p in d.rglob(".*")]


def test_apply_plan_one_call(made):
    model, plan, d = made
    model2 = tiny_model("llama")
    sp = apply_plan(model2, Plan.load(d), 0.5, refine=False)
    assert sp.gating == "threshold" and sp.method == "wina"
    assert sp.thresholds == plan.thresholds_at(0.5)
    sp.remove()
    sp = apply_plan(model2, Plan.load(d), 0.5)                      # refined thresholds (default)
    assert sp.sparsities == plan.sparsities_at(0.5)
    with torch.no_grad():
        model2(plan.calib_ids, use_cache=False)
    assert abs(sp.measured_sparsity() - 0.5) < 0.03
    sp.remove()
    sp = apply_plan(model2, d, 0.4, gating="topk", mode="layer")       # a path works too
    assert sp.sparsities == plan.sparsities_at(0.4, "layer")
    sp.remove()
    with pytest.raises(InvalidArgument):
        apply_plan(model2, plan, 1.2)


def test_mismatched_model(made):
    _, plan, _ = made
    other_shape = tiny_model("llama", intermediate_size=128)
    with pytest.raises(PlanError, match="configuration"):
        apply_plan(other_shape, plan, 0.5)
    other_arch = tiny_model("qwen2")
    with pytest.raises(PlanError, match="qwen2"):
        apply_plan(other_arch, plan, 0.5)
    other_weights = tiny_model("llama", seed=7)
    with pytest.raises(PlanError, match="different weights"):
        apply_plan(other_weights, plan, 0.5)
    # a fine-tune: the same weights but for the last layer's MLP
    import copy
    import torch
    tuned = tiny_model("llama")
    with torch.no_grad():
        tuned.model.layers[-1].mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(PlanError, match="different weights"):
        apply_plan(tuned, plan, 0.5)
    # a plan made before the per-layer norms (the first layer's 16 only) is checked on those
    older = copy.deepcopy(plan)
    older.meta["weights_fingerprint"] = older.meta["weights_fingerprint"][:16]
    apply_plan(tuned, older, 0.5).remove()


def test_transform_recorded_and_applied(tmp_path):
    model = tiny_model("llama")
    transform(model)
    plan = calibrate(model, CharTok(), source="random", samples=2, seq_len=64, out=tmp_path / "t")
    fresh = tiny_model("llama")
    ids = plan.calib_ids
    with torch.no_grad():
        dense = fresh(ids).logits
    sp = apply_plan(fresh, Plan.load(tmp_path / "t"), 0.3)       # performs the transform
    assert is_transformed(fresh)
    with sp.paused(), torch.no_grad():
        assert torch.allclose(fresh(ids).logits, dense, atol=1e-3)
    sp.remove()
    untransformed_plan = calibrate(tiny_model("llama"), CharTok(), source="random", samples=2, seq_len=64)
    with pytest.raises(PlanError, match="untransformed"):
        apply_plan(fresh, untransformed_plan, 0.3)


def test_corrupt_partial_and_unknown_plans(made, tmp_path):
    _, plan, d = made
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlanError, match="no plan.json"):
        Plan.load(tmp_path / "empty")

    c = _copy(d, tmp_path / "c1")                       # a flipped byte in a histogram
    f = c / "histograms" / "layer_001.safetensors"
    b = bytearray(f.read_bytes())
    b[-3] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(PlanError, match="corrupt.*checksum"):
        Plan.load(c)

    c = _copy(d, tmp_path / "c2")                       # a missing trajectory file
    (c / "trajectories" / "layer_000.safetensors").unlink()
    with pytest.raises(PlanError, match="missing trajectories/layer_000"):
        Plan.load(c)

    c = _copy(d, tmp_path / "c3")                       # truncated plan.json
    (c / "plan.json").write_text((c / "plan.json").read_text()[:100])
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(c)

    c = _copy(d, tmp_path / "c4")                       # a future format version
    meta = json.loads((c / "plan.json").read_text())
    meta["version"] = 99
    (c / "plan.json").write_text(json.dumps(meta))
    with pytest.raises(PlanError, match="version 99"):
        Plan.load(c)

    c = _copy(d, tmp_path / "c5")                       # calibration stopped after layer 0
    meta = json.loads((c / "plan.json").read_text())
    meta["status"]["calibrated_layers"] = 1
    meta["status"]["allocated_layers"] = 0
    (c / "plan.json").write_text(json.dumps(meta))
    with pytest.raises(PlanError, match="edited after it was written"):     # a hand edit: refused
        Plan.load(c)
    meta[SEAL] = seal(meta)                             # as the library writes a partial plan
    (c / "plan.json").write_text(json.dumps(meta))
    with pytest.raises(PlanError, match="partial plan: calibrated 1 of 2"):
        Plan.load(c)
    part = Plan.load(c, allow_partial=True)
    with pytest.raises(PlanError, match="partial"):
        part.thresholds_at(0.5)

    c = _copy(d, tmp_path / "c6")                       # not a safetensors file at all
    f = c / "calibration.safetensors"
    f.write_bytes(b"garbage")
    meta = json.loads((c / "plan.json").read_text())
    import hashlib
    meta["files"]["calibration.safetensors"] = hashlib.sha256(b"garbage").hexdigest()
    meta[SEAL] = seal(meta)
    (c / "plan.json").write_text(json.dumps(meta))
    with pytest.raises(PlanError, match="cannot read calibration"):
        Plan.load(c)


def test_uniform_without_allocation(tmp_path):
    model = tiny_model("phi3")
    plan = calibrate(model, CharTok(), source="random", samples=2, seq_len=64)
    assert plan.modes() == ["uniform"]
    sp = plan.sparsities_at(0.5)
    assert set(sp.values()) == {0.5}
    with pytest.raises(PlanError, match="no allocation"):
        plan.sparsities_at(0.5, "layer")
    plan.save(tmp_path / "u")
    assert Plan.load(tmp_path / "u").thresholds_at(0.5) == plan.thresholds_at(0.5)


@torch.no_grad()
@pytest.mark.parametrize("rotation", ["pca", "pca-block"])
def test_pca_plan_carries_its_rotation(tmp_path, rotation):
    """calibrate(rotation=pca | pca-block) fits the basis (one, or one per block) on the calibration
    text, stores it in the plan, and applying the plan to a fresh copy of the model rotates it the
    same way (same logits as the calibrated model); a model with another transform is refused; the
    basis file is checked."""
    import copy
    from wina.transform import transform
    base = tiny_model("llama")
    fresh, svd = copy.deepcopy(base), copy.deepcopy(base)
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    plan = calibrate(base, CharTok(), source="random", samples=3, seq_len=64, out=tmp_path / "p",
                     model_id="tiny", rotation=rotation)
    assert plan.meta["transform"] is True and plan.meta["rotation"] == rotation
    n_blocks = 2 * base.config.num_hidden_layers
    assert base._wina_transform.rotation == rotation
    assert base._wina_transform.n_shortcuts == (0 if rotation == "pca" else n_blocks - 1)
    assert plan.rotation_basis.shape == ((64, 64) if rotation == "pca" else (n_blocks, 64, 64))
    loaded = Plan.load(tmp_path / "p")
    assert torch.equal(loaded.rotation_basis, plan.rotation_basis)
    sp = apply_plan(fresh, loaded, 0.5, gating="topk")
    sp.remove()
    assert (fresh(ids).logits - base(ids).logits).abs().max() < 1e-5
    transform(svd)
    with pytest.raises(PlanError, match=f"{rotation} transform.*another"):
        apply_plan(svd, loaded, 0.5)
    with pytest.raises(PlanError, match="calibration made with other arguments"):
        calibrate(tiny_model("llama"), CharTok(), source="random", samples=3, seq_len=64, out=tmp_path / "p",
                  model_id="tiny")                    # the same folder without the rotation
    (tmp_path / "p" / "rotation.safetensors").write_bytes(b"x")
    with pytest.raises(PlanError, match="rotation.safetensors"):
        Plan.load(tmp_path / "p")
