"""The offline task configs: each loads its local file through lm-eval with the right number of
documents and the right gold answer on a known example; bad input gives one clear error."""
from __future__ import annotations

import shutil

import pytest

from wina import tasks as T
from wina.errors import DataError, InvalidArgument

# name -> (scored documents, text that starts the first scored document's prompt, its gold index)
KNOWN = {
    "piqa": (1838, "Question: How do I ready a guinea pig cage for it's new occupants?", 0),
    "winogrande": (1267, None, 1),            # answer "2" -> option index 1
    "arc_easy": (2376, "Question: Which statement best explains why photosynthesis", 0),
    "arc_challenge": (1172, "Question: An astronomer observes that a planet rotates faster", 2),
    "boolq": (3270, "Ethanol fuel -- All biomass goes through", 0),       # label "false" -> 0
    "hellaswag": (10042, "Roof shingle removal: A man is sitting on a roof. He", 3),
    "gsm8k": (1314, "Question: Kylar went to the store to buy glasses", None),
    "wikitext": (62, None, None),
}


@pytest.fixture(scope="module")
def loaded(shared_data):
    """Every local task, loaded once through lm-eval's TaskManager with wina's configs."""
    from lm_eval.tasks import TaskManager
    from wina.evaluate import offline
    with offline():
        tm = TaskManager(include_path=str(T.LOCAL_DIR), include_defaults=False,
                         metadata={"data_dir": str(shared_data)})
        return tm.load(T.known_tasks())


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_local_task_docs_and_gold(loaded, name):
    n, prefix, gold = KNOWN[name]
    task = loaded["tasks"][name]
    docs = task.eval_docs
    assert len(docs) == n == T.TASKS[name].docs
    doc = docs[0]
    if prefix is not None:
        assert task.doc_to_text(doc).startswith(prefix)
    if gold is not None:
        if name == "winogrande":        # the harness's winogrande puts the gold in doc_to_text
            assert task.doc_to_text(doc) == gold
            assert task.doc_to_choice(doc)[gold].endswith("so Maria")
        else:
            assert task.doc_to_target(doc) == gold


def test_gsm8k_fewshot_examples_are_excluded_from_scoring(loaded):
    task = loaded["tasks"]["gsm8k"]
    shots = list(task.fewshot_docs())
    assert len(shots) == 5 and shots[0]["question"].startswith("Janet")
    assert shots[0]["answer"].endswith("#### 18")
    scored = {d["question"] for d in task.eval_docs}
    assert not scored & {d["question"] for d in shots}
    assert task.doc_to_target(task.eval_docs[0]).endswith("#### 64")


def test_mmlu_all_subjects(loaded):
    subs = {k: t for k, t in loaded["tasks"].items() if k.startswith("mmlu_")}
    assert len(subs) == 57
    assert sum(len(t.eval_docs) for t in subs.values()) == 14042
    aa = subs["mmlu_abstract_algebra"]
    doc = aa.eval_docs[0]
    assert aa.doc_to_text(doc).startswith("Find the degree for the given field extension")
    assert aa.doc_to_target(doc) == 1                                   # answer "B"
    assert len(list(aa.fewshot_docs())) == 5                            # dev split
    assert set(loaded["group_map"]["mmlu"]) == {"mmlu_stem", "mmlu_other", "mmlu_social_sciences",
                                                 "mmlu_humanities"}


def test_wikitext_documents_match_the_harness_split(loaded, shared_data):
    docs = loaded["tasks"]["wikitext"].eval_docs
    assert docs[0]["page"].startswith(" = Robert Boulter = ")
    # every line of the file once, but the leading blank line that the dataset script drops
    assert sum(len(d["page"].split("\n")) for d in docs) == len(
        (shared_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")) - 1


def test_read_docs_matches_registry(shared_data):
    assert len(T.read_docs("boolq", shared_data)) == 3270
    assert T.read_docs("boolq", shared_data)[0]["label"] == 0
    assert sum(1 for d in T.read_docs("boolq", shared_data) if d["label"] == 1) == 2033
    assert len(T.read_docs("mmlu", shared_data)) == 14042
    assert set(T.available(shared_data)) == set(T.known_tasks())


def test_configs_are_package_data():
    files = [p for p in T.LOCAL_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert files and all(p.suffix == ".yaml" for p in files), "pyproject ships only *.yaml under wina/tasks"
    assert len(list((T.LOCAL_DIR / "mmlu").glob("mmlu_*.yaml"))) == 57


def test_unknown_task_lists_the_known_ones(tmp_path):
    with pytest.raises(InvalidArgument) as e:
        T.check_local(["piqa", "nosuchtask"], tmp_path)
    msg = str(e.value)
    assert "nosuchtask" in msg and all(t in msg for t in T.known_tasks())


def test_missing_file_names_the_expected_path(tmp_path, shared_data):
    (tmp_path / "piqa").mkdir()
    shutil.copy(shared_data / "piqa" / "valid.jsonl", tmp_path / "piqa")
    with pytest.raises(DataError) as e:
        T.check_local(["piqa"], tmp_path)
    assert str(tmp_path / "piqa" / "valid-labels.lst") in str(e.value)
    from wina.tasks import loaders
    with pytest.raises(DataError, match="valid-labels.lst"):
        loaders.load_piqa(data_dir=str(tmp_path))


def test_mismatched_label_file_is_an_error(tmp_path, shared_data):
    (tmp_path / "piqa").mkdir()
    shutil.copy(shared_data / "piqa" / "valid.jsonl", tmp_path / "piqa")
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    from wina.tasks import loaders
    with pytest.raises(DataError, match="1838 rows but 2 labels"):
        loaders.read_piqa(tmp_path)


def test_parse_tasks():
    assert T.parse_tasks("piqa, arc_easy,piqa") == ["piqa", "arc_easy"]
    with pytest.raises(InvalidArgument):
        T.parse_tasks(" , ")


def test_a_damaged_task_file_is_named_with_its_line(tmp_path):
    from wina.errors import DataError
    from wina.tasks.loaders import read_piqa
    (tmp_path / "piqa").mkdir()
    f = tmp_path / "piqa" / "valid.jsonl"
    f.write_text('{"goal": "a", "sol1": "b", "sol2": "c"}\n{"goal": "trunc\n')
    with pytest.raises(DataError, match=r"valid\.jsonl: line 2 is not JSON"):
        read_piqa(tmp_path)
