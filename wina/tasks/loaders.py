"""Readers for the local copies of the evaluation sets, in their original file formats.

Each ``load_<task>`` returns a :class:`datasets.DatasetDict` with the split names and the fields
that lm-evaluation-harness's own task config for that task reads from the hub dataset, so the
YAML files next to this module keep the harness's prompts, targets and metrics unchanged. They are
called by lm-eval as ``custom_dataset`` with the task's metadata as keyword arguments; the data
folder comes from ``data_dir`` there (set by :func:`wina.evaluate.evaluate`), else from
:func:`wina.data.find_data_dir` (``$WINA_DATA``, then ``../shared/data``, as everywhere). Nothing
here touches the network.

Differences from the hub versions (documented in :mod:`wina.tasks`):

- hellaswag: the only local copy is llama.cpp's preprocessed 6-line text file. The harness builds
  ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``; the file holds the same
  text with ctx_b not capitalised, so the first letter of the last sentence fragment is upper-cased
  here when it is lower-case. Scores are close to the harness's, not identical.
- gsm8k: only the test split is here; the harness draws its 5 few-shot examples from train. The
  first :data:`GSM8K_FEWSHOT` test problems are used as the fixed few-shot examples and are
  excluded from scoring (1,314 scored problems instead of 1,319).
"""
from __future__ import annotations

import bz2
import csv
import json
from pathlib import Path
from typing import Any, Optional

from ..errors import DataError

GSM8K_FEWSHOT = 5          # first N problems of test.jsonl: few-shot pool, not scored


def data_root(data_dir: Optional[str] = None) -> Path:
    """``data_dir``, else the data folder of :func:`wina.data.find_data_dir` (the one rule)."""
    from ..data import find_data_dir
    d = data_dir or find_data_dir()
    if not d:
        raise DataError("no data folder given or found: pass data_dir (--data-dir) or set WINA_DATA")
    p = Path(d).expanduser()
    if not p.is_dir():
        raise DataError(f"{p} is a file, not a data folder" if p.exists() else f"data folder not found: {p}")
    return p


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"missing data file: expected {path}")
    return path


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(_need(path), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:          # named: which file, which line
                raise DataError(f"{path}: line {n} is not JSON ({e}); the file is damaged or truncated") from None
    return rows


def _labels(path: Path) -> list[str]:
    with open(_need(path), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _dd(**splits: list[dict[str, Any]]):
    import datasets
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def _paired(rows: list[dict], labels: list[str], what: str) -> None:
    if len(rows) != len(labels):
        raise DataError(f"{what}: {len(rows)} rows but {len(labels)} labels")


# --- readers (plain lists; the loaders wrap them in DatasetDicts) ----------------------------------

def read_piqa(root: Path) -> list[dict]:
    rows = _jsonl(root / "piqa" / "valid.jsonl")
    labels = _labels(root / "piqa" / "valid-labels.lst")
    _paired(rows, labels, "piqa")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(l)}
            for r, l in zip(rows, labels)]


def read_winogrande(root: Path) -> list[dict]:
    rows = _jsonl(root / "winogrande" / "dev.jsonl")
    labels = _labels(root / "winogrande" / "dev-labels.lst")
    _paired(rows, labels, "winogrande")
    out = []
    for r, l in zip(rows, labels):
        if str(r["answer"]) != l:
            raise DataError(f"winogrande: answer {r['answer']!r} of {r['qID']} disagrees with the label file ({l})")
        out.append({"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"],
                    "answer": str(r["answer"])})
    return out


def read_arc(root: Path, which: str) -> list[dict]:
    folder, name = {"easy": ("arc_easy", "ARC-Easy-Test.jsonl"),
                    "challenge": ("arc_challenge", "ARC-Challenge-Test.jsonl")}[which]
    out = []
    for r in _jsonl(root / folder / name):
        q = r["question"]
        out.append({"id": r["id"], "question": q["stem"],
                    "choices": {"text": [c["text"] for c in q["choices"]],
                                "label": [c["label"] for c in q["choices"]]},
                    "answerKey": r["answerKey"]})
    return out


