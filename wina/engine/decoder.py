"""A short static-cache decoder built from a transformers model's weights (gpt-fast style).

:class:`Engine` copies the weights of a loaded (optionally transformed) llama / mistral / qwen2 /
phi3 model into the layout the kernels want (input-channel-major, RMSNorm gains folded into the
consuming weights, q/k/v and gate/up concatenated), keeps a static KV cache, and runs

* prefill: the prompt (or, in a later chat turn, only its new tokens: ``start``) in one forward, one
  masked cuBLAS matmul per projection (the sparsifier's rule on each row; ``sparse_prefill=False``
  runs prompts dense) between two fused passes (:mod:`wina.kernels.prefill`: the gated input, then
  bias + residual + sums of squares), RoPE + cache write in one launch, then attention; on the GPU a
  prompt of up to 768 tokens replays a CUDA graph captured at the next bucket length
  (:data:`PREFILL_BUCKETS`; start, dense prefix and counted rows read on the device, attention by
  :func:`wina.kernels.attention.attn_prefill_triton`), longer ones run eagerly with SDPA,
* decode: one token per step through :mod:`wina.kernels` — five launches per layer (q/k/v GEMV
  with the RMSNorm fused in and RoPE + cache write in its finishing programs, flash-decoding
  attention, o GEMV + residual, gate/up GEMV, SiLU·up + down GEMV + residual; a sparse launch with
  pre-compaction adds its small compaction launch) — captured once in a CUDA graph and replayed.

KV caches: the engine owns one (:attr:`Engine.cache`); :meth:`Engine.new_cache` / :meth:`Engine.bind`
give each conversation its own over the same weights (dense and sparse chat panes), each with its
own captured graphs. Gate counts: ``generate(count_every=N)`` counts, on the device, the inputs the
sparse launches keep for the prompt and every N-th decode step (a second captured step that stashes
each launch's input and counts all layers of a role at once); :meth:`Engine.gate_counts` reads them
once. The engine knows nothing of tokenizers or chat (:mod:`wina.generate`, :mod:`wina.chat`).

Sparsity: per projection a score scale c (WINA column norms, ones for TEAL) and a threshold t; an
input is kept iff ``|x_i|·c_i > t`` — the same rule as :mod:`wina.sparsify`'s threshold gating, and
the first ``dense_prefix`` of a prompt stays dense as there. Thresholds live in device buffers, so
:meth:`Engine.set_sparsity` changes them without a new capture.

After :func:`wina.transform.transform`, each layer computes ``h = h·Sᵀ + block(norm(h))``; the
engine applies the shortcuts S as dense GEMVs (fused with the residual add).

On a CPU everything runs through the kernels' plain-torch references (fp32 logits equal the
transformers forward to rounding). The engine never imports transformers' internals beyond reading
weights, the config and the model's rotary-embedding module (for the exact RoPE tables).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch.nn.attention.bias import causal_lower_right

from ..adapters import adapter_for, decoder_layers
from ..errors import Cancelled, InvalidArgument
from ..kernels import (ACT_SILU_MUL, attn_decode, gemv, gemv_rope, prepare_input, reserve_workspace,
                       use_triton)
from ..kernels.attention import attn_prefill_triton, rope_cache_triton
from ..kernels.prefill import prefill_input, prefill_output
from ..sampling import MIN_TEMPERATURE, check_sampling

Key = tuple[int, str]
NEG_INF = float("-inf")
# prompt lengths 2 .. 768 run as a CUDA graph captured at the next of these lengths (padded rows are
# computed, never counted or returned, and their cache slots are written before they are read): up
# to ~640 tokens an eager 7B prefill costs the host more than the GPU (docs/gpu-notes.md run 33);
# longer prompts run eagerly
PREFILL_BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 640, 768)


def _on_device(fn):
    """Run an engine method with the engine's GPU as the current device: Triton launches and graph
    captures go to the current device, and an engine may live on another GPU than the default."""
    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        if self.device.type != "cuda":
            return fn(self, *args, **kwargs)
        with torch.cuda.device(self.device):
            return fn(self, *args, **kwargs)
    return run


@dataclass
class Group:
    """One fused launch: projections sharing an input, concatenated along the output."""
    name: str
    projs: tuple[str, ...]
    wt: torch.Tensor                      # [K, N], input-channel-major
    bias: Optional[torch.Tensor]
    bounds: list[int]                     # output offsets where segments 2, 3 start
    gain: Optional[torch.Tensor]          # |RMSNorm gain| folded into wt (scales are multiplied by it)
    scales: torch.Tensor                  # [S, K] fp32: c_eff = c * |gain| (0 on dead columns)
    thresholds: torch.Tensor              # [S] fp32, -inf = keep everything
    live: Optional[list] = None           # per segment: [K] bool (False: W[:, i] == 0) or None
    sparse: bool = False                  # some threshold is finite (kept in step with `thresholds`)
    gating: bool = False                  # some threshold is > 0: the launch runs the sparse kernel.
    # A threshold <= 0 keeps every input except exact zeros and dead columns (whose weight rows are
    # zero), i.e. it computes the dense product: such a launch (a matrix at 0 % in a greedy plan)
    # runs the dense kernel, which is faster than the sparse one keeping everything (1.0-1.08x,
    # docs/gpu-results.md)


@dataclass
class Layer:
    attn_in: Group
    o: Group
    mlp_in: Group
    down: Group
    s_attn: Optional[torch.Tensor]        # shortcut Sᵀ [d, d] (wt layout), None = identity
    s_mlp: Optional[torch.Tensor]
    window: int
    k_cache: torch.Tensor                 # [1, n_kv, S, hd]
    v_cache: torch.Tensor


@dataclass
class KVCache:
    """One conversation's key/value cache: per layer [1, n_kv, S, hd] keys and values. An engine
    owns one from the start (:attr:`Engine.cache`); :meth:`Engine.new_cache` makes more (one per
    chat pane: dense and sparse replies share the weights, not the cache), :meth:`Engine.bind`
    switches. Each bound cache gets its own captured decode graphs."""
    k: list
    v: list
    id: int
    used: int = 0         # an upper bound of the positions ever written (a capture saves only these)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


@dataclass
class GenerationResult:
    tokens: list[int]                     # new tokens (stop token excluded)
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    stopped: str                          # "stop", "length" or "cancelled"
    sparse: bool

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode loop (the first token comes from the prefill)."""
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        t = self.prefill_s + self.decode_s
        return len(self.tokens) / t if t > 0 else 0.0


