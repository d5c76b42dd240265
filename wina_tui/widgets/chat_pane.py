"""One side of the chat: the conversation with one model (dense or sparse), streamed as Markdown.

A worker thread talks to the pane only through messages (:class:`ChatPane.Start`, ``Delta``,
``Done``), posted with ``post_message`` (thread-safe, ordered). Deltas are appended through
Textual's ``MarkdownStream``: only the last Markdown block is re-parsed, never the whole reply.
The conversation (:attr:`ChatPane.history`) is only changed here, on the UI thread, when a reply
is done: it is then the copy of the chat session's messages that ``Done`` carries (the session
holds the conversation; the pane shows it and saves it). A reply stopped before any text, or an
empty one, is shown but not kept (by the session either), so the history never holds an empty turn.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import asdict, dataclass
from typing import Optional

from rich.text import Text
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widget import MountError
from textual.widgets import Markdown, Static

from ..state import fmt_pct

STOP_REASONS = {"eos": "end of reply", "length": "max tokens", "cancelled": "stopped"}


@dataclass
class ReplyStats:
    tokens: int
    seconds: float                 # the whole reply: prefill + decode
    stopped: str                   # "eos" | "length" | "cancelled"
    sparsity: Optional[float]      # measured, size-weighted (0 for dense)
    flops: Optional[float]         # FLOP fraction of dense (shortcuts included)
    ttft: Optional[float] = None   # seconds to the first token (prefill + one decode step)
    decode_tps: Optional[float] = None   # tokens/s after the first token
    context_tokens: Optional[int] = None  # the conversation's tokens before the reply
    prefill_tokens: Optional[int] = None  # of which prefilled for it (the rest: the kept KV cache)
    truncated: bool = False               # older turns were dropped to fit the context

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop_reason"] = STOP_REASONS.get(self.stopped, self.stopped)
        return d


def format_rate(st: ReplyStats) -> str:
    """The decode rate (tokens after the first over the time after it), or "—" for a reply of one
    token: never tokens over prefill and decode together."""
    return "—" if st.decode_tps is None else f"{st.decode_tps:.1f}"


def format_ttft(s: Optional[float]) -> str:
    if s is None:
        return "—"
    return f"{1000 * s:.0f} ms" if s < 1 else f"{s:.2f} s"


class ChatPane(Vertical):
    DEFAULT_CSS = """
    ChatPane { width: 1fr; height: 1fr; border: round $primary 60%; padding: 0 0; }
    ChatPane:focus-within { border: round $primary; }
    ChatPane.-generating { border: round $accent; }
    ChatPane > VerticalScroll { height: 1fr; padding: 0 1; }
    ChatPane .user-msg { margin: 1 0 0 6; padding: 0 1; background: $primary 15%; color: $text; }
    ChatPane .system-msg { margin: 1 0 0 0; padding: 0 1; color: $text-muted; text-style: italic; }
    ChatPane .bot-msg { margin: 1 0 0 0; padding: 0 0; }
    ChatPane .bot-msg > * { margin: 0 0 0 0; }
    ChatPane .reply-stats { color: $text-muted; height: auto; }
    ChatPane .placeholder { color: $text-muted; margin: 1 0; }
    ChatPane .stopped { color: $warning; }
    """

    class Start(Message):
        """A reply starts; ``shown`` (if given) is set once the pane shows the prompt and an empty
        reply, so that the worker starts the model after the layout work, not while it runs."""

        def __init__(self, prompt: str, shown: Optional[threading.Event] = None) -> None:
            super().__init__()
            self.prompt = prompt
            self.shown = shown

    class Delta(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class Done(Message):
        """The reply ended. ``prompt``: the user message it answered (kept in the history with the
        reply unless the reply is empty); ``stats`` None with ``error`` when it failed.
        ``history``: the chat session's messages after the reply (the pane's history becomes a
        copy); ``kept``: whether the session kept the exchange (default: the reply has text)."""

        def __init__(self, stats: Optional[ReplyStats], error: Optional[str] = None, prompt: str = "",
                     history: Optional[list[dict]] = None, kept: Optional[bool] = None,
                     shown: Optional[threading.Event] = None) -> None:
            super().__init__()
            self.shown = shown           # set once the pane shows the finished reply
            self.stats = stats
            self.error = error
            self.prompt = prompt
            self.history = history
            self.kept = kept

    def __init__(self, title: str, *, placeholder: str = "", **kw) -> None:
        super().__init__(**kw)
        self.title = title
        self.placeholder = placeholder
        self.history: list[dict] = []           # the conversation of this model (chat template input)
        self.replies: list[str] = []             # every reply shown, kept or not
        self.reply_stats: list[dict] = []        # per kept assistant turn, aligned with the history
        self.stats: Optional[ReplyStats] = None  # the last reply's
        self.streaming = False
        self._stream = None
        self._current: Optional[Markdown] = None
        self._buffer: list[str] = []

    def compose(self):
        with VerticalScroll():
            yield Static(self.placeholder, classes="placeholder")

    def on_mount(self) -> None:
        self.border_title = self.title
        self.border_subtitle = "— tok/s · — sparse · FLOPs —"

    def set_title(self, title: str) -> None:
        self.title = title
        self.border_title = title

    def set_placeholder(self, text: str) -> None:
        self.placeholder = text
        for w in self.query(".placeholder"):
            w.update(text)

    def clear(self) -> None:
        self.history.clear()
        self.replies.clear()
        self.reply_stats.clear()
        self.stats = None
        scroll = self.query_one(VerticalScroll)
        scroll.anchor(False)            # anchored, an emptied scroll would keep its old offset: the
        scroll.remove_children()        # placeholder would sit at the bottom
        scroll.mount(Static(self.placeholder, classes="placeholder"))
        scroll.scroll_home(animate=False, immediate=True)
        self.border_subtitle = "— tok/s · — sparse · FLOPs —"

    def note(self, text: str, classes: str = "system-msg") -> None:
        """A line in the conversation that is not a message (a system prompt change, a saved file)."""
        scroll = self.query_one(VerticalScroll)
        for w in list(scroll.query(".placeholder")):
            w.remove()
        scroll.mount(Static(Text(text), classes=classes))
        scroll.anchor()

    # --- messages from the worker --------------------------------------------------------------
    async def on_chat_pane_start(self, message: "ChatPane.Start") -> None:
        message.stop()
        try:
            await self._start(message)
        except MountError:           # the app is closing
            pass
        finally:
            self._set_when_painted(message.shown)

    async def _start(self, message: "ChatPane.Start") -> None:
        scroll = self.query_one(VerticalScroll)
        for w in list(scroll.query(".placeholder")):
            await w.remove()
        self._buffer = []
        self._current = Markdown("", classes="bot-msg")
        await scroll.mount(Static(Text(message.prompt), classes="user-msg"))
        await scroll.mount(self._current)
        self._stream = Markdown.get_stream(self._current)
        self.streaming = True
        self.add_class("-generating")
        self.border_subtitle = "generating…"
        scroll.anchor()

    async def on_chat_pane_delta(self, message: "ChatPane.Delta") -> None:
        message.stop()
        if self._stream is not None:
            self._buffer.append(message.text)
            await self._stream.write(message.text)

    async def on_chat_pane_done(self, message: "ChatPane.Done") -> None:
        message.stop()
        try:
            await self._done(message)
        except MountError:           # the app is closing (quit while a reply streamed): nothing to show
            self.streaming = False
        finally:
            self._set_when_painted(message.shown)

    def _set_when_painted(self, shown: Optional[threading.Event]) -> None:
        """Set ``shown`` once the screen has been laid out and painted with what was just mounted,
        so that the worker's next reply does not share the interpreter with that work (at once when
        the pane is no longer mounted: the app is closing)."""
        if shown is None:
            return
        if self.is_attached and self.app.is_running:
            self.call_after_refresh(shown.set)
        else:
            shown.set()

    async def _done(self, message: "ChatPane.Done") -> None:
        text = "".join(self._buffer)
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await asyncio.sleep(0)          # let the stream's task start before stopping it
            try:
                await stream.stop()
            except asyncio.CancelledError:  # the task never ran: nothing was appended
                pass
            if self._current is not None and getattr(self._current, "source", text) != text:
                await self._current.update(text)
        self.streaming = False
        self.remove_class("-generating")
        self.replies.append(text)
        scroll = self.query_one(VerticalScroll)
        if message.error:
            await scroll.mount(Static(Text(message.error, style="bold red")))
            self.border_subtitle = "error"
            return
        st = message.stats
        self.stats = st
        if st is None:
            return
        kept = bool(text.strip()) if message.kept is None else message.kept
        if message.history is not None:
            self.history = [dict(m) for m in message.history]
        elif kept:
            self.history.extend([{"role": "user", "content": message.prompt},
                                 {"role": "assistant", "content": text}])
        if kept:
            self.reply_stats.append(st.to_dict())
        answers = sum(1 for m in self.history if m.get("role") == "assistant")
        if len(self.reply_stats) > answers:     # older turns dropped to fit the context
            del self.reply_stats[:len(self.reply_stats) - answers]
        if st.stopped == "cancelled":
            await scroll.mount(Static("■ stopped" + ("" if kept else " before any text: not kept in the "
                                                                   "conversation"), classes="stopped"))
        elif not kept:
            await scroll.mount(Static("(empty reply: not kept in the conversation)", classes="placeholder"))
        if st.truncated:
            await scroll.mount(Static("(older turns dropped to fit the context)", classes="system-msg"))
        await scroll.mount(Static(self.format_reply(st), classes="reply-stats"))
        self.border_subtitle = self.format_stats(st)
        scroll.anchor()

    @staticmethod
    def format_stats(st: ReplyStats) -> str:
        flops = "—" if st.flops is None else f"{st.flops:.2f}×"
        return f"{format_rate(st)} tok/s · {fmt_pct(st.sparsity)} sparse · FLOPs {flops}"

    @staticmethod
    def format_reply(st: ReplyStats) -> str:
        """The line under a reply: tokens, time to first token, decode rate, stop reason, sparsity."""
        return (f"{st.tokens} tok · first token {format_ttft(st.ttft)} · {format_rate(st)} tok/s decode · "
                f"{STOP_REASONS.get(st.stopped, st.stopped)} · {fmt_pct(st.sparsity)} sparse")
