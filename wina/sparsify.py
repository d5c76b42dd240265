"""Activation sparsity on the input of every decoder projection: dense, TEAL and WINA gating.

For a projection y = W·x each input channel i gets a score: TEAL ``|x_i|``, WINA ``|x_i|·‖W[:,i]‖₂``
(column L2 norms, computed once when the sparsifier is attached; :meth:`Sparsifier.refresh_scales`
recomputes them, e.g. after the transform). Per token, either the ``k = floor(d·(1−s))`` best-scored
inputs are kept (``gating="topk"``, exact) or those whose score exceeds a per-matrix threshold
(``gating="threshold"``, thresholds from a calibration plan). The rest are zeroed.

Which projections are weight-informed (``weighted``):
- ``"default"``: as the official WINA code: only the matrix whose SVD sets each block's rotation
  (k_proj and gate_proj; qkv_proj and gate_up_proj for phi3) scores with column norms, the others
  with |x|.
- ``"all"``: the general rule, every projection scores with its own column norms.

Columns of W that are exactly zero (after the transform, k_proj keeps only kv_dim non-zero columns)
are always dropped: they contribute nothing to the output, so this is free, exact sparsity. Top-k
ranks the live inputs only and keeps min(k, live) of them (TEAL's |x| would otherwise spend places
on dead columns); measured sparsity counts the dead ones as dropped.

Tokens: in a sequence of length L > 1 only the last ``int((1 − dense_prefix)·L)`` positions are
sparsified (the official code keeps the first ~1 % dense); a single decode token (L = 1) is always
sparsified. The mechanism is a forward pre-hook on each nn.Linear, so it works on any supported
architecture without copying its forward, can be paused, and is removed without reloading.
Not thread-safe: run one forward at a time per model.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional, Union

import torch

from .adapters import Adapter, adapter_for, iter_projections
from .errors import InvalidArgument

METHODS = ("dense", "teal", "wina")
GATINGS = ("topk", "threshold")
WEIGHTED = ("default", "all")

Key = tuple[int, str]                              # (layer index, projection name)
SparsitySpec = Union[float, Mapping[Key, float]]


@dataclass
class MatrixGate:
    """State of one projection's gate."""
    layer: int
    proj: str
    in_features: int
    params: int                                  # weight elements (for size-weighted averages)
    scale: Optional[torch.Tensor]                # per-input score scale; None = |x| alone
    live: Optional[torch.Tensor]                 # bool, False where W[:, i] == 0; None = all live
    sparsity: float = 0.0
    threshold: Optional[float] = None
    dropped: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    seen: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    @property
    def key(self) -> Key:
        return (self.layer, self.proj)

    @property
    def k(self) -> int:
        return int(math.floor(self.in_features * (1.0 - self.sparsity)))

    def measured(self) -> float:
        seen = int(self.seen)
        return int(self.dropped) / seen if seen else float("nan")


