"""Chat: one prompt goes to the dense model (left) and the sparse one (right), streamed side by side.

The model is not thread-safe and there is one copy of the weights: one worker runs the dense reply
(``sparsifier.paused()``) and then the sparse one, each streaming into its pane through messages.
Each pane has its own cancel token: ``esc`` stops the reply that is streaming, not the other one.

Lines that start with ``/`` are commands, never sent to the models: ``/reset``, ``/system TEXT``,
``/save FILE`` (``.md``: Markdown, else JSON), ``/help``; ``//text`` sends ``/text``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import threading
import time
from pathlib import Path
from typing import Optional

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static
from textual.worker import Worker, WorkerState

from wina.api import CancelToken, chat_input_ids, generation_backend, stream_reply, warm_up

from ..state import Throttle, atomic_write_text, busy_text, describe_error
from ..widgets.chat_pane import ChatPane, ReplyStats, format_ttft

NO_MODEL = "No model loaded yet: press F2 for setup, then Load & chat (ctrl+g)."
COMMANDS = ("/reset (or ctrl+n): a new conversation · /system TEXT: the system prompt (no text: none) · "
            "/save FILE: the conversation as JSON, or Markdown for .md · //text sends /text")


def reply_timings(gen, t_start: float, t_first: Optional[float]) -> tuple[Optional[float], Optional[float]]:
    """(time to first token, decode tokens/s) of a reply: the library's own figures where its
    Generation carries them, else from when the first text arrived through the streaming callback
    (prefill + the first decode step) and the tokens after it."""
    ttft = next((getattr(gen, n) for n in ("ttft_s", "ttft", "time_to_first_token") if
                 isinstance(getattr(gen, n, None), (int, float))), None)
    tps = next((getattr(gen, n) for n in ("decode_tokens_per_s", "decode_tps") if
                isinstance(getattr(gen, n, None), (int, float))), None)
    if ttft is None and t_first is not None:
        ttft = max(0.0, t_first - t_start)
    if tps is None and ttft is not None and gen.tokens > 1 and gen.seconds - ttft > 0:
        tps = (gen.tokens - 1) / (gen.seconds - ttft)
    return ttft, tps


def conversation_markdown(doc: dict) -> str:
    lines = [f"# Chat · {doc['model']}", "", f"Saved {doc['saved']} · {doc['setup']}", ""]
    if doc.get("system"):
        lines += [f"**System:** {doc['system']}", ""]
    for pane in doc["panes"]:
        lines += [f"## {pane['title']}", ""]
        stats = iter(pane["replies"])
        for m in pane["messages"]:
            if m["role"] == "user":
                lines += [f"**User:** {m['content']}", ""]
            elif m["role"] == "assistant":
                lines += [m["content"], ""]
                st = next(stats, None)
                if st:
                    lines += [f"*{ChatPane.format_reply(ReplyStats(**{k: st[k] for k in ReplyStats.__dataclass_fields__}))}*", ""]
    return "\n".join(lines)


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop", priority=True),
        Binding("ctrl+n", "new_chat", "New chat", priority=True),
        Binding("ctrl+s", "toggle_sparse_only", "Sparse only"),
    ]

    def __init__(self, session, *, max_new_tokens: int = 256, temperature: float = 0.0, **kw) -> None:
        super().__init__(**kw)
        self.session = session
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.cancels: dict[str, CancelToken] = {}   # per pane id, for the reply in flight
        self.generating: Optional[str] = None      # the pane id whose reply streams now
        self.sparse_only = False
        self.turns = 0
        self.system = ""
        self.worker: Optional[Worker] = None
        self.thread: Optional[threading.Thread] = None
        self.backend = ""

    @property
    def cancel(self) -> Optional[CancelToken]:
        """The token of the reply streaming now (None when idle)."""
        return self.cancels.get(self.generating or "")

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="panes"):
            yield ChatPane("dense", placeholder=NO_MODEL, id="dense")
            yield ChatPane("sparse", placeholder=NO_MODEL, id="sparse")
        with Horizontal(id="prompt-row"):
            yield Input(placeholder="Ask both models…  (enter sends · esc stops · /help commands)",
                        id="prompt")
        yield Static("", id="chat-status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "chat"
        self.refresh_titles()
        self.query_one("#prompt", Input).focus()
        self.set_interval(1.0, self._refresh_if_waiting)

    def on_screen_resume(self) -> None:
        self.refresh_titles()
        self.query_one("#prompt", Input).focus()

    @property
    def is_generating(self) -> bool:
        return self.worker is not None and self.worker.state in (WorkerState.PENDING, WorkerState.RUNNING)

    def _refresh_if_waiting(self) -> None:
        """While another job holds the model, keep the placeholder and status saying so."""
        if self.app.screen is self and not self.is_generating and (self.session.busy or
                                                                   self.session.loaded is None):
            self.refresh_titles()

    # --- titles --------------------------------------------------------------------------------------
    def refresh_titles(self) -> None:
        if not self.is_mounted:
            return
        dense, sparse = self.query_one("#dense", ChatPane), self.query_one("#sparse", ChatPane)
        s = self.session
        busy = s.busy if not (self.is_generating or s.busy == "chat") else None
        if s.loaded is None or s.applied is None:
            dense.set_title("dense")
            sparse.set_title("sparse")
            if busy:
                what = busy_text(busy)
                wait = f"{what[0].upper()}{what[1:]}: the chat can use the model when it is done."
                dense.set_placeholder(wait)
                sparse.set_placeholder(wait)
                self.set_status(f"⏳ {what} · the chat waits for it")
            else:
                dense.set_placeholder(NO_MODEL)
                sparse.set_placeholder(NO_MODEL)
                self.set_status("no model")
            return
        model = s.loaded.model_id
        tr = " + transform" if s.applied.options.transform else ""
        dense.set_title(f"dense{tr} · {model}")
        if s.sparsifier is None:
            sparse.set_title("sparse: none (method is dense)")
            sparse.set_placeholder("The method is dense: choose TEAL or WINA in setup (F2) to compare.")
        else:
            plan = " · plan" if s.applied.options.plan else ""
            sparse.set_title(f"{s.applied.describe()}{plan}")
            sparse.set_placeholder("The sparse model's replies stream here.")
        dense.set_placeholder("The dense model's replies stream here. One copy of the weights: the "
                              "sparse gates are paused for this pane.")
        if self.generating is not None:         # the busy line says which reply streams
            return
        if busy:
            self.set_status(f"⏳ {busy_text(busy)} · the chat waits for it")
            return
        mode = "greedy" if self.temperature <= 0 else f"T={self.temperature:g}"
        template = "chat template" if getattr(s.loaded.tokenizer, "chat_template", None) else "plain prompt"
        backend = f" · {self.backend}" if self.backend else ""
        system = " · system prompt set" if self.system else ""
        self.set_status(f"{mode} · max {self.max_new_tokens} new tokens · {template}{backend}{system}"
                        + (" · sparse only" if self.sparse_only else ""))

    def set_status(self, text: str) -> None:
        self.query_one("#chat-status", Static).update(text)

    def _set_generating(self, pane_id: Optional[str]) -> None:
        """UI thread: which pane streams now (the busy line says it)."""
        self.generating = pane_id
        if pane_id is None:
            self.refresh_titles()
            return
        rest = " · the sparse reply follows" if pane_id == "dense" and "sparse" in self.cancels else ""
        self.set_status(f"⏳ {pane_id} reply streaming (esc stops it){rest}")

    # --- actions -------------------------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        if prompt.startswith("/") and not prompt.startswith("//"):
            if self.command(prompt):
                event.input.value = ""
            return
        if prompt.startswith("//"):
            prompt = prompt[1:]
        if self.send(prompt):
            event.input.value = ""

    def command(self, line: str) -> bool:
        """Run a ``/`` command; True when the input line may be cleared."""
        name, _, arg = line.partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("/reset", "/new", "/clear"):
            return self.action_new_chat()
        if name == "/system":
            if self.is_generating:
                self.notify("wait for the reply (or esc) before changing the system prompt", severity="warning")
                return False
            self.system = arg
            for pane in self.query(ChatPane):
                pane.note(f"system prompt: {arg}" if arg else "system prompt: none")
            self.notify("system prompt set for the next messages" if arg else "system prompt cleared")
            self.refresh_titles()
            return True
        if name == "/save":
            if not arg:
                self.notify("/save needs a file name: chat.json, or chat.md for Markdown", severity="warning")
                return False
            return self.save(arg)
        if name in ("/help", "/?"):
            self.notify(COMMANDS, timeout=10)
            return True
        self.notify(f"unknown command {name}: {COMMANDS}", severity="warning", timeout=10)
        return False

    def conversation(self) -> dict:
        s = self.session
        panes = []
        for pane in self.query(ChatPane):
            panes.append({"pane": pane.id, "title": pane.title, "messages": list(pane.history),
                          "replies": list(pane.reply_stats)})
        return {"saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "model": s.loaded.model_id if s.loaded else s.settings.model,
                "setup": s.applied.describe() if s.applied else s.settings.describe(),
                "system": self.system, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "panes": panes}

    def save(self, name: str) -> bool:
        path = Path(name).expanduser()
        doc = self.conversation()
        md = path.suffix.lower() in (".md", ".markdown")
        try:
            if path.is_dir():
                raise IsADirectoryError(f"{path} is a folder")
            atomic_write_text(path, conversation_markdown(doc) if md else json.dumps(doc, indent=1,
                                                                                     ensure_ascii=False))
        except OSError as e:
            self.notify(f"not saved: {describe_error(e)}", severity="error", timeout=8)
            return False
        n = sum(len(p["replies"]) for p in doc["panes"])
        self.notify(f"saved the conversation ({n} replies) to {path}")
        return True

    def send(self, prompt: str) -> bool:
        s = self.session
        if s.busy and not self.is_generating:
            self.notify(f"{busy_text(s.busy)}: the chat waits for it", severity="warning")
            return False
        if s.loaded is None or s.applied is None:
            self.notify(NO_MODEL, severity="warning")
            return False
        if self.is_generating:
            self.notify("still generating: press esc to stop", severity="warning")
            return False
        sp = s.sparsifier
        panes = []
        if not (self.sparse_only and sp is not None):
            panes.append("dense")
        if sp is not None:
            panes.append("sparse")
        self.cancels = {p: CancelToken() for p in panes}
        self.turns += 1
        self.worker = self.generate(prompt, dict(self.cancels), self.system)
        return True

    def action_stop(self) -> None:
        """Stop the reply that is streaming; the other pane's reply (if it follows) still runs."""
        tok = self.cancel
        if tok is not None and not tok.cancelled:
            tok.cancel()
            self.set_status(f"stopping the {self.generating} reply…")

    def cancel_all(self) -> None:
        for tok in self.cancels.values():
            tok.cancel()

    def action_new_chat(self) -> bool:
        if self.is_generating:
            self.notify("stop the current reply first (esc)", severity="warning")
            return False
        for pane in self.query(ChatPane):
            pane.clear()
            if self.system:
                pane.note(f"system prompt: {self.system}")
        self.turns = 0
        self.refresh_titles()
        return True

    def action_toggle_sparse_only(self) -> None:
        self.sparse_only = not self.sparse_only
        self.refresh_titles()

    # --- the worker ------------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="chat")
    def generate(self, prompt: str, cancels: dict[str, CancelToken], system: str) -> None:
        s = self.session
        self.thread = threading.current_thread()
        panes = {pid: self.query_one(f"#{pid}", ChatPane) for pid in cancels}
        history = {pid: list(p.history) for pid, p in panes.items()}   # read before any reply changes it
        started: set[str] = set()
        try:
            with s.using("chat"):
                self._warm_up(s, list(cancels))
                for pid, cancel in cancels.items():
                    started.add(pid)
                    self.app.call_from_thread(self._set_generating, pid)
                    self._one_reply(panes[pid], history[pid], prompt, system, pid == "dense", cancel)
        except Exception as e:  # Busy, WinaError, or a model failure: show it, never crash
            msg = describe_error(e)
            with contextlib.suppress(Exception):
                self.app.call_from_thread(self.notify, msg, severity="error")
            for pid in started:
                panes[pid].post_message(ChatPane.Done(None, error=msg, prompt=prompt))
        finally:
            with contextlib.suppress(Exception):
                self.app.call_from_thread(self._set_generating, None)

    def _warm_up(self, s, pane_ids) -> None:
        """On the GPU engine path, compile and capture the decode step(s) the replies will use
        before the first one streams (seconds, once per model), saying so in the status line."""
        model, sp = s.loaded.model, s.sparsifier
        if generation_backend(model) != "engine":
            return
        self.app.call_from_thread(self.set_status, "preparing the decode engine (the first use compiles "
                                                   "its kernels)…")
        try:
            for is_dense in {pid == "dense" for pid in pane_ids}:
                with (sp.paused() if (is_dense and sp is not None) else contextlib.nullcontext()):
                    warm_up(model, sampled=self.temperature > 0)
        finally:
            self.app.call_from_thread(self.refresh_titles)

    def _generate(self, model, tok, ids, on_text, cancel):
        """Through :func:`wina.generate.stream_reply`: the GPU decode engine when it applies (CUDA,
        bf16/fp16, threshold gating), else the portable loop. Both follow the sparsifier's current
        state (paused: dense)."""
        self.backend = "decode engine (CUDA)" if generation_backend(model) == "engine" else "torch"
        return stream_reply(model, tok, ids, max_new_tokens=self.max_new_tokens,
                            temperature=self.temperature, on_text=on_text, cancel=cancel)

    def _one_reply(self, pane: ChatPane, history: list[dict], prompt: str, system: str, is_dense: bool,
                   cancel: CancelToken) -> None:
        s = self.session
        sp = s.sparsifier
        model, tok = s.loaded.model, s.loaded.tokenizer
        messages = ([{"role": "system", "content": system}] if system else []) + history + [
            {"role": "user", "content": prompt}]
        if cancel.cancelled:         # only quitting cancels a reply before it starts
            return
        pane.post_message(ChatPane.Start(prompt))
        ids = chat_input_ids(tok, messages)
        ctx = sp.paused() if (is_dense and sp is not None) else contextlib.nullcontext()
        if sp is not None and not is_dense:
            sp.reset_counters()
        out = Throttle(lambda parts: pane.post_message(ChatPane.Delta("".join(parts))), 0.04)
        first: list[float] = []

        def on_text(t: str) -> None:
            if not first:
                first.append(time.perf_counter())
            out.push(t)

        with ctx:
            t0 = time.perf_counter()
            try:
                gen = self._generate(model, tok, ids, on_text, cancel)
            finally:
                out.flush()
        ttft, tps = reply_timings(gen, t0, first[0] if first else None)
        if is_dense or sp is None:
            sparsity, flops = 0.0, s.dense_flop_fraction()
        else:
            m = sp.measured_sparsity()
            # engine replies are counted too (wina.generate.count_gates); nominal if nothing was
            sparsity = sp.nominal_sparsity() if m != m else m
            flops = s.flop_fraction(measured=True)
        pane.post_message(ChatPane.Done(ReplyStats(gen.tokens, gen.seconds, gen.stopped, sparsity, flops,
                                                   ttft=ttft, decode_tps=tps), prompt=prompt))


__all__ = ["ChatScreen", "NO_MODEL", "reply_timings", "format_ttft"]
