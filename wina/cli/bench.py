"""``wina bench``: decode speed, kernels, and the chat path on a GPU."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from .app import app, out, err
from .bench_tables import print_bench, print_chat_bench
from .common import O_DTYPE, _device, _load, _opts, _prepare, _quiet_libraries
from .render import ProgressRenderer
from ..errors import WinaError


@app.command("bench")
def bench_cmd(
    ctx: typer.Context,
    models: Optional[List[str]] = typer.Argument(None, help="Shape names with random weights (llama-2-7b, "
                                                            "llama-3-8b, qwen-2.5-7b, phi-4, tiny-llama) and/or "
                                                            "model specs. Default: llama-2-7b."),
    sparsities: str = typer.Option("0.25,0.40,0.50,0.65", "--sparsities", help="Comma-separated targets in (0, 1)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="wina | teal: the score the sparse engine "
                                                                     "gates by (default wina; --chat --plan: "
                                                                     "the plan's)."),
    prompt_len: int = typer.Option(128, "--prompt-len", help="Prompt tokens."),
    new_tokens: int = typer.Option(256, "--new-tokens", help="Decoded tokens per measurement."),
    hf_new_tokens: Optional[int] = typer.Option(None, "--hf-new-tokens", help="Tokens for the transformers "
                                                                              "baseline (default --new-tokens; 0 skips it)."),
    device: str = typer.Option("cuda", "--device", help="cuda | cuda:N | cpu (slow, for smoke runs)."),
    dtype: str = O_DTYPE,
    kernels: bool = typer.Option(True, "--kernels/--no-kernels", help="Also the per-kernel bandwidth table (CUDA)."),
    kernel_layers: int = typer.Option(8, "--kernel-layers", help="Layers the kernel table covers."),
    layers: Optional[int] = typer.Option(None, "--layers", min=1, help="Shrink shape-only models to N layers."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights and prompt."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    chat: bool = typer.Option(False, "--chat", help="Measure the user's path instead: a scripted multi-turn "
                                                   "chat through the chat session, dense and sparse side by "
                                                   "side, per turn TTFT and decode tokens/s against the engine "
                                                   "alone at the same context; peak GPU memory."),
    plan: Optional[str] = typer.Option(None, "--plan", "-p", help="--chat: threshold gating from this plan "
                                                                  "(default: thresholds calibrated on the script)."),
    chat_sparsity: float = typer.Option(0.5, "--sparsity", "-s", help="--chat: the target sparsity."),
    turns: int = typer.Option(5, "--turns", help="--chat: user turns (the context grows past 2k tokens)."),
    user_tokens: int = typer.Option(500, "--user-tokens", help="--chat: tokens of each user message after "
                                                               "the first (~110)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="--chat with a shape name: the tokenizer "
                                                                      "folder to use (the vocabulary grows to fit)."),
    count_every: Optional[int] = typer.Option(None, "--count-every", help="--chat: the sparse chat counts its "
                                                                          "gates on every N-th decode step (and "
                                                                          "the prompt); 0 never. Default: the "
                                                                          "chat's own."),
) -> None:
    """Decode speed (batch 1): transformers generate vs our dense engine vs the sparse engine, next to the
    memory floor; per-kernel bandwidth on CUDA. With --chat: the chat as users run it.

    Example: [bold]wina bench llama-2-7b llama-3-8b --sparsities 0.25,0.5 --json bench.json[/]   ·
    [bold]wina bench --chat ./my-model --new-tokens 200[/]
    """
    from ..errors import InvalidArgument
    if chat:
        _refuse_unused(ctx, _DECODE_ONLY, "not used with --chat (it times a scripted chat: --turns, "
                                          "--user-tokens, --new-tokens); drop {them}")
        _bench_chat((models or ["llama-2-7b"]), plan, chat_sparsity, method, turns, new_tokens, user_tokens,
                    tokenizer, device, dtype, layers, seed, json_out, count_every)
        return
    _refuse_unused(ctx, _CHAT_ONLY, "only used with --chat; add --chat or drop {them}")
    method = method or "wina"
    try:
        sps = [float(x) for x in sparsities.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgument(f"--sparsities must be comma-separated numbers, got {sparsities!r}") from None
    if not sps:
        raise InvalidArgument("--sparsities is empty")
    for name, v in (("--prompt-len", prompt_len), ("--new-tokens", new_tokens)):
        if v < 1:
            raise InvalidArgument(f"{name} must be at least 1, got {v}")
    if hf_new_tokens is not None and hf_new_tokens < 0:
        raise InvalidArgument(f"--hf-new-tokens must be >= 0 (0 skips the transformers baseline), got {hf_new_tokens}")
    if json_out is not None:
        from ..api import check_writable
        check_writable(json_out)
    _quiet_libraries()
    from ..api import run_bench
    with ProgressRenderer() as r:
        res = run_bench(tuple(models or ("llama-2-7b",)), sparsities=sps, method=method, prompt_len=prompt_len,
                        new_tokens=new_tokens, hf_new_tokens=hf_new_tokens, device=device, dtype=dtype,
                        kernels=kernels, kernel_layers=kernel_layers, num_hidden_layers=layers, seed=seed,
                        on_event=r, json_path=str(json_out) if json_out else None)
        failed = [m for m in res.get("models", []) if "error" in m]
        if failed and len(failed) == len(res.get("models", [])):     # nothing to show: one line, no bars
            if len(failed) == 1:
                raise WinaError(f"{failed[0]['model']}: {failed[0]['error']}")
            raise WinaError(f"every benchmark failed; first: {failed[0]['model']}: {failed[0]['error']}")
    print_bench(res, out)
    for m in failed:
        err.print(f"[red]{escape(m['model'])}: {escape(m['error'])}[/]", soft_wrap=True)
    if json_out is not None:
        out.print(f"[green]results written:[/] {escape(str(json_out))}", soft_wrap=True)


# the options one mode of wina bench reads and the other does not (parameter name -> option)
_DECODE_ONLY = {"sparsities": "--sparsities", "prompt_len": "--prompt-len", "hf_new_tokens": "--hf-new-tokens",
                "kernels": "--kernels/--no-kernels", "kernel_layers": "--kernel-layers"}
_CHAT_ONLY = {"plan": "--plan", "chat_sparsity": "--sparsity", "turns": "--turns", "user_tokens": "--user-tokens",
              "tokenizer": "--tokenizer", "count_every": "--count-every"}


def _refuse_unused(ctx: typer.Context, options: dict, why: str) -> None:
    """Refuse, naming them, the ``options`` given on the command line that this mode does not use
    (they would be ignored without a word); ``why`` says so, ``{them}`` in it is "it" or "them"."""
    def typed(name: str) -> bool:          # by the source's name: typer may carry its own copy of click
        src = ctx.get_parameter_source(name)
        return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")

    given = [flag for name, flag in options.items() if typed(name)]
    if given:
        from ..errors import InvalidArgument
        one = len(given) == 1
        raise InvalidArgument(f"{', '.join(given)} {'is' if one else 'are'} "
                              + why.format(them="it" if one else "them"))


def _bench_chat(models, plan, sparsity, method, turns, new_tokens, user_tokens, tokenizer, device, dtype,
                layers, seed, json_out, count_every=None) -> None:
    """wina bench --chat: load (or build) the model, attach the gating (a plan's thresholds, as
    ``wina chat --plan`` attaches them; else the chat bench calibrates its own), run
    wina.api.run_chat_bench."""
    from ..errors import InvalidArgument
    if len(models) != 1:
        raise InvalidArgument("--chat measures one model at a time")
    from ..api import check_chat_bench
    check_chat_bench(turns=turns, new_tokens=new_tokens, user_tokens=user_tokens, count_every=count_every,
                     sparsity=sparsity, method=method, options=True)
    # the plan's method (a --method given must match it), transform and thresholds: before loading
    opts = _opts(method, sparsity, None, plan, "threshold") if plan is not None else None
    if json_out is not None:
        from ..api import check_writable
        check_writable(json_out)
    spec = models[0]
    _quiet_libraries()
    from ..api import SHAPES, random_model, run_chat_bench, shape_config
    with ProgressRenderer() as r:
        if spec in SHAPES:
            if tokenizer is None:
                raise InvalidArgument(f"{spec} is a shape with random weights: --chat needs --tokenizer DIR")
            if not Path(tokenizer).expanduser().is_dir():
                raise InvalidArgument(f"--tokenizer {tokenizer}: no such folder (give a folder with a "
                                      "tokenizer.json, e.g. one from tokenizer.save_pretrained)")
            from transformers import AutoTokenizer
            from ..api import resolve_dtype
            tok = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)   # never the repo's code
            cfg = shape_config(spec, layers)
            cfg.vocab_size = max(cfg.vocab_size, len(tok))
            model = random_model(cfg, _device(device), resolve_dtype(dtype, _device(device)), seed)
        else:
            if tokenizer is not None:
                raise InvalidArgument(f"--tokenizer is for a shape name with random weights; {spec} brings "
                                      "its own tokenizer: drop --tokenizer")
            loaded = _load(spec, device, dtype, r)
            model, tok = loaded.model, loaded.tokenizer
        if opts is not None:
            _prepare(model, opts)                # the bare model: the api applies options to it too
        res = run_chat_bench(model, tok, turns=turns, new_tokens=new_tokens, user_tokens=user_tokens,
                             sparsity=sparsity, method=opts.method if opts else (method or "wina"), seed=seed,
                             label=spec, on_event=r,
                             count_every=count_every,
                             json_path=str(json_out) if json_out else None)
    print_chat_bench(res, out)
    if json_out is not None:
        out.print(f"[green]results written:[/] {escape(str(json_out))}", soft_wrap=True)
