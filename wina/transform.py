"""The column-orthogonalising transform (computational invariance).

Steps, all exact in real arithmetic (the outputs of the model do not change):

1. Untie the embeddings from the LM head if they are tied (SmolLM2 ties them): rotating one would
   silently rotate the other.
2. Fold every RMSNorm gain into the weights that consume the norm's output (W ← W·diag(g), g ← 1).
3. Give each block (attention, MLP) of each layer its own orthogonal basis Q of the residual stream:
   Q = V from the SVD W = UΣVᵀ of the block's key matrix (k_proj / gate_proj; qkv_proj /
   gate_up_proj for phi3), so that W·Q = UΣ has orthogonal columns, which is where WINA's error
   bound holds. Inputs of the block's projections become W·Q; the block's output projection writes
   straight into the next block's basis (W_out ← Q_nextᵀ·W_out); the residual stream is carried
   from one basis to the next by a d×d shortcut S = Q_nextᵀ·Q. RMSNorm with unit gain commutes with
   an orthogonal Q, so every layer computes ``h = h·Sᵀ + block(norm(h))``.
4. Embeddings become E·Q_first; the last block keeps its own basis (no shortcut) and the LM head
   becomes W_head·diag(g_final)·Q_last.

What the official code did differently, fixed here: no subtraction of the embedding mean (it breaks
invariance for RMSNorm models), tied embeddings are untied first, SVD in float64 with the result
cast to the model's dtype.

GQA: k_proj is kv_dim×d, so after the rotation only kv_dim of its d columns are non-zero. Those
dead columns are dropped by every gate for free (see :mod:`wina.sparsify`).

The shortcuts are stored as buffers ``wina_shortcut`` on each block module (self_attn, mlp) and
applied by forward hooks; :func:`shortcuts` returns them for the decode engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .adapters import Adapter, adapter_for, decoder_layers
from .errors import TransformError
from .plan_meta import DATA_ROTATIONS, PLAN_ROTATIONS

SHORTCUT = "wina_shortcut"


@dataclass
class TransformInfo:
    n_shortcuts: int
    hidden_size: int
    untied: bool
    rotation: str = "svd"
    basis: Optional[torch.Tensor] = None    # pca: the d×d basis; pca-block: [2 × layers, d, d] (what a plan stores)

    @property
    def shortcut_macs_per_token(self) -> int:
        return self.n_shortcuts * self.hidden_size * self.hidden_size


def is_transformed(model) -> bool:
    return getattr(model, "_wina_transform", None) is not None


def ensure(model, transformed: bool, *, rotation: str = "svd", basis=None, what: str = "this step",
           error=TransformError, on_event=None) -> None:
    """Put a loaded model in the state a step needs, the one rule every step follows: the attached
    sparsifier (if any) is removed, and the model is transformed in place when ``transformed`` and it
    is not yet (``rotation`` and, for a data rotation, its ``basis``: a tensor, or a function that computes
    it, called only when needed). A transformed model cannot go back, nor change its rotation: that
    is a :class:`TransformError` asking for a reload (``what`` names who needs the other state; the
    error's ``needs_reload`` is True)."""
    sp = getattr(model, "_wina_sparsifier", None)
    if sp is not None:
        sp.remove()
    current = getattr(model, "_wina_transform", None)
    if transformed and current is None:
        transform(model, rotation=rotation, basis=basis() if callable(basis) else basis, on_event=on_event)
    elif transformed:
        same = current.rotation == rotation
        if same and rotation in DATA_ROTATIONS and basis is not None:
            b = basis() if callable(basis) else basis
            same = current.basis is not None and torch.equal(current.basis, b.float().cpu())
        if not same:
            raise _reload(error(f"{what} needs the model with the {rotation} transform, but the loaded "
                                f"model has another ({current.rotation}); reload it"))
    elif current is not None:
        raise _reload(error(f"{what} needs the untransformed model, but the loaded model is transformed; "
                            "reload it"))


def _reload(e: Exception) -> Exception:
    """Mark an error of :func:`ensure` that loading the model again resolves (``e.needs_reload``):
    a front-end that keeps a model loaded reloads it and tries once more."""
    e.needs_reload = True
    return e


def _is_rmsnorm(mod) -> bool:
    return (type(mod).__name__.endswith("RMSNorm") and isinstance(getattr(mod, "weight", None), torch.Tensor)
            and getattr(mod, "bias", None) is None)


def _check(model, adapter: Adapter) -> None:
    norms = [model.get_submodule(adapter.final_norm)]
    for layer in decoder_layers(model, adapter):
        norms += [layer.get_submodule(adapter.attn_norm), layer.get_submodule(adapter.mlp_norm)]
    bad = [type(n).__name__ for n in norms if not _is_rmsnorm(n)]
    if bad:
        raise TransformError(f"the transform needs RMSNorm layers; this model has {bad[0]}")
    if is_transformed(model):
        raise TransformError("this model is already transformed")
    if getattr(model, "_wina_sparsifier", None) is not None:
        raise TransformError("transform the model before attaching a sparsifier")


def _fold(linears, gain64: torch.Tensor) -> None:
    for lin in linears:
        w = lin.weight.data
        lin.weight.data = (w.double() * gain64.to(w.device)).to(w.dtype)


def _basis(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, W·V) from the full SVD W = UΣVᵀ in float64: V is d×d orthogonal and W·V = UΣ has
    orthogonal columns, set exactly (columns past the rank are exact zeros, not rounding noise)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=True)
    r = s.numel()
    rotated = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
    rotated[:, :r] = u[:, :r] * s
    return vh.transpose(0, 1).contiguous(), rotated


