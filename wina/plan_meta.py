"""A plan's ``plan.json``: read and checked without torch (dry runs, the CLI's option defaults, the
TUI's plan browser), and sealed so that an edited plan is refused.

``plan.json`` carries ``meta_sha256``: the sha256 of its own JSON (sorted keys) without that field
and without ``saved_at``. :func:`read_meta` recomputes it; a hand-edited method, transform or
sparsity therefore fails with one clear line instead of giving numbers under a wrong label. Plans
written before the seal existed carry none and are read as they are.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Union

from .errors import PlanError

FORMAT = "wina-plan"
PLAN_ROTATIONS = ("svd", "pca", "pca-block")     # the transform's rotations a plan records (wina.transform)
DATA_ROTATIONS = ("pca", "pca-block")    # their bases come from the calibration text and live in the plan


def rotation_suffix(rotation: str) -> str:
    """How a transformed variant's label names its rotation: "-transform" (the seed's), "-pca", "-pca-block"."""
    return f"-{rotation}" if rotation in DATA_ROTATIONS else "-transform"
VERSION = 1
SEAL = "meta_sha256"
UNSEALED = (SEAL, "saved_at")

# key -> (types accepted, required): what the rest of the library relies on
_FIELDS: dict[str, tuple[tuple, bool]] = {
    "format": ((str,), True), "version": ((int,), True), "n_layers": ((int,), True),
    "projections": ((list,), True), "files": ((dict,), True), "status": ((dict,), True),
    "method": ((str,), True), "transform": ((bool,), True), "weighted": ((str,), False),
    "rotation": ((str, type(None)), False),
    "model_id": ((str,), False), "architecture": ((str,), False), "allocation": ((dict, type(None)), False),
    "calibration": ((dict,), False), "created": ((str,), False),
}


def seal(meta: dict) -> str:
    """The checksum stored in ``meta_sha256``."""
    body = {k: v for k, v in meta.items() if k not in UNSEALED}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def check(meta: Any, where: Union[str, Path]) -> dict:
    """Types of the fields the library reads, and the seal; raises :class:`PlanError`."""
    if not isinstance(meta, dict):
        raise PlanError(f"{where}: plan.json does not hold an object")
    if meta.get("format") != FORMAT:
        raise PlanError(f"{where} is not a wina plan (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise PlanError(f"plan format version {meta.get('version')!r} is not supported "
                        f"(this wina reads version {VERSION}); re-run calibrate")
    for key, (types, required) in _FIELDS.items():
        if key not in meta:
            if required:
                raise PlanError(f"corrupt plan {where}: plan.json lacks {key!r}")
            continue
        v = meta[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise PlanError(f"corrupt plan {where}: plan.json field {key!r} has the wrong type "
                            f"({type(v).__name__})")
    if meta["n_layers"] < 1 or not all(isinstance(p, str) for p in meta["projections"]):
        raise PlanError(f"corrupt plan {where}: plan.json has bad n_layers or projections")
    st = meta["status"]
    for k in ("calibrated_layers", "allocated_layers"):
        v = st.get(k, 0)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= meta["n_layers"]:
            raise PlanError(f"corrupt plan {where}: plan.json status.{k} is not a layer count")
    if SEAL in meta and meta[SEAL] != seal(meta):
        raise PlanError(f"plan {where} was edited after it was written (plan.json does not match its "
                        "checksum); re-run calibrate, or allocate, to make a new plan")
    return meta


def read_meta(path: Union[str, Path]) -> dict:
    """The checked metadata of the plan folder ``path`` (or of a plan.json file)."""
    p = Path(path).expanduser()
    f = p / "plan.json" if p.is_dir() else p
    if not p.exists():
        raise PlanError(f"plan not found: {path}")
    if p.is_file() and p.name != "plan.json":
        raise PlanError(f"{path} is a file, not a plan (a plan is a folder holding plan.json, made by "
                        "wina calibrate)")
    if not f.is_file():
        from .files import writer
        pid = writer(p) if p.is_dir() else None
        if pid is not None:             # a calibration that has not saved its first layer yet
            raise PlanError(f"plan {path} is being written by process {pid}; wait for it to finish")
        raise PlanError(f"{path} is not a plan (no plan.json)")
    try:
        meta = json.loads(f.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"corrupt plan {path}: plan.json is not valid JSON ({e})") from None
    except OSError as e:
        raise PlanError(f"cannot read {f}: {e.strerror}") from None
    return check(meta, path)
