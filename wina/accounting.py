"""FLOPs and sparsity accounting.

FLOPs are counted as in the WINA paper's Table 5: multiply-accumulates per token in the linear
layers (every decoder projection plus the LM head; attention scores and elementwise work left out).
For Llama-2-7B this gives 6.61 G dense and 3.37 G at 50 % (the LM head stays dense). The transform
adds one d×d shortcut product per block boundary (2·layers − 1 of them); that overhead is reported
separately, never hidden inside the sparse figure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

from .adapters import adapter_for, projection_shapes

Key = tuple[int, str]


@dataclass
class FlopCount:
    dense: int            # linear-layer MACs per token, no sparsity
    sparse: float         # the same with the given sparsity (LM head dense)
    shortcut: int         # the transform's shortcut MACs per token (0 without transform)
    lm_head: int

    @property
    def sparse_total(self) -> float:
        return self.sparse + self.shortcut

    @property
    def fraction(self) -> float:
        """Sparse cost (shortcuts included) over dense cost."""
        return self.sparse_total / self.dense if self.dense else 1.0

    def as_dict(self) -> dict:
        return {"dense": self.dense, "sparse": self.sparse, "shortcut": self.shortcut,
                "lm_head": self.lm_head, "sparse_total": self.sparse_total, "fraction": self.fraction}


def matrix_params(config) -> dict[str, int]:
    """Weight elements of each projection of one layer."""
    return {p: o * i for p, (o, i) in projection_shapes(config).items()}


def flops_per_token(config, sparsity: Union[float, Mapping[Key, float]] = 0.0, *,
                    transform: bool = False) -> FlopCount:
    """Per-token linear-layer MACs from a config alone (no weights needed)."""
    config = getattr(config, "config", config)
    adapter_for(config)
    per = matrix_params(config)
    n_layers = config.num_hidden_layers
    lm_head = config.hidden_size * config.vocab_size
    dense = n_layers * sum(per.values()) + lm_head
    sparse = float(lm_head)
    for layer in range(n_layers):
        for p, n in per.items():
            s = sparsity.get((layer, p), 0.0) if isinstance(sparsity, Mapping) else float(sparsity)
            sparse += n * (1.0 - s)
    shortcut = (2 * n_layers - 1) * config.hidden_size ** 2 if transform else 0
    return FlopCount(dense=dense, sparse=sparse, shortcut=shortcut, lm_head=lm_head)


@dataclass
class MatrixRow:
    layer: int
    proj: str
    params: int
    nominal: float
    measured: float


@dataclass
class SparsityReport:
    method: str
    gating: str
    transformed: bool
    nominal: float                 # size-weighted nominal sparsity
    measured: float                # size-weighted measured sparsity over the last forwards (nan if none)
    flops_nominal: FlopCount
    flops_measured: Optional[FlopCount]
    rows: list[MatrixRow] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"method": self.method, "gating": self.gating, "transform": self.transformed,
                "nominal_sparsity": self.nominal,
                "measured_sparsity": None if math.isnan(self.measured) else self.measured,
                "flops_nominal": self.flops_nominal.as_dict(),
                "flops_measured": self.flops_measured.as_dict() if self.flops_measured else None,
                "matrices": [vars(r) for r in self.rows]}

    def __str__(self) -> str:
        m = "n/a" if math.isnan(self.measured) else f"{self.measured:.1%}"
        f = self.flops_measured or self.flops_nominal
        return (f"{self.method} ({self.gating}{', transform' if self.transformed else ''}): "
                f"nominal {self.nominal:.1%}, measured {m}; "
                f"{f.sparse_total / 1e9:.3f} of {f.dense / 1e9:.3f} GFLOPs/token "
                f"(shortcuts {f.shortcut / 1e9:.3f})")


def report(sp) -> SparsityReport:
    """Per-matrix and overall sparsity of a :class:`~wina.sparsify.Sparsifier`, with FLOPs."""
    from .transform import is_transformed
    cfg = sp.model.config
    transformed = is_transformed(sp.model)
    rows = [MatrixRow(g.layer, g.proj, g.params, g.sparsity, g.measured()) for g in sp.gates.values()]
    nominal = {(r.layer, r.proj): r.nominal for r in rows}
    measured = {(r.layer, r.proj): r.measured for r in rows if not math.isnan(r.measured)}
    fm = flops_per_token(cfg, measured, transform=transformed) if len(measured) == len(rows) else None
    return SparsityReport(sp.method, sp.gating, transformed, sp.nominal_sparsity(),
                          sp.measured_sparsity(), flops_per_token(cfg, nominal, transform=transformed),
                          fm, rows)
