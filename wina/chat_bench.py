"""``wina bench --chat``: the user's path timed. A scripted multi-turn chat through
:class:`wina.chat.ChatSession`, dense and sparse side by side on one engine, against the engine alone
at each turn's context (same ids), with issue 19's targets.

:func:`run_chat_bench` returns a JSON-serialisable dict; the CLI renders it
(``wina.cli.bench_tables``), :func:`chat_bench_markdown` gives its per-turn table for the docs.
"""
from __future__ import annotations

import datetime as _dt
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Optional, Sequence

import torch

from .bench import engine_thresholds, weight_bytes
from .errors import InvalidArgument
from .events import Progress
from .files import write_json

_WORDS = ("the river city light stone bridge market morning evening garden window story music "
          "winter summer road friend teacher question answer letter paper table island forest "
          "mountain village harbor station library museum kitchen history science number").split()


def chat_script(tokenizer, turns: int = 5, first_tokens: int = 90, user_tokens: int = 500,
                seed: int = 0) -> list[str]:
    """User messages of about ``first_tokens`` (the first) and ``user_tokens`` tokens (the rest)."""
    import random
    rng = random.Random(seed)
    out = []
    for t in range(turns):
        want = first_tokens if t == 0 else user_tokens
        words = [f"Turn {t + 1}: please read this and answer."]
        text = " ".join(words)
        while _n_ids(tokenizer(text).input_ids) < want:
            words.extend(rng.choice(_WORDS) for _ in range(16))
            text = " ".join(words)
        out.append(text)
    return out


def _n_ids(x) -> int:
    return int(x.shape[-1]) if hasattr(x, "shape") else len(x)


def _threshold_sparsifier(model, method: str, sparsity: float, ids: list[int], max_seq_len: int):
    """Attach threshold gating at ``sparsity`` calibrated on ``ids`` (uniform per matrix: each
    drops that fraction of its scores in a dense forward), as run_bench does for the engine alone."""
    from .engine import Engine
    from .sparsify import sparsify
    tmp_sp = sparsify(model, method, sparsity, gating="topk")
    scales = tmp_sp.scales
    tmp_sp.remove()
    tmp = Engine.from_model(model, scales=scales, max_seq_len=max(len(ids) + 8, 64), use_sparsifier=False)
    thr = engine_thresholds(tmp, ids, sparsity)
    del tmp
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return sparsify(model, method, sparsity, gating="threshold", thresholds=thr)


def check_settings(*, turns: int, new_tokens: int, user_tokens: int, count_every: Optional[int] = None,
                   sparsity: float = 0.5, method: Optional[str] = "wina", options: bool = False) -> None:
    """The one check of a chat bench's settings, made before any model is loaded (by
    :func:`run_chat_bench` and ``wina bench --chat``): at least one turn, two new tokens per reply
    (the first is the time to first token, the rest the decode rate), one token per later user
    message, a gate-count interval >= 0, a sparsity in (0, 1), the method wina or teal (None: a
    plan's). ``options``: the error names them as the command line does (``--new-tokens``, ...)."""
    def name(key: str) -> str:
        return "--" + key.replace("_", "-") if options else key

    for key, v, least, why in (("turns", turns, 1, ""),
                               ("new_tokens", new_tokens, 2, " (the first token, then one to time the decode)"),
                               ("user_tokens", user_tokens, 1, "")):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise InvalidArgument(f"{name(key)} must be at least {least}{why}, got {v}")
    if count_every is not None and (isinstance(count_every, bool) or not isinstance(count_every, int)
                                    or count_every < 0):
        raise InvalidArgument(f"{name('count_every')} must be >= 0 (0: never count), got {count_every}")
    if not 0.0 < sparsity < 1.0:                 # NaN fails this too
        raise InvalidArgument(f"{name('sparsity')} must be in (0, 1), got {sparsity}")
    if method is not None and method not in ("wina", "teal"):
        raise InvalidArgument(f"{name('method')} must be wina or teal, got {method!r}")


