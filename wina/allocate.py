"""Greedy per-matrix sparsity allocation (TEAL's greedy, as the seed's greedyopt step) and a
cross-layer extension.

Within-layer greedy (``mode="layer"``, the seed's recipe), for every decoder layer independently, on
dense inputs: start with every matrix at sparsity 0 (at its dead-column floor after the transform,
``1 − kv_dim/d`` for k_proj of a GQA model); the step of a matrix is ``step / weight``, its weight
being its parameter count relative to the layer's first attention projection (q_proj; qkv_proj for
phi3), from :func:`wina.adapters.projection_shapes`; at every step each matrix's next step is tried
and the one with the smallest layer-output error is committed; the error is the L2 norm of the
difference from the dense layer output, averaged over the positions in the last 25 % of each
sequence. Every committed step raises the layer's parameter-weighted sparsity by
``step / Σ weights`` (less where a matrix hits the 0.99 cap). The whole trajectory up to
``max_sparsity`` is recorded; a target ``s`` later picks, per layer, the row nearest ``s``.

Two protocol settings reproduce the seed's greedy where it differs (docs/seed-fidelity.md):

- ``error`` (:data:`ERROR_RULES`): ``"wina"`` (default) is the error above, the L2 norm over the
  channels of each position, averaged over positions; ``"seed"`` is the official rule
  (microsoft/wina @8153dbf, wina/greedyopt.py:109-113): per sequence, the L2 norm over the positions
  of the last 25 % for each channel, averaged over channels, then averaged over sequences (the
  official code sums over sequences: the same choices, values divided by the count).
- ``step_norm`` (:data:`STEP_NORMS`): which matrix a step of size ``step`` refers to. ``"wina"``
  (default): the layer's first attention projection (q_proj; qkv_proj for phi3); ``"seed"``: o_proj,
  as the official step table (greedyopt.py:41-66). The two agree except on phi3 models whose fused
  qkv_proj is larger than o_proj (Phi-4: 1.5×, so ``"wina"`` steps are 1.5× coarser there).

Trials use the plan's histogram thresholds (threshold gating, as deployed). A greedy row's
configurations differ from the current one in a single matrix, so the greedy evaluates them through
:class:`RowEvaluator`, which computes every projection's output once per (input, threshold) and
replays it into the attention and MLP modules for every configuration that shares it: a q trial
computes q_proj alone and reuses k and v; an o trial reuses the attention output; a down trial reuses
the MLP's gate and up outputs; and what a row computes is kept for the next row. The attention output
projection and the MLP run only on the last 25 % of positions (the error's positions). The values
are those of a plain evaluation of the whole layer (:meth:`LayerTrials.errors`, tested step for step).

Cross-layer (``mode="global"``): after the within-layer trajectories, the model-level cost of each
layer's rows is estimated: for a few grid sparsities (default 0.5 and 0.8), layer l alone is set to
its trajectory row and the rest of the model runs dense; the KL divergence of the next-token
distribution from the dense model's (last 25 % of positions) gives a per-layer factor
``ρ_l = KL / error²`` (interpolated in sparsity), so the cost of row r of layer l is
``ρ_l · error_l(r)²``. A greedy over all layers then repeatedly advances the layer whose next rows
add the least cost per step (lower convex hull slope, so a noisy bump does not block a layer), and
records that order; a target ``s`` takes the prefix whose average sparsity is nearest ``s``.
Every layer has the same shapes, so a step in any layer drops the same number of weights.

Resuming: with a plan directory, each finished layer's trajectory is written atomically;
re-running with the same arguments resumes at the first unfinished layer (dense inputs are
re-propagated, deterministically) and gives the same result as an uninterrupted run.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Optional, Sequence

import torch

from .adapters import adapter_for, decoder_layers, projection
from .calibrate import LayerRunner, _nullctx
from .scores import default_sizes, gate_scale_and_live, is_weighted, prefix_start
from .errors import InvalidArgument, PlanError
from .kernels.masking import gate_rows
from .layer_pool import LayerPool, layer_devices, layer_on_device
from .events import CancelToken, ProgressCallback, Reporter
from .plan import MAX_MATRIX_SPARSITY, Plan, TrajectoryRow

TAIL_FRACTION = 0.25
ERROR_RULES = ("wina", "seed")
STEP_NORMS = ("wina", "seed")
ERROR_DESCRIPTIONS = {
    "wina": "mean L2 of layer output, last 25% of positions",
    "seed": "seed: per sequence, L2 over the last 25% of positions per channel, mean over channels",
}


def step_weights(plan: Plan, step_norm: str = "wina") -> dict[str, float]:
    """Per-matrix step divisors: a greedy step raises matrix ``p`` by ``step / w[p]``.

    ``"wina"``: the plan's parameter weights (relative to the first attention projection);
    ``"seed"``: relative to the attention output projection (o_proj), as the official step table.
    """
    if step_norm not in STEP_NORMS:
        raise InvalidArgument(f"unknown step normalisation {step_norm!r}; choose {' or '.join(STEP_NORMS)}")
    w = plan.weights
    if step_norm == "wina":
        return w
    ref = "o_proj" if "o_proj" in w else plan.projections[-1]
    return {p: v / w[ref] for p, v in w.items()}


def tail_start(seq_len: int) -> int:
    return seq_len - max(1, int(round(seq_len * TAIL_FRACTION)))


class _CopyGates:
    """Threshold gates on one layer's projections, with one threshold per stacked copy of the batch.

    ``thr[proj]`` is a float tensor (n_copies,) or None (the projection runs dense). Inputs arrive as
    (n_copies·b, L, d); positions before ``start`` stay dense (the sparsifier's dense prefix).
    """

    def __init__(self, model, layer: int, plan: Plan) -> None:
        a = adapter_for(model)
        self.thr: dict[str, Optional[torch.Tensor]] = {}
        self.start = 0
        self.handles = []
        for p in plan.projections:
            lin = projection(model, layer, p, a)
            scale, live = gate_scale_and_live(lin, is_weighted(plan.method, plan.meta["weighted"], p, a))
            self.thr[p] = None
            self.handles.append(lin.register_forward_pre_hook(self._hook(p, scale, live)))

    def _hook(self, p, scale, live):
        def hook(module, args):
            t = self.thr[p]
            if t is None:
                return None
            return (gate_rows(args[0], t, scale, live, self.start), *args[1:])
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class LayerTrials:
    """Evaluates per-matrix sparsity configurations of one layer against its dense output."""

    def __init__(self, model, plan: Plan, runner: LayerRunner, layer: int, h: torch.Tensor,
                 y_dense: torch.Tensor, dense_prefix: float, error: str = "wina") -> None:
        if error not in ERROR_RULES:
            raise InvalidArgument(f"unknown error rule {error!r}; choose {' or '.join(ERROR_RULES)}")
        self.model, self.plan, self.runner, self.layer = model, plan, runner, layer
        self.error = error
        self.a = adapter_for(model)
        block = decoder_layers(model, self.a)[layer]
        self.attn = block.get_submodule(self.a.attn)
        self.mlp = block.get_submodule(self.a.mlp)
        self.attn_norm = block.get_submodule(self.a.attn_norm)
        self.mlp_norm = block.get_submodule(self.a.mlp_norm)
        self.attn_side = set(self.a.attn_inputs) | {self.a.attn_output}
        self.h = h
        L = h.shape[1]
        self.t0 = tail_start(L)
        self.y_tail = y_dense[:, self.t0:]
        self.prefix = prefix_start(L, dense_prefix)
        self.gates = _CopyGates(model, layer, plan)
        self._thr_cache: dict[tuple[str, float], float] = {}
        self.tokens = max(1, runner.chunk_tokens)

    def close(self) -> None:
        self.gates.remove()

    def thr(self, p: str, s: float) -> float:
        key = (p, round(s, 12))
        if key not in self._thr_cache:
            self._thr_cache[key] = self.plan.threshold(self.layer, p, s)
        return self._thr_cache[key]

    def _set(self, configs: list[dict[str, float]], projs) -> None:
        for p in self.plan.projections:
            self.gates.thr[p] = None
        for p in projs:
            vals = [self.thr(p, c[p]) if c[p] > 0 else -1.0 for c in configs]
            self.gates.thr[p] = torch.tensor(vals, dtype=torch.float32)

    @torch.no_grad()
    def attn_tails(self, configs: list[dict[str, float]]) -> torch.Tensor:
        """Residual stream after the attention block, last 25 % of positions: (n, B, L4, d)."""
        n = len(configs)
        B, L, _ = self.h.shape
        self._set(configs, [p for p in self.plan.projections if p in self.attn_side])
        self.gates.start = self.prefix
        b = max(1, self.tokens // (n * L))
        outs = []
        try:
            for s0 in range(0, B, b):
                hc = self.h[s0:s0 + b]
                hrep = hc.unsqueeze(0).expand(n, *hc.shape).reshape(n * hc.shape[0], L, -1)
                x = self.attn_norm(hrep)
                o = self.attn(hidden_states=x, **self.runner.kwargs)
                o = o[0] if isinstance(o, tuple) else o
                h1 = hrep + o
                outs.append(h1[:, self.t0:].reshape(n, hc.shape[0], L - self.t0, -1))
        finally:
            self.gates.start = 0
        return torch.cat(outs, 1)

    @torch.no_grad()
    def mlp_errors(self, h1: torch.Tensor, configs: list[dict[str, float]]) -> list[float]:
        """Layer-output error for n (attention-tail, MLP config) pairs; h1: (n, B, L4, d)."""
        n, B, L4, d = h1.shape
        self._set(configs, [p for p in self.plan.projections if p not in self.attn_side])
        self.gates.start = 0
        b = max(1, self.tokens // (n * L4))
        err = torch.zeros(n, dtype=torch.float64)
        for s0 in range(0, B, b):
            hc = h1[:, s0:s0 + b]
            nb = hc.shape[1]
            flat = hc.reshape(n * nb, L4, d)
            x = self.mlp_norm(flat)
            y = flat + self.mlp(x)
            err += self.error_sum(y.reshape(n, nb, L4, d), s0)
        return (err / self.error_count()).tolist()

    def error_sum(self, y: torch.Tensor, s0: int) -> torch.Tensor:
        """Unnormalised error of n layer-output tails y (n, nb, L4, d) against the dense tails of
        sequences s0 … s0+nb: (n,) float64 on the CPU."""
        nb = y.shape[1]
        dt = torch.promote_types(y.dtype, torch.float32)    # float32, float64 for a float64 model
        if getattr(self, "_tail_f", (None,))[0] is not self.y_tail:
            self._tail_f = (self.y_tail, self.y_tail.to(dt))
        diff = y.to(dt) - self._tail_f[1][s0:s0 + nb].unsqueeze(0)
        if self.error == "seed":             # norm over positions, mean over channels, per sequence
            return diff.norm(dim=2).mean(dim=2).sum(dim=1).double().cpu()
        return diff.norm(dim=-1).sum(dim=(1, 2)).double().cpu()      # norm over channels, per position

    def error_count(self) -> int:
        B, L4 = self.y_tail.shape[:2]
        return B if self.error == "seed" else B * L4

    def errors(self, configs: list[dict[str, float]]) -> list[float]:
        """Full evaluation of n whole-layer configurations."""
        h1 = self.attn_tails(configs)
        return self.mlp_errors(h1, configs)


@contextmanager
def _replaying(outputs: dict) -> None:
    """Let each module in ``outputs`` return the given tensor instead of computing; its hooks still
    run (a gate on a replaying projection must be off; a norm's transform hook sees its input)."""
    own = {m: m.__dict__.get("forward") for m in outputs}     # e.g. accelerate's wrapper: kept
    for m, out in outputs.items():
        m.forward = lambda *args, _out=out, **kwargs: _out
    try:
        yield
    finally:
        for m, f in own.items():
            if f is None:
                del m.forward
            else:
                m.forward = f


class RowEvaluator:
    """Layer-output errors of whole-layer configurations, sharing work between them.

    Every intermediate is memoised by what determines it: an attention input projection's output by
    its threshold; the attention output (before o_proj, last 25 % of positions) by the q/k/v
    thresholds; the residual stream after attention by all attention thresholds; an MLP input
    projection's output by that and its own threshold; the error by the whole configuration.
    Modules run with the memoised projection outputs replayed, so the attention, activation and
    gating code is the model's own. :meth:`end_row` forgets what the last row did not use.
    """

    def __init__(self, trials: LayerTrials) -> None:
        t = self.trials = trials
        a = t.a
        self.attn_in, self.o, self.mlp_in = list(a.attn_inputs), a.attn_output, list(a.mlp_inputs)
        self.down = a.mlp_output
        self.lin = {p: projection(t.model, t.layer, p, a) for p in t.plan.projections}
        B, L, _ = t.h.shape
        self.B, self.L4 = B, L - t.t0
        self.b_full = max(1, t.tokens // L)          # sequences per chunk, whole sequences
        self.b_tail = max(1, t.tokens // self.L4)    # sequences per chunk, tails
        self.cache: dict[tuple, object] = {}
        self.used: set[tuple] = set()

    def _memo(self, key: tuple, make):
        self.used.add(key)
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def end_row(self) -> None:
        for k in [k for k in self.cache if k not in self.used]:
            del self.cache[k]
        self.used = set()

    def _thr(self, cfg: dict[str, float], p: str) -> float:
        return self.trials.thr(p, cfg[p]) if cfg[p] > 0 else -1.0

    @contextmanager
    def _only_gate(self, p: str, thr: float, start: int):
        """Projection p alone gated at ``thr`` (positions before ``start`` dense) inside the block."""
        g = self.trials.gates
        for q in g.thr:
            g.thr[q] = None
        g.thr[p] = torch.tensor([thr], dtype=torch.float32)
        g.start = start
        try:
            yield
        finally:
            g.thr[p] = None
            g.start = 0

    def _gated(self, p: str, thr: float, x: torch.Tensor, start: int) -> torch.Tensor:
        with self._only_gate(p, thr, start):
            return self.lin[p](x)

    # ---- attention side: whole sequences in, the last 25 % of positions out --------------------
    def _x(self) -> torch.Tensor:
        return self._memo(("x",), lambda: torch.cat([self.trials.attn_norm(self.trials.h[s:s + self.b_full])
                                                     for s in range(0, self.B, self.b_full)]))

    def _proj(self, p: str, thr: float) -> torch.Tensor:
        x = self._x()
        return self._memo(("P", p, thr), lambda: torch.cat(
            [self._gated(p, thr, x[s:s + self.b_full], self.trials.prefix) for s in range(0, self.B, self.b_full)]))

    def _attn_out(self, thrs: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input of o_proj, residual stream without o_proj's output), last 25 % of positions, with
        q/k/v at thresholds ``thrs``. The block runs as in the model, its norm just before it (the
        transform's shortcut hooks pair the two), o_proj replaying zeros."""
        def make():
            t = self.trials
            outs = [self._proj(p, th) for p, th in zip(self.attn_in, thrs)]
            x, o = self._x(), self.lin[self.o]
            got, base = [], []
            hook = o.register_forward_pre_hook(lambda m, args: got.append(args[0][:, t.t0:]), prepend=True)
            try:
                for s in range(0, self.B, self.b_full):
                    hc = t.h[s:s + self.b_full]
                    zero = hc.new_zeros(()).expand(*hc.shape[:-1], o.out_features)
                    replay = {self.lin[p]: out[s:s + self.b_full] for p, out in zip(self.attn_in, outs)}
                    with _replaying({**replay, o: zero, t.attn_norm: x[s:s + self.b_full]}):
                        y = t.attn(hidden_states=t.attn_norm(hc), **t.runner.kwargs)
                    y = y[0] if isinstance(y, tuple) else y
                    base.append((hc + y)[:, t.t0:])
            finally:
                hook.remove()
            return torch.cat(got), torch.cat(base)
        return self._memo(("A", thrs), make)

    def _h1(self, akey: tuple[float, ...]) -> torch.Tensor:
        """Residual stream after the attention block, last 25 % of positions: (B, L4, d)."""
        def make():
            t = self.trials
            a, base = self._attn_out(akey[:-1])
            start = max(0, t.prefix - t.t0)
            return torch.cat([base[s:s + self.b_full] + self._gated(self.o, akey[-1], a[s:s + self.b_full], start)
                              for s in range(0, self.B, self.b_full)])
        return self._memo(("h1", akey), make)

    # ---- MLP side, on the tails ----------------------------------------------------------------
    def _x1(self, akey) -> torch.Tensor:
        h1 = self._h1(akey)
        return self._memo(("x1", akey), lambda: torch.cat([self.trials.mlp_norm(h1[s:s + self.b_tail])
                                                           for s in range(0, self.B, self.b_tail)]))

    def _mlp_proj(self, akey, p: str, thr: float) -> torch.Tensor:
        x1 = self._x1(akey)
        return self._memo(("G", akey, p, thr), lambda: torch.cat(
            [self._gated(p, thr, x1[s:s + self.b_tail], 0) for s in range(0, self.B, self.b_tail)]))

    def error(self, cfg: dict[str, float]) -> float:
        akey = (*(self._thr(cfg, p) for p in self.attn_in), self._thr(cfg, self.o))
        mkey = tuple(self._thr(cfg, p) for p in (*self.mlp_in, self.down))

        def make():
            t = self.trials
            h1, x1 = self._h1(akey), self._x1(akey)
            gs = [self._mlp_proj(akey, p, th) for p, th in zip(self.mlp_in, mkey)]
            err = torch.zeros(1, dtype=torch.float64)
            with self._only_gate(self.down, mkey[-1], 0):
                for s in range(0, self.B, self.b_tail):
                    hc, sl = h1[s:s + self.b_tail], slice(s, s + self.b_tail)
                    with _replaying({**{self.lin[p]: o[sl] for p, o in zip(self.mlp_in, gs)}, t.mlp_norm: x1[sl]}):
                        y = hc + t.mlp(t.mlp_norm(hc))      # the norm's hooks see its input, as in the model
                    err += t.error_sum(y.unsqueeze(0), s)
            return float(err[0]) / t.error_count()
        return self._memo(("E", akey, mkey), make)


def _greedy_layer(trials: LayerTrials, plan: Plan, layer: int, step: float, max_sparsity: float,
                  emit, lazy: bool = False, refresh: int = 8,
                  weights: Optional[dict[str, float]] = None) -> tuple[list[TrajectoryRow], list[Optional[str]]]:
    """One layer's greedy trajectory.

    ``lazy``: instead of trying every matrix at every step, keep each matrix's last measured
    marginal error and re-measure only the most promising one(s) until the best is fresh (lazy
    greedy); all matrices are re-measured every ``refresh`` steps. It picks the same matrix as the
    full greedy whenever marginal errors only grow with sparsity, and costs about 2 trials a step
    instead of one per matrix. ``weights``: the step divisors (:func:`step_weights`; default the
    plan's parameter weights).
    """
    P = plan.projections
    w = weights if weights is not None else plan.weights
    cur = {p: plan.floor(layer, p) for p in P}
    ev = RowEvaluator(trials)
    err_cur = ev.error(cur)
    rows = [TrajectoryRow(dict(cur), plan.effective(layer, cur), err_cur)]
    steps: list[Optional[str]] = [None]
    emit(rows[-1], None)
    delta: dict[str, float] = {}                      # last measured marginal error of each matrix
    n_step = 0

    def measure(ps: list[str], trial: dict[str, float]) -> dict[str, float]:
        return {p: ev.error({**cur, p: trial[p]}) for p in ps}

    while rows[-1].effective < max_sparsity - 1e-9:
        cands = [p for p in P if cur[p] < MAX_MATRIX_SPARSITY - 1e-9]
        if not cands:
            break
        trial = {p: min(cur[p] + step / w[p], MAX_MATRIX_SPARSITY) for p in cands}
        if not lazy or n_step % refresh == 0 or any(p not in delta for p in cands):
            errs = measure(cands, trial)
            for p in cands:
                delta[p] = errs[p] - err_cur
        else:
            errs = {}
            while True:
                best = min(cands, key=lambda p: (delta[p], P.index(p)))
                if best in errs:
                    break
                errs.update(measure([best], trial))
                delta[best] = errs[best] - err_cur
        best = min((p for p in cands if p in errs), key=lambda p: (errs[p], P.index(p)))
        cur[best] = trial[best]
        err_cur = errs[best]
        ev.end_row()
        n_step += 1
        rows.append(TrajectoryRow(dict(cur), plan.effective(layer, cur), err_cur))
        steps.append(best)
        emit(rows[-1], best)
    return rows, steps


def expected_steps(plan: Plan, layer: int, step: float, max_sparsity: float, step_norm: str = "wina") -> int:
    w = step_weights(plan, step_norm)
    eff0 = plan.effective(layer, {p: plan.floor(layer, p) for p in plan.projections})
    return max(0, math.ceil((max_sparsity - eff0) * sum(w.values()) / step - 1e-9))


def allocation_args(config, plan, *, max_sparsity: float = 0.9, step: Optional[float] = None,
                    samples: Optional[int] = None, seq_len: Optional[int] = None, lazy: Optional[bool] = None,
                    error: str = "wina", step_norm: str = "wina") -> dict:
    """The settings that :func:`allocate` records in ``plan`` for these arguments, with the defaults of
    a model of ``config`` resolved (see there); a plan's allocation made with other ones starts over.
    ``plan``: a :class:`Plan` or a plan folder's metadata (its calibration's sample count and length)."""
    d = default_sizes(config)
    if step is None:
        step = float(d["alloc_step"])
    if not (0.0 < step < 1.0):
        raise InvalidArgument(f"step must be in (0, 1), got {step}")
    if not (0.0 < max_sparsity < 1.0):
        raise InvalidArgument(f"max_sparsity must be in (0, 1), got {max_sparsity}")
    if isinstance(plan, Plan):
        n, length = (int(x) for x in plan.calib_ids.shape)
    else:
        n, length = int(plan["calibration"]["samples"]), int(plan["calibration"]["seq_len"])
    samples = min(int(samples or d["alloc_samples"] or n), n)
    seq_len = min(int(seq_len or d["alloc_seq_len"] or length), length)
    args = {"max_sparsity": max_sparsity, "step": step, "samples": samples, "seq_len": seq_len,
            "lazy": bool(d["alloc_lazy"] if lazy is None else lazy),
            "error": ERROR_DESCRIPTIONS[error], "gating": "threshold"}
    if step_norm != "wina":            # absent for the default, so plans made before this stay valid
        args["step_norm"] = step_norm
    if error != "wina":
        args["error_rule"] = error
    return args


@torch.no_grad()
def allocate(model, tokenizer, plan: Plan, *, max_sparsity: float = 0.9, step: Optional[float] = None,
             mode: str = "layer", on_event: Optional[ProgressCallback] = None,
             cancel: Optional[CancelToken] = None, samples: Optional[int] = None,
             seq_len: Optional[int] = None, grid: tuple[float, ...] = (0.5, 0.8),
             lazy: Optional[bool] = None, chunk_tokens: int = 16384, error: str = "wina",
             step_norm: str = "wina", devices: Optional[Sequence] = None) -> Plan:
    """Greedy per-matrix sparsity allocation; stores the trajectories in ``plan`` (and saves it).

    ``samples``/``seq_len``: how much of the plan's calibration data the greedy uses (the first
    samples, each cut to its first seq_len tokens); default all of it for models of 1 B parameters
    and more (the seed's recipe), 4 × 256 tokens for smaller ones (see docs/calibration.md).
    ``step``: the base step; default the seed's 0.025 for models of 1 B parameters and more, 0.1 for
    smaller ones (a CPU budget; pass 0.025 for the seed's exact recipe). ``lazy``: lazy greedy
    (see :func:`_greedy_layer`); default on for small models, off (the seed's full greedy) for large.
    ``mode="global"`` adds the cross-layer allocation (module docstring). ``error`` and
    ``step_norm``: the protocol settings of the module docstring ("seed" reproduces the official
    greedy); both are recorded in the plan, and changing one restarts the allocation. ``devices``:
    where the layers' greedies run, one layer per device at a time (the layers are independent:
    each starts from its dense input); default every visible GPU when the model is on one, else
    the model's device. The plan is the same on any number of devices of one kind. Events:
    ``stage="allocate"`` with ``layer``, ``n_layers`` and metrics ``sparsity`` (the layer's effective
    sparsity), ``error``, ``matrix`` (the projection just committed; None for the first row), ``row``.
    """
    from .transform import ensure
    if mode not in ("layer", "global"):
        raise InvalidArgument(f"unknown allocation mode {mode!r}; choose layer or global")
    if error not in ERROR_RULES:
        raise InvalidArgument(f"unknown error rule {error!r}; choose {' or '.join(ERROR_RULES)}")
    if step_norm not in STEP_NORMS:
        raise InvalidArgument(f"unknown step normalisation {step_norm!r}; choose {' or '.join(STEP_NORMS)}")
    if not isinstance(plan, Plan):
        raise InvalidArgument("allocate needs a Plan (from calibrate or Plan.load)")
    traj_args = allocation_args(model.config, plan, max_sparsity=max_sparsity, step=step, samples=samples,
                                seq_len=seq_len, lazy=lazy, error=error, step_norm=step_norm)
    step, samples, seq_len, lazy = traj_args["step"], traj_args["samples"], traj_args["seq_len"], traj_args["lazy"]
    plan._require_calibrated()
    plan.check_model(model)
    devs = layer_devices(devices, next(model.parameters()).device, dispatched=bool(getattr(model, "hf_device_map", None)))
    ensure(model, bool(plan.meta["transform"]), rotation=plan.rotation, basis=plan.rotation_basis,
           what="this plan",
           error=PlanError)
    ids = plan.calib_ids[:samples, :seq_len]
    old = plan.meta.get("allocation") or {}
    if {k: v for k, v in old.items() if k not in ("mode", "grid")} != traj_args:
        plan.reset_allocation({**traj_args, "mode": mode, "grid": list(grid) if mode == "global" else None})
    else:
        if old.get("mode") != mode or (mode == "global" and old.get("grid") != list(grid)):
            plan.clear_global()
        plan.meta["allocation"] = {**traj_args, "mode": mode, "grid": list(grid) if mode == "global" else None}
    N = plan.n_layers
    dense_prefix = float(plan.meta["calibration"].get("dense_prefix", 0.01))
    per_layer = [expected_steps(plan, i, step, max_sparsity, step_norm) + 1 for i in range(N)]
    sw = step_weights(plan, step_norm)
    total = sum(per_layer) + (N if mode == "global" else 0)
    rep = Reporter("allocate", total, on_event, cancel, n_layers=N)
    sp = getattr(model, "_wina_sparsifier", None)
    ctx = sp.paused() if sp is not None else _nullctx()
    with ctx:
        need_layers = plan.n_allocated < N
        need_global = mode == "global" and plan.global_order is None
        if not (need_layers or need_global):
            rep.emit(total, message="allocation complete")
            return plan
        runner = LayerRunner(model, chunk_tokens)
        h = runner.inputs(ids)
        inputs_for_global = [] if need_global else None
        done = {"rows": sum(per_layer[:plan.n_allocated])}
        lock = threading.Lock()

        def greedy(i: int, h_i: torch.Tensor, y_i: torch.Tensor, dev: torch.device):
            """Layer i's trajectory on ``dev`` (the layer moves there and back when it is not home)."""
            counter = {"row": 0}

            def emit(row: TrajectoryRow, matrix):
                with lock:
                    counter["row"] += 1
                    done["rows"] += 1
                    rep.emit(min(done["rows"], total), layer=i, message=f"layer {i + 1}/{N}",
                             sparsity=row.effective, error=row.error, matrix=matrix, row=counter["row"] - 1)

            with layer_on_device(model, runner, i, dev) as sub:
                trials = LayerTrials(model, plan, sub, i, h_i.to(dev), y_i.to(dev), dense_prefix, error=error)
                try:
                    rows, steps = _greedy_layer(trials, plan, i, step, max_sparsity, emit, lazy=lazy, weights=sw)
                finally:
                    trials.close()
            with lock:                   # rows counted one by one; the layer's rest (a capped matrix)
                done["rows"] += per_layer[i] - counter["row"]
            return rows, steps

        def commit(i: int, result) -> None:
            plan.set_layer_trajectory(i, *result)
            if plan.path is not None:
                plan.save_layer_trajectory(i)

        with LayerPool(devs) as pool:     # one layer per device at a time; committed in layer order
            for i in range(N):
                y = runner.run(i, h)
                if inputs_for_global is not None:
                    inputs_for_global.append(h.cpu() if h.is_cuda else h)
                if i >= plan.n_allocated:
                    with lock:
                        rep.emit(min(done["rows"], total), layer=i, message=f"layer {i + 1}/{N}")
                    pool.submit(i, greedy, h, y)
                    for j, result in pool.finished():
                        commit(j, result)
                h = y
            for j, result in pool.drain():
                commit(j, result)
        del h
        if need_global:
            _global(model, plan, runner, inputs_for_global, tuple(grid), dense_prefix, rep, done["rows"])
        if plan.path is not None:
            plan.save_allocation_done()
    rep.emit(total, message="allocation complete")
    return plan


# ---- cross-layer ---------------------------------------------------------------------------------
@torch.no_grad()
def _global(model, plan: Plan, runner: LayerRunner, inputs: list[torch.Tensor], grid: tuple[float, ...],
            dense_prefix: float, rep: Reporter, done: int) -> None:
    a = adapter_for(model)
    layers = decoder_layers(model, a)
    norm = model.get_submodule(a.final_norm)
    head = model.get_submodule(a.lm_head)
    N = plan.n_layers
    dev = runner.device
    B, L, _ = inputs[0].shape
    t0 = tail_start(L)

    def run_from(l: int, h: torch.Tensor) -> torch.Tensor:
        for j in range(l, N):
            y = layers[j](h, **runner.kwargs)
            h = y[0] if isinstance(y, tuple) else y
        return h

    # dense log-probs of the tail
    dense_tail = []
    for s0 in range(B):
        hf = run_from(0, inputs[0][s0:s0 + 1].to(dev))
        dense_tail.append(torch.log_softmax(head(norm(hf[:, t0:])).float(), -1).cpu())
    G = len(grid)
    kl = torch.zeros(N, G, dtype=torch.float64)
    lerr = torch.zeros(N, G, dtype=torch.float64)
    geff = torch.zeros(N, G, dtype=torch.float64)
    for l in range(N):
        rep.emit(done + l, layer=l, message=f"cross-layer sensitivity, layer {l + 1}/{N}")
        traj = plan.trajectories[l]
        picks = [min(range(len(traj)), key=lambda r: (abs(traj[r].effective - g), r)) for g in grid]
        gates = _CopyGates(model, l, plan)          # only layer l's projections are gated
        try:
            for p in plan.projections:
                vals = [plan.threshold(l, p, traj[r].sparsities[p]) if traj[r].sparsities[p] > 0 else -1.0
                        for r in picks]
                gates.thr[p] = torch.tensor(vals, dtype=torch.float32)
            gates.start = prefix_start(L, dense_prefix)
            for s0 in range(B):
                hc = inputs[l][s0:s0 + 1].to(dev)
                hf = run_from(l, hc.expand(G, *hc.shape[1:]).contiguous())
                lp = torch.log_softmax(head(norm(hf[:, t0:])).float(), -1).cpu()
                ref = dense_tail[s0]
                kl[l] += (ref.exp() * (ref - lp)).sum(-1).mean(-1).double()
        finally:
            gates.remove()
        kl[l] /= B
        for k, r in enumerate(picks):
            lerr[l, k] = traj[r].error
            geff[l, k] = traj[r].effective
    plan.sensitivity = torch.stack([geff, kl, lerr], 0)      # [3, N, G]: sparsity, KL, layer error
    plan.global_order = global_order(plan)


def _rho(plan: Plan, l: int, eff: float) -> float:
    geff, kl, lerr = plan.sensitivity[0, l], plan.sensitivity[1, l], plan.sensitivity[2, l]
    r = (kl / lerr.clamp_min(1e-12) ** 2).tolist()
    xs = geff.tolist()
    if eff <= xs[0]:
        return r[0]
    for k in range(1, len(xs)):
        if eff <= xs[k]:
            f = (eff - xs[k - 1]) / max(xs[k] - xs[k - 1], 1e-12)
            return r[k - 1] + f * (r[k] - r[k - 1])
    return r[-1]


def global_order(plan: Plan, lookahead: int = 20) -> torch.Tensor:
    """Order in which the cross-layer greedy advances layers along their trajectories."""
    N = plan.n_layers
    cost = []
    for l in range(N):
        t = plan.trajectories[l]
        cost.append([_rho(plan, l, row.effective) * row.error ** 2 for row in t])
    pos = [0] * N
    order: list[int] = []
    while True:
        best = None
        for l in range(N):
            c = cost[l]
            r = pos[l]
            if r + 1 >= len(c):
                continue
            slope, k_best = min(((c[r + k] - c[r]) / k, k) for k in range(1, min(lookahead, len(c) - 1 - r) + 1))
            if best is None or (slope, l) < (best[0], best[1]):
                best = (slope, l, k_best)
        if best is None:
            break
        _, l, k = best
        order.extend([l] * k)
        pos[l] += k
    return torch.tensor(order, dtype=torch.int64)