def _rotate_inputs(lin: nn.Linear, q: torch.Tensor) -> None:
    w = lin.weight.data
    lin.weight.data = (w.double() @ q.to(w.device)).to(w.dtype)


def _rotate_outputs(lin: nn.Linear, q: torch.Tensor) -> None:
    """Output written in basis q: W ← qᵀ·W, b ← qᵀ·b."""
    w = lin.weight.data
    qt = q.to(w.device).transpose(0, 1)
    lin.weight.data = (qt @ w.double()).to(w.dtype)
    if lin.bias is not None:
        lin.bias.data = (qt @ lin.bias.data.double()).to(lin.bias.dtype)


def _shortcut_hooks(block: nn.Module, norm: nn.Module) -> list:
    """Make ``h + block(norm(h))`` compute ``h·Sᵀ + block(norm(h))`` (S is the block's buffer)."""
    stash: dict[str, torch.Tensor] = {}

    def remember_residual(module, args):
        stash["r"] = args[0]

    def add_shortcut(module, args, output):
        s = getattr(module, SHORTCUT)
        r = stash.pop("r")
        out = output[0] if isinstance(output, tuple) else output
        out = out + (r @ s.transpose(0, 1).to(r.dtype) - r)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return [norm.register_forward_pre_hook(remember_residual), block.register_forward_hook(add_shortcut)]


