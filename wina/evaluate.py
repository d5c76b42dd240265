"""Evaluation through lm-evaluation-harness (as a library) and the fast perplexity path.

:func:`evaluate` runs ``lm_eval.simple_evaluate`` on an already loaded (and possibly transformed
and sparsified) model through lm-eval's own HF model class (:class:`lm_eval.models.huggingface.HFLM`,
given the model and tokenizer objects). A thin subclass splits each batch of requests into chunks
so that progress (requests done / total, per task) goes out as :class:`wina.events.Progress` events
with stage ``"evaluate"`` and a :class:`wina.events.CancelToken` is honoured between chunks.

With ``data_dir`` every task is read from local files (``wina/tasks``; nothing touches the hub:
the HF offline switches are set for the duration); without it, lm-eval's own task configs and hub
datasets are used as usual.

:func:`run_evaluation` does a whole run: checks the tasks and their files before any work, runs
lm-eval and/or perplexity, measures the sparsity actually applied, and writes one results file
(:mod:`wina.results`). The headline metric of a task follows the seed: ``acc_norm`` where it exists,
else ``exact_match`` (flexible-extract), else ``acc``; perplexity tasks report ``word_perplexity``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .errors import DataError, InvalidArgument
from .events import CancelToken, ProgressCallback, Reporter
from .interrupt import honours_cancel
from . import tasks as _tasks

DEFAULT_BATCH_SIZE = 8
STAGE = "evaluate"

# (metric, filter) in order of preference, as the seed's eval.py reports them
HEADLINE_ORDER = (("acc_norm", "none"), ("exact_match", "flexible-extract"), ("acc", "none"),
                  ("exact_match", "strict-match"), ("word_perplexity", "none"))
LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"}


# --- headline metric --------------------------------------------------------------------------------

def headline_metric(task_result: dict) -> Optional[dict]:
    """The headline of one task's entry in lm-eval's ``results``: metric, value, stderr, direction."""
    for metric, filt in HEADLINE_ORDER:
        key = f"{metric},{filt}"
        if key in task_result and isinstance(task_result[key], (int, float)):
            se = task_result.get(f"{metric}_stderr,{filt}")
            return {"metric": metric, "filter": filt, "value": float(task_result[key]),
                    "stderr": float(se) if isinstance(se, (int, float)) else None,
                    "higher_is_better": metric not in LOWER_IS_BETTER}
    return None


def headlines(lm_results: dict, tasks: Optional[Sequence[str]] = None) -> dict[str, dict]:
    """Headline metric per requested task (a group such as mmlu: its aggregate) from lm-eval's output."""
    res = lm_results.get("results", {})
    names = list(tasks) if tasks is not None else [
        n for n in res if n not in _subtask_names(lm_results)]
    out = {}
    for n in names:
        h = headline_metric(res.get(n, {}))
        if h is not None:
            out[n] = h
    return out


def _subtask_names(lm_results: dict) -> set[str]:
    subs: set[str] = set()
    for children in (lm_results.get("group_subtasks") or {}).values():
        subs.update(children)
    return subs


# --- offline switches -----------------------------------------------------------------------------

@contextlib.contextmanager
def offline():
    """HF hub and datasets offline for the duration (environment and the already-imported flags)."""
    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    patched = []
    for k in saved_env:
        os.environ[k] = "1"
    for mod_name, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"),
                           ("datasets.config", "HF_DATASETS_OFFLINE"),
                           ("datasets.config", "HF_HUB_OFFLINE")):
        try:
            mod = __import__(mod_name, fromlist=[attr])
        except ImportError:
            continue
        if hasattr(mod, attr):
            patched.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, old in patched:
            setattr(mod, attr, old)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet(level: str):
    """lm-eval's logging at ``level`` and its tqdm bars off (progress goes out as events)."""
    lg = logging.getLogger("lm_eval")
    old = lg.level
    old_tqdm = os.environ.get("TQDM_DISABLE")
    lg.setLevel(getattr(logging, level.upper(), logging.ERROR))
    if level.upper() not in ("DEBUG", "INFO"):
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        lg.setLevel(old)
        if old_tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old_tqdm