def _as_ids(prompt_ids) -> list[int]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2:
            if prompt_ids.shape[0] != 1:
                raise InvalidArgument("the engine decodes one sequence at a time (batch 1)")
            prompt_ids = prompt_ids[0]
        return [int(t) for t in prompt_ids.tolist()]
    return [int(t) for t in prompt_ids]


def _rope_tables(model, config, head_dim: int, s_max: int, device, dtype):
    """cos, sin [s_max, rot] fp32, as the model's own rotary embedding computes them."""
    rot_mod = None
    for name in ("model.rotary_emb", "rotary_emb"):
        try:
            rot_mod = model.get_submodule(name)
            break
        except AttributeError:
            continue
    if rot_mod is not None:
        try:
            x = torch.zeros(1, 1, head_dim, dtype=dtype, device=device)
            pos = torch.arange(s_max, device=device)[None]
            with torch.no_grad():
                cos, sin = rot_mod(x, pos)
            return cos[0].float().contiguous(), sin[0].float().contiguous()
        except Exception:  # fall back to the plain formula below
            pass
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rot = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    inv = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32, device=device) / rot))
    f = torch.arange(s_max, dtype=torch.float32, device=device)[:, None] * inv[None]
    emb = torch.cat((f, f), dim=-1)
    return emb.cos().to(dtype).float().contiguous(), emb.sin().to(dtype).float().contiguous()


def eos_ids(*sources) -> set[int]:
    """The end-of-sequence token ids that ``sources`` name (a generation config, a model config, a
    tokenizer: each one's ``eos_token_id``, an int or a list of ints; None, or no such attribute,
    names none). The one rule for eos ids: :mod:`wina.generate` and :mod:`wina.chat` use it too."""
    out: set[int] = set()
    for src in sources:
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            out.add(e)
        elif isinstance(e, (list, tuple)):
            out.update(int(v) for v in e)
    return out


def _eos_from(model) -> set[int]:
    """The engine's stop ids: those of the model's generation config and its config."""
    return eos_ids(getattr(model, "generation_config", None), getattr(model, "config", None))