@torch.no_grad()
def block_input_moments(model, ids: torch.Tensor, *, batch_size: int = 4) -> list[torch.Tensor]:
    """E[x xᵀ] (float64, d×d) of every block's normalised input x = h / rms(h), in block order
    (layer 0 attention, layer 0 MLP, layer 1 attention, ...), over the token ids [N, T]. RMSNorm with
    unit gain commutes with a rotation, so these are the moments a rotated block sees, rotated."""
    adapter = adapter_for(model)
    layers = list(decoder_layers(model, adapter))
    d = model.get_submodule(adapter.embed).weight.shape[1]
    moments = [torch.zeros(d, d, dtype=torch.float64) for _ in range(2 * len(layers))]
    count = [0]
    handles = []

    def hook_for(b: int, norm):
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

        def hook(module, args):
            h = args[0].detach().double().reshape(-1, d)
            x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
            moments[b].add_((x.T @ x).cpu())
            if b == 0:
                count[0] += x.shape[0]
        return hook

    for i, layer in enumerate(layers):
        for j, norm_name in enumerate((adapter.attn_norm, adapter.mlp_norm)):
            norm = layer.get_submodule(norm_name)
            handles.append(norm.register_forward_pre_hook(hook_for(2 * i + j, norm)))
    dev = next(model.parameters()).device
    try:
        for k in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[k:k + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [m / max(count[0], 1) for m in moments]


def pca_basis(moment: torch.Tensor) -> torch.Tensor:
    """The eigenvectors of a second-moment matrix, largest eigenvalue first, each with its largest
    component positive (a deterministic sign): the activation-PCA rotation of a block."""
    evals, evecs = torch.linalg.eigh(moment.double())
    q = evecs.flip(-1)
    idx = q.abs().argmax(0)
    sign = torch.sign(q[idx, torch.arange(q.shape[1])])
    sign[sign == 0] = 1
    return (q * sign).contiguous()


ROTATIONS = PLAN_ROTATIONS


def data_basis(rotation: str, moments: list[torch.Tensor]) -> torch.Tensor:
    """A data rotation's basis from the block inputs' moments (:func:`block_input_moments`): one d×d
    basis (``pca``) or one per block, stacked [2 × layers, d, d] (``pca-block``), float64."""
    if rotation == "pca":
        return global_pca_basis(moments)
    if rotation == "pca-block":
        return torch.stack([pca_basis(m) for m in moments])
    raise TransformError(f"the {rotation} rotation does not come from calibration text")


def global_pca_basis(moments: list[torch.Tensor]) -> torch.Tensor:
    """One basis for the whole residual stream: the PCA of every block's normalised input."""
    return pca_basis(sum(m.double() for m in moments))


@torch.no_grad()
def transform(model, *, on_event=None, rotation: str = "svd", basis: Optional[torch.Tensor] = None,
              moments: Optional[list[torch.Tensor]] = None) -> TransformInfo:
    """Apply the transform in place; returns what it added. Logits are unchanged up to rounding.

    ``rotation``:

    - ``"svd"`` (the seed's): each block's basis from the SVD of its key matrix, so that the key
      matrix's columns are orthogonal (WINA's assumption); a d×d shortcut between blocks.
    - ``"pca"``: one basis for the whole residual stream, the eigenvectors of the block inputs'
      second moment on calibration text (``basis``, or computed from ``moments`` of
      :func:`block_input_moments`): the coordinates a gate sees are decorrelated, the energy in
      few of them; no shortcuts (the residual stream stays in one basis, decoding costs nothing).
    - ``"pca-block"``: a PCA basis per block (``basis`` stacked [2 × layers, d, d], or computed from
      ``moments``), with a d×d shortcut between blocks as the seed's transform: it fits each block's
      inputs; fitted on enough real text it helps under a uniform split, not under the greedy
      allocation, and its shortcuts cost decode bytes (docs/rotation-study.md).

    ``on_event`` receives :class:`wina.events.Progress` (stage "transform", one unit per layer for
    the bases and one per layer for the rotations). Not cancellable: a half-rotated model is wrong.
    """
    if rotation not in ROTATIONS:
        raise TransformError(f"unknown rotation {rotation!r}; choose one of {', '.join(ROTATIONS)}")
    if rotation in DATA_ROTATIONS and basis is None:
        if moments is None:
            raise TransformError(f"the {rotation} rotation needs its basis or the block inputs' moments "
                                 "(calibration text)")
        basis = data_basis(rotation, moments)
    from .events import Reporter
    adapter = adapter_for(model)
    _check(model, adapter)
    layers = list(decoder_layers(model, adapter))
    if rotation == "pca-block" and (basis.dim() != 3 or basis.shape[0] != 2 * len(layers)):
        raise TransformError(f"the pca-block rotation needs one basis per block ({2 * len(layers)}), got a "
                             f"tensor of shape {tuple(basis.shape)}")
    rep = Reporter("transform", 2 * len(layers), on_event, None, n_layers=len(layers))
    rep.emit(0, message="folding norms")
    emb = model.get_submodule(adapter.embed)
    head = model.get_submodule(adapter.lm_head)
    d = emb.weight.shape[1]

    untied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    if untied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            try:
                model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
            except Exception:
                pass

    def lin(layer, name):
        return layer.get_submodule(f"{adapter.module_of(name)}.{name}")

    # 1. fold norm gains
    for layer in layers:
        for norm_name, inputs in ((adapter.attn_norm, adapter.attn_inputs), (adapter.mlp_norm, adapter.mlp_inputs)):
            norm = layer.get_submodule(norm_name)
            _fold([lin(layer, p) for p in inputs], norm.weight.data.double())
            norm.weight.data.fill_(1.0)
    final_norm = model.get_submodule(adapter.final_norm)
    _fold([head], final_norm.weight.data.double())
    final_norm.weight.data.fill_(1.0)

    # 2. one basis per block, from the key matrix after folding (svd) or the block's inputs (pca)
    bases: list[torch.Tensor] = []
    exact: list[Optional[torch.Tensor]] = []    # svd: the key matrices after rotation, exactly UΣ
    for i, layer in enumerate(layers):
        for j, key in enumerate((adapter.attn_key, adapter.mlp_key)):
            if rotation == "svd":
                v, rotated = _basis(lin(layer, key).weight.data)
            elif rotation == "pca-block":
                v, rotated = basis[2 * i + j].double(), None
            else:                               # the same object: no shortcut between blocks
                v, rotated = (bases[0] if bases else basis.double()), None
            bases.append(v)
            exact.append(rotated)
        rep.advance(layer=i, message="SVD" if rotation == "svd" else "PCA basis")

    # 3. rotate, block by block
    n_short = 0
    for i, layer in enumerate(layers):
        for j, (block_name, norm_name, inputs, output) in enumerate((
                (adapter.attn, adapter.attn_norm, adapter.attn_inputs, adapter.attn_output),
                (adapter.mlp, adapter.mlp_norm, adapter.mlp_inputs, adapter.mlp_output))):
            b = 2 * i + j
            q = bases[b]
            q_next = bases[b + 1] if b + 1 < len(bases) else q
            key = adapter.attn_key if j == 0 else adapter.mlp_key
            for p in inputs:
                if p == key and exact[b] is not None:
                    w = lin(layer, p).weight
                    w.data = exact[b].to(device=w.device, dtype=w.dtype)
                else:
                    _rotate_inputs(lin(layer, p), q)
            _rotate_outputs(lin(layer, output), q_next)
            block = layer.get_submodule(block_name)
            if b + 1 < len(bases) and q_next is not q:
                dev = lin(layer, output).weight.device
                dtype = lin(layer, output).weight.dtype
                block.register_buffer(SHORTCUT, (q_next.transpose(0, 1) @ q).to(device=dev, dtype=dtype),
                                      persistent=False)
                _shortcut_hooks(block, layer.get_submodule(norm_name))
                n_short += 1
        rep.advance(layer=i, message="rotating")

    emb.weight.data = (emb.weight.data.double() @ bases[0].to(emb.weight.device)).to(emb.weight.dtype)
    _rotate_inputs(head, bases[-1])

    info = TransformInfo(n_shortcuts=n_short, hidden_size=d, untied=untied, rotation=rotation,
                         basis=basis.float().cpu() if rotation in DATA_ROTATIONS else None)
    model._wina_transform = info
    return info


def shortcuts(model) -> dict[tuple[int, str], Optional[torch.Tensor]]:
    """{(layer, "attn"|"mlp"): S or None (identity)} for a transformed model (all None otherwise)."""
    adapter = adapter_for(model)
    out = {}
    for i, layer in enumerate(decoder_layers(model, adapter)):
        for tag, name in (("attn", adapter.attn), ("mlp", adapter.mlp)):
            out[(i, tag)] = getattr(layer.get_submodule(name), SHORTCUT, None)
    return out
