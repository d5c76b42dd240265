"""Chat: one prompt goes to the dense model (left) and the sparse one (right), streamed side by side.

Each pane talks to its own :class:`wina.chat.ChatSession`: ``ChatSession.pair`` when a sparse model
is applied (one engine on a GPU, one copy of the weights, two KV caches; on the CPU the dense
session pauses the sparse gates), a lone dense session otherwise. The sessions are made once per
applied model (model, sparsifier, settings) and kept across turns, so a turn prefills only the
tokens its session's KV cache does not hold yet. They hold the conversation: a pane's
``history`` is a copy of its session's messages, handed over with each finished reply. When the
model or its sparse setup changes (setup applied anew, a plan opened, a calibration), the
conversation ends there: the panes are cleared with a note, and the new sessions start empty, so
that no model continues a conversation another one wrote.

The model is not thread-safe: one worker warms the sessions up (once, before their first reply)
and runs the dense reply and then the sparse one, each streaming into its pane through messages.
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

from wina.api import CancelToken, ChatSession, InvalidArgument, WinaError

from ..state import Throttle, atomic_write_text, busy_text, describe_error
from ..widgets.chat_pane import ChatPane, ReplyStats, format_ttft

NO_MODEL = "No model loaded yet: press F2 for setup, then Load & chat (ctrl+g)."
COMMANDS = ("/reset (or ctrl+n): a new conversation · /system TEXT: the system prompt (no text: none) · "
            "/save FILE: the conversation as JSON, or Markdown for .md · //text sends /text")
BACKENDS = {"engine": "decode engine (CUDA)", "transformers": "torch"}
STREAM_INTERVAL = 0.1    # seconds between two updates of a streamed reply (each lays out its Markdown)
SHOWN_TIMEOUT = 5.0      # the worker waits at most this for a pane to show a message


def reply_stats(reply, sparsity: Optional[float], flops: Optional[float]) -> ReplyStats:
    """A pane's figures for a :class:`wina.chat.Reply`: its tokens, time to first token, decode
    rate (none for a reply of one token) and stop reason, and the given sparsity and FLOPs."""
    return ReplyStats(reply.tokens, reply.seconds, reply.stopped, sparsity, flops, ttft=reply.ttft_s,
                      decode_tps=reply.decode_tokens_per_s if reply.tokens > 1 else None,
                      context_tokens=reply.context_tokens, prefill_tokens=reply.prefill_tokens,
                      truncated=reply.truncated)


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
                    fields = {k: st[k] for k in ReplyStats.__dataclass_fields__ if k in st}
                    lines += [f"*{ChatPane.format_reply(ReplyStats(**fields))}*", ""]
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
        # pane id -> its ChatSession, made for the applied model in ``_made_for``; changed by the
        # worker (inside session.using) or, when nothing generates, on the UI thread
        self.sessions: dict[str, ChatSession] = {}
        self._made_for: Optional[tuple] = None     # (model, sparsifier, applied settings)
        self._talked_with: Optional[tuple] = None  # the same, for the conversation on screen

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
        self._drop_sessions_of_another_model()
        if self.app.screen is self and not self.is_generating and (self.session.busy or
                                                                   self.session.loaded is None):
            self.refresh_titles()

    # --- the sessions ----------------------------------------------------------------------------------
    def _applied_key(self) -> Optional[tuple]:
        s = self.session
        if s.loaded is None or s.applied is None:
            return None
        return (s.loaded.model, s.sparsifier, s.applied)

    @staticmethod
    def _same_setup(old: Optional[tuple], now: Optional[tuple]) -> bool:
        return (old is not None and now is not None and old[0] is now[0] and old[1] is now[1]
                and old[2] == now[2])

    def _sessions_current(self) -> bool:
        return self._same_setup(self._made_for, self._applied_key())

    def _close_sessions(self) -> None:
        """Close the sessions (their KV caches go)."""
        for sess in self.sessions.values():
            with contextlib.suppress(Exception):
                sess.close()
        self.sessions = {}
        self._made_for = None

    def _end_conversation_of_another_setup(self) -> None:
        """UI thread: the conversation on screen was had with another model or sparse setup; it ends
        here (the new sessions start empty) and the panes say why."""
        was = self._talked_with
        if was is None or self.is_generating or self._same_setup(was, self._applied_key()):
            return
        self._talked_with = None
        self.turns = 0
        for pane in self.query(ChatPane):
            pane.clear()
            pane.note("The model or its sparse setup changed: a new conversation.")
            if self.system:
                pane.note(f"system prompt: {self.system}")

    def _drop_sessions_of_another_model(self) -> None:
        """UI thread: sessions of a model that is no longer loaded (a new one loads, or has) are closed
        now, so that they do not keep the old model's weights in memory while nothing chats. Only
        the old model is touched, which no other job uses any more."""
        if not self.sessions or self.is_generating or self._made_for is None:
            return
        s = self.session
        if s.loaded is None or s.loaded.model is not self._made_for[0]:
            self._close_sessions()

    def _ensure_sessions(self, system: str) -> dict[str, ChatSession]:
        """Worker, inside ``session.using``: the sessions for the applied model, made once and kept
        across turns; new ones (the old closed) when the model, its sparsifier or the settings
        changed, each taking over its pane's conversation."""
        if self.sessions and self._sessions_current():
            return self.sessions
        s = self.session
        old = self._made_for
        model, tok = s.loaded.model, s.loaded.tokenizer
        was_engine = any(x.backend == "engine" for x in self.sessions.values())
        self._close_sessions()
        if (was_engine and old is not None and old[0] is model
                and old[2].options.transform != s.applied.options.transform):
            from wina.api import release_engine        # the transform changed the weights in place
            release_engine(model)
        kw = dict(system=system or None, max_new_tokens=self.max_new_tokens, temperature=self.temperature)
        if s.sparsifier is not None:
            dense, sparse = ChatSession.pair(model, tok, **kw)
        else:
            dense, sparse = ChatSession(model, tok, sparse=False, **kw), None
        sessions = {"dense": dense} if sparse is None else {"dense": dense, "sparse": sparse}
        self.sessions, self._made_for = sessions, self._applied_key()
        return sessions

    # --- titles --------------------------------------------------------------------------------------
    def refresh_titles(self) -> None:
        self._drop_sessions_of_another_model()
        if not self.is_mounted:
            return
        self._end_conversation_of_another_setup()
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
    @staticmethod
    def _message_of(line: str) -> Optional[str]:
        """The message a line of the input sends (None: empty, or a ``/`` command; ``//`` sends one
        ``/``)."""
        line = line.strip()
        if not line or (line.startswith("/") and not line.startswith("//")):
            return None
        return line[1:] if line.startswith("//") else line

    def _panes(self) -> list[str]:
        """The panes that answer the next message, in the order they answer."""
        sp = self.session.sparsifier
        return ([] if (self.sparse_only and sp is not None) else ["dense"]) + (["sparse"] if sp is not None else [])

    @on(Input.Changed, "#prompt")
    def _typed(self, event: Input.Changed) -> None:
        """While the user types, the session that answers first makes the message's ids on a thread
        (its send() uses them if the message is sent as it is): its time to first token then holds
        no tokenizing that the user waited for. The one that answers next does it while the first
        decodes (ChatSession.send's prepare_next)."""
        self._prepare_typed(event.value)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """A message typed while the replies streamed is prepared once they are done."""
        if event.worker is self.worker and not self.is_generating:
            self._prepare_typed(self.query_one("#prompt", Input).value)

    def _prepare_typed(self, line: str) -> None:
        text = self._message_of(line)
        if text is None or self.is_generating or not self.sessions or not self._sessions_current():
            return
        first = next(iter(self._panes()), None)
        sess = self.sessions.get(first or "")
        if sess is not None and sess.warm:
            sess.system = self.system or None
            sess.prepare_in_background(text, self.max_new_tokens)

    @on(Input.Submitted, "#prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        line = event.value.strip()
        if not line:
            return
        prompt = self._message_of(line)
        if prompt is None:
            if self.command(line):
                event.input.value = ""
            else:                               # refused: typing replaces it, an arrow key edits it
                event.input.select_all()
            return
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
            for sess in self.sessions.values():     # the next turn's template starts with it
                sess.system = arg or None
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
                raise InvalidArgument(f"{path} is a folder; give a file name")
            if not path.parent.is_dir():
                raise InvalidArgument(f"no folder {path.parent}: save into one that exists")
            atomic_write_text(path, conversation_markdown(doc) if md else json.dumps(doc, indent=1,
                                                                                     ensure_ascii=False))
        except (OSError, WinaError) as e:
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
        self._end_conversation_of_another_setup()
        self._talked_with = self._applied_key()
        self.cancels = {p: CancelToken() for p in self._panes()}
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
        for sess in self.sessions.values():     # a new conversation: the KV caches are cleared
            sess.reset()
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
    def _ui(self, fn, *args) -> None:
        """Run ``fn`` on the UI thread (from the worker); nothing when the app is closing."""
        with contextlib.suppress(Exception):
            self.app.call_from_thread(fn, *args)

    @work(thread=True, exclusive=True, group="chat")
    def generate(self, prompt: str, cancels: dict[str, CancelToken], system: str) -> None:
        s = self.session
        self.thread = threading.current_thread()
        panes = {pid: self.query_one(f"#{pid}", ChatPane) for pid in cancels}
        started: set[str] = set()
        try:
            with s.using("chat"):
                sessions = self._ensure_sessions(system)
                todo = [pid for pid in cancels if pid in sessions]
                self._warm_up({pid: sessions[pid] for pid in todo})
                for pid in todo:
                    sessions[pid].system = system or None
                for i, pid in enumerate(todo):
                    started.add(pid)
                    self._ui(self._set_generating, pid)
                    # the next pane's prompt is tokenized while this one decodes, not in its own TTFT
                    after = sessions[todo[i + 1]] if i + 1 < len(todo) else None
                    self._one_reply(panes[pid], sessions[pid], prompt, cancels[pid], after)
        except Exception as e:  # Busy, WinaError, or a model failure: show it, never crash
            msg = describe_error(e)
            self._ui(lambda: self.notify(msg, severity="error"))
            for pid in started:
                panes[pid].post_message(ChatPane.Done(None, error=msg, prompt=prompt))
        finally:
            self._ui(self._set_generating, None)

    def _warm_up(self, sessions: dict[str, ChatSession]) -> None:
        """Before a session's first reply: ChatSession.warm_up (on the GPU engine: the weights into
        the engine, the kernels compiled, the decode step captured; nothing to do on the CPU),
        the status line saying so."""
        cold = {pid: x for pid, x in sessions.items() if not x.warm}
        if not cold:
            return
        self._ui(self.set_status, "⏳ warming up…")
        last = [0.0]

        def progress(pid: str, ev) -> None:
            now = time.monotonic()
            if ev.done not in (0, ev.total) and now - last[0] < 0.1:
                return
            last[0] = now
            step = f" {ev.done}/{ev.total}" if ev.total else ""
            what = f": {ev.message}" if ev.message else ""
            self._ui(self.set_status, f"⏳ warming up… the {pid} session{what}{step}")

        try:
            for pid, sess in cold.items():
                sess.warm_up(on_event=lambda ev, pid=pid: progress(pid, ev))
        finally:
            self._ui(self.refresh_titles)

    def _one_reply(self, pane: ChatPane, sess: ChatSession, prompt: str, cancel: CancelToken,
                   after: Optional[ChatSession]) -> None:
        """One turn of ``sess`` (its KV cache kept from the turns before), streamed into ``pane``;
        ``after``, the session that answers next, prepares the prompt while this one decodes."""
        s = self.session
        if cancel.cancelled:         # only quitting cancels a reply before it starts
            return
        self.backend = BACKENDS.get(sess.backend, sess.backend)
        shown = threading.Event()
        pane.post_message(ChatPane.Start(prompt, shown=shown))
        self._wait_shown(shown, cancel)      # the prompt laid out first: not inside the time to first token
        out = Throttle(lambda parts: pane.post_message(ChatPane.Delta("".join(parts))), STREAM_INTERVAL)
        try:
            with _gil_handover():
                r = sess.send(prompt, on_text=out.push, cancel=cancel, max_new_tokens=self.max_new_tokens,
                              prepare_next=after)
        finally:
            out.flush()
        kept = bool(r.text.strip())
        if not kept:
            # stopped before any text, or an empty reply: the session keeps no empty turn (send()
            # added the user message and an empty answer); its cache is trimmed at the next turn
            msgs = sess.messages
            if len(msgs) >= 2 and msgs[-1]["role"] == "assistant" and msgs[-2]["role"] == "user":
                sess.messages = msgs[:-2]
        sp = s.sparsifier
        if not sess.sparse or sp is None:
            sparsity, flops = 0.0, s.dense_flop_fraction()
        else:
            # measured on the reply itself (device counts on the engine); nominal if nothing was
            sparsity = r.sparsity if r.sparsity is not None else sp.nominal_sparsity()
            flops = s.flop_fraction(measured=True)
        shown = threading.Event()
        pane.post_message(ChatPane.Done(reply_stats(r, sparsity, flops), prompt=prompt,
                                        history=list(sess.messages), kept=kept, shown=shown))
        self._wait_shown(shown, cancel)      # the finished reply laid out before the next pane's starts

    def _wait_shown(self, shown: threading.Event, cancel: CancelToken) -> None:
        """Wait (a few seconds at most; not when quitting) until the pane has shown a message."""
        deadline = time.monotonic() + SHOWN_TIMEOUT
        while not shown.wait(0.05):
            if cancel.cancelled or time.monotonic() > deadline or not self.app.is_running:
                return


@contextlib.contextmanager
def _gil_handover(interval: float = 0.0001):
    """While a reply decodes, the worker gets Python's lock back within ``interval`` of asking
    (Python's default switch interval is 5 ms): between two GPU steps the decode loop needs it for a
    moment, and the app's thread, laying out the streamed text, would otherwise keep it for up to
    5 ms a token."""
    import sys
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, interval))
    try:
        yield
    finally:
        sys.setswitchinterval(old)


__all__ = ["ChatScreen", "NO_MODEL", "reply_stats", "format_ttft"]
