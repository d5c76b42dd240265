"""``wina tui``: the Textual app, found through its entry point (the library never imports it)."""
from __future__ import annotations

import typer

from .app import app
from ..errors import WinaError


@app.command("tui", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                      "help_option_names": []})
def tui_cmd(ctx: typer.Context) -> None:
    """The Textual app: set up a model, calibrate, chat side by side, evaluate. Same as [bold]wina-tui[/];
    every option is passed on to it (wina tui --help lists them).

    Example: [bold]wina tui --model smollm2-135m[/]
    """
    args = list(ctx.args)
    from importlib.metadata import entry_points
    found = [ep for ep in entry_points(group="console_scripts") if ep.name == "wina-tui"]
    if not found:
        raise WinaError("the TUI is not installed (no wina-tui entry point); pip install -e . again")
    try:
        entry = found[0].load()                  # the app is a separate package: found, not imported
    except ImportError as e:
        raise WinaError(f"the TUI is not available: {e}") from None
    try:
        rv = entry(list(args or []))
    except SystemExit as e:             # argparse's --help / a bad option
        rv = e.code
    if isinstance(rv, int) and rv:
        raise typer.Exit(rv)