def gate_scores(x: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The gating score of every input channel: |x| (TEAL) or |x|·c (WINA)."""
    s = x.abs()
    return s if scale is None else s * scale.to(dtype=s.dtype, device=s.device)


def gate_reference(x: torch.Tensor, gate: MatrixGate, gating: str,
                   dense_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch gate: returns (x with dropped inputs zeroed, number of dropped inputs). The first
    ``dense_rows`` positions (the second-last axis) keep every input and drop none."""
    score = gate_scores(x, gate.scale)
    if gate.live is not None:           # dead columns never take a place among the k kept
        score = score.masked_fill(~gate.live.to(score.device), float("-inf"))
    if gating == "threshold":
        mask = score > gate.threshold
    else:
        k = gate.k
        mask = torch.zeros_like(score, dtype=torch.bool)
        if k > 0:
            mask.scatter_(-1, score.topk(k, dim=-1, sorted=False).indices, True)
    if gate.live is not None:
        mask &= gate.live.to(mask.device)
    if dense_rows > 0:
        mask[..., :dense_rows, :] = True
    # count_nonzero: a bool tensor's sum() runs several times slower on a CPU
    return x * mask.to(x.dtype), mask.numel() - torch.count_nonzero(mask)


# (x, gate, gating, dense_rows) -> (gated x, dropped count)
GateFn = Callable[[torch.Tensor, MatrixGate, str, int], tuple[torch.Tensor, torch.Tensor]]


def _check_sparsity(s: float, where: str = "sparsity") -> float:
    s = float(s)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise InvalidArgument(f"{where} must be in [0, 1), got {s}")
    return s


class Sparsifier:
    """Gates attached to a model's projections. Create with :func:`sparsify`."""

    def __init__(self, model, method: str = "wina", sparsity: SparsitySpec = 0.5, *,
                 gating: str = "topk", thresholds: Optional[Mapping[Key, float]] = None,
                 weighted: str = "default", dense_prefix: float = 0.01) -> None:
        if method not in METHODS:
            raise InvalidArgument(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if gating not in GATINGS:
            raise InvalidArgument(f"unknown gating {gating!r}; choose one of {', '.join(GATINGS)}")
        if weighted not in WEIGHTED:
            raise InvalidArgument(f"unknown weighting {weighted!r}; choose one of {', '.join(WEIGHTED)}")
        if not 0.0 <= float(dense_prefix) < 1.0:
            raise InvalidArgument(f"dense_prefix must be in [0, 1), got {dense_prefix}")
        self.model = model
        self.adapter: Adapter = adapter_for(model)
        self.method, self.gating, self.weighted = method, gating, weighted
        self.dense_prefix = float(dense_prefix)
        self.enabled = True
        self.gate_fn: GateFn = gate_reference      # swap in a fused kernel here
        self.gates: dict[Key, MatrixGate] = {}
        self._modules: dict[Key, torch.nn.Module] = {}
        self._handles = []
        for layer, proj, lin in iter_projections(model, self.adapter):
            g = MatrixGate(layer, proj, lin.in_features, lin.weight.numel(), None, None)
            self.gates[g.key] = g
            self._modules[g.key] = lin
        self.refresh_scales()
        self.set_sparsity(sparsity)
        if thresholds is not None:
            self.set_thresholds(thresholds)
        if method != "dense":
            for key, lin in self._modules.items():
                self._handles.append(lin.register_forward_pre_hook(self._make_hook(self.gates[key])))

    # --- configuration -------------------------------------------------------------------------
    def is_weighted(self, proj: str) -> bool:
        if self.method != "wina":
            return False
        return self.weighted == "all" or proj in self.adapter.weighted_default

    @torch.no_grad()
    def refresh_scales(self) -> None:
        """(Re)compute column norms and dead columns from the current weights."""
        for key, lin in self._modules.items():
            g = self.gates[key]
            norms = lin.weight.detach().float().norm(dim=0)
            dead = norms == 0
            g.live = (~dead) if bool(dead.any()) else None
            g.scale = norms.to(lin.weight.dtype) if self.is_weighted(g.proj) else None

    def set_sparsity(self, sparsity: SparsitySpec) -> None:
        """One uniform sparsity, or one per (layer, projection); projections not named stay dense."""
        if isinstance(sparsity, Mapping):
            unknown = [k for k in sparsity if tuple(k) not in self.gates]
            if unknown:
                raise InvalidArgument(f"no projection {unknown[0]} in this model")
            for g in self.gates.values():
                g.sparsity = _check_sparsity(sparsity.get(g.key, 0.0), f"sparsity of {g.key}")
        else:
            s = _check_sparsity(sparsity)
            for g in self.gates.values():
                g.sparsity = s
        self._check_thresholds()

    def set_thresholds(self, thresholds: Mapping[Key, float]) -> None:
        for key, t in thresholds.items():
            if tuple(key) not in self.gates:
                raise InvalidArgument(f"no projection {key} in this model")
            self.gates[tuple(key)].threshold = float(t)
        self._check_thresholds()

    def _check_thresholds(self) -> None:
        if self.gating != "threshold" or self.method == "dense":
            return
        # checked lazily at forward time too; here only when thresholds were already given
        if any(g.threshold is not None for g in self.gates.values()):
            missing = [g.key for g in self.gates.values() if g.sparsity > 0 and g.threshold is None]
            if missing:
                raise InvalidArgument(f"threshold gating needs a threshold for every sparsified "
                                      f"matrix; missing {missing[0]} (use a calibration plan)")

    @property
    def scales(self) -> dict[Key, Optional[torch.Tensor]]:
        return {k: g.scale for k, g in self.gates.items()}

    @property
    def thresholds(self) -> dict[Key, Optional[float]]:
        return {k: g.threshold for k, g in self.gates.items()}

    @property
    def sparsities(self) -> dict[Key, float]:
        return {k: g.sparsity for k, g in self.gates.items()}

    # --- the hook ------------------------------------------------------------------------------
    def _make_hook(self, gate: MatrixGate):
        def hook(module, args):
            if not self.enabled:
                return None
            x = args[0]
            if gate.seen.device != x.device:
                gate.seen, gate.dropped = gate.seen.to(x.device), gate.dropped.to(x.device)
            if gate.sparsity <= 0.0:
                gate.seen += x.numel()
                return None
            if self.gating == "threshold" and gate.threshold is None:
                raise InvalidArgument(f"threshold gating needs a threshold for {gate.key} "
                                      "(use a calibration plan)")
            n_tok = x.shape[-2] if x.dim() >= 2 else 1
            start = 0
            if n_tok > 1 and self.dense_prefix > 0:
                start = n_tok - int((1.0 - self.dense_prefix) * n_tok)
            gate.seen += x.numel()
            if start >= n_tok:
                return None
            # the dense prefix is gated inside the one mask: no copy of the rows around it
            y, dropped = self.gate_fn(x, gate, self.gating, start)
            gate.dropped += dropped
            return (y, *args[1:])
        return hook

    # --- switching -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run the model dense inside the block (the same weights, no copy)."""
        old, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = old

    def remove(self) -> None:
        """Detach every hook: the model is dense again, exactly as before."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.enabled = False
        if getattr(self.model, "_wina_sparsifier", None) is self:
            self.model._wina_sparsifier = None

    # --- accounting ----------------------------------------------------------------------------
    def reset_counters(self) -> None:
        for g in self.gates.values():
            g.dropped = torch.zeros((), dtype=torch.int64)
            g.seen = torch.zeros((), dtype=torch.int64)

    def measured(self) -> dict[Key, float]:
        """Fraction of inputs dropped per matrix since the last reset (all positions counted)."""
        return {k: g.measured() for k, g in self.gates.items()}

    def measured_sparsity(self) -> float:
        """Measured sparsity over the whole model, each matrix weighted by its size."""
        num = den = 0.0
        for g in self.gates.values():
            m = g.measured()
            if not math.isnan(m):
                num += m * g.params
                den += g.params
        return num / den if den else float("nan")

    def nominal_sparsity(self) -> float:
        tot = sum(g.params for g in self.gates.values())
        return sum(g.sparsity * g.params for g in self.gates.values()) / tot if tot else 0.0

    def report(self):
        from .accounting import report
        return report(self)


def sparsify(model, method: str = "wina", sparsity: SparsitySpec = 0.5, *, gating: str = "topk",
             thresholds: Optional[Mapping[Key, float]] = None, weighted: str = "default",
             dense_prefix: float = 0.01) -> Sparsifier:
    """Attach sparse gating to every decoder projection of ``model`` (in place, removable).

    >>> sp = sparsify(model, "wina", 0.5)          # top-k WINA at 50 % on every projection
    >>> with sp.paused(): dense_logits = model(ids).logits
    >>> sp.remove()                                # back to the dense model
    """
    existing = getattr(model, "_wina_sparsifier", None)
    if existing is not None:
        existing.remove()
    sp = Sparsifier(model, method, sparsity, gating=gating, thresholds=thresholds,
                    weighted=weighted, dense_prefix=dense_prefix)
    model._wina_sparsifier = sp
    return sp
