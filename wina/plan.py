"""The calibration plan: histograms, trajectories, thresholds and metadata in one directory.

Layout (format ``wina-plan``, version 1)::

    plan.json                       metadata, status, sha256 of every other file (written last)
    calibration.safetensors         input_ids (samples × seq_len) the plan was calibrated on
    histograms/layer_007.safetensors  counts [n_proj, N_BINS] float64, n_live [n_proj]
    trajectories/layer_007.safetensors  sparsities [rows, n_proj], effective, error, matrix
    global.safetensors              order of the cross-layer greedy (mode "global"), sensitivities
    thresholds.safetensors          thresholds at targets 0.00, 0.05, ..., 0.95 (kernels read these)

Every file is written to a temporary name and renamed (atomic). ``plan.json`` lists each file's
sha256; :meth:`Plan.load` refuses a plan whose files are missing or altered, a plan of an unknown
format version, or (unless ``allow_partial``) one whose calibration or allocation did not finish.

Applying a plan (:func:`apply_plan`) checks the model: same architecture and config hash, same
weights (16 column norms of layer 0's output projection, which the transform does not change). A
plan made on a transformed model *performs* the transform on an untransformed model (in place; the
model's outputs do not change, see :mod:`wina.transform`); a plan made without the transform refuses
a transformed model.

Matrix sparsities count dead input columns as dropped (as :class:`wina.sparsify.Sparsifier` does):
after the transform k_proj of a GQA model has only kv_dim live columns, so its sparsity never goes
below ``1 − kv_dim/d``; its threshold there is 0 (only the dead, exactly-zero columns go).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch

from .errors import InvalidArgument, PlanError
from .files import write_bytes
from .plan_meta import DATA_ROTATIONS, FORMAT, VERSION
MAX_MATRIX_SPARSITY = 0.99
THRESHOLD_TARGETS = tuple(round(0.05 * i, 2) for i in range(20))

Key = tuple[int, str]


class TrajectoryRow(NamedTuple):
    sparsities: dict[str, float]      # per projection of the layer
    effective: float                  # parameter-weighted sparsity of the layer
    error: float                      # layer-output error (mean L2 over the last 25 % of positions)


def _st_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _st_load(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load
    return load(data)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the plan ------------------------------------------------------------------------------------
class Plan:
    """Histograms (+ trajectories) of one model; see the module docstring."""

    def __init__(self, meta: dict, calib_ids: torch.Tensor, path: Optional[Path] = None) -> None:
        self.meta = meta
        self.calib_ids = calib_ids
        self.path: Optional[Path] = Path(path) if path is not None else None
        n = meta["n_layers"]
        self.histograms: list[Optional[torch.Tensor]] = [None] * n      # [n_proj, N_BINS]
        self.n_live: list[Optional[list[int]]] = [None] * n
        self.trajectories: list[list[TrajectoryRow]] = [[] for _ in range(n)]
        self.trajectory_steps: list[list[Optional[str]]] = [[] for _ in range(n)]
        self.global_order: Optional[torch.Tensor] = None
        self.sensitivity: Optional[torch.Tensor] = None
        self.rotation_basis: Optional[torch.Tensor] = None     # the pca transform's basis

    # --- shape information ---------------------------------------------------------------------
    @property
    def projections(self) -> list[str]:
        return list(self.meta["projections"])

    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.meta["weights"])

    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def n_calibrated(self) -> int:
        return int(self.meta["status"]["calibrated_layers"])

    @property
    def n_allocated(self) -> int:
        return int(self.meta["status"].get("allocated_layers", 0))

    @property
    def calibrated(self) -> bool:
        return self.n_calibrated == self.n_layers

    @property
    def allocated(self) -> bool:
        return self.meta.get("allocation") is not None and self.n_allocated == self.n_layers

    def in_features(self, proj: str) -> int:
        return int(self.meta["shapes"][proj][1])

    def floor(self, layer: int, proj: str) -> float:
        """Sparsity a matrix has for free: its dead (all-zero) input columns."""
        live = self.n_live[layer]
        if live is None:
            return 0.0
        return 1.0 - live[self.projections.index(proj)] / self.in_features(proj)

    def effective(self, layer: int, sparsities: dict[str, float]) -> float:
        w = self.weights
        return sum(w[p] * sparsities[p] for p in self.projections) / sum(w.values())

    # --- filling in ----------------------------------------------------------------------------
    def set_layer_histograms(self, layer: int, stats: dict[str, dict]) -> None:
        self.histograms[layer] = torch.stack([stats[p]["counts"].double() for p in self.projections])
        self.n_live[layer] = [int(stats[p]["n_live"]) for p in self.projections]
        self.meta["status"]["calibrated_layers"] = max(self.n_calibrated, layer + 1)
        if self.calibrated:
            self.meta["status"]["calibrated_at"] = _now()

    def set_layer_trajectory(self, layer: int, rows: list[TrajectoryRow], steps: list[Optional[str]]) -> None:
        self.trajectories[layer] = list(rows)
        self.trajectory_steps[layer] = list(steps)
        self.meta["status"]["allocated_layers"] = max(self.n_allocated, layer + 1)

    def reset_allocation(self, allocation_meta: dict) -> None:
        self.meta["allocation"] = dict(allocation_meta)
        self.meta["status"]["allocated_layers"] = 0
        self.trajectories = [[] for _ in range(self.n_layers)]
        self.trajectory_steps = [[] for _ in range(self.n_layers)]
        self.global_order = None
        self.sensitivity = None
        if self.path is not None:
            for f in list(self.meta["files"]):
                if f.startswith("trajectories/") or f in ("global.safetensors", "thresholds.safetensors"):
                    del self.meta["files"][f]
                    try:
                        (self.path / f).unlink()
                    except OSError:
                        pass
            self._write_json()

    # --- queries -------------------------------------------------------------------------------
    def _require_calibrated(self) -> None:
        if not self.calibrated:
            raise PlanError(f"partial plan: calibrated {self.n_calibrated} of {self.n_layers} layers; "
                            "re-run calibrate with the same arguments to finish it")

    def modes(self) -> list[str]:
        """Modes this plan can answer; the last one is the default (the allocation's own mode)."""
        m = ["uniform"]
        if self.allocated:
            m.append("layer")
            if self.global_order is not None:
                m.append("global")
                if (self.meta.get("allocation") or {}).get("mode") == "layer":
                    m[-2:] = ["global", "layer"]
        return m

    def clear_global(self) -> None:
        self.global_order = None
        self.sensitivity = None
        if "global.safetensors" in self.meta.get("files", {}):
            del self.meta["files"]["global.safetensors"]
            if self.path is not None:
                try:
                    (self.path / "global.safetensors").unlink()
                except OSError:
                    pass

    def sparsities_at(self, sparsity: float, mode: Optional[str] = None) -> dict[Key, float]:
        """Per-matrix sparsities for a target average sparsity.

        ``mode``: "layer" (per layer, the trajectory row whose effective sparsity is nearest the
        target), "global" (the prefix of the cross-layer greedy nearest the target), "uniform"
        (every matrix at the target, dead columns on top). Default: "global" if the plan has it,
        else "layer" if allocated, else "uniform".
        """
        s = float(sparsity)
        if not (0.0 <= s < 1.0) or math.isnan(s):
            raise InvalidArgument(f"sparsity must be in [0, 1), got {sparsity}")
        self._require_calibrated()
        if mode is None:
            mode = self.modes()[-1]
        if mode not in ("uniform", "layer", "global"):
            raise InvalidArgument(f"unknown plan mode {mode!r}; choose uniform, layer or global")
        out: dict[Key, float] = {}
        if mode == "uniform":
            for i in range(self.n_layers):
                for p in self.projections:
                    out[(i, p)] = min(max(s, self.floor(i, p)), MAX_MATRIX_SPARSITY)
            return out
        if not self.allocated:
            raise PlanError("this plan has no allocation (run allocate first, or use mode='uniform')")
        rows = self.rows_at(s, mode)
        for i, r in enumerate(rows):
            for p, v in self.trajectories[i][r].sparsities.items():
                out[(i, p)] = v
        return out

    def rows_at(self, sparsity: float, mode: str = "layer") -> list[int]:
        """Index of the chosen trajectory row of every layer for a target sparsity."""
        if mode == "layer":
            return [nearest_row(t, sparsity) for t in self.trajectories]
        if mode != "global" or self.global_order is None:
            raise PlanError("this plan has no cross-layer allocation (allocate with mode='global')")
        rows = [0] * self.n_layers
        eff = [t[0].effective for t in self.trajectories]
        best, best_rows = abs(sum(eff) / self.n_layers - sparsity), list(rows)
        for layer in self.global_order.tolist():
            rows[layer] += 1
            eff[layer] = self.trajectories[layer][rows[layer]].effective
            d = abs(sum(eff) / self.n_layers - sparsity)
            if d < best:
                best, best_rows = d, list(rows)
            elif sum(eff) / self.n_layers > sparsity:
                break
        return best_rows

    def threshold(self, layer: int, proj: str, sparsity: float) -> float:
        from .scores import matrix_threshold
        self._require_calibrated()
        j = self.projections.index(proj)
        return matrix_threshold(self.histograms[layer][j], sparsity, self.n_live[layer][j],
                                self.in_features(proj))

    def thresholds_at(self, sparsity: float, mode: Optional[str] = None) -> dict[Key, float]:
        """Per-matrix thresholds (on the gating score) for a target average sparsity."""
        return {k: self.threshold(k[0], k[1], v) for k, v in self.sparsities_at(sparsity, mode).items()}

    def effective_at(self, sparsity: float, mode: Optional[str] = None) -> float:
        """The parameter-weighted average sparsity the plan actually gives for a target."""
        sp = self.sparsities_at(sparsity, mode)
        w = self.weights
        return sum(w[p] * v for (_, p), v in sp.items()) / (sum(w.values()) * self.n_layers)

    # --- checks --------------------------------------------------------------------------------
    def check_model(self, model) -> None:
        from .adapters import adapter_for
        from .adapters import config_hash, weight_fingerprint
        mt = adapter_for(model).model_type
        if mt != self.meta["architecture"]:
            raise PlanError(f"plan is for a {self.meta['architecture']} model, this one is {mt}")
        h = config_hash(model.config)
        if h != self.meta["config_hash"]:
            raise PlanError(f"plan was made for another model configuration (config hash "
                            f"{self.meta['config_hash']}, this model {h}; plan model: "
                            f"{self.meta.get('model_id') or 'unnamed'})")
        fp = self.meta.get("weights_fingerprint")
        if fp:
            now = weight_fingerprint(model)
            if any(abs(a - b) > 1e-3 * max(abs(a), abs(b), 1e-6) + 1e-5 for a, b in zip(fp, now)):
                raise PlanError("plan was calibrated on different weights (same configuration); "
                                "calibrate this model")

    # --- disk ----------------------------------------------------------------------------------
    def _write_file(self, rel: str, tensors: dict[str, torch.Tensor]) -> None:
        data = _st_bytes(tensors)
        write_bytes(self.path / rel, data)
        self.meta["files"][rel] = _sha(data)

    def _write_json(self) -> None:
        from .plan_meta import SEAL, seal
        self.meta["saved_at"] = _now()
        self.meta[SEAL] = seal(self.meta)
        write_bytes(self.path / "plan.json", json.dumps(self.meta, indent=1, sort_keys=True).encode())

    def _hist_tensors(self, i: int) -> dict[str, torch.Tensor]:
        return {"counts": self.histograms[i], "n_live": torch.tensor(self.n_live[i], dtype=torch.int64)}

    def _traj_tensors(self, i: int) -> dict[str, torch.Tensor]:
        rows, steps = self.trajectories[i], self.trajectory_steps[i]
        P = self.projections
        return {"sparsities": torch.tensor([[r.sparsities[p] for p in P] for r in rows], dtype=torch.float64),
                "effective": torch.tensor([r.effective for r in rows], dtype=torch.float64),
                "error": torch.tensor([r.error for r in rows], dtype=torch.float64),
                "matrix": torch.tensor([P.index(s) if s else -1 for s in steps], dtype=torch.int64)}

    def _threshold_tensors(self) -> dict[str, torch.Tensor]:
        out = {"targets": torch.tensor(THRESHOLD_TARGETS, dtype=torch.float64)}
        for mode in sorted(self.modes()):
            t = torch.zeros(len(THRESHOLD_TARGETS), self.n_layers, len(self.projections), dtype=torch.float64)
            sp = torch.zeros_like(t)
            for a, s in enumerate(THRESHOLD_TARGETS):
                for (i, p), v in self.sparsities_at(s, mode).items():
                    j = self.projections.index(p)
                    sp[a, i, j] = v
                    t[a, i, j] = self.threshold(i, p, v)
            out[f"{mode}/thresholds"], out[f"{mode}/sparsities"] = t, sp
        return out

    def save(self, path: Union[str, Path, None] = None) -> Path:
        """Write the whole plan (atomically, file by file; plan.json last)."""
        if path is not None:
            self.path = Path(path)
        if self.path is None:
            raise InvalidArgument("plan.save needs a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self.meta["files"] = {}
        self._write_file("calibration.safetensors", {"input_ids": self.calib_ids})
        if self.rotation_basis is not None:
            self._write_file("rotation.safetensors", {"basis": self.rotation_basis.float().contiguous()})
        for i in range(self.n_layers):
            if self.histograms[i] is not None:
                self._write_file(f"histograms/layer_{i:03d}.safetensors", self._hist_tensors(i))
            if self.trajectories[i]:
                self._write_file(f"trajectories/layer_{i:03d}.safetensors", self._traj_tensors(i))
        if self.global_order is not None:
            self._write_global()
        if self.calibrated and (self.meta.get("allocation") is None or self.allocated):
            self._write_file("thresholds.safetensors", self._threshold_tensors())
        self._write_json()
        return self.path

    def _write_global(self) -> None:
        t = {"order": self.global_order.to(torch.int64)}
        if self.sensitivity is not None:
            t["sensitivity"] = self.sensitivity.double()
        self._write_file("global.safetensors", t)

    def save_layer_histograms(self, i: int) -> None:
        self._write_file(f"histograms/layer_{i:03d}.safetensors", self._hist_tensors(i))
        if self.calibrated:
            self._write_file("thresholds.safetensors", self._threshold_tensors())
        self._write_json()

    def save_layer_trajectory(self, i: int) -> None:
        self._write_file(f"trajectories/layer_{i:03d}.safetensors", self._traj_tensors(i))
        self._write_json()

    def save_allocation_done(self) -> None:
        if self.global_order is not None:
            self._write_global()
        self._write_file("thresholds.safetensors", self._threshold_tensors())
        self._write_json()

    @classmethod
    def load(cls, path: Union[str, Path], *, allow_partial: bool = False) -> "Plan":
        """Read and validate a plan directory; raises PlanError for anything wrong with it."""
        root = Path(path)
        if not root.is_dir():
            raise PlanError(f"plan directory not found: {path}")
        from .plan_meta import read_meta
        meta = read_meta(root)
        try:
            n, P, files = int(meta["n_layers"]), list(meta["projections"]), dict(meta["files"])
            meta["status"]["calibrated_layers"]
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"corrupt plan {path}: plan.json lacks {e}") from None

        def read(rel: str) -> dict[str, torch.Tensor]:
            f = root / rel
            if not f.is_file():
                raise PlanError(f"partial or corrupt plan {path}: missing {rel}")
            data = f.read_bytes()
            if _sha(data) != files[rel]:
                raise PlanError(f"corrupt plan {path}: {rel} does not match its checksum")
            try:
                return _st_load(data)
            except Exception as e:
                raise PlanError(f"corrupt plan {path}: cannot read {rel} ({e})") from None

        if "calibration.safetensors" not in files:
            raise PlanError(f"partial or corrupt plan {path}: no calibration data listed")
        plan = cls(meta, read("calibration.safetensors")["input_ids"], root)
        if meta.get("rotation") in DATA_ROTATIONS:
            if "rotation.safetensors" not in files:
                raise PlanError(f"partial or corrupt plan {path}: the {meta['rotation']} transform's basis is missing")
            plan.rotation_basis = read("rotation.safetensors")["basis"]
        n_cal = plan.n_calibrated
        for i in range(n_cal):
            rel = f"histograms/layer_{i:03d}.safetensors"
            if rel not in files:
                raise PlanError(f"partial or corrupt plan {path}: missing {rel}")
            t = read(rel)
            if t["counts"].shape[0] != len(P):
                raise PlanError(f"corrupt plan {path}: {rel} has {t['counts'].shape[0]} histograms, expected {len(P)}")
            plan.histograms[i] = t["counts"]
            plan.n_live[i] = [int(v) for v in t["n_live"]]
        for i in range(plan.n_allocated):
            rel = f"trajectories/layer_{i:03d}.safetensors"
            if rel not in files:
                raise PlanError(f"partial or corrupt plan {path}: missing {rel}")
            t = read(rel)
            rows = [TrajectoryRow({p: float(v) for p, v in zip(P, sp.tolist())}, float(e), float(er))
                    for sp, e, er in zip(t["sparsities"], t["effective"], t["error"])]
            plan.trajectories[i] = rows
            plan.trajectory_steps[i] = [P[m] if m >= 0 else None for m in t["matrix"].tolist()]
        if "global.safetensors" in files:
            g = read("global.safetensors")
            plan.global_order = g["order"]
            plan.sensitivity = g.get("sensitivity")
        if not allow_partial:
            plan._require_finished(path)
        return plan

    def _require_finished(self, path: Union[str, Path]) -> None:
        """Refuse a plan whose calibration or allocation did not finish: the process still writing it
        is named (wait for it), else the command that finishes it."""
        a = self.meta.get("allocation")
        if self.calibrated and (a is None or self.allocated) and not (
                (a or {}).get("mode") == "global" and self.global_order is None):
            return
        from .files import writer
        pid = writer(path)
        if pid is not None:
            raise PlanError(f"plan {path} is being written by process {pid}; wait for it to finish")
        self._require_calibrated()
        if not self.allocated:
            raise PlanError(f"partial plan {path}: allocation finished {self.n_allocated} of {self.n_layers} "
                            "layers; re-run allocate with the same arguments to finish it")
        raise PlanError(f"partial plan {path}: the cross-layer allocation did not finish; "
                        "re-run allocate with the same arguments")

    @property
    def rotation(self) -> str:
        """The transform's rotation (svd, pca or pca-block) when the plan was calibrated on a transformed model."""
        return self.meta.get("rotation") or "svd"

    def __repr__(self) -> str:
        a = self.meta.get("allocation") or {}
        return (f"Plan({self.meta.get('model_id') or self.meta['architecture']}, {self.method}, "
                f"transform={self.meta['transform']}, calibrated {self.n_calibrated}/{self.n_layers}, "
                f"allocation={a.get('mode')}, path={self.path})")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def nearest_row(rows: list[TrajectoryRow], sparsity: float) -> int:
    """The within-layer ("layer") mode's choice: the trajectory row whose effective sparsity is
    nearest ``sparsity`` (the lower one on a tie)."""
    return min(range(len(rows)), key=lambda r: (abs(rows[r].effective - sparsity), r))


# ---- one layer at a time, from a plan folder being written (live views) ---------------------------

ALLOCATING = ".allocating"


def allocating_folder(plan_dir: Union[str, Path]) -> Path:
    """Where a new allocation of a plan whose allocation is finished is written, beside the plan,
    until it replaces it (:func:`wina.pipeline.allocate`)."""
    p = Path(plan_dir)
    return p.with_name(p.name + ALLOCATING)


class LayerHistogram(NamedTuple):
    counts: torch.Tensor      # [N_BINS] float64, the gating scores' histogram
    n_live: int               # input columns that are not all zero
    in_features: int


def _layer_file(root: Path, meta: dict, rel: str) -> Optional[dict[str, torch.Tensor]]:
    """A layer's tensors, checked against plan.json's checksum; None while the file is not listed."""
    sha = meta["files"].get(rel)
    f = root / rel
    if sha is None or not f.is_file():
        return None
    data = f.read_bytes()
    if _sha(data) != sha:
        raise PlanError(f"corrupt plan {root}: {rel} does not match its checksum")
    try:
        return _st_load(data)
    except Exception as e:
        raise PlanError(f"corrupt plan {root}: cannot read {rel} ({e})") from None


def _check_layer(root: Path, meta: dict, layer: int) -> None:
    if not isinstance(layer, int) or not 0 <= layer < meta["n_layers"]:
        raise InvalidArgument(f"{root}: no layer {layer} (the plan has {meta['n_layers']})")


def plan_histogram(plan_dir: Union[str, Path], layer: int) -> dict[str, LayerHistogram]:
    """The score histograms of one calibrated layer of the plan folder ``plan_dir`` (a calibration
    in progress included: every finished layer is whole), per projection; checked against plan.json.
    A layer not calibrated yet is a :class:`PlanError`."""
    from .plan_meta import read_meta
    root = Path(plan_dir)
    meta = read_meta(root)
    _check_layer(root, meta, layer)
    t = _layer_file(root, meta, f"histograms/layer_{layer:03d}.safetensors")
    if t is None:
        raise PlanError(f"{root}: layer {layer + 1} is not calibrated yet")
    try:
        live = [int(v) for v in t["n_live"].tolist()]
        return {p: LayerHistogram(t["counts"][j].double().clone(), live[j], int(meta["shapes"][p][1]))
                for j, p in enumerate(meta["projections"])}
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise PlanError(f"corrupt plan {root}: layer {layer + 1}'s histograms do not fit plan.json ({e})") from None


def plan_trajectory(plan_dir: Union[str, Path], layer: int) -> Optional[list[TrajectoryRow]]:
    """The greedy trajectory of one allocated layer of the plan folder ``plan_dir`` (an allocation
    in progress included; while a finished allocation is being replaced, the new one), checked
    against plan.json; None when the layer is not allocated yet."""
    from .plan_meta import read_meta
    root = Path(plan_dir)
    for d in (allocating_folder(root), root):
        if not (d / "plan.json").is_file():
            continue
        meta = read_meta(d)
        _check_layer(d, meta, layer)
        t = _layer_file(d, meta, f"trajectories/layer_{layer:03d}.safetensors")
        if t is None:
            continue
        P = list(meta["projections"])
        try:
            return [TrajectoryRow({p: float(v) for p, v in zip(P, sp.tolist())}, float(e), float(er))
                    for sp, e, er in zip(t["sparsities"], t["effective"], t["error"])]
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"corrupt plan {d}: layer {layer + 1}'s trajectory is unreadable ({e})") from None
    return None