class Engine:
    """Static-cache decoder over a model's weights. Build with :meth:`Engine.from_model`."""

    def __init__(self) -> None:  # use from_model
        self.layers: list[Layer] = []
        self._graphs: dict = {}
        self._static_logits: dict = {}
        self._pf_in = self._pf_host = self._pf_pool = self._side_stream = None   # captured prefills

    # --------------------------------------------------------------------------------------------
    # construction
    # --------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_model(cls, model, *, thresholds: Optional[Mapping[Key, float]] = None,
                   scales: Optional[Mapping[Key, Optional[torch.Tensor]]] = None,
                   shortcuts: Optional[Mapping[tuple[int, str], Optional[torch.Tensor]]] = None,
                   max_seq_len: Optional[int] = None, dense_prefix: Optional[float] = None,
                   use_sparsifier: bool = True, use_graphs: bool = True,
                   on_layer: Optional[Callable[[int, torch.nn.Module], None]] = None) -> "Engine":
        """Copy ``model``'s weights into a decode engine on the model's device and dtype.

        ``thresholds`` {(layer, proj): t} and ``scales`` {(layer, proj): c [in_features] or None}
        give the gating (absent = dense); when omitted and the model carries a threshold-gated
        :class:`wina.sparsify.Sparsifier`, its thresholds and scales are used. ``shortcuts``
        defaults to :func:`wina.transform.shortcuts` of a transformed model. ``on_layer(i, block)``
        is called once layer i's weights are copied (``wina.chat`` moves the model's own copy of
        them off the GPU there, so that building the engine never holds two copies of every layer).
        """
        eng = cls()
        a = adapter_for(model)
        cfg = model.config
        eng.adapter, eng.config = a, cfg
        emb = model.get_submodule(a.embed).weight
        dev, dt = emb.device, emb.dtype
        eng.device, eng.dtype = dev, dt
        d = cfg.hidden_size
        nh = cfg.num_attention_heads
        hd = getattr(cfg, "head_dim", None) or d // nh
        n_kv = getattr(cfg, "num_key_value_heads", None) or nh
        eng.d, eng.n_heads, eng.head_dim, eng.n_kv = d, nh, hd, n_kv
        eng.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        limit = int(getattr(cfg, "max_position_embeddings", 4096) or 4096)
        eng.max_seq_len = int(max_seq_len or min(limit, 4096))
        eng.eos_ids = _eos_from(model)
        eng.use_graphs = use_graphs

        sp = getattr(model, "_wina_sparsifier", None) if use_sparsifier else None
        if sp is not None and (not sp.enabled or sp.method == "dense" or not sp._handles):
            sp = None
        if thresholds is None and sp is not None:
            if sp.gating != "threshold":
                raise InvalidArgument("the decode engine needs threshold gating (a calibrated plan); "
                                      "this model's sparsifier uses top-k")
            thresholds = {k: g.threshold for k, g in sp.gates.items()
                          if g.sparsity > 0 and g.threshold is not None}
            scales = sp.scales if scales is None else scales
            if dense_prefix is None:
                dense_prefix = sp.dense_prefix
        eng.dense_prefix = 0.01 if dense_prefix is None else float(dense_prefix)
        thresholds = dict(thresholds or {})
        scales = dict(scales or {})

        if shortcuts is None:
            try:
                from .. import transform as _tr
                shortcuts = _tr.shortcuts(model) if _tr.is_transformed(model) else {}
            except Exception:
                shortcuts = {}

        layers = list(decoder_layers(model, a))
        eng.n_layers = len(layers)
        s = eng.max_seq_len
        layer_types = getattr(cfg, "layer_types", None)
        sw = getattr(cfg, "sliding_window", None) or 0
        for i, block in enumerate(layers):
            def lin(p, _b=block):
                return _b.get_submodule(f"{a.module_of(p)}.{p}")
            g1 = block.get_submodule(a.attn_norm).weight
            g2 = block.get_submodule(a.mlp_norm).weight
            if a.model_type == "qwen2":
                window = sw if (layer_types and layer_types[i] == "sliding_attention") else 0
            else:
                window = sw
            shortcut_a = shortcuts.get((i, "attn")) if shortcuts else None
            shortcut_m = shortcuts.get((i, "mlp")) if shortcuts else None
            layer = Layer(
                attn_in=eng._group("attn_in", i, [lin(p) for p in a.attn_inputs], a.attn_inputs, g1,
                                   thresholds, scales),
                o=eng._group("o", i, [lin(a.attn_output)], (a.attn_output,), None, thresholds, scales),
                mlp_in=eng._group("mlp_in", i, [lin(p) for p in a.mlp_inputs], a.mlp_inputs, g2,
                                  thresholds, scales),
                down=eng._group("down", i, [lin(a.mlp_output)], (a.mlp_output,), None, thresholds,
                                scales),
                s_attn=None if shortcut_a is None else shortcut_a.detach().to(dev, dt).t().contiguous(),
                s_mlp=None if shortcut_m is None else shortcut_m.detach().to(dev, dt).t().contiguous(),
                window=int(window),
                k_cache=torch.zeros(1, n_kv, s, hd, dtype=dt, device=dev),
                v_cache=torch.zeros(1, n_kv, s, hd, dtype=dt, device=dev))
            eng.layers.append(layer)
            if on_layer is not None:
                on_layer(i, block)
        unknown = [k for k in thresholds if not (0 <= k[0] < eng.n_layers and k[1] in a.projections)]
        if unknown:
            raise InvalidArgument(f"no projection {unknown[0]} in this model")

        eng.embed = emb.detach()
        gf = model.get_submodule(a.final_norm).weight.detach().float()
        head = model.get_submodule(a.lm_head)
        eng.head = (head.weight.detach().float() * gf[None, :]).to(dt).t().contiguous()
        eng.head_bias = None if getattr(head, "bias", None) is None else head.bias.detach()
        eng.vocab = eng.head.shape[1]
        eng.cos, eng.sin = _rope_tables(model, cfg, hd, s, dev, dt)

        eng.fast = use_triton(eng.embed)
        eng._n_caches = 0
        eng.cache = KVCache([L.k_cache for L in eng.layers], [L.v_cache for L in eng.layers], 0)
        eng.sparse_prefill = True
        eng.graph_prefill = True              # prompts up to PREFILL_BUCKETS[-1] tokens replay a captured graph
        for j, (_, g) in enumerate(eng.groups()):
            g.index = j
        eng._stack_gating()
        # gate counts of the sparse launches, accumulated on the device (see generate(count_every=))
        eng._kept = torch.zeros(j + 1, 3, dtype=torch.long, device=dev)
        eng._count_rows = 0
        eng._tok = torch.zeros(1, dtype=torch.long, device=dev)
        eng._pos = torch.zeros(1, dtype=torch.long, device=dev)
        eng._temp = torch.ones(1, dtype=torch.float32, device=dev)
        eng._top_p = torch.ones(1, dtype=torch.float32, device=dev)
        if dev.type == "cuda":
            n = max([eng.vocab] + [g.wt.shape[1] for L in eng.layers for g in (L.attn_in, L.mlp_in)])
            reserve_workspace(dev, 64 * n)
        return eng

    def _group(self, name, layer, linears, projs, gain, thresholds, scales) -> Group:
        dev, dt = self.device, self.dtype
        ws = [l.weight.detach() for l in linears]
        gain_f = None if gain is None else gain.detach().float().to(dev)
        w = torch.cat(ws, 0) if len(ws) > 1 else ws[0]
        wf = w.float() if gain_f is not None else w
        if gain_f is not None:
            wf = wf * gain_f[None, :]
        wt = wf.to(dt).t().contiguous()
        del wf
        biases = [getattr(l, "bias", None) for l in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else torch.zeros(l.weight.shape[0], dtype=dt, device=dev)
                              for b, l in zip(biases, linears)]).to(dt)
        outs = [l.weight.shape[0] for l in linears]
        bounds = [sum(outs[:j]) for j in range(1, len(outs))]
        k = wt.shape[0]
        live = []
        for wj in ws:
            lj = wj.abs().amax(0) > 0
            live.append(None if bool(lj.all()) else lj)
        g = Group(name, tuple(projs), wt, bias, bounds, None if gain_f is None else gain_f.abs(),
                  torch.ones(len(projs), k, dtype=torch.float32, device=dev),
                  torch.full((len(projs),), NEG_INF, dtype=torch.float32, device=dev), live)
        g.layer = layer
        self._set_group(g, thresholds, scales)
        return g

    def _set_group(self, g: Group, thresholds, scales) -> None:
        for j, p in enumerate(g.projs):
            c = scales.get((g.layer, p)) if scales else None
            c = torch.ones(g.wt.shape[0], device=self.device) if c is None else c.detach().float().to(self.device)
            if c.numel() != g.wt.shape[0]:
                raise InvalidArgument(f"scale of {(g.layer, p)} has {c.numel()} entries, expected {g.wt.shape[0]}")
            if g.gain is not None:
                c = c * g.gain
            if g.live[j] is not None:
                c = c * g.live[j]
            g.scales[j].copy_(c)
        self._set_thresholds(g, thresholds)

    @staticmethod
    def _set_thresholds(g: Group, thresholds) -> None:
        """The group's threshold buffer (-inf where a projection has none) and its flags."""
        ts = [thresholds.get((g.layer, p)) for p in g.projs] if thresholds else [None] * len(g.projs)
        for j, t in enumerate(ts):
            g.thresholds[j] = NEG_INF if t is None else float(t)
        g.sparse = any(t is not None for t in ts)
        g.gating = any(t is not None and float(t) > 0.0 for t in ts)

    def groups(self):
        """Yield ((layer, group name), Group) over the sparsifiable launches."""
        for i, L in enumerate(self.layers):
            for g in (L.attn_in, L.o, L.mlp_in, L.down):
                yield (i, g.name), g

    @torch.no_grad()
    def set_sparsity(self, thresholds: Optional[Mapping[Key, float]],
                     scales: Optional[Mapping[Key, Optional[torch.Tensor]]] = None) -> None:
        """New thresholds (and optionally scales); ``None`` or {} makes the engine dense.
        Captured graphs stay valid (the values live in device buffers)."""
        thresholds = dict(thresholds or {})
        for _, g in self.groups():
            if scales is not None:
                self._set_group(g, thresholds, scales)
            else:
                self._set_thresholds(g, thresholds)

    @property
    def sparse(self) -> bool:
        return any(g.sparse for _, g in self.groups())

    # --------------------------------------------------------------------------------------------
    # KV caches
    # --------------------------------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        """A further, empty KV cache of the engine's size (bind it with :meth:`bind`)."""
        self._n_caches += 1
        shape = self.layers[0].k_cache.shape
        mk = lambda: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        return KVCache([mk() for _ in self.layers], [mk() for _ in self.layers], self._n_caches)

    def bind(self, cache: KVCache) -> None:
        """Make ``cache`` the one that prefill, steps and generate read and write."""
        if cache is self.cache:
            return
        if len(cache.k) != len(self.layers):
            raise InvalidArgument("this KV cache belongs to another engine")
        for L, k, v in zip(self.layers, cache.k, cache.v):
            L.k_cache, L.v_cache = k, v
        self.cache = cache

    def drop_cache(self, cache: KVCache) -> None:
        """Forget the graphs captured over ``cache`` (their memory is freed with them)."""
        for key in [k for k in self._graphs if k[-1] == cache.id]:
            del self._graphs[key]
            self._static_logits.pop(key, None)

    # --------------------------------------------------------------------------------------------
    # gate counts, on the device: what the sparse launches keep, read once per reply
    # --------------------------------------------------------------------------------------------
    def reset_counts(self) -> None:
        self._kept.zero_()
        self._count_rows = 0

    def _count(self, g: Group, x, ssq_in, act) -> None:
        """Add the inputs each segment of ``g`` keeps (|x_i|·c_i > t, as the kernels decide) to the
        device counters; graph-safe (no host sync). Launches that run dense keep everything and
        are accounted for when the counts are read."""
        if not g.gating:
            return
        xf = prepare_input(x, g.wt.shape[0], ssq_in, self.eps, act)
        keep = (xf.abs().unsqueeze(1) * g.scales.unsqueeze(0)) > g.thresholds.view(1, -1, 1)
        self._kept[g.index, :len(g.projs)] += keep.sum((0, 2))

    ROLES = ("attn_in", "o", "mlp_in", "down")

    def _stack_gating(self) -> None:
        """Per role, the layers' scales and thresholds as views of one stacked buffer (set_sparsity
        writes them in place), and a buffer for each layer's input of that role: a counting decode
        step copies each sparse launch's input there and counts all layers of a role at once."""
        self._stk = {}
        for r, role in enumerate(self.ROLES):
            gs = [getattr(L, role) for L in self.layers]
            sc = torch.stack([g.scales for g in gs])
            th = torch.stack([g.thresholds for g in gs])
            for i, g in enumerate(gs):
                g.scales, g.thresholds = sc[i], th[i]
            width = gs[0].wt.shape[0] * (2 if role == "down" else 1)
            buf = torch.zeros(len(gs), width, dtype=self.dtype, device=self.device)
            self._stk[role] = (r, sc, th, buf)

    def _stash(self, g: Group, x, ssq_in, act) -> None:
        """Record hook of a counting decode step: keep the launch's input (one copy, graph-safe)."""
        if g.gating:
            self._stk[g.name][3][g.layer].copy_(x[0])

    def _count_stashed(self) -> None:
        """Count the stashed inputs of every layer, per role (the RMSNorm of attn_in / mlp_in is
        recomputed from the stashed residual; SiLU·up of down from the stashed gate/up output)."""
        kept = self._kept.view(len(self.layers), len(self.ROLES), 3)
        for role, (r, sc, th, buf) in self._stk.items():
            x = buf.float()
            k = sc.shape[-1]
            if role == "down":
                x = torch.nn.functional.silu(x[:, :k]) * x[:, k:]
            elif role in ("attn_in", "mlp_in"):
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            keep = (x.abs().unsqueeze(1) * sc) > th.unsqueeze(-1)          # [L, S, K]
            kept[:, r, :sc.shape[1]] += keep.sum(-1)

    def gate_counts(self) -> dict:
        """The counts since :meth:`reset_counts` (one device read): ``rows`` (token positions
        counted), ``sparsity`` (fraction of the sparsifiable weight bytes skipped, each matrix
        weighted by its size, as :func:`wina.bench.engine_sparsity`; None when nothing was counted) and
        ``per_matrix`` {(layer, proj): fraction of inputs skipped}."""
        rows = self._count_rows
        if rows <= 0:
            return {"rows": 0, "sparsity": None, "per_matrix": {}}
        kept = self._kept.cpu().tolist()
        num = den = 0.0
        per: dict = {}
        for _, g in self.groups():
            k = g.wt.shape[0]
            edges = [0, *g.bounds, g.wt.shape[1]]
            for j, p in enumerate(g.projs):
                frac = 1.0 - (kept[g.index][j] / (rows * k) if g.gating else 1.0)
                per[(g.layer, p)] = frac
                n = (edges[j + 1] - edges[j]) * k
                num += frac * n
                den += n
        return {"rows": rows, "sparsity": num / den if den else None, "per_matrix": per}

    # --------------------------------------------------------------------------------------------
    # the forward: T tokens at positions pos .. pos+T-1 (prefill: T = prompt, decode: T = 1)
    # --------------------------------------------------------------------------------------------
    def _lin(self, x, g: Group, sparse: bool, dense_rows: int, *, ssq_in=None, res=None, act=0,
             want_ssq=False, record=None, count_from: Optional[int] = None, rows=None):
        if record is not None:
            record(g, x, ssq_in, act)
        sp = sparse and g.gating
        if x.shape[0] > 1:
            # prefill: one (masked) matmul per segment in the model's dtype (cuBLAS on the GPU);
            # the multi-row Triton variants would each compile at their first prompt length
            return self._prefill_lin(x, g, sp, dense_rows if sp else 0, ssq_in, res, act, count_from, want_ssq,
                                     rows)
        kw = dict(bounds=g.bounds, bias=g.bias, eps=self.eps, act=act, want_ssq=want_ssq, role=g.name)
        if sp and dense_rows > 0:
            d = dense_rows
            y1, s1 = gemv(x[:d], g.wt, ssq_in=None if ssq_in is None else ssq_in[:d],
                          res=None if res is None else res[:d], **kw)
            if d >= x.shape[0]:
                return y1, s1
            y2, s2 = gemv(x[d:], g.wt, scales=g.scales, thresholds=g.thresholds, sparse=True,
                          ssq_in=None if ssq_in is None else ssq_in[d:],
                          res=None if res is None else res[d:], **kw)
            if want_ssq and s1.shape[1] != s2.shape[1]:
                s1, s2 = s1.sum(-1, keepdim=True), s2.sum(-1, keepdim=True)
            return torch.cat([y1, y2]), torch.cat([s1, s2])
        return gemv(x, g.wt, scales=g.scales, thresholds=g.thresholds, sparse=sp, ssq_in=ssq_in,
                    res=res, **kw)

    def _rope_prefill(self, qkv: torch.Tensor, L: Layer, p0: int) -> torch.Tensor:
        """RoPE + cache write of T > 1 rows at positions p0 .. (the math of the kernels' torch
        reference, with the start known on the host: no device sync per layer)."""
        t, nh, nkv, hd = qkv.shape[0], self.n_heads, self.n_kv, self.head_dim
        q = qkv[:, :nh * hd].reshape(t, nh, hd)
        k = qkv[:, nh * hd:(nh + nkv) * hd].reshape(t, nkv, hd)
        v = qkv[:, (nh + nkv) * hd:].reshape(t, nkv, hd)
        c = self.cos[p0:p0 + t].to(qkv.dtype)[:, None, :]
        sn = self.sin[p0:p0 + t].to(qkv.dtype)[:, None, :]
        rot = c.shape[-1]

        def rope(x):
            xr, xp = x[..., :rot], x[..., rot:]
            half = rot // 2
            out = xr * c + torch.cat((-xr[..., half:], xr[..., :half]), dim=-1) * sn
            return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out
        q, k = rope(q), rope(k)
        L.k_cache[0, :, p0:p0 + t] = k.transpose(0, 1)
        L.v_cache[0, :, p0:p0 + t] = v.transpose(0, 1)
        return q.reshape(t, nh * hd)

    def _attn_prefill(self, q: torch.Tensor, L: Layer, p0: int) -> torch.Tensor:
        """Causal attention of T > 1 query rows at positions p0 .. over the cache. A later chat turn
        (p0 > 0) is causal aligned to the bottom right, which SDPA's flash kernels take without a
        mask tensor (a boolean mask sends it to a kernel planned per shape); grouped-query heads
        are read in place (enable_gqa), not repeated over the whole cache."""
        t, nh, nkv, hd = q.shape[0], self.n_heads, self.n_kv, self.head_dim
        length = p0 + t
        qh = q.reshape(t, nh, hd).transpose(0, 1).unsqueeze(0)
        k, v = L.k_cache[:, :, :length], L.v_cache[:, :, :length]
        gqa = nh != nkv
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if L.window:
            qpos = torch.arange(p0, length, device=q.device)[:, None]
            kpos = torch.arange(length, device=q.device)[None, :]
            allowed = (kpos <= qpos) & (kpos > qpos - L.window)
            out = sdpa(qh, k, v, attn_mask=allowed[None, None], enable_gqa=gqa)
        elif p0 == 0:
            out = sdpa(qh, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = sdpa(qh, k, v, attn_mask=causal_lower_right(t, length), enable_gqa=gqa)
        return out[0].transpose(0, 1).reshape(t, nh * hd)

    def _prefill_lin(self, x, g: Group, sparse: bool, dense_rows: int, ssq_in, res, act,
                     count_from: Optional[int] = None, want_ssq: bool = False, rows=None):
        """:func:`wina.kernels.gemv_reference` in the model's dtype (the same rule): one pass makes
        every segment's gated input (:func:`wina.kernels.prefill.prefill_input`, which also adds the
        gates' decisions on the rows from ``count_from`` on to the device counters, as
        :meth:`_count` would), one cuBLAS matmul per segment, one pass adds bias and residual
        (:func:`wina.kernels.prefill.prefill_output`)."""
        k, n = g.wt.shape
        kept = self._kept[g.index] if (sparse and count_from is not None) else None
        xm = prefill_input(x, k, ssq_in, self.eps, act, self.dtype,
                           g.scales if sparse else None, g.thresholds if sparse else None,
                           dense_rows, kept, count_from or 0, rows)
        if xm.shape[0] == 1:
            y = xm[0] @ g.wt
        else:
            edges = [0, *[int(b) for b in g.bounds], n]
            y = torch.cat([xm[j] @ g.wt[:, edges[j]:edges[j + 1]] for j in range(len(edges) - 1)], dim=-1)
        return prefill_output(y, g.bias, res, want_ssq, x.dtype)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, sparse: bool, dense_rows: int = 0,
                 record=None, start: Optional[int] = None, last_only: bool = False,
                 count_from: Optional[int] = None, rows: Optional[torch.Tensor] = None,
                 last: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of ``ids`` at positions ``pos`` ..; ``record``: a decode step's hook on each launch's
        input; ``count_from``: a prefill counts its gates from that row on (see :meth:`prefill`).
        A captured prefill passes ``rows`` (dense prefix, counted rows, on the device; see
        :func:`wina.kernels.prefill.prefill_input`) and ``last`` (the row whose logits it returns)."""
        if ids.shape[0] > 1 and start is None and rows is None:
            start = int(pos.reshape(-1)[0])
        h = self.embed.index_select(0, ids)
        ssq = h.float().pow(2).sum(-1, keepdim=True)
        kw = dict(record=record, count_from=count_from, rows=rows)
        for L in self.layers:
            if ids.shape[0] == 1:
                # decode: RoPE and the cache write run in the q/k/v GEMV's finishing programs
                if record is not None:
                    record(L.attn_in, h, ssq, 0)
                g = L.attn_in
                q = gemv_rope(h, g.wt, self.cos, self.sin, pos, L.k_cache, L.v_cache, self.n_heads,
                              self.n_kv, self.head_dim, scales=g.scales, thresholds=g.thresholds,
                              bounds=g.bounds, bias=g.bias, ssq_in=ssq, eps=self.eps,
                              sparse=sparse and g.gating)
                att = attn_decode(q, L.k_cache, L.v_cache, pos, L.window)
            else:
                qkv, _ = self._lin(h, L.attn_in, sparse, dense_rows, ssq_in=ssq, **kw)
                q = (rope_cache_triton(qkv, self.cos, self.sin, pos, L.k_cache, L.v_cache, self.n_heads,
                                       self.n_kv, self.head_dim) if use_triton(qkv)
                     else self._rope_prefill(qkv, L, start))
                att = (attn_prefill_triton(q, L.k_cache, L.v_cache, pos, L.window) if rows is not None
                       else self._attn_prefill(q, L, start))
            if L.s_attn is None:
                h, ssq = self._lin(att, L.o, sparse, dense_rows, res=h, want_ssq=True, **kw)
            else:
                delta, _ = self._lin(att, L.o, sparse, dense_rows, **kw)
                h, ssq = gemv(h, L.s_attn, res=delta, want_ssq=True)
            gu, _ = self._lin(h, L.mlp_in, sparse, dense_rows, ssq_in=ssq, **kw)
            if L.s_mlp is None:
                h, ssq = self._lin(gu, L.down, sparse, dense_rows, act=ACT_SILU_MUL, res=h, want_ssq=True, **kw)
            else:
                delta, _ = self._lin(gu, L.down, sparse, dense_rows, act=ACT_SILU_MUL, **kw)
                h, ssq = gemv(h, L.s_mlp, res=delta, want_ssq=True)
        if last is not None:                   # a captured prefill: its last real row
            h, ssq = h.index_select(0, last), ssq.index_select(0, last)
        elif last_only:                        # a prompt needs the next token's logits only
            h, ssq = h[-1:], ssq[-1:]
        logits, _ = gemv(h, self.head, ssq_in=ssq, bias=self.head_bias, eps=self.eps, role="head")
        return logits

    def _dense_rows(self, t: int) -> int:
        if t <= 1 or self.dense_prefix <= 0:
            return 0
        return t - int((1.0 - self.dense_prefix) * t)

    @torch.no_grad()
    @_on_device
    def prefill(self, ids: Sequence[int], sparse: Optional[bool] = None, start: int = 0,
                count: bool = False, last_only: bool = False) -> torch.Tensor:
        """Run ``ids`` through the model at positions ``start`` .. (the cache must hold the
        positions before ``start``: a later chat turn prefills only its new tokens); returns logits
        [T, V]. The dense prefix covers the first positions of the whole sequence, as a prefill of
        everything from 0 would. ``count``: add the gates' decisions to the device counters.
        ``last_only``: logits [1, V] of the last position only (generation needs no more).
        With :attr:`sparse_prefill` False, prompts run dense (decode steps stay sparse). On the GPU,
        a ``last_only`` prompt of up to ``PREFILL_BUCKETS[-1]`` tokens replays the prefill captured at
        its bucket length (:meth:`capture_prefill`; :attr:`graph_prefill` False: always eager)."""
        sparse = self.sparse if sparse is None else bool(sparse)
        t = len(ids)
        if t == 0:
            raise InvalidArgument("the prompt is empty")
        if start < 0 or start + t > self.max_seq_len:
            raise InvalidArgument(f"{start + t} tokens do not fit the engine's cache of {self.max_seq_len}")
        if t > 1 and not self.sparse_prefill:
            sparse = False
        d0 = min(t, max(0, self._dense_rows(start + t) - start))
        counting = count and sparse
        self.cache.used = max(self.cache.used, start + t)
        if last_only and self._prefill_bucket(t, start):
            if counting:
                self._count_rows += t - d0
            return self._prefill_replay(ids, start, d0, sparse, counting)
        x = torch.tensor(list(ids), dtype=torch.long, device=self.device)
        pos = torch.tensor([start], dtype=torch.long, device=self.device)
        record, count_from = None, None
        if counting:
            if t > 1:
                count_from = d0
            else:
                record = self._count
            self._count_rows += t - d0 if t > 1 else 1
        return self._forward(x, pos, sparse, d0 if t > 1 else 0, record=record, start=start,
                             last_only=last_only, count_from=count_from)

    # --------------------------------------------------------------------------------------------
    # prefill, CUDA graphs at bucketed prompt lengths
    # --------------------------------------------------------------------------------------------
    def _prefill_bucket(self, t: int, start: int) -> int:
        """The captured length a prompt of ``t`` tokens at ``start`` runs at, or 0: eagerly (no graphs
        here, a prompt longer than the last bucket, padding past the cache, sliding-window
        attention, or a transformed model's shortcuts, which run through the GEMV)."""
        if t < 2 or t > PREFILL_BUCKETS[-1] or not self._graphable() or not self.graph_prefill:
            return 0
        b = next(b for b in PREFILL_BUCKETS if b >= t)
        if start + b > self.max_seq_len or any(L.window or L.s_attn is not None for L in self.layers):
            return 0
        return b

    def _prefill_inputs(self, bucket: int):
        """The captured prefills' static inputs, views of one device buffer filled by one copy:
        ids [bucket] (padded with token 0), start [1], rows [3] (dense prefix, first and end of the
        counted rows), last [1] (the row whose logits are returned)."""
        m = PREFILL_BUCKETS[-1]
        if self._pf_in is None:
            self._pf_in = torch.zeros(m + 5, dtype=torch.long, device=self.device)
            self._pf_host = torch.zeros(m + 5, dtype=torch.long).pin_memory()
        b = self._pf_in
        return b[:bucket], b[m:m + 1], b[m + 1:m + 4], b[m + 4:m + 5]

    def _prefill_fill(self, ids, start: int, d0: int, counting: bool) -> None:
        m, t = PREFILL_BUCKETS[-1], len(ids)
        hb = self._pf_host
        hb.zero_()
        hb[:t] = torch.as_tensor(list(ids), dtype=torch.long)
        hb[m:] = torch.tensor([start, d0, d0 if counting else 0, t if counting else 0, t - 1])
        self._pf_in.copy_(hb)

    def _warm_up_stream(self) -> torch.cuda.Stream:
        """The one side stream every capture's warm-up runs on: cuBLAS keeps a workspace per stream
        (32 MiB on Hopper), and a new stream per capture held ~400 MB over a small chat pair's
        twelve prefill graphs (docs/gpu-notes.md run 34)."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=self.device)
        return self._side_stream

    def _prefill_graph(self, bucket: int, sparse: bool, counting: bool):
        """The prefill of ``bucket`` rows captured over the bound cache (once per bucket, mode and
        cache; all share one memory pool, as they never run at once)."""
        pattern = tuple(g.gating for _, g in self.groups()) if sparse else ()
        key = ("prefill", bucket, sparse, pattern, counting, self.cache.id)
        if key in self._graphs:
            return self._graphs[key], key
        ids, pos, rows, last = self._prefill_inputs(bucket)

        def body():
            return self._forward(ids, pos, sparse, rows=rows, last=last, count_from=0 if counting else None)
        # warm-up and capture write the cache's last ``bucket`` slots and count: put back after them
        # the counts and those of the slots that may hold a conversation (none before a first turn)
        slot = self.max_seq_len - bucket
        end = min(self.cache.used, self.max_seq_len)
        saved = [(L.k_cache[:, :, slot:end].clone(), L.v_cache[:, :, slot:end].clone())
                 for L in self.layers] if end > slot else []
        kept = self._kept.clone()
        self._prefill_fill([0] * bucket, slot, 0, counting)
        s = self._warm_up_stream()
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            body()
        torch.cuda.current_stream(self.device).wait_stream(s)
        if self._pf_pool is None:
            self._pf_pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pf_pool):
            out = body()
        self._kept.copy_(kept)
        for L, (k, v) in zip(self.layers, saved):
            L.k_cache[:, :, slot:end].copy_(k)
            L.v_cache[:, :, slot:end].copy_(v)
        self._graphs[key] = g
        self._static_logits[key] = out
        return g, key

    def _prefill_replay(self, ids, start: int, d0: int, sparse: bool, counting: bool) -> torch.Tensor:
        g, key = self._prefill_graph(self._prefill_bucket(len(ids), start), sparse, counting)
        self._prefill_fill(ids, start, d0, counting)
        g.replay()
        return self._static_logits[key].clone()

    @_on_device
    def capture_prefill(self, sparse: Optional[bool] = None, count: bool = False) -> int:
        """Capture the prefill at every bucket length that fits the cache (otherwise a prompt's first
        use of a bucket does it), over the bound cache; ``count``: the counting form of a sparse
        prefill. Returns how many buckets are captured."""
        sparse = self.sparse if sparse is None else bool(sparse)
        n = 0
        with torch.no_grad():
            for b in PREFILL_BUCKETS:
                if self._prefill_bucket(b, 0):
                    self._prefill_graph(b, sparse, bool(count and sparse))
                    n += 1
        return n

    # --------------------------------------------------------------------------------------------
    # decode step, CUDA graph
    # --------------------------------------------------------------------------------------------
    def _select(self, logits: torch.Tensor, sampled: bool) -> torch.Tensor:
        """Next token [1] from logits [1, V]: argmax, or temperature + top-p through Gumbel-max
        (graph-safe: no host sync, temperature/top-p read from device buffers)."""
        if not sampled:
            return logits.argmax(-1)
        lf = logits.float() / self._temp
        srt, idx = lf.sort(dim=-1, descending=True)
        probs = torch.softmax(srt, dim=-1)
        cum = probs.cumsum(-1)
        srt = srt.masked_fill((cum - probs) > self._top_p, NEG_INF)
        u = torch.rand_like(srt).clamp_(min=1e-20)
        choice = (srt - torch.log(-torch.log(u))).argmax(-1, keepdim=True)
        return idx.gather(-1, choice).reshape(1)

    def _step_body(self, sparse: bool, sampled: bool, count: bool = False) -> torch.Tensor:
        logits = self._forward(self._tok, self._pos, sparse, record=self._stash if count else None)
        if count:
            self._count_stashed()
        nxt = self._select(logits, sampled)
        self._tok.copy_(nxt)
        self._pos.add_(1)
        return logits

    def _graph_key(self, sparse: bool, sampled: bool, count: bool = False):
        # which groups run the sparse kernel, and which cache the step reads, are baked into a capture
        pattern = tuple(g.gating for _, g in self.groups()) if sparse else ()
        return (sparse, sampled, pattern, bool(count and sparse), self.cache.id)

    def _graph(self, sparse: bool, sampled: bool, count: bool = False):
        count = bool(count and sparse)
        key = self._graph_key(sparse, sampled, count)
        if key in self._graphs:
            return self._graphs[key]
        tok, pos = self._tok.clone(), self._pos.clone()
        # warm-up steps write the KV cache: use the last slot and put it back afterwards, so that
        # a capture between a prefill and its decode steps leaves the cache intact
        slot = self.max_seq_len - 1
        saved = [(L.k_cache[:, :, slot].clone(), L.v_cache[:, :, slot].clone()) for L in self.layers]
        kept = self._kept.clone()
        s = self._warm_up_stream()
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(2):
                self._tok.zero_()
                self._pos.fill_(slot)
                self._step_body(sparse, sampled, count)
        torch.cuda.current_stream(self.device).wait_stream(s)
        self._tok.zero_()
        self._pos.fill_(slot)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = self._step_body(sparse, sampled, count)
        self._kept.copy_(kept)                # the warm-up steps counted too
        for L, (k, v) in zip(self.layers, saved):
            L.k_cache[:, :, slot].copy_(k)
            L.v_cache[:, :, slot].copy_(v)
        self._tok.copy_(tok)
        self._pos.copy_(pos)
        self._graphs[key] = g
        self._static_logits[key] = out
        return g

    def _graphable(self) -> bool:
        # graphs need the Triton decode path (the torch references read positions on the host)
        return self.use_graphs and self.device.type == "cuda" and self.fast

    @_on_device
    def capture(self, sparse: Optional[bool] = None, sampled: bool = False, count: bool = False) -> None:
        """Capture the decode step now (otherwise the first generate does it), over the bound
        cache; ``count``: also the counting variant of the sparse step (see generate)."""
        if self._graphable():
            sparse = self.sparse if sparse is None else bool(sparse)
            self._graph(sparse, sampled)
            if count and sparse:
                self._graph(sparse, sampled, True)

    @torch.no_grad()
    @_on_device
    def step(self, token: int, position: int, sparse: Optional[bool] = None) -> torch.Tensor:
        """One decode step for ``token`` at ``position`` (teacher forcing); returns logits [V]."""
        sparse = self.sparse if sparse is None else bool(sparse)
        if position >= self.max_seq_len:
            raise InvalidArgument(f"position {position} is outside the engine's cache of {self.max_seq_len}")
        self._tok.fill_(int(token))
        self._pos.fill_(int(position))
        self.cache.used = max(self.cache.used, int(position) + 1)
        if self._graphable():
            self._graph(sparse, False).replay()
            return self._static_logits[self._graph_key(sparse, False)][0].clone()
        return self._step_body(sparse, False)[0]

    @torch.no_grad()
    def forward_logits(self, ids: Sequence[int], prefill_len: Optional[int] = None,
                       sparse: Optional[bool] = None) -> torch.Tensor:
        """Logits [T, V] for ``ids``: the first ``prefill_len`` positions from one prefill, the rest
        from single decode steps (teacher forcing). Used to check the engine against transformers."""
        ids = _as_ids(ids)
        p = len(ids) if prefill_len is None else int(prefill_len)
        out = [self.prefill(ids[:p], sparse).float()]
        for j in range(p, len(ids)):
            out.append(self.step(ids[j], j, sparse).float()[None])
        return torch.cat(out)

    # --------------------------------------------------------------------------------------------
    # generation
    # --------------------------------------------------------------------------------------------
    @torch.no_grad()
    @_on_device
    def generate(self, prompt_ids, max_new_tokens: int = 256, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: Optional[int] = None,
                 on_token: Optional[Callable[[int], None]] = None,
                 stop: Optional[Iterable[int]] = None, sparse: Optional[bool] = None,
                 cancel=None, start: int = 0, count_every: int = 0) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after ``prompt_ids`` (list or [1, T] tensor).

        Greedy when ``temperature == 0``, else temperature + nucleus (``top_p``) sampling.
        ``on_token(id)`` is called for every new token as soon as it is known (raise
        :class:`wina.errors.Cancelled` from it, or trigger ``cancel`` (a CancelToken), to stop);
        ``stop``: token ids that end generation (default: the model's eos ids; ``()`` for none).
        ``sparse``: None = sparse iff thresholds are set. ``start``: the prompt continues what the
        bound cache holds at positions < start (a later chat turn; only the new tokens are
        prefilled). ``count_every``: N > 0 counts the gates' decisions on the device (read them
        with :meth:`gate_counts`) for the prompt and every N-th decode step (a second captured
        step with the counting in it; N = 1 counts every step, at some cost per step)."""
        ids = _as_ids(prompt_ids)
        check_sampling(max_new_tokens, temperature, top_p)
        if start + len(ids) + max_new_tokens > self.max_seq_len:
            raise InvalidArgument(f"{start + len(ids)} prompt + {max_new_tokens} new tokens exceed the engine's "
                                  f"cache of {self.max_seq_len} (build it with a larger max_seq_len)")
        sparse = self.sparse if sparse is None else bool(sparse)
        count = sparse and count_every > 0
        self.cache.used = max(self.cache.used, start + len(ids) + max_new_tokens)
        stops = set(self.eos_ids if stop is None else (int(s) for s in stop))
        sampled = temperature > 0
        if seed is not None:
            torch.manual_seed(seed)
            if self.device.type == "cuda":
                torch.cuda.manual_seed(seed)
        self._temp.fill_(max(float(temperature), MIN_TEMPERATURE))
        self._top_p.fill_(float(top_p))
        graph = self._graph(sparse, sampled) if self._graphable() else None
        cgraph = self._graph(sparse, sampled, True) if (graph is not None and count) else None

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        logits = self.prefill(ids, sparse, start=start, count=count, last_only=True)
        first = self._select(logits, sampled)
        tokens: list[int] = []
        stopped = "length"

        def emit(tok: int) -> bool:
            nonlocal stopped
            if tok in stops:
                stopped = "stop"
                return False
            tokens.append(tok)
            try:
                if on_token is not None:
                    on_token(tok)
            except Cancelled:
                stopped = "cancelled"
                return False
            if cancel is not None and getattr(cancel, "cancelled", False):
                stopped = "cancelled"
                return False
            return True

        first_tok = int(first)
        t1 = time.perf_counter()
        go = emit(first_tok)
        n_steps = max_new_tokens - 1
        if go and n_steps > 0:
            self._tok.fill_(first_tok)
            self._pos.fill_(start + len(ids))
            if graph is not None:
                self._decode_graph(graph, n_steps, emit, cgraph, count_every)
            else:
                for i in range(n_steps):
                    c = count and i % count_every == 0
                    self._step_body(sparse, sampled, c)
                    self._count_rows += int(c)
                    if not emit(int(self._tok[0])):
                        break
        sync()
        t2 = time.perf_counter()
        return GenerationResult(tokens, len(ids), t1 - t0, t2 - t1, stopped, sparse)

    def _decode_graph(self, graph, n_steps: int, emit, count_graph=None, every: int = 0) -> None:
        """Replay the graph n_steps times, one step ahead of the host: the token of step i is
        read (and streamed) while step i+1 already runs. With ``count_graph``, every ``every``-th
        step replays that one (the same step, counting the gates)."""
        host = [torch.empty(1, dtype=torch.long, pin_memory=True) for _ in range(2)]
        events = [torch.cuda.Event(), torch.cuda.Event()]
        pending = None
        for i in range(n_steps):
            if count_graph is not None and i % every == 0:
                count_graph.replay()
                self._count_rows += 1
            else:
                graph.replay()
            j = i % 2
            host[j].copy_(self._tok, non_blocking=True)
            events[j].record()
            if pending is not None:
                events[pending].synchronize()
                if not emit(int(host[pending][0])):
                    return
            pending = j
        if pending is not None:
            events[pending].synchronize()
            emit(int(host[pending][0]))