def run_chat_bench(model, tokenizer, *, turns: int = 5, new_tokens: int = 200, first_tokens: int = 90,
                   user_tokens: int = 500, sparsity: float = 0.5, method: str = "wina",
                   max_seq_len: int = 4096, one_copy: bool = True, count_every: Optional[int] = None,
                   seed: int = 0, label: str = "", on_event: Optional[Callable[[Progress], None]] = None,
                   json_path: Optional[str] = None) -> dict:
    """A scripted conversation (``turns`` user messages, the context growing past 2k tokens) through
    :class:`wina.chat.ChatSession`, dense and sparse side by side (one engine, two KV caches), greedy,
    ``new_tokens`` per reply (eos ignored). Per turn and mode: time to first token, decode tokens/s,
    the tokens prefilled, the measured sparsity; then the engine alone at each turn's context (a
    generate from that turn's prompt, the same ids, and the prefill of that turn's new tokens), and
    the ratios.
    Also: peak GPU memory against the weight and KV-cache bytes, and a 512-token prefill dense vs
    sparse. If the model has no active sparsifier, one is attached (threshold gating, each matrix at
    ``sparsity``, calibrated on the script). Returns a JSON-serialisable dict."""
    from .chat import ChatSession
    from .generate import engine_available
    check_settings(turns=turns, new_tokens=new_tokens, user_tokens=user_tokens, count_every=count_every,
                   sparsity=sparsity, method=method)
    emit = on_event or (lambda ev: None)
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    script = chat_script(tokenizer, turns, first_tokens, user_tokens, seed)
    out: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
        "model": label, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "turns": turns, "new_tokens": new_tokens, "turns_detail": []}
    sp = getattr(model, "_wina_sparsifier", None)
    if sp is None or not sp.enabled or sp.method == "dense":
        emit(Progress("chat-bench", 0, turns, message=f"calibrating thresholds at {sparsity:.0%}"))
        ids = chat_script_ids(tokenizer, script)
        sp = _threshold_sparsifier(model, method, sparsity, ids[:2048], max_seq_len)
        out["gating"] = f"{method} threshold, {sparsity:.0%} per matrix (calibrated on the script)"
    else:
        out["gating"] = f"{sp.method} {sp.gating}, nominal {sp.nominal_sparsity():.1%}"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    kw = dict(max_new_tokens=new_tokens, max_seq_len=max_seq_len, one_copy=one_copy, ignore_eos=True)
    if count_every is not None:
        kw["count_every"] = count_every
    dense, sparse = ChatSession.pair(model, tokenizer, **kw)
    if sparse is None:
        raise InvalidArgument("the model has no active sparsifier")
    out["backend"] = dense.backend
    # the engine counts the prompt and every count_every-th step; the portable path's gates count every row
    out["count_every"] = sparse.count_every if dense.backend == "engine" else 1
    t = time.perf_counter()
    dense.warm_up(emit)
    sparse.warm_up(emit)
    out["warm_up_s"] = time.perf_counter() - t
    prompts: dict[tuple[int, str], list[int]] = {}      # each turn's prompt ids, for the engine alone
    for i, text in enumerate(script):
        emit(Progress("chat-bench", i, turns, message=f"turn {i + 1}"))
        row: dict[str, Any] = {"turn": i + 1}
        for name, s in (("dense", dense), ("sparse", sparse)):
            r = s.send(text)
            prompts[(i, name)] = list(s.context_ids()[:r.context_tokens])
            row[name] = {"context": r.context_tokens, "prefilled": r.prefill_tokens, "tokens": r.tokens,
                         "ttft_s": r.ttft_s, "prepare_s": r.prepare_s, "decode_s": r.decode_s,
                         "decode_tokens_per_s": r.decode_tokens_per_s,
                         "stopped": r.stopped, "sparsity": r.sparsity, "counted": r.counted_tokens,
                         "truncated": r.truncated}
        row["sparse_over_dense"] = sparse_over_dense(row)
        out["turns_detail"].append(row)
        if json_path:
            write_json(json_path, out)
    eng = dense.engine
    if cuda:
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        wb = weight_bytes(eng) + eng.embed.numel() * eng.embed.element_size()
        kv = dense._cache.nbytes() + sparse._cache.nbytes()
        out["memory"] = {"peak_allocated_gib": peak / 2**30, "peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / 2**30,
                         "weight_gib": wb / 2**30, "kv_caches_gib": kv / 2**30,
                         "peak_over_weights_plus_kv": peak / (wb + kv),
                         "peak_minus_kv_over_weights": (peak - kv) / wb}
    # the engine alone, at each turn's context, on a scratch cache
    if engine_available(model) or dense.backend == "engine":
        emit(Progress("chat-bench", turns, turns, message="the engine alone at the same contexts"))
        with scratch_cache(dense) as eng:
            engine_alone(eng, out["turns_detail"], prompts)
            # 512-token prefill, dense vs sparse
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, eng.vocab, (512,), generator=g).tolist()
            p_d = _time_prefill(eng, ids, 0, False)
            p_s = _time_prefill(eng, ids, 0, True)
            out["prefill_512"] = {"dense_s": p_d, "sparse_s": p_s, "sparse_over_dense": p_s / p_d if p_d else None}
    out["targets"] = chat_targets(out)
    if json_path:
        write_json(json_path, out)
    return out


def sparse_over_dense(row: dict) -> Optional[float]:
    """A chat turn's sparse decode rate over its dense one (None where either is unknown)."""
    d, s = row["dense"].get("decode_tokens_per_s"), row["sparse"].get("decode_tokens_per_s")
    return s / d if d and s else None


@contextmanager
def scratch_cache(session):
    """``session``'s engine bound to a scratch KV cache for the duration (the session's cache, and
    the conversation in it, are left alone and bound again after)."""
    eng = session.engine
    scratch = eng.new_cache()
    eng.bind(scratch)
    try:
        yield eng
    finally:
        eng.bind(session._cache)
        eng.drop_cache(scratch)