@contextlib.contextmanager
def _git_hash_without_noise():
    """lm-eval records ``git describe`` of the working folder; outside a repository git prints
    "fatal: not a git repository" on the user's terminal. The same lookup, its stderr dropped."""
    import subprocess
    from lm_eval import evaluator

    def git_hash():
        try:
            return subprocess.check_output(["git", "describe", "--always"],   # noqa: S607
                                           stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, OSError):
            return None
    old = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = old


# --- lm-eval glue ---------------------------------------------------------------------------------

_CLASSES: dict[str, Any] = {}


def _classes():
    """Subclasses of lm-eval's HFLM and TaskManager, built on first use (lm-eval imports slowly)."""
    if _CLASSES:
        return _CLASSES["lm"], _CLASSES["tm"]
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    class WinaTaskManager(TaskManager):
        """Remembers what it loaded (for request totals) and applies wina's few-shot defaults."""

        def __init__(self, *a, fewshot_defaults: Optional[dict[str, int]] = None, **kw):
            super().__init__(*a, **kw)
            self.fewshot_defaults = fewshot_defaults or {}
            self.loaded: Optional[dict] = None
            self.top_of: dict[str, str] = {}      # leaf task -> the name the caller asked for

        def load(self, task_list):
            out = super().load(task_list)
            self.loaded = out
            gmap = out.get("group_map", {}) or {}

            def leaves(name):
                if name in gmap:
                    for child in gmap[name]:
                        yield from leaves(child)
                else:
                    yield name

            asked = task_list if isinstance(task_list, list) else [task_list]
            for top in asked:
                if isinstance(top, str):
                    for leaf in leaves(top):
                        self.top_of.setdefault(leaf, top)
            for top, n in self.fewshot_defaults.items():
                for leaf in leaves(top):
                    task = out["tasks"].get(leaf)
                    if task is not None and task.get_config("num_fewshot") is None:
                        task.set_config(key="num_fewshot", value=n)
            return out

    class ProgressHFLM(HFLM):
        """lm-eval's HFLM, fed in chunks so that progress and cancellation work per chunk."""

        def __init__(self, *a, on_event=None, cancel=None, task_manager=None, chunk=32, **kw):
            super().__init__(*a, **kw)
            self._on_event, self._cancel, self._tm, self._chunk = on_event, cancel, task_manager, chunk
            self._rep: Optional[Reporter] = None
            self._per_task: dict[str, list[int]] = {}

        def get_model_info(self) -> dict:       # the parent asks the hub for the model's sha
            m = self._model
            return {"model_num_parameters": sum(p.numel() for p in m.parameters()),
                    "model_dtype": str(getattr(m, "dtype", "")), "model_revision": None,
                    "model_sha": ""}

        def _totals(self) -> Reporter:
            if self._rep is None:
                per: dict[str, list[int]] = {}
                loaded = getattr(self._tm, "loaded", None) or {}
                top_of = getattr(self._tm, "top_of", {})
                for name, task in (loaded.get("tasks") or {}).items():
                    n = sum(int(getattr(i, "repeats", 1) or 1) for i in (task.instances or []))
                    per.setdefault(top_of.get(name, name), [0, 0])[1] += n
                self._top_of = top_of
                self._per_task = per
                self._rep = Reporter(STAGE, sum(v[1] for v in per.values()), self._on_event, self._cancel)
            return self._rep

        def _chunked(self, method, requests, disable_tqdm, chunk: Optional[int] = None):
            rep = self._totals()
            out: list = []
            chunk = chunk or self._chunk
            for i in range(0, len(requests), chunk):
                part = requests[i:i + chunk]
                cur = self._top(getattr(part[0], "task_name", None))
                rep.emit(message=cur, **self._metrics(cur))          # raises Cancelled if asked
                out.extend(method(part, disable_tqdm=True))
                for r in part:
                    name = self._top(getattr(r, "task_name", None))
                    if name in self._per_task:
                        self._per_task[name][0] += 1
                rep.done += len(part)
            last = self._top(getattr(requests[-1], "task_name", None)) if requests else ""
            rep.emit(message=last, **self._metrics(last))
            return out

        def _top(self, name: Optional[str]) -> str:
            return getattr(self, "_top_of", {}).get(name, name) if name else ""

        def _metrics(self, task: str) -> dict:
            d, t = self._per_task.get(task, [0, 0])
            return {"task": task, "task_done": d, "task_total": t,
                    "tasks": {k: (v[0], v[1]) for k, v in self._per_task.items()}}

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._chunked(super().loglikelihood, requests, disable_tqdm)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            """The choices of a multiple-choice question share their context: it runs once, and every
            choice's continuation then runs on its cached keys and values (:func:`shared_context_scores`).
            Requests whose context no other request shares go the harness's own way."""
            groups: dict[tuple, list[int]] = {}
            for i, (_, ctx, cont) in enumerate(requests):
                if ctx and cont and len(ctx) + len(cont) <= self.max_length + 1 and self.backend == "causal":
                    groups.setdefault(tuple(ctx), []).append(i)
            # share a context where that saves work: its repeats outweigh the continuations it carries
            shared = [k for k, v in groups.items()
                      if len(v) > 1 and (len(v) - 1) * len(k) >= sum(len(requests[i][2]) for i in v)]
            if not shared:
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            out: list = [None] * len(requests)
            in_groups = {i for k in shared for i in groups[k]}
            rest = [i for i in range(len(requests)) if i not in in_groups]
            if rest:
                for i, r in zip(rest, super()._loglikelihood_tokens([requests[i] for i in rest], True, override_bs)):
                    out[i] = r
            bs = self.batch_size if isinstance(self.batch_size, int) else 8
            # longest first, as the harness does: batches of similar lengths pad little
            shared.sort(key=lambda k: (-max(len(requests[i][2]) for i in groups[k]), -len(k)))
            for b in range(0, len(shared), bs):
                keys = shared[b:b + bs]
                conts = [[requests[i][2] for i in groups[k]] for k in keys]
                scores = shared_context_scores(self.model, [list(k) for k in keys], conts,
                                               pad_id=self.tokenizer.pad_token_id or 0)
                for k, sc in zip(keys, scores):
                    for i, answer in zip(groups[k], sc):
                        out[i] = answer
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            # one document is many windows: progress (and the cancel check between chunks) per document
            return self._chunked(super().loglikelihood_rolling, requests, disable_tqdm, chunk=1)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._chunked(super().generate_until, requests, disable_tqdm)

    _CLASSES["lm"], _CLASSES["tm"] = ProgressHFLM, WinaTaskManager
    return ProgressHFLM, WinaTaskManager


