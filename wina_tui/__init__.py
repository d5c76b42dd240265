"""wina-tui: the Textual app for WINA / TEAL activation sparsity.

Pick a model and a method, calibrate and allocate with live progress, chat with the dense and the
sparse model side by side, and run evaluations. Start it with ``wina-tui`` or
``python -m wina_tui.app``; from code, :func:`wina_tui.app.run`.
"""
