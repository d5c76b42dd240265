"""Calibration: data sources and layer-by-layer histograms of the gating score of every projection.

Data sources (``source=``):

- ``"self"`` (default, works offline, no data needed): text sampled from the model itself. Each
  sample starts from the tokenizer's BOS token (EOS if it has none) and continues by ancestral
  sampling with temperature 1.0 and nucleus top-p 0.95 (``SELF_TEMPERATURE``, ``SELF_TOP_P``), EOS
  suppressed, a fixed seed (``seed=0``), until ``seq_len`` tokens.
- a local file: ``.txt``/``.raw``/``.md`` (the whole text) or ``.jsonl`` (one JSON object a line; the
  ``field`` option names the text field, default ``"text"``). Documents are joined with the EOS
  token, tokenised without special tokens, and ``samples`` windows of ``seq_len`` tokens are taken
  evenly spaced over the token stream.
- ``"hub:<name>"`` or a bare hub dataset name such as ``"tatsu-lab/alpaca"`` (needs the
  ``datasets`` package and network; the seed's recipe is alpaca, 20 samples × 2048 tokens; its
  ``text`` field is used). Offline this fails with a :class:`~wina.errors.DataError`.
- ``"wikitext"``: wikitext-2's raw test text (``wikitext2/wiki.test.raw``) from the data folder
  (:func:`wina.data.find_data_dir`: ``$WINA_DATA`` or ``../shared/data``), read as a text file.
  It is the text ``wina ppl`` and the presets measure perplexity on: a plan calibrated on it
  has seen the evaluation text, so prefer ``self`` or another text when wikitext perplexity matters.
- ``"random"``: uniformly random token ids (tests and shape-only benchmarks on random weights).

Default sizes (``samples``/``seq_len`` left as ``None``), from the model's projection parameter count:
models under 1 B parameters (the embedded SmolLM2-135M) use 16 × 512 tokens; larger ones the seed's
20 × 2048. See :data:`SIZE_DEFAULTS` and docs/calibration.md.

Collection keeps one decoder layer's activations in memory at a time: the inputs of layer 0 are
captured with a forward pre-hook (``with_kwargs``) on the layer (hidden states plus the position
embeddings / mask keyword arguments), then each layer is run alone on the dense hidden states
(dense propagation) while pre-hooks on its projections accumulate a histogram of the gating score
(TEAL ``|x|``, WINA ``|x|·c``, the same rule as :class:`wina.sparsify.Sparsifier`). A transformed
model works unchanged: the transform's shortcut hooks live on the layer's modules.

Histograms: log-spaced bins, 256 per octave from 2^-24 to 2^24 (plus under/overflow bins), so a
threshold read from a histogram (log-linear interpolation inside the bin) is within 0.28 % of the
empirical quantile's value. Only live input columns are counted (after the transform k_proj has
only kv_dim non-zero columns; the dead ones are dropped for free, so such a matrix's sparsity starts
at ``1 − n_live/d``), and only positions the sparsifier gates (after the dense prefix).

Resuming: with ``out=``, the calibration ids and each finished layer's histograms are written
atomically as soon as they exist; re-running with the same arguments resumes at the first
unfinished layer (layers before it are re-propagated densely, which is deterministic), and the
result is identical to an uninterrupted run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from .adapters import adapter_for, decoder_layers, projection
from .files import read_text
from .errors import DataError, InvalidArgument, PlanError
from .events import CancelToken, ProgressCallback, Reporter
from .interrupt import honours_cancel
from .scores import (BINS_PER_OCTAVE, LO_EXP, N_BINS, bin_scores, default_sizes,  # noqa: F401 (histogram API)
                     gate_scale_and_live, hist_threshold, is_weighted, matrix_threshold, prefix_start)

SELF_TEMPERATURE = 1.0
SELF_TOP_P = 0.95

# ---- calibration data ----------------------------------------------------------------------------
WIKITEXT_FILE = "wikitext2/wiki.test.raw"


def wikitext_path() -> Path:
    """The file behind the ``wikitext`` calibration source; a clear error when there is no data folder."""
    from .data import candidates, find_data_dir
    root = find_data_dir()
    if root is None:
        looked = ", ".join(str(c) for c in candidates())
        raise DataError(f"calibration source wikitext reads {WIKITEXT_FILE} from a data folder, and "
                        f"none was found ($WINA_DATA unset; {looked} absent); set WINA_DATA or use "
                        "'self' or a text file")
    p = root / WIKITEXT_FILE
    if not p.is_file():
        raise DataError(f"calibration source wikitext: {p} not found (the data folder is {root})")
    return p


def _check_source(source: str) -> str:
    if source in ("self", "random"):
        return source
    if source == "wikitext":
        wikitext_path()
        return "wikitext"
    if source.startswith("hub:"):
        return "hub"
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_file():
            raise DataError(f"calibration source {source} is not a file")
        return "file"
    if source.count("/") == 1 and not source.startswith((".", "/", "~")) and not p.suffix:
        return "hub"
    raise DataError(f"calibration source not found: {source} (use 'self', 'wikitext', a .txt/.jsonl "
                    "file, or hub:<dataset>)")


def source_file(source: str) -> Optional[Path]:
    """The text file a calibration source reads (a file, or wikitext's in the data folder), or None
    (self, random, a hub dataset, or a file that is not there)."""
    try:
        kind = _check_source(source)
    except DataError:
        return None
    if kind == "file":
        return Path(source).expanduser().resolve()
    return wikitext_path().resolve() if kind == "wikitext" else None


def check_source(source: str, field: str = "text") -> str:
    """The one check of a calibration source before any model is loaded; returns its kind. A file
    (or wikitext's, from the data folder) is read whole: missing, binary, not UTF-8, a .jsonl line
    that is not JSON or lacks the field, or no text at all is refused here. A hub dataset needs the
    ``datasets`` package and a usable hub."""
    if not isinstance(source, str) or not source.strip():
        raise DataError("the calibration source is empty (use 'self', 'wikitext', a .txt/.jsonl file, "
                        "or hub:<dataset>)")
    kind = _check_source(source)
    if kind in ("file", "wikitext"):
        p = wikitext_path() if kind == "wikitext" else Path(source).expanduser()
        if not any(t.strip() for t in _read_texts(p, field)):
            raise DataError(f"calibration source {p} holds no text")
    elif kind == "hub":
        _hub_ready(source[4:] if source.startswith("hub:") else source)
    return kind


def check_settings(*, method: str = "wina", rotation: str = "svd", weighted: str = "default",
                   samples: Optional[int] = None, seq_len: Optional[int] = None,
                   source: Optional[str] = "self") -> None:
    """The one check of a calibration's settings, before any model is loaded (what
    :meth:`wina.pipeline.Calibration.validate` calls). ``source=None`` skips the source (a resumed
    calibration reads its ids from the plan, not from the source)."""
    from .plan_meta import PLAN_ROTATIONS
    if method not in ("teal", "wina"):
        raise InvalidArgument(f"unknown calibration method {method!r}; choose teal or wina")
    if rotation not in PLAN_ROTATIONS:
        raise InvalidArgument(f"unknown rotation {rotation!r}; choose one of {', '.join(PLAN_ROTATIONS)}")
    if weighted not in ("default", "all"):
        raise InvalidArgument(f"unknown weighting {weighted!r}; choose default or all")
    for name, v, lo in (("samples", samples, 1), ("seq_len", seq_len, 8)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise InvalidArgument(f"calibration {name} must be an integer of at least {lo}, got {v!r}")
    if source is not None:
        check_source(source)


def _read_texts(path: Path, field: str) -> list[str]:
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(read_text(path).splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(rec, dict) and field in rec:
                texts.append(str(rec[field]))
            elif isinstance(rec, dict) and "instruction" in rec:    # alpaca-style records
                texts.append("\n\n".join(str(rec[k]) for k in ("instruction", "input", "output")
                                         if rec.get(k)))
            else:
                raise DataError(f"{path}:{n}: no {field!r} field (every JSON line needs one, or alpaca's "
                                "instruction/input/output)")
        return texts
    return [read_text(path)]


def _hub_ready(name: str) -> None:
    """A hub dataset can be fetched: the ``datasets`` package is there and the hub usable."""
    import importlib.util
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"hub dataset {name!r} needs the 'datasets' package (pip install datasets), "
                        "or use source='self' or a local file")
    from . import hub
    if not hub.usable():
        why = "the hub is off (HF_HUB_OFFLINE)" if hub.offline() else "the hub is unreachable"
        raise DataError(f"calibration dataset {name!r} comes from the Hugging Face hub and {why}; "
                        "calibrate on 'self' (text the model writes), 'wikitext' or a local .txt/.jsonl file")


def _hub_texts(name: str, field: str) -> list[str]:
    name = name[4:] if name.startswith("hub:") else name
    _hub_ready(name)
    from datasets import load_dataset
    from .errors import is_network_error, network_error
    try:
        ds = load_dataset(name, split="train")
    except Exception as e:  # network, missing dataset: many types
        if is_network_error(e):
            raise network_error(f"calibration dataset {name!r}", e) from None
        raise DataError(f"cannot load hub dataset {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                        "; offline, use source='self' or a local file") from None
    if field not in ds.column_names:
        raise DataError(f"hub dataset {name!r} has no field {field!r}; fields: {', '.join(ds.column_names)}")
    return [str(t) for t in ds[field]]


def _windows_from_texts(texts: list[str], tokenizer, samples: int, seq_len: int, what: str) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False).input_ids)
        if eos is not None:
            ids.append(eos)
    n_win = len(ids) // seq_len
    if n_win < samples:
        raise DataError(f"{what} has {len(ids)} tokens: fewer than {samples} samples × {seq_len} tokens "
                        "(use fewer samples or a shorter seq_len)")
    all_ids = torch.tensor(ids[: n_win * seq_len], dtype=torch.long).view(n_win, seq_len)
    pick = torch.linspace(0, n_win - 1, samples).round().long()
    return all_ids[pick].contiguous()


@torch.no_grad()
def sample_self(model, tokenizer, samples: int, seq_len: int, *, seed: int = 0,
                temperature: float = SELF_TEMPERATURE, top_p: float = SELF_TOP_P,
                batch_size: int = 8, reporter: Optional[Reporter] = None) -> torch.Tensor:
    """Text sampled from the model (see the module docstring for the settings); (samples, seq_len)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token to start sampling from")
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out = []
    import inspect
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    sp = getattr(model, "_wina_sparsifier", None)
    ctx = sp.paused() if sp is not None else _nullctx()
    with ctx:
        for b0 in range(0, samples, batch_size):
            nb = min(batch_size, samples - b0)
            ids = torch.full((nb, 1), start, dtype=torch.long)
            past = None
            cur = ids.to(device)
            for t in range(seq_len - 1):
                if reporter is not None:
                    reporter.check()          # a cancel stops sampling within a token (events: every 64)
                o = model(cur, use_cache=True, **{cache_kw: past})
                past = getattr(o, "cache", None) if cache_kw == "cache" else o.past_key_values
                logits = o.logits[:, -1].float().cpu() / max(temperature, 1e-5)
                if eos is not None and eos != start:
                    logits[:, eos] = -float("inf")
                if start is not None:
                    logits[:, start] = -float("inf")
                nxt = nucleus_sample(torch.softmax(logits, -1), top_p, gen)
                ids = torch.cat([ids, nxt], 1)
                cur = nxt.to(device)
                if reporter is not None and t % 64 == 0:
                    reporter.emit(0, message=f"sampling calibration text: {b0 + nb}/{samples} samples, "
                                             f"token {t + 1}/{seq_len}")
            del past
            out.append(ids)
    return torch.cat(out, 0)


NUCLEUS_TOPK = (1024, 8192)    # a row's nucleus is looked for in its top-k, k = these, then all


def nucleus_sample(probs: torch.Tensor, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row of ``probs`` (rows, vocab), by nucleus sampling: ``torch.multinomial`` over
    the probabilities sorted in descending order, those whose preceding mass is ``>= top_p`` zeroed.

    The same tokens, bit for bit, as sorting the whole vocabulary (the recipe that drew every earlier
    calibration text), but cheaper: a row's sorted prefix comes from its top-k, k growing
    (:data:`NUCLEUS_TOPK`, then the whole row) until the nucleus ends inside it. The weights handed to
    ``torch.multinomial`` are then the same tensor as the full sort's (so the same random draws and the
    same drawn rank), and the token at that rank is the same unless its probability ties with a
    neighbour's, where the order among equal probabilities is the full sort's own: it decides those."""
    nb, V = probs.shape
    vals = torch.zeros_like(probs)           # sorted probabilities; zeros past a row's top-k
    order: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * nb
    rows = list(range(nb))
    keep = None
    for k in NUCLEUS_TOPK + (V,):
        k = min(k, V)
        top, idx = probs[rows].topk(k, -1)
        vals[rows, :k] = top
        for j, r in enumerate(rows):
            order[r] = idx[j]
        keep = (vals.cumsum(-1) - vals) < top_p
        if k == V:
            break
        # the nucleus ends inside the top-k when rank k-1 is out of it; the later ranks then are too
        # (a cumulative sum of non-negative numbers only grows)
        rows = [r for r in rows if bool(keep[r, k - 1])]
        if not rows:
            break
    w = vals * keep
    choice = torch.multinomial(w / w.sum(-1, keepdim=True), 1, generator=gen)
    c = choice[:, 0].tolist()
    for r in range(nb):
        n = len(order[r])
        v = vals[r, c[r]]
        if (c[r] + 1 >= n and n < V) or (c[r] > 0 and vals[r, c[r] - 1] == v) or (
                c[r] + 1 < V and vals[r, c[r] + 1] == v):
            return probs.sort(-1, descending=True)[1].gather(-1, choice)   # a tie: the full sort's order
    return torch.stack([order[r][c[r]] for r in range(nb)]).unsqueeze(1)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def calibration_ids(model, tokenizer, source: str, samples: int, seq_len: int, *, field: str = "text",
                    seed: int = 0, reporter: Optional[Reporter] = None) -> torch.Tensor:
    """Token ids (samples, seq_len) for a calibration source."""
    if samples < 1 or seq_len < 8:
        raise InvalidArgument(f"calibration needs samples >= 1 and seq_len >= 8, got {samples} × {seq_len}")
    kind = _check_source(source)
    if kind == "self":
        return sample_self(model, tokenizer, samples, seq_len, seed=seed, reporter=reporter)
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=g)
    if kind in ("file", "wikitext"):
        p = wikitext_path() if kind == "wikitext" else Path(source).expanduser()
        return _windows_from_texts(_read_texts(p, field), tokenizer, samples, seq_len, str(p))
    return _windows_from_texts(_hub_texts(source, field), tokenizer, samples, seq_len, source)


# ---- layer-by-layer propagation ------------------------------------------------------------------
class _Stop(Exception):
    pass


class LayerRunner:
    """Dense propagation through decoder layers, one layer's activations at a time.

    ``inputs(ids)`` captures the hidden states that layer 0 receives and the keyword arguments
    (position embeddings, mask, ...) of a batch-1 forward (they broadcast over any batch).
    ``run(i, h)`` runs decoder layer i alone on h (chunks of ``chunk`` sequences).
    """

    KEEP_KW = ("attention_mask", "position_ids", "position_embeddings", "cache_position")

    def __init__(self, model, chunk_tokens: int = 16384) -> None:
        self.model = model
        self.adapter = adapter_for(model)
        self.layers = decoder_layers(model, self.adapter)
        self.device = next(model.parameters()).device
        self.chunk_tokens = chunk_tokens
        self.kwargs: dict[str, Any] = {}

    @torch.no_grad()
    def _capture(self, ids: torch.Tensor):
        got: dict[str, Any] = {}

        def pre(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            got["h"] = h.detach()
            got["kw"] = {k: v for k, v in kwargs.items() if k in self.KEEP_KW}
            raise _Stop

        handle = self.layers[0].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            self.model(ids.to(self.device), use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return got["h"], got["kw"]

    @torch.no_grad()
    def inputs(self, ids: torch.Tensor) -> torch.Tensor:
        sp = getattr(self.model, "_wina_sparsifier", None)
        ctx = sp.paused() if sp is not None else _nullctx()
        with ctx:
            _, self.kwargs = self._capture(ids[:1])
            hs = [self._capture(ids[i:i + self.n_chunk(ids.shape[1])])[0]
                  for i in range(0, ids.shape[0], self.n_chunk(ids.shape[1]))]
        return torch.cat(hs, 0)

    def n_chunk(self, seq_len: int) -> int:
        return max(1, self.chunk_tokens // max(seq_len, 1))

    @torch.no_grad()
    def run(self, i: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        out = []
        n = self.n_chunk(h.shape[1])
        sp = getattr(self.model, "_wina_sparsifier", None)
        ctx = sp.paused() if sp is not None else _nullctx()
        with ctx:
            for b in range(0, h.shape[0], n):
                y = layer(h[b:b + n], **self.kwargs)
                out.append(y[0] if isinstance(y, tuple) else y)
        return torch.cat(out, 0)


# ---- the calibration step ------------------------------------------------------------------------
@torch.no_grad()
def collect_layer(runner: LayerRunner, i: int, h: torch.Tensor, method: str, weighted: str,
                  dense_prefix: float) -> tuple[torch.Tensor, dict[str, dict]]:
    """Run layer i densely on h; returns (output, {proj: {"counts", "n_live", "in_features"}})."""
    a = runner.adapter
    stats: dict[str, dict] = {}
    handles = []
    for p in a.projections:
        lin = projection(runner.model, i, p, a)
        scale, live = gate_scale_and_live(lin, is_weighted(method, weighted, p, a))
        n_live = int(live.sum()) if live is not None else lin.in_features
        st = {"counts": torch.zeros(N_BINS, dtype=torch.float64), "n_live": n_live,
              "in_features": lin.in_features}
        stats[p] = st

        def hook(module, args, _st=st, _scale=scale, _live=live):
            x = args[0]
            start = prefix_start(x.shape[-2], dense_prefix) if x.dim() >= 2 else 0
            xs = x[..., start:, :]
            if _live is not None:
                xs = xs[..., _live.to(xs.device)]
                sc = None if _scale is None else _scale.to(xs.device)[_live.to(xs.device)]
            else:
                sc = _scale
            _st["counts"] += bin_scores(_gate_scores(xs, sc))
            return None

        handles.append(lin.register_forward_pre_hook(hook))
    try:
        y = runner.run(i, h)
    finally:
        for hd in handles:
            hd.remove()
    return y, stats


def _ids_hash(ids: torch.Tensor) -> str:
    import hashlib
    return hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]


def _gate_scores(x, scale):
    from .sparsify import gate_scores
    return gate_scores(x, scale)


def _args_mismatch(stored: Optional[dict], args: dict) -> Optional[str]:
    """None when a plan's recorded calibration arguments are ``args`` (a plan from before the text's
    checksum was recorded is compared without it); else what to add to the refusal ("" or why)."""
    if stored == args:
        return None
    def rest(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "source_sha256"}
    if isinstance(stored, dict) and rest(stored) == rest(args):
        return None if "source_sha256" not in stored else " (the text file has changed)"
    return ""


@honours_cancel
def calibrate(model, tokenizer, *, method: str = "wina", source: str = "self",
              samples: Optional[int] = None, seq_len: Optional[int] = None,
              out: Optional[str | Path] = None, weighted: str = "default", model_id: str = "",
              on_event: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
              field: str = "text", seed: int = 0, dense_prefix: float = 0.01,
              chunk_tokens: int = 16384, input_ids: Optional[torch.Tensor] = None,
              rotation: Optional[str] = None):
    """Collect per-projection gating-score histograms, layer by layer; returns a :class:`~wina.plan.Plan`.

    ``out``: plan directory, written as layers finish and resumed if it holds an unfinished
    calibration made with the same arguments (a finished one with the same arguments is returned
    as is). The model may be transformed already (:func:`wina.transform.transform`); the plan
    records it. ``rotation`` ("svd", "pca" or "pca-block"): transform the model first (the pca
    rotations: their bases from the calibration text, stored in the plan); None: calibrate the model as it is. Progress: ``stage="calibrate"`` events, one per layer (``done`` = layers finished).
    """
    from . import __version__
    from .plan import Plan, plan_from_model
    from .plan_meta import DATA_ROTATIONS, PLAN_ROTATIONS
    from .transform import block_input_moments, data_basis, ensure, is_transformed

    if rotation is not None and rotation not in PLAN_ROTATIONS:
        raise InvalidArgument(f"unknown rotation {rotation!r}; choose one of {', '.join(PLAN_ROTATIONS)}")
    if rotation is None and is_transformed(model):
        rotation = model._wina_transform.rotation
        if rotation not in PLAN_ROTATIONS:
            raise InvalidArgument(f"a plan cannot record the {rotation} transform; reload the model")
    if method not in ("wina", "teal"):
        raise InvalidArgument(f"calibration method must be 'wina' or 'teal', got {method!r}")
    if weighted not in ("default", "all"):
        raise InvalidArgument(f"unknown weighting {weighted!r}; choose default or all")
    adapter = adapter_for(model)
    d = default_sizes(model.config)
    if input_ids is not None:                   # ready-made calibration ids (samples, seq_len)
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() != 2 or input_ids.shape[1] < 8:
            raise InvalidArgument("input_ids must be a (samples, seq_len >= 8) tensor")
        samples, seq_len = input_ids.shape
        kind, src = "ids", f"{source} (given ids, sha256 {_ids_hash(input_ids)})"
    else:
        samples = int(samples or d["samples"])
        seq_len = int(seq_len or d["seq_len"])
        kind = _check_source(source)
        src = str(Path(source).expanduser().resolve()) if kind == "file" else source
    n_layers = len(decoder_layers(model, adapter))
    args = {"method": method, "weighted": weighted, "source": src,
            "field": field if kind in ("file", "hub") else None,
            "samples": samples, "seq_len": seq_len, "seed": seed, "dense_prefix": dense_prefix,
            "transform": rotation is not None}
    if rotation in DATA_ROTATIONS:
        args["rotation"] = rotation
    if kind == "file" and input_ids is None:
        from .files import sha256
        args["source_sha256"] = sha256(src)         # an edited text is another calibration

    rep = Reporter("calibrate", n_layers, on_event, cancel, n_layers=n_layers)
    plan = None
    if out is not None and Path(out).exists() and (Path(out) / "plan.json").exists():
        plan = Plan.load(out, allow_partial=True)
        plan.check_model(model)
        why = _args_mismatch(plan.meta.get("calibration_args"), args)
        if why is not None:
            raise PlanError(f"{out} holds a calibration made with other arguments{why}; "
                            "use another directory or delete it")
        if rotation is not None:
            ensure(model, True, rotation=rotation, basis=plan.rotation_basis, what="this calibration",
                   on_event=on_event)
    if plan is None:
        rep.emit(0, message="preparing calibration data")
        ids = input_ids if input_ids is not None else calibration_ids(
            model, tokenizer, source, samples, seq_len, field=field, seed=seed, reporter=rep)
        basis = None
        if rotation is not None:
            if rotation in DATA_ROTATIONS:
                if is_transformed(model):
                    basis = model._wina_transform.basis
                else:
                    rep.emit(0, message=f"the {rotation} rotation's basis from the calibration text")
                    basis = data_basis(rotation, block_input_moments(model, ids)).float()   # as the plan stores it
            ensure(model, True, rotation=rotation, basis=basis, what="this calibration", on_event=on_event)
        plan = plan_from_model(model, ids, model_id=model_id, args=args, version=__version__)
        plan.rotation_basis = basis
        if out is not None:
            plan.save(out)
    if plan.n_calibrated == n_layers:
        rep.emit(n_layers, message="calibration complete")
        return plan

    runner = LayerRunner(model, chunk_tokens)
    h = runner.inputs(plan.calib_ids)
    for i in range(n_layers):
        rep.emit(i, layer=i, message=f"layer {i + 1}/{n_layers}")
        if i < plan.n_calibrated:
            h = runner.run(i, h)                       # resume: dense propagation only
            continue
        h, stats = collect_layer(runner, i, h, method, weighted, dense_prefix)
        plan.set_layer_histograms(i, stats)
        if plan.path is not None:
            plan.save_layer_histograms(i)
    rep.emit(n_layers, layer=n_layers - 1, message="calibration complete")
    return plan
