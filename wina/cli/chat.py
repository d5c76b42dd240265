"""``wina chat``: streaming chat for ssh sessions."""
from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.markup import escape

from .app import app, err, EPILOG_MODEL
from .common import _load, _opts, _prepare, _sparsity_line
from .common import O_DEVICE, O_DTYPE, O_GATING, O_METHOD, O_PLAN, O_SPARSITY, O_TRANSFORM, O_WEIGHTED
from .render import ProgressRenderer


@app.command("chat")
def chat_cmd(
    model: str = typer.Argument("smollm2-135m", help=EPILOG_MODEL),
    method: Optional[str] = O_METHOD, sparsity: Optional[float] = O_SPARSITY,
    transform: Optional[bool] = O_TRANSFORM, plan: Optional[str] = O_PLAN, gating: str = O_GATING,
    weighted: str = O_WEIGHTED,
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Answer this one message and exit."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest reply in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling (with --temperature > 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed."),
    device: str = O_DEVICE, dtype: str = O_DTYPE,
) -> None:
    """A plain streaming chat in the terminal (works over ssh). /reset clears, /exit or Ctrl-D quits.

    Example: [bold]wina chat smollm2-135m --method wina --sparsity 0.5[/]
    """
    from ..errors import InvalidArgument
    opts = _opts(method, sparsity, transform, plan, gating, weighted)
    from ..api import check_sampling, check_text
    check_sampling(max_new_tokens, temperature, top_p, options=True)
    if system is not None:
        check_text(system, "--system")                # before the model loads
    if prompt is not None:
        check_text(prompt, "--prompt")
        if not prompt.strip():
            raise InvalidArgument("--prompt is empty: give the message to answer")
    with ProgressRenderer(transient=True) as r:
        loaded = _load(model, device, dtype, r)
        sp = _prepare(loaded, opts)
    from ..api import ChatSession
    from ..events import CancelToken
    # one copy of the weights on the GPU: the engine's (nothing else uses the model here)
    session = ChatSession(loaded.model, loaded.tokenizer, sparse=True, system=system,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          one_copy=True)
    if session.backend == "engine":
        with ProgressRenderer(transient=True) as r:      # compile + capture now, not in the first reply
            session.warm_up(on_event=r)
    keys = "" if prompt is not None else " /reset clears the conversation, /exit or Ctrl-D quits."
    err.print(f"[dim]{escape(model)} — {escape(_sparsity_line(sp, opts))} — {session.backend}.{keys}[/]",
              soft_wrap=True)

    def turn(user: str) -> None:
        cancel = CancelToken()

        def emit(delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()

        try:
            g = session.send(user, on_text=emit, cancel=cancel)
        except InvalidArgument as e:
            if prompt is not None:
                raise
            sys.stdout.write("\n")
            err.print(f"[red]error:[/] {escape(str(e))}")   # the conversation goes on
            return
        except KeyboardInterrupt:
            cancel.cancel()
            sys.stdout.write("\n")
            err.print("[dim](interrupted)[/]")
            return
        sys.stdout.write("\n")
        sys.stdout.flush()
        ms = f", measured sparsity {g.sparsity:.1%}" if (g.sparse and g.sparsity is not None) else ""
        dropped = ", older turns dropped" if g.truncated else ""
        err.print(f"[dim][{g.tokens} tokens, first token {g.ttft_s * 1000:.0f} ms, decode "
                  f"{g.decode_tokens_per_s:.1f} tokens/s, stop: {g.stopped}{ms}, context "
                  f"{g.context_tokens + g.tokens} tokens ({g.prefill_tokens} prefilled){dropped}][/]",
                  soft_wrap=True)

    if prompt is not None:
        turn(prompt)
        return
    while True:
        sys.stdout.write("you> ")
        sys.stdout.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            return
        if not line:                          # EOF (Ctrl-D)
            sys.stdout.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit", "/q"):
            return
        if line == "/reset":
            session.reset()
            err.print("[dim](conversation cleared)[/]")
            continue
        if line.startswith("//"):
            line = line[1:]                   # //text sends /text
        elif line.startswith("/"):            # a mistyped command is not sent to the model
            err.print(f"[yellow]unknown command {escape(line.split()[0])}: /reset, /exit; //text sends /text[/]",
                      soft_wrap=True)
            continue
        sys.stdout.write("bot> ")
        sys.stdout.flush()
        turn(line)
