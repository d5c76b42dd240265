"""The shape of the code: no import circles, the library never imports the app, and the front-ends
(the CLI, the preset runner, the TUI) reach the library only through ``wina.api``, ``wina.errors``
and ``wina.events``. Imports inside functions count: a circle through a lazy import is still one."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRONT_ALLOWED = {"wina.api", "wina.errors", "wina.events"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names), wherever the import statement is."""
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            for a in node.names:                         # "from . import api" imports wina.api
                out.add(f"{target}.{a.name}")
    return out


def _graph(roots=("wina", "wina_tui")) -> dict[str, set[str]]:
    files = [p for r in roots for p in (REPO / r).rglob("*.py")]
    mods = {_module_name(p): p for p in files}
    g = {}
    for m, p in mods.items():
        g[m] = {i for i in _imports(p) if i in mods and i != m}
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _is_package_init_edge(a: str, b: str) -> bool:
    """A package's __init__ importing its own submodules is not a circle of concepts."""
    return b.startswith(a + ".")


def test_no_import_circles():
    g = _graph()
    g = {a: {b for b in bs if not _is_package_init_edge(a, b)} for a, bs in g.items()}
    assert _cycles(g) == []


def test_library_never_imports_the_app():
    for p in (REPO / "wina").rglob("*.py"):
        bad = {i for i in _imports(p) if i.split(".")[0] in ("textual", "wina_tui")}
        assert not bad, f"{p.relative_to(REPO)} imports {sorted(bad)}"


def _front_end_files():
    yield from (REPO / "wina_tui").rglob("*.py")
    yield from (REPO / "wina" / "cli").rglob("*.py")
    yield REPO / "wina" / "runner.py"             # the preset runner, behind `wina run`


FRONT_ENDS = ("wina.cli", "wina.runner")          # front-ends may drive each other (`wina run`)


def test_front_ends_use_only_the_api():
    for p in _front_end_files():
        deep = {i for i in _imports(p) if i.startswith("wina.") and not i.startswith(FRONT_ENDS)
                and i not in FRONT_ALLOWED and not any(i.startswith(a + ".") for a in FRONT_ALLOWED)}
        deep = {i for i in deep if i.rpartition(".")[0] not in FRONT_ALLOWED}
        assert not deep, f"{p.relative_to(REPO)} reaches below wina.api: {sorted(deep)}"


def test_the_library_never_imports_a_front_end():
    """The pipeline and everything under it work without the front-ends: nothing in wina/ outside
    them imports the CLI or the runner."""
    fronts = set(_front_end_files())
    for p in (REPO / "wina").rglob("*.py"):
        if p in fronts:
            continue
        bad = {i for i in _imports(p) if i.startswith(FRONT_ENDS)}
        assert not bad, f"{p.relative_to(REPO)} imports the front-end {sorted(bad)}"
