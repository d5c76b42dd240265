"""Chat: one prompt goes to the dense model (left) and the sparse one (right), streamed side by side.

The model is not thread-safe and there is one copy of the weights: one worker runs the dense reply
(``sparsifier.paused()``) and then the sparse one, each streaming into its pane through messages.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static
from textual.worker import Worker, WorkerState

from wina.api import CancelToken, chat_input_ids
from wina.generate import generation_backend, stream_reply, warm_up

from ..state import Throttle, describe_error
from ..widgets.chat_pane import ChatPane, ReplyStats

NO_MODEL = "No model loaded yet: press F2 for setup, then Load & chat (ctrl+g)."


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
        self.cancel: Optional[CancelToken] = None
        self.sparse_only = False
        self.turns = 0
        self.worker: Optional[Worker] = None
        self.backend = ""

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="panes"):
            yield ChatPane("dense", placeholder=NO_MODEL, id="dense")
            yield ChatPane("sparse", placeholder=NO_MODEL, id="sparse")
        with Horizontal(id="prompt-row"):
            yield Input(placeholder="Ask both models…  (enter sends · esc stops · ctrl+n new chat)",
                        id="prompt")
        yield Static("", id="chat-status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "chat"
        self.refresh_titles()
        self.query_one("#prompt", Input).focus()

    def on_screen_resume(self) -> None:
        self.refresh_titles()
        self.query_one("#prompt", Input).focus()

    # --- titles --------------------------------------------------------------------------------------
    def refresh_titles(self) -> None:
        if not self.is_mounted:
            return
        dense, sparse = self.query_one("#dense", ChatPane), self.query_one("#sparse", ChatPane)
        s = self.session
        if s.loaded is None or s.applied is None:
            dense.set_title("dense")
            sparse.set_title("sparse")
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
        mode = "greedy" if self.temperature <= 0 else f"T={self.temperature:g}"
        template = "chat template" if getattr(s.loaded.tokenizer, "chat_template", None) else "plain prompt"
        backend = f" · {self.backend}" if self.backend else ""
        self.set_status(f"{mode} · max {self.max_new_tokens} new tokens · {template}{backend}"
                        + (" · sparse only" if self.sparse_only else ""))

    def set_status(self, text: str) -> None:
        self.query_one("#chat-status", Static).update(text)

    # --- actions -------------------------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        if self.send(prompt):
            event.input.value = ""

    def send(self, prompt: str) -> bool:
        s = self.session
        if s.loaded is None or s.applied is None:
            self.notify(NO_MODEL, severity="warning")
            return False
        if self.worker is not None and self.worker.state in (WorkerState.PENDING, WorkerState.RUNNING):
            self.notify("still generating: press esc to stop", severity="warning")
            return False
        if s.busy:
            self.notify(f"the model is busy ({s.busy})", severity="warning")
            return False
        self.cancel = CancelToken()
        self.turns += 1
        self.worker = self.generate(prompt, self.cancel)
        return True

    def action_stop(self) -> None:
        if self.cancel is not None and not self.cancel.cancelled:
            self.cancel.cancel()
            self.set_status("stopping…")

    def action_new_chat(self) -> None:
        if self.worker is not None and self.worker.state == WorkerState.RUNNING:
            self.notify("stop the current reply first (esc)", severity="warning")
            return
        for pane in self.query(ChatPane):
            pane.clear()
        self.turns = 0
        self.refresh_titles()

    def action_toggle_sparse_only(self) -> None:
        self.sparse_only = not self.sparse_only
        self.refresh_titles()

    # --- the worker ------------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="chat")
    def generate(self, prompt: str, cancel: CancelToken) -> None:
        s = self.session
        dense, sparse = self.query_one("#dense", ChatPane), self.query_one("#sparse", ChatPane)
        sp = s.sparsifier
        runs = []
        if not (self.sparse_only and sp is not None):
            runs.append((dense, True))
        if sp is not None:
            runs.append((sparse, False))
        try:
            with s.using("chat"):
                self._warm_up(s, runs)
                for pane, is_dense in runs:
                    self._one_reply(pane, prompt, is_dense, cancel)
        except Exception as e:  # Busy, WinaError, or a model failure: show it, never crash
            self.app.call_from_thread(self.notify, describe_error(e), severity="error")
            for pane, _ in runs:
                if pane.streaming:
                    pane.post_message(ChatPane.Done(None, error=describe_error(e)))
        finally:
            self.app.call_from_thread(self.refresh_titles)

    def _warm_up(self, s, runs) -> None:
        """On the GPU engine path, compile and capture the decode step(s) the replies will use
        before the first one streams (seconds, once per model), saying so in the status line."""
        model, sp = s.loaded.model, s.sparsifier
        if generation_backend(model) != "engine":
            return
        self.app.call_from_thread(self.set_status, "preparing the decode engine (the first use compiles "
                                                   "its kernels)…")
        try:
            for is_dense in {d for _, d in runs}:
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

    def _one_reply(self, pane: ChatPane, prompt: str, is_dense: bool, cancel: CancelToken) -> None:
        s = self.session
        sp = s.sparsifier
        model, tok = s.loaded.model, s.loaded.tokenizer
        messages = list(pane.history) + [{"role": "user", "content": prompt}]
        pane.streaming = True
        pane.post_message(ChatPane.Start(prompt))
        if cancel.cancelled:
            pane.history.extend([messages[-1], {"role": "assistant", "content": ""}])
            pane.post_message(ChatPane.Done(ReplyStats(0, 0.0, "cancelled", None, None)))
            return
        ids = chat_input_ids(tok, messages)
        ctx = sp.paused() if (is_dense and sp is not None) else contextlib.nullcontext()
        if sp is not None and not is_dense:
            sp.reset_counters()
        out = Throttle(lambda parts: pane.post_message(ChatPane.Delta("".join(parts))), 0.04)
        with ctx:
            try:
                gen = self._generate(model, tok, ids, out.push, cancel)
            finally:
                out.flush()
        if is_dense or sp is None:
            sparsity, flops = 0.0, s.dense_flop_fraction()
        else:
            m = sp.measured_sparsity()
            # engine replies are counted too (wina.generate.count_gates); nominal if nothing was
            sparsity = sp.nominal_sparsity() if m != m else m
            flops = s.flop_fraction(measured=True)
        pane.history.extend([messages[-1], {"role": "assistant", "content": gen.text}])
        pane.post_message(ChatPane.Done(ReplyStats(gen.tokens, gen.seconds, gen.stopped, sparsity, flops)))
