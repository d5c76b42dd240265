"""The ``wina`` command line: a thin typer layer over the public API (:mod:`wina.api`),
one module per command group (plans, quality, chat, run, bench, tui).

Every command imports torch / transformers / lm-eval / textual inside its body, so ``wina --help``
answers at once. User errors (:class:`wina.errors.WinaError`, bad options) print one red line on
stderr and exit with code 2; ``--debug`` (anywhere on the line, or ``WINA_DEBUG=1``) shows the
traceback instead. Long steps report :class:`wina.events.Progress` events, drawn by one small
renderer (:class:`ProgressRenderer`) shared by every command.
"""
from __future__ import annotations

from .app import app, main  # noqa: F401
from . import info, plans, quality, chat, bench, run, tui  # noqa: F401,E402  (registers, in this order)