def engine_alone(eng, rows: list[dict], prompts: dict) -> None:
    """The engine alone at each chat turn's context: for ``rows`` (a chat bench's ``turns_detail``:
    per mode ``tokens``, ``prefilled``, ``decode_tokens_per_s``, ``ttft_s``) and ``prompts`` ((turn
    index, mode) → that turn's prompt ids), a generate from the same ids (a sparse step's time
    depends on what it keeps) and the prefill of the turn's new tokens alone; adds
    ``engine_decode_tokens_per_s``, ``decode_ratio``, ``engine_prefill_s`` and ``ttft_over_prefill`` per
    mode. ``eng`` is bound to a scratch cache
    (:func:`scratch_cache`)."""
    for i, row in enumerate(rows):
        for name in ("dense", "sparse"):
            c = row[name]
            ids = prompts[(i, name)]
            res = eng.generate(ids, c["tokens"] if c["tokens"] > 1 else 2, sparse=(name == "sparse"), stop=())
            alone = res.decode_tokens_per_s
            n = c["prefilled"]
            pre = _time_prefill(eng, ids[-n:], len(ids) - n, name == "sparse")
            c["engine_decode_tokens_per_s"] = alone
            c["decode_ratio"] = c["decode_tokens_per_s"] / alone if alone and c["decode_tokens_per_s"] else None
            c["engine_prefill_s"] = pre
            c["ttft_over_prefill"] = c["ttft_s"] / pre if pre else None


def chat_script_ids(tokenizer, script: Sequence[str]) -> list[int]:
    ids: list[int] = []
    for text in script:
        x = tokenizer(text).input_ids
        ids.extend(int(v) for v in (x[0].tolist() if hasattr(x, "shape") else x))
    return ids


def _time_prefill(eng, ids: list[int], start: int, sparse: bool, reps: int = 3) -> float:
    sync = (lambda: torch.cuda.synchronize(eng.device)) if eng.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        eng.prefill(ids, sparse, start=start, last_only=True)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def chat_targets(res: dict) -> dict:
    """Issue 19's targets against a chat bench."""
    t: dict[str, Any] = {}
    rows = res.get("turns_detail", [])
    if not rows:
        return t
    if "engine_decode_tokens_per_s" in rows[0]["dense"]:
        worst = min(min(r[m]["decode_ratio"] or 0 for m in ("dense", "sparse")) for r in rows)
        t["chat decode / engine decode >= 0.95 (worst turn)"] = (round(worst, 3), worst >= 0.95)
        sod = min(r["sparse_over_dense"] or 0 for r in rows)
        t["sparse / dense decode in chat >= 1.5x (worst turn)"] = (round(sod, 3), sod >= 1.5)
        later = [r[m]["ttft_over_prefill"] for r in rows[1:] for m in ("dense", "sparse")
                 if r[m].get("ttft_over_prefill")]
        if later:
            w = max(later)
            t["later TTFT <= 1.2x prefill of the new tokens (worst)"] = (round(w, 3), w <= 1.2)
    first = rows[0]["sparse"]["ttft_s"]
    t[f"first TTFT ({rows[0]['sparse']['context']}-token prompt) <= 150 ms (sparse)"] = (
        round(first * 1000, 1), first <= 0.150)
    if res.get("prefill_512"):
        v = res["prefill_512"]["sparse_over_dense"]
        t["512-token prefill sparse / dense <= 1.2"] = (round(v, 3), v <= 1.2)
    if res.get("memory"):
        v = res["memory"]["peak_minus_kv_over_weights"]
        t["peak GPU memory - KV caches <= 1.15 x weight bytes"] = (round(v, 3), v <= 1.15)
    return t


def chat_bench_markdown(res: dict) -> str:
    """The per-turn table of :func:`run_chat_bench` as GitHub markdown (docs/gpu-results.md)."""
    def f(v, fmt, scale=1.0):
        return "-" if v is None else format(v * scale, fmt)
    lines = ["| turn | context | prefilled | mode | TTFT ms | of which ids ms | prefill alone ms | decode tok/s "
             "| engine alone tok/s | chat / engine | measured sparsity | sparse / dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("turns_detail", []):
        for m in ("dense", "sparse"):
            c = r[m]
            sod = f(r.get("sparse_over_dense"), ".2f") + "×" if m == "sparse" else ""
            cells = [str(r["turn"]) if m == "dense" else "", str(c["context"]), str(c["prefilled"]), m,
                     f(c["ttft_s"], ".1f", 1000), f(c.get("prepare_s"), ".1f", 1000),
                     f(c.get("engine_prefill_s"), ".1f", 1000), f(c["decode_tokens_per_s"], ".1f"),
                     f(c.get("engine_decode_tokens_per_s"), ".1f"),
                     f(c.get("decode_ratio"), ".3f"), f(c["sparsity"], ".1%"), sod]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