def shared_context_scores(model, contexts: list[list[int]], continuations: list[list[list[int]]], *,
                          pad_id: int = 0) -> list[list[tuple[float, bool]]]:
    """Log-likelihood and greedy match of each continuation after its context, computing each context
    once: a batch of contexts (right-padded) fills a key/value cache; every continuation then runs on
    its context's rows of that cache, at the positions it has in the whole sequence. The same numbers
    as one forward pass per (context + continuation), up to float rounding; the sparsifier gates the
    same positions (its dense prefix lies in the context, so the continuations' pass keeps none dense).
    Returns, per context, ``(sum of log-probabilities, all tokens greedy)`` per continuation."""
    import torch
    with torch.no_grad():
        return _shared_context_scores(torch, model, contexts, continuations, pad_id)


def _shared_context_scores(torch, model, contexts, continuations, pad_id):
    dev = next(model.parameters()).device
    n = len(contexts)
    lens = [len(c) for c in contexts]
    lp = max(lens)
    ids = torch.full((n, lp), pad_id, dtype=torch.long)
    mask = torch.zeros((n, lp), dtype=torch.long)
    for j, c in enumerate(contexts):
        ids[j, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[j, :len(c)] = 1
    pos = torch.arange(lp).unsqueeze(0).expand(n, lp)
    ends = sorted(set(x - 1 for x in lens))               # the head runs only where a context ends
    kw = {"logits_to_keep": torch.tensor(ends, device=dev)} if _keeps_logits(model) else {}
    o = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=True, **kw)
    at = {e: i for i, e in enumerate(ends)} if kw else {e: e for e in ends}
    last = torch.stack([o.logits[j, at[lens[j] - 1]] for j in range(n)]).float().log_softmax(-1)   # [n, V]
    import inspect
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = getattr(o, "cache", None) if cache_kw == "cache" else o.past_key_values
    if cache is None:
        cache = o.past_key_values
    del o
    rows = [(j, c) for j, cs in enumerate(continuations) for c in cs]
    ls = max(len(c) - 1 for _, c in rows)
    tail = None
    if ls > 0:
        g = torch.tensor([j for j, _ in rows], device=dev)
        cache.reorder_cache(g)                                   # each continuation's context rows
        m = len(rows)
        ids2 = torch.full((m, ls), pad_id, dtype=torch.long)
        mask2 = torch.zeros((m, ls), dtype=torch.long)
        pos2 = torch.zeros((m, ls), dtype=torch.long)
        for r, (j, c) in enumerate(rows):
            k = len(c) - 1
            if k:
                ids2[r, :k] = torch.tensor(c[:-1], dtype=torch.long)
                mask2[r, :k] = 1
            pos2[r] = lens[j] + torch.arange(ls)
        attn = torch.cat([mask[[j for j, _ in rows]], mask2], 1)
        sp = getattr(model, "_wina_sparsifier", None)
        keep = sp.dense_prefix if sp is not None else None
        if sp is not None:
            sp.dense_prefix = 0.0                                # the sequence's start is in the context
        try:
            tail = model(input_ids=ids2.to(dev), attention_mask=attn.to(dev), position_ids=pos2.to(dev),
                         use_cache=True, **{cache_kw: cache}).logits
        finally:
            if sp is not None:
                sp.dense_prefix = keep
    # every row's scores on the device at once, read back once: a host sync per row would make the
    # scoring, not the model, set the pace on a GPU
    g = torch.tensor([j for j, _ in rows], device=last.device)
    c0 = torch.tensor([c[0] for _, c in rows], device=last.device)
    first_lp = last[g, c0].tolist()
    first_ok = (last.argmax(-1)[g] == c0).tolist()
    tail_lp, tail_ok = [0.0] * len(rows), [True] * len(rows)
    if tail is not None:
        want = torch.zeros((len(rows), ls), dtype=torch.long)
        for r, (_, c) in enumerate(rows):
            want[r, :len(c) - 1] = torch.tensor(c[1:], dtype=torch.long)
        real = torch.arange(ls).unsqueeze(0) < torch.tensor([len(c) - 1 for _, c in rows]).unsqueeze(1)
        want, real = want.to(tail.device), real.to(tail.device)
        step = max(1, _SCORE_ELEMENTS // (ls * tail.shape[-1]))      # bound the float copy's memory
        lps, oks = [], []
        for a in range(0, len(rows), step):
            t, w, on = tail[a:a + step].float(), want[a:a + step], real[a:a + step]
            lp = t.gather(2, w.unsqueeze(2)).squeeze(2) - t.logsumexp(-1)
            lps.append(lp.masked_fill(~on, 0.0).sum(1))               # the real positions, not padding
            oks.append(((t.argmax(-1) == w) | ~on).all(1))
        tail_lp, tail_ok = torch.cat(lps).tolist(), torch.cat(oks).tolist()
    out: list[list[tuple[float, bool]]] = [[] for _ in contexts]
    for r, (j, _) in enumerate(rows):
        out[j].append((first_lp[r] + tail_lp[r], bool(first_ok[r] and tail_ok[r])))
    return out


_SCORE_ELEMENTS = 1 << 26        # logits scored per chunk (256 MiB in float32)


def _keeps_logits(model) -> bool:
    import inspect
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _check_limit(limit) -> Optional[Union[int, float]]:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise InvalidArgument(f"limit must be a number, got {limit!r}")
    if limit != limit or limit in (float("inf"), float("-inf")):
        raise InvalidArgument(f"limit must be a finite number of documents, got {limit}")
    if isinstance(limit, float) and not limit.is_integer():
        if not 0.0 < limit < 1.0:
            raise InvalidArgument(f"a fractional limit must be in (0, 1), got {limit}")
        return limit
    if limit < 1:
        raise InvalidArgument(f"limit must be at least 1, got {limit}")
    return int(limit)


def _check_counts(num_fewshot, batch_size) -> None:
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                    or num_fewshot < 0):
        raise InvalidArgument(f"num_fewshot must be an integer of 0 or more, got {num_fewshot!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgument(f"batch_size must be an integer of at least 1, got {batch_size!r}")


def check_settings(*, tasks=(), limit=None, num_fewshot: Optional[int] = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, ppl_text=None, ppl_max_tokens: Optional[int] = None,
                   ppl_protocol: str = "windows", ppl_context: int = 512) -> list[str]:
    """The one check of an evaluation's settings, made before any model is loaded (what
    :meth:`wina.pipeline.Evaluation.validate` calls, and so the CLI, the runner and the TUI): task
    names, the limit, the few-shot count, the batch size, the perplexity protocol and token budget
    (at least one window), and the perplexity text (a UTF-8 text file). Returns the task names."""
    names = _tasks.parse_tasks(tasks) if tasks else []
    if not names and ppl_text is None:
        raise InvalidArgument("nothing to evaluate: give tasks and/or a perplexity text file")
    _check_limit(limit)
    _check_counts(num_fewshot, batch_size)
    from .perplexity import check_options, read_text
    check_options(ppl_max_tokens, ppl_protocol, ppl_context, name="ppl_max_tokens")
    if ppl_text is not None:
        if not read_text(ppl_text).strip():  # missing, a folder, binary or not UTF-8: refused there
            raise DataError(f"{ppl_text} is empty: nothing to measure the perplexity of")
    return names


def check_tasks(tasks: Union[str, Sequence[str]], data_dir=None, *, task_manager=None) -> list[str]:
    """Parse and validate task names (and, with ``data_dir``, their files) before any work.

    Raises :class:`InvalidArgument` for an unknown task (listing the known ones) and
    :class:`DataError` for a missing file (naming the path expected).
    """
    names = _tasks.parse_tasks(tasks)
    if data_dir is not None:
        _tasks.check_local(names, data_dir)
        return names
    unknown = [n for n in names if n not in _tasks.TASKS]
    if unknown:
        tm = task_manager
        if tm is None:
            from lm_eval.tasks import TaskManager
            with _quiet("ERROR"):
                tm = TaskManager()
        for n in unknown:
            if n not in tm.all_tasks:
                raise _tasks.unknown_task_error(n, hub=True)
    return names


@honours_cancel                          # a long document stops within a layer
def evaluate(model, tokenizer, tasks: Union[str, Sequence[str]], *, limit=None, data_dir=None,
             num_fewshot: Optional[int] = None, batch_size: int = DEFAULT_BATCH_SIZE,
             max_length: Optional[int] = None, on_event: Optional[ProgressCallback] = None,
             cancel: Optional[CancelToken] = None, log_samples: bool = False,
             bootstrap_iters: int = 1000, chunk: Optional[int] = None,
             gen_kwargs: Optional[dict] = None, verbosity: str = "ERROR") -> dict:
    """Run lm-eval's ``simple_evaluate`` on a loaded model; returns lm-eval's results (JSON-safe).

    ``tasks``: names (list or comma-separated), e.g. ``["piqa", "arc_easy"]``; see
    :func:`wina.tasks.known_tasks`. ``limit``: documents per task (an int, or a fraction < 1).
    ``data_dir``: read every task from local files (offline); ``None``: the hub. ``num_fewshot``:
    overrides every task's default (wina's defaults: mmlu 5, gsm8k 5, others 0). ``gen_kwargs``:
    overrides generation settings of generative tasks (e.g. ``{"max_gen_toks": 64}``).
    Progress: ``Progress(stage="evaluate", done, total, message=<task>, metrics={"task",
    "task_done", "task_total", "tasks": {name: (done, total)}})`` per chunk of requests.
    """
    limit = _check_limit(limit)
    _check_counts(num_fewshot, batch_size)
    if data_dir is not None:
        data_dir = str(Path(data_dir).expanduser().resolve())
    Reporter(STAGE, 0, on_event, cancel).emit(0, message="loading tasks")

    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet(verbosity))
        if data_dir is not None:
            stack.enter_context(offline())
        import lm_eval
        from lm_eval.utils import handle_non_serializable
        stack.enter_context(_git_hash_without_noise())
        LM, TM = _classes()
        fewshot = {n: s.fewshot for n, s in _tasks.TASKS.items() if s.fewshot is not None}
        if data_dir is not None:
            tm = TM(include_path=str(_tasks.LOCAL_DIR), include_defaults=False,
                    metadata={"data_dir": data_dir}, fewshot_defaults=fewshot)
        else:
            tm = TM(fewshot_defaults=fewshot)
        names = check_tasks(tasks, data_dir, task_manager=tm)
        lm = LM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                on_event=on_event, cancel=cancel, task_manager=tm,
                chunk=chunk or max(16, 2 * batch_size))
        from . import distributed
        distributed.attach(lm, distributed.init())      # one rank of N under `accelerate launch`
        t0 = time.perf_counter()
        from . import hub
        from .errors import is_network_error, network_error
        if data_dir is None and not hub.offline() and not hub.reachable():
            raise DataError(f"the tasks {', '.join(names)} come from the Hugging Face hub, which is "
                            "unreachable; give --data-dir a folder laid out like ../shared/data "
                            "(or set WINA_DATA), or set HF_HUB_OFFLINE=1 to use the datasets cache")
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=tm, log_samples=log_samples, gen_kwargs=gen_kwargs,
                                          bootstrap_iters=bootstrap_iters, verbosity=verbosity.upper())
        except Exception as e:
            if data_dir is None and is_network_error(e):
                raise network_error(f"the data of {', '.join(names)}", e) from None
            raise
        elapsed = time.perf_counter() - t0
        if res is None and lm.world_size > 1 and lm.rank != 0:
            return None                                  # data-parallel: rank 0 holds the results
        if res is None:
            raise DataError("lm-eval returned no results")
        res = json.loads(json.dumps(res, default=handle_non_serializable))
    res["wina_eval"] = {"tasks": names, "limit": limit, "data_dir": data_dir, "num_fewshot": num_fewshot,
                        "batch_size": batch_size, "elapsed_s": elapsed,
                        "offline": data_dir is not None, "data": _data_kind(data_dir)}
    return res