def read_boolq(root: Path) -> list[dict]:
    out = []
    for r in _jsonl(root / "boolq" / "val.jsonl"):
        lab = r["label"]
        if isinstance(lab, str):
            if lab.lower() not in ("true", "false"):
                raise DataError(f"boolq: unexpected label {lab!r} in row {r.get('idx')}")
            lab = lab.lower() == "true"
        out.append({"question": r["question"], "passage": r["passage"], "idx": int(r["idx"]),
                    "label": int(bool(lab))})          # harness: 0 = false, 1 = true
    return out


def _capitalize_last_fragment(ctx: str) -> str:
    """Upper-case the first letter of the text after the last '. ' (the harness's ctx_b.capitalize())."""
    cut = max(ctx.rfind(". "), ctx.rfind(": "))
    i = cut + 2 if cut >= 0 else 0
    if i < len(ctx) and ctx[i].islower():
        return ctx[:i] + ctx[i].upper() + ctx[i + 1:]
    return ctx


def read_hellaswag(root: Path) -> list[dict]:
    path = _need(root / "hellaswag" / "hellaswag_val_full.txt.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"hellaswag: {path} has {len(lines)} lines, not a multiple of 6")
    out = []
    for i in range(0, len(lines), 6):
        ctx, gold, endings = lines[i], int(lines[i + 1]), lines[i + 2:i + 6]
        out.append({"query": _capitalize_last_fragment(ctx.strip()),
                    "choices": [e.strip() for e in endings], "gold": gold, "label": str(gold)})
    return out


def read_gsm8k(root: Path) -> list[dict]:
    return [{"question": r["question"], "answer": r["answer"]}
            for r in _jsonl(root / "gsm8k" / "test.jsonl")]


def read_mmlu(root: Path, subject: str, split: str) -> list[dict]:
    path = _need(root / "mmlu" / split / f"{subject}_{split}.csv")
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
                raise DataError(f"mmlu: bad row in {path}: {row[:1]}")
            out.append({"question": row[0], "subject": subject, "choices": row[1:5],
                        "answer": "ABCD".index(row[5])})
    return out


def read_wikitext(root: Path) -> list[dict]:
    """Documents of wiki.test.raw, split at top-level headings as EleutherAI/wikitext_document_level does."""
    path = _need(root / "wikitext2" / "wiki.test.raw")
    docs, cur = [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.strip().endswith(" ="):
            page = "\n".join(cur)
            if page.strip():
                docs.append({"page": page})
            cur = []
        cur.append(line)
    docs.append({"page": "\n".join(cur)})
    return docs


# --- loaders (lm-eval ``custom_dataset`` entry points) ---------------------------------------------

def load_piqa(data_dir: Optional[str] = None, **_: Any):
    return _dd(validation=read_piqa(data_root(data_dir)))


def load_winogrande(data_dir: Optional[str] = None, **_: Any):
    return _dd(validation=read_winogrande(data_root(data_dir)))


def load_arc_easy(data_dir: Optional[str] = None, **_: Any):
    return _dd(test=read_arc(data_root(data_dir), "easy"))


def load_arc_challenge(data_dir: Optional[str] = None, **_: Any):
    return _dd(test=read_arc(data_root(data_dir), "challenge"))


def load_boolq(data_dir: Optional[str] = None, **_: Any):
    return _dd(validation=read_boolq(data_root(data_dir)))


def load_hellaswag(data_dir: Optional[str] = None, **_: Any):
    return _dd(validation=read_hellaswag(data_root(data_dir)))


def load_gsm8k(data_dir: Optional[str] = None, **_: Any):
    rows = read_gsm8k(data_root(data_dir))
    return _dd(test=rows[GSM8K_FEWSHOT:], fewshot=rows[:GSM8K_FEWSHOT])


def load_mmlu(data_dir: Optional[str] = None, subject: Optional[str] = None, **_: Any):
    if not subject:
        raise DataError("mmlu: no subject given in the task config")
    root = data_root(data_dir)
    return _dd(test=read_mmlu(root, subject, "test"), dev=read_mmlu(root, subject, "dev"))


def load_wikitext(data_dir: Optional[str] = None, **_: Any):
    return _dd(test=read_wikitext(data_root(data_dir)))
