"""The ``wina`` application object and its error boundary: every fault a user can fix is one red line
and exit code 2; ``--debug`` shows the traceback."""
from __future__ import annotations

import os
import sys
import traceback
from typing import Optional

import importlib

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from ..errors import Cancelled, WinaError


_STATE = {"debug": False}
# results (stdout); into a file or a pipe, tables keep their columns instead of an 80-column cut
out = Console(highlight=False, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
err = Console(stderr=True, highlight=False)     # progress, notes and errors (stderr)

EPILOG_MODEL = ("MODEL: smollm2-135m (the embedded default), a .gguf file, a local transformers "
                "folder, or a hub id such as meta-llama/Llama-2-7b-hf.")


# --- error boundary ---------------------------------------------------------------------------------

def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _click_exc(name: str) -> tuple:
    """An exception class of click, as typer uses it: its vendored copy (typer >= 0.20) and/or click."""
    found = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
        if cls not in found:
            found.append(cls)
    return tuple(found)


_USAGE, _ABORT, _CLICK = _click_exc("UsageError"), _click_exc("Abort"), _click_exc("ClickException")


class WinaGroup(TyperGroup):
    """Runs the app in non-standalone mode and turns every error into one red line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        cut = argv.index("--") if "--" in argv else len(argv)
        if "--debug" in argv[:cut]:
            argv = [a for i, a in enumerate(argv) if not (a == "--debug" and i < cut)]
            _STATE["debug"] = True
        else:
            _STATE["debug"] = os.environ.get("WINA_DEBUG", "") not in ("", "0")
        try:
            rv = super().main(args=argv, prog_name=prog_name or "wina", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except _USAGE as e:
            if _STATE["debug"]:
                traceback.print_exc()
            hint = ""
            if e.ctx is not None and e.ctx.command_path:
                hint = f" (see {e.ctx.command_path} --help)"
            _red_line(e.format_message() + hint)
            sys.exit(2)
        except _ABORT:
            _red_line("aborted")
            sys.exit(130)
        except KeyboardInterrupt:
            _red_line("interrupted")
            sys.exit(130)
        except Cancelled as e:
            _red_line(str(e) or "cancelled")
            sys.exit(130)
        except WinaError as e:
            if _STATE["debug"]:
                traceback.print_exc()
            _red_line(str(e) or type(e).__name__)
            sys.exit(2)
        except _CLICK as e:
            _red_line(e.format_message())
            sys.exit(e.exit_code)
        except SystemExit:
            raise
        except Exception as e:  # an environment fault (one line, exit 2) or a bug (traceback with --debug)
            from ..errors import user_error
            if _STATE["debug"]:
                traceback.print_exc()
            fault = user_error(e)
            if fault is not None:
                _red_line(str(fault))
                sys.exit(2)
            if not _STATE["debug"]:
                _red_line(f"internal error: {type(e).__name__}: {e} (run again with --debug for the traceback)")
            sys.exit(1)
        if rv == 130:                        # Ctrl-C (typer turns it into exit code 130)
            _red_line("interrupted")
        sys.exit(rv if isinstance(rv, int) else 0)


def _red_line(msg: str) -> None:
    err.print(f"[bold red]error:[/] [red]{escape(_one_line(msg))}[/]", soft_wrap=True)


app = typer.Typer(
    cls=WinaGroup, name="wina", add_completion=False, rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="WINA and TEAL training-free activation sparsity for LLM decoding: calibrate, allocate, "
         "evaluate, chat, benchmark, compare.\n\n"
         "Quick start: [bold]wina run smollm2-quick[/]  ·  [bold]wina ppl smollm2-135m --text FILE "
         "--method wina --sparsity 0.5[/]  ·  [bold]wina chat smollm2-135m[/]",
    epilog="Add --debug anywhere to see the traceback of an error.")


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
          threads: Optional[int] = typer.Option(None, "--threads", envvar="WINA_THREADS", min=1,
                                                help="CPU threads for torch (default: torch's choice)."),
          version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    _STATE["threads"] = threads
    if version:
        from ..api import __version__
        out.print(f"wina {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())
        raise typer.Exit(0)


def main() -> None:
    """Console-script entry point (``wina``)."""
    import os
    os.environ.setdefault("TQDM_DISABLE", "1")    # read when tqdm is imported: our bars replace its bars
    app()

