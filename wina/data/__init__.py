"""Where evaluation data comes from: one rule for every command, the runner and the TUI.

A data folder has the layout of ``../shared/data`` (one folder per task, the original file formats;
:mod:`wina.tasks` names the files). :func:`resolve` turns a user's choice into a :class:`DataSource`:

- a folder (``--data-dir DIR``, a preset's ``eval.data_dir = "DIR"``): that folder, which must exist;
- ``"hub"``: lm-eval's hub datasets (network, or the local datasets cache with ``HF_HUB_OFFLINE=1``);
- ``"auto"`` (the default), the first that applies:
  1. ``$WINA_DATA`` (or the older ``$WINA_DATA_DIR``), when set;
  2. ``../shared/data`` beside the project checkout, then ``./data``, when present;
  3. the subsets shipped in this package (``wina/data/``, see ``SOURCES.md``), when they hold every
     task asked for and at least the documents asked for (the first 100 of piqa and arc_easy: what
     the quick preset evaluates);
  4. the hub.

A text that a preset names inside the data folder (``ppl_text = "{data}/wikitext2/wiki.test.raw"``)
comes from the full data folder when there is one, else from the shipped excerpt (the first 100
lines of wikitext-2's test text, about 5,700 tokens: a perplexity over its first
4096 tokens (:data:`SHIPPED_TEXTS`) is the full file's), see :func:`data_text`.

A task that none of these can serve fails before any work with one line saying which task, where
it looked and how to point ``--data-dir`` at a copy.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .. import hub
from ..errors import DataError

SHIPPED_DIR = Path(__file__).resolve().parent
SHIPPED_DOCS = {"piqa": 100, "arc_easy": 100}     # task -> documents shipped (the first N)
SHIPPED_TEXTS = {"wikitext2/wiki.test.raw": 4096}  # text -> tokens its excerpt serves (perplexity)
ENV_VARS = ("WINA_DATA", "WINA_DATA_DIR")
PROJECT_DIR = SHIPPED_DIR.parent.parent            # the checkout (or site-packages) holding wina/


@dataclass(frozen=True)
class DataSource:
    kind: str                      # "folder" | "shipped" | "hub"
    path: Optional[Path]           # the data folder (None for the hub)
    why: str                       # how it was chosen, for dry runs and results files

    @property
    def label(self) -> str:
        if self.kind == "hub":
            return "the Hugging Face hub"
        if self.kind == "shipped":
            return f"the subsets shipped with wina ({self.path})"
        return f"local files in {self.path}"


def _env_dir() -> Optional[tuple[str, Path]]:
    for var in ENV_VARS:
        v = os.environ.get(var)
        if v:
            return var, Path(v).expanduser().resolve()
    return None


def candidates() -> list[Path]:
    """The folders ``auto`` looks at after the environment, in order."""
    return [PROJECT_DIR.parent / "shared" / "data", Path.cwd() / "data"]


def find_data_dir() -> Optional[Path]:
    """A full data folder: ``$WINA_DATA`` (``$WINA_DATA_DIR``), else the first existing of
    :func:`candidates`; None when there is none (the shipped subsets are not a full folder)."""
    env = _env_dir()
    if env is not None:
        return env[1]
    for cand in candidates():
        if cand.is_dir():
            return cand.resolve()
    return None


def shipped_covers(tasks: Sequence[str], limit: Optional[float]) -> bool:
    """Whether the shipped subsets hold every task in ``tasks`` for ``limit`` documents each
    (a fractional limit or no limit asks for the whole split: never covered)."""
    if not tasks or limit is None or limit < 1 or float(limit) != int(limit):
        return False
    return all(t in SHIPPED_DOCS and int(limit) <= SHIPPED_DOCS[t] for t in tasks)


def data_text(rel: str, folder: Optional[Path] = None, max_tokens: Optional[int] = None) -> Path:
    """The file ``rel`` (e.g. ``wikitext2/wiki.test.raw``) of the data folder ``folder`` (default:
    :func:`find_data_dir`); without a data folder, the shipped excerpt when there is one and it
    serves ``max_tokens`` (a perplexity over at most that many tokens gives the full file's figure).
    Raises :class:`DataError` when neither serves."""
    rel = rel.strip("/")
    folder = folder if folder is not None else find_data_dir()
    if folder is not None:
        return (folder / rel).resolve()
    serves = SHIPPED_TEXTS.get(rel)
    if serves is not None and max_tokens is not None and 0 < max_tokens <= serves:
        return (verify_shipped() / rel).resolve()
    need = "no token limit" if max_tokens is None else f"{max_tokens} tokens"
    raise DataError(f"{rel} needs a data folder and none was found (looked at {_looked(None)}); the "
                    f"shipped excerpt serves at most {serves or 0} tokens ({need} asked): point "
                    "--data-dir (or $WINA_DATA) at a folder laid out like ../shared/data")


def verify_shipped() -> Path:
    """Check the shipped files against ``SHA256SUMS``; returns the folder."""
    sums = SHIPPED_DIR / "SHA256SUMS"
    try:
        lines = sums.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"the shipped evaluation data is incomplete ({sums}: {e.strerror}); "
                        "reinstall wina or pass --data-dir") from None
    for line in lines:
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        f = SHIPPED_DIR / name.strip()
        try:
            got = hashlib.sha256(f.read_bytes()).hexdigest()
        except OSError as e:
            raise DataError(f"the shipped evaluation data is incomplete ({f}: {e.strerror}); "
                            "reinstall wina or pass --data-dir") from None
        if got != digest:
            raise DataError(f"the shipped evaluation file {f} is damaged (sha256 mismatch); "
                            "reinstall wina or pass --data-dir")
    return SHIPPED_DIR


def _looked(limit: Optional[float]) -> str:
    env = _env_dir()
    where = [f"${env[0]}={env[1]}" if env else "$WINA_DATA (unset)"]
    where += [f"{c} (absent)" for c in candidates() if not c.is_dir()]
    lim = "all documents" if limit is None else f"{limit:g} documents"
    where.append(f"the shipped subsets (piqa, arc_easy: first 100 documents; asked: {lim})")
    return ", ".join(where)


def resolve(spec: "str | Path | None" = "auto", tasks: Sequence[str] = (),
            limit: Optional[float] = None) -> DataSource:
    """Where ``tasks`` (with ``limit`` documents each) are read from, for a user's ``spec``:
    ``"auto"``/None, ``"hub"``, or a folder. Raises :class:`DataError` when nothing can serve them."""
    if spec is None or str(spec) == "auto":
        env = _env_dir()
        if env is not None:
            if not env[1].is_dir():
                raise DataError(f"${env[0]} points at {env[1]}, which is not a folder")
            return DataSource("folder", env[1], f"${env[0]}")
        for cand in candidates():
            if cand.is_dir():
                return DataSource("folder", cand.resolve(), "found beside the project")
        if shipped_covers(tasks, limit):
            return DataSource("shipped", verify_shipped(), "shipped subsets cover the tasks")
        if tasks and not hub.usable():
            raise DataError(
                f"no local copy of {', '.join(tasks)} and the hub is "
                f"{'off (HF_HUB_OFFLINE)' if hub.offline() else 'unreachable'}: looked at "
                f"{_looked(limit)}; point --data-dir (or $WINA_DATA) at a folder laid out like "
                "../shared/data, or run online")
        return DataSource("hub", None, "no local copy found")
    if str(spec) == "hub":
        return DataSource("hub", None, "asked for")
    p = Path(spec).expanduser().resolve()
    if not p.is_dir():
        raise DataError(f"{p} is a file, not a data folder" if p.exists() else f"data folder not found: {p}")
    return DataSource("folder", p, "asked for")