def _data_kind(data_dir) -> str:
    """"shipped" (the package's subsets), "folder" or "hub": where a run's documents came from."""
    from .data import SHIPPED_DIR
    if data_dir is None:
        return "hub"
    return "shipped" if Path(data_dir).resolve() == SHIPPED_DIR else "folder"


# --- a whole run: eval and/or perplexity, then one results file -------------------------------------

def run_evaluation(model, tokenizer, tasks: Union[str, Sequence[str], None] = None, *, model_id: str,
                   sparsifier=None, method: Optional[str] = None, sparsity: Optional[float] = None,
                   allocation: Optional[str] = None, plan: Optional[str] = None,
                   out: Union[str, Path, None] = None, ppl_file: Union[str, Path, None] = None,
                   ppl_max_tokens: Optional[int] = None, ppl_context: int = 512,
                   ppl_protocol: str = "windows", limit=None, data_dir=None, num_fewshot: Optional[int] = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, on_event: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None, gen_kwargs: Optional[dict] = None,
                   extra: Optional[dict] = None) -> "Any":
    """Evaluate a prepared model (transformed/sparsified by the caller) and write one results file.

    ``tasks``: lm-eval tasks (may be empty when only ``ppl_file`` is given). ``sparsifier``: the
    :class:`wina.sparsify.Sparsifier` attached to ``model`` (None: dense); its counters are reset
    here and the measured sparsity is read after the run. ``ppl_file``: also compute the fast
    perplexity (:func:`wina.perplexity.perplexity`) on that text, with ``ppl_protocol`` ("windows" or
    the seed's, "seed"). ``out``: a file path or a folder
    (a name is made up); None writes nothing. Everything is checked before any work; on any error
    nothing is written. Returns a :class:`wina.results.Run`.
    """
    from . import results as _results
    names = check_settings(tasks=tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                           ppl_max_tokens=ppl_max_tokens, ppl_protocol=ppl_protocol, ppl_context=ppl_context,
                           ppl_text=ppl_file)
    if names:
        check_tasks(names, data_dir)          # unknown task / missing file: before any work
    text = None
    if ppl_file is not None:
        from .perplexity import read_text
        text = read_text(ppl_file)
    if out is not None:
        _results.check_writable(out)

    lm_res, ppl_block = None, None
    measured_ppl = measured_eval = None
    t0 = time.perf_counter()
    if text is not None:
        from .perplexity import perplexity
        if sparsifier is not None:
            sparsifier.reset_counters()
        r = perplexity(model, tokenizer, text, context=ppl_context, max_tokens=ppl_max_tokens,
                       protocol=ppl_protocol, on_event=on_event, cancel=cancel)
        measured_ppl = _measured(sparsifier)
        from .files import sha256
        ppl_block = {"file": str(ppl_file), "sha256": sha256(ppl_file),
                     "perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens,
                     "windows": r.windows, "context": r.context, "max_tokens": ppl_max_tokens,
                     "protocol": r.protocol, "measured_sparsity": measured_ppl}
    if names:
        if sparsifier is not None:
            sparsifier.reset_counters()
        lm_res = evaluate(model, tokenizer, names, limit=limit, data_dir=data_dir, num_fewshot=num_fewshot,
                          batch_size=batch_size, on_event=on_event, cancel=cancel, gen_kwargs=gen_kwargs)
        measured_eval = _measured(sparsifier)
    from .distributed import world
    if not world().is_main:
        return None                                      # data-parallel: rank 0 writes the file
    wina = _results.make_wina_block(
        model_id=model_id, model=model, sparsifier=sparsifier, method=method, sparsity=sparsity,
        allocation=allocation, plan=plan,
        measured=measured_eval if measured_eval is not None else measured_ppl,
        eval_info=(lm_res or {}).pop("wina_eval", None) if lm_res else
        {"tasks": [], "limit": None, "data_dir": None, "num_fewshot": None},
        headline=headlines(lm_res, names) if lm_res else {},
        perplexity=ppl_block, elapsed_s=time.perf_counter() - t0, extra=extra)
    if plan:
        wina["plan_settings"] = plan_settings(plan)
    record = _results.make_record(lm_res, wina)
    return _results.write_run(record, out) if out is not None else _results.Run(None, record)


def plan_settings(plan) -> dict:
    """What made a plan, for a results file to carry: its folder, the checksum of its plan.json (which
    holds its files' checksums), the calibration's arguments and the allocation's settings."""
    from .files import sha256
    from .plan_meta import read_meta
    folder = Path(plan).expanduser().resolve()
    meta = read_meta(folder)
    return {"path": str(folder), "plan_json_sha256": sha256(folder / "plan.json"),
            "method": meta.get("method"), "transform": meta.get("transform"), "rotation": meta.get("rotation"),
            "model": meta.get("model_id") or meta.get("model"),
            "calibration": meta.get("calibration_args"), "allocation": meta.get("allocation")}


def _measured(sparsifier) -> Optional[float]:
    if sparsifier is None:
        return 0.0
    from .distributed import merge_gate_counters
    merge_gate_counters(sparsifier)                      # counts of every rank (no-op alone)
    m = sparsifier.measured_sparsity()
    return None if m is None or (isinstance(m, float) and math.isnan(m)) else float(m)
