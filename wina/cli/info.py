"""``wina models``: the supported architectures, the embedded default model and the presets."""
from __future__ import annotations

import json

import typer
from rich.markup import escape

from .app import app, err, out
from ..errors import WinaError


@app.command("models")
def models_cmd(as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout.")) -> None:
    """Supported architectures, the embedded default model and the presets.

    Example: [bold]wina models[/]
    """
    from rich.table import Table
    from ..api import ADAPTERS
    from ..api import EMBEDDED, EMBEDDED_PACKAGE, embedded_gguf
    from ..api import list_presets
    examples = {"llama": "Llama-2, Llama-3, SmolLM2", "mistral": "Mistral", "qwen2": "Qwen-2.5",
                "phi3": "Phi-3, Phi-4"}
    try:
        gguf = str(embedded_gguf())
    except WinaError as e:
        gguf = None
        gguf_note = str(e)
    problems: list[str] = []
    presets = list_presets(problems)
    for why in problems:                     # a broken preset file is named, the others still listed
        err.print(f"[yellow]warning: skipped a preset: {escape(why)}[/]", soft_wrap=True)
    if as_json:
        print(json.dumps({
            "architectures": {k: {"projections": list(a.projections), "examples": examples.get(k, "")}
                              for k, a in ADAPTERS.items()},
            "embedded": {"name": EMBEDDED, "package": EMBEDDED_PACKAGE, "gguf": gguf},
            "presets": [{"name": p.name, "model": p.model, "description": p.description,
                         "path": str(p.path)} for p in presets],
            "broken_presets": problems}, indent=1))
        return
    t = Table(title="Supported architectures (config.model_type)", title_justify="left")
    t.add_column("model_type", style="bold")
    t.add_column("projections sparsified per layer")
    t.add_column("examples", style="dim")
    for k, a in ADAPTERS.items():
        t.add_row(k, ", ".join(a.projections), examples.get(k, ""))
    out.print(t)
    out.print(f"\n[bold]Embedded default:[/] {EMBEDDED} — SmolLM2-135M-Instruct (GGUF from the PyPI package "
              f"{EMBEDDED_PACKAGE}==0.1.2)")
    out.print(f"  {'[green]installed[/]: ' + escape(gguf) if gguf else '[yellow]' + escape(gguf_note) + '[/]'}",
              soft_wrap=True)
    pt = Table(title="\nPresets (wina run NAME)", title_justify="left")
    pt.add_column("name", style="bold")
    pt.add_column("model")
    pt.add_column("description", style="dim")
    for p in presets:
        pt.add_row(p.name, p.model, p.description)
    out.print(pt)