def plan_folders(*roots: Union[str, Path]) -> list[Path]:
    """The plan folders directly under each root (a new allocation being written beside a plan left
    out), newest first."""
    seen: dict[Path, float] = {}
    for root in roots:
        if root is None:
            continue
        try:
            for pj in Path(root).glob("*/plan.json"):
                d = pj.parent.resolve()
                if d.name.endswith(ALLOCATING) or d in seen:
                    continue
                try:
                    seen[d] = pj.stat().st_mtime
                except OSError:
                    continue
        except OSError:
            continue
    return sorted(seen, key=lambda d: -seen[d])


def plan_from_model(model, calib_ids: torch.Tensor, *, model_id: str, args: dict, version: str) -> Plan:
    """A fresh, empty plan for a model and its calibration ids."""
    from .adapters import adapter_for, decoder_layers, projection_shapes
    from .adapters import config_hash, weight_fingerprint
    from .scores import BINS_PER_OCTAVE, HI_EXP, LO_EXP, N_BINS, size_class
    a = adapter_for(model)
    shapes = projection_shapes(model.config)
    P = list(a.projections)
    ref = shapes[a.attn_inputs[0]]
    ref_n = ref[0] * ref[1]
    meta = {
        "format": FORMAT, "version": VERSION,
        "model_id": model_id, "architecture": a.model_type,
        "config_hash": config_hash(model.config),
        "weights_fingerprint": weight_fingerprint(model),
        "n_layers": len(decoder_layers(model, a)),
        "projections": P,
        "shapes": {p: list(shapes[p]) for p in P},
        "weights": {p: shapes[p][0] * shapes[p][1] / ref_n for p in P},
        "size_class": size_class(model.config),
        "method": args["method"], "weighted": args["weighted"], "transform": args["transform"],
        "rotation": args.get("rotation"),
        "calibration": {"source": args["source"], "samples": int(calib_ids.shape[0]),
                        "seq_len": int(calib_ids.shape[1]), "seed": args["seed"], "field": args["field"],
                        "dense_prefix": args["dense_prefix"]},
        "calibration_args": args,
        "histogram": {"lo_exp": LO_EXP, "hi_exp": HI_EXP, "bins_per_octave": BINS_PER_OCTAVE,
                      "n_bins": N_BINS, "positions": "after the dense prefix", "columns": "live only"},
        "package_version": version,
        "created": _now(),
        "status": {"calibrated_layers": 0, "allocated_layers": 0},
        "allocation": None,
        "files": {},
    }
    return Plan(meta, calib_ids.cpu())


