"""The evaluation tasks wina knows, their local data files, and lm-eval task configs that read them.

``wina eval --data-dir DIR`` runs every task from local files in their original formats (the layout
of ``../shared/data``, see its README): the YAML files under ``wina/tasks/local/`` are lm-eval
task configs with the harness's prompts, targets, metrics and few-shot settings, whose data comes
from :mod:`wina.tasks.loaders` instead of the hub. Without a data folder the harness's own configs
and hub datasets are used.

Deviations from the hub versions, to be stated wherever the numbers are reported:

- hellaswag: only llama.cpp's preprocessed 6-line text form exists locally; scores are close to the
  harness's, not identical.
- gsm8k: no train split; the first 5 test problems are the fixed few-shot examples and are not
  scored (1,314 problems scored).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import DataError, InvalidArgument

LOCAL_DIR = Path(__file__).parent / "local"


@dataclass(frozen=True)
class TaskSpec:
    name: str                       # lm-eval task (or group) name
    files: tuple[str, ...]          # paths relative to the data folder
    docs: int                       # documents scored on the full local set
    kind: str                       # "multiple_choice" | "generate_until" | "loglikelihood_rolling"
    fewshot: Optional[int] = None   # wina's default few-shot count (None: the task config's)
    note: str = ""


def _mmlu_files() -> tuple[str, ...]:
    subjects = sorted(p.stem[len("mmlu_"):] for p in (LOCAL_DIR / "mmlu").glob("mmlu_*.yaml"))
    return tuple(f"mmlu/{split}/{s}_{split}.csv" for s in subjects for split in ("test", "dev"))


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), 1838, "multiple_choice"),
    TaskSpec("winogrande", ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), 1267, "multiple_choice"),
    TaskSpec("hellaswag", ("hellaswag/hellaswag_val_full.txt.bz2",), 10042, "multiple_choice",
             note="local data is llama.cpp's preprocessed text form: close to the harness's scores, not identical"),
    TaskSpec("arc_easy", ("arc_easy/ARC-Easy-Test.jsonl",), 2376, "multiple_choice"),
    TaskSpec("arc_challenge", ("arc_challenge/ARC-Challenge-Test.jsonl",), 1172, "multiple_choice"),
    TaskSpec("boolq", ("boolq/val.jsonl",), 3270, "multiple_choice"),
    TaskSpec("mmlu", _mmlu_files(), 14042, "multiple_choice", fewshot=5,
             note="5-shot from dev (first_n), as the seed"),
    TaskSpec("gsm8k", ("gsm8k/test.jsonl",), 1314, "generate_until", fewshot=5,
             note="few-shot examples: the first 5 test problems, excluded from scoring (no train split offline)"),
    TaskSpec("wikitext", ("wikitext2/wiki.test.raw",), 62, "loglikelihood_rolling"),
)}

SEED_TASKS = ("piqa", "winogrande", "hellaswag", "arc_challenge", "mmlu", "gsm8k")


def known_tasks() -> list[str]:
    return sorted(TASKS)


def parse_tasks(tasks: "str | Sequence[str]") -> list[str]:
    """``"piqa,arc_easy"`` or a list -> a list of names, duplicates dropped, order kept."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    out: list[str] = []
    for t in tasks:
        t = t.strip()
        if t and t not in out:
            out.append(t)
    if not out:
        raise InvalidArgument(f"no task given; known tasks: {', '.join(known_tasks())}")
    return out


def unknown_task_error(name: str, hub: bool = False) -> InvalidArgument:
    extra = " (without --data-dir, any lm-eval task name also works)" if hub else ""
    return InvalidArgument(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}{extra}")


def expected_files(name: str, data_dir) -> list[Path]:
    if name not in TASKS:
        raise unknown_task_error(name)
    root = Path(data_dir).expanduser()
    return [root / f for f in TASKS[name].files]


def check_local(tasks: Sequence[str], data_dir) -> None:
    """Raise before any work if a task is unknown or one of its files is missing (naming the file)."""
    for t in tasks:
        if t not in TASKS:
            raise unknown_task_error(t)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a data folder" if root.exists() else f"data folder not found: {root}")
    for t in tasks:
        for p in expected_files(t, root):
            if not p.is_file():
                raise DataError(f"task {t}: missing data file, expected {p}")


def available(data_dir) -> list[str]:
    """Tasks whose files are all present under ``data_dir``."""
    root = Path(data_dir).expanduser()
    return [t for t in known_tasks() if all(p.is_file() for p in expected_files(t, root))]


def read_docs(name: str, data_dir) -> list[dict]:
    """The scored documents of a local task, as the task config sees them (mmlu: all subjects' test rows)."""
    from . import loaders
    root = loaders.data_root(str(data_dir))
    check_local([name], root)
    if name == "mmlu":
        subjects = sorted({Path(f).name[:-len("_test.csv")] for f in TASKS["mmlu"].files if f.endswith("_test.csv")})
        return [d for s in subjects for d in loaders.read_mmlu(root, s, "test")]
    if name == "gsm8k":
        return loaders.read_gsm8k(root)[loaders.GSM8K_FEWSHOT:]
    reader = {"piqa": loaders.read_piqa, "winogrande": loaders.read_winogrande,
              "hellaswag": loaders.read_hellaswag, "boolq": loaders.read_boolq,
              "wikitext": loaders.read_wikitext,
              "arc_easy": lambda r: loaders.read_arc(r, "easy"),
              "arc_challenge": lambda r: loaders.read_arc(r, "challenge")}[name]
    return reader(root)