def apply_plan(model, plan: Plan, sparsity: float, *, gating: str = "threshold",
               dense_prefix: float = 0.01, mode: Optional[str] = None, refine: bool = True,
               refine_tokens: int = 1024):
    """Sparsify ``model`` with a plan at a target average sparsity; returns the Sparsifier.

    Checks that the plan fits the model (architecture, config hash, weights). A plan made on a
    transformed model transforms an untransformed one first (in place, outputs unchanged); a plan
    made without the transform refuses a transformed model. ``gating="threshold"`` uses the plan's
    thresholds; ``"topk"`` uses its per-matrix sparsities with exact top-k. ``mode``: see
    :meth:`Plan.sparsities_at`.

    ``refine`` (threshold gating only): the histograms describe the *dense* model, but once the
    inputs of gate/up (or q/k/v, or earlier layers) are gated, the input of the next matrix shrinks
    and a dense threshold drops more than its share (e.g. 0.71 measured for a 0.65 target on
    SmolLM2). Refining runs one forward pass over the first ``refine_tokens`` tokens of the plan's
    calibration data with the gates on and, in forward order, sets each matrix's threshold to the
    exact quantile of the scores it actually receives, so that measured sparsity matches the
    target on the calibration data. ``refine=False`` keeps the histogram (dense) thresholds.
    """
    from .sparsify import sparsify
    from .transform import ensure
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    plan._require_calibrated()
    plan.check_model(model)
    ensure(model, bool(plan.meta["transform"]), rotation=plan.rotation, basis=plan.rotation_basis,
           what="this plan", error=PlanError)
    sp_map = plan.sparsities_at(sparsity, mode)
    thresholds = plan.thresholds_at(sparsity, mode) if gating == "threshold" else None
    sp = sparsify(model, plan.method, sp_map, gating=gating, thresholds=thresholds,
                  weighted=plan.meta["weighted"], dense_prefix=dense_prefix)
    if gating == "threshold" and refine and plan.method != "dense":
        refine_thresholds(model, sp, plan, tokens=refine_tokens)
    return sp


@torch.no_grad()
def refine_thresholds(model, sp, plan: Plan, *, tokens: int = 1024) -> None:
    """Set each gate's threshold to the exact quantile of its actual (upstream-gated) input scores
    on the plan's calibration data, in forward order (one forward pass); see :func:`apply_plan`."""
    from .scores import prefix_start
    from .sparsify import gate_scores
    ids = plan.calib_ids
    L = min(ids.shape[1], max(8, tokens))
    n = max(1, min(ids.shape[0], tokens // L))
    ids = ids[:n, :L].to(next(model.parameters()).device)
    handles = []

    def make(gate):
        def hook(module, args):
            if not sp.enabled or gate.sparsity <= 0:
                return None
            x = args[0]
            floor = 0.0 if gate.live is None else 1.0 - int(gate.live.sum()) / gate.in_features
            if gate.sparsity <= floor + 1e-12:
                gate.threshold = 0.0
                return None
            start = prefix_start(x.shape[-2], sp.dense_prefix) if x.dim() >= 2 else 0
            xs = x[..., start:, :]
            sc = gate_scores(xs, gate.scale)
            if gate.live is not None:
                sc = sc[..., gate.live.to(sc.device)]
            flat = sc.float().flatten()
            q = (gate.sparsity - floor) / (1.0 - floor)
            k = int(round(q * flat.numel()))
            gate.threshold = float(flat.kthvalue(k).values) if k >= 1 else 0.0
            return None
        return hook

    for key, g in sp.gates.items():
        handles.append(sp._modules[key].register_forward_pre_hook(make(g), prepend=True))
    try:
        model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        sp.reset_counters()
