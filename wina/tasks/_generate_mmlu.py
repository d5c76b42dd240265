"""Regenerate the local MMLU task configs (wina/tasks/local/mmlu/) from lm-eval's installed ones.

Run once by a developer (``python -m wina.tasks._generate_mmlu``); the output is committed. Each of
the 57 subject tasks keeps lm-eval's prompt, description, choices, metric, few-shot split (dev) and
sampler (first_n); only the data source changes to the local headerless CSVs. The group files
(mmlu, mmlu_stem, mmlu_other, mmlu_social_sciences, mmlu_humanities) are copied as they are.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

class _Fn(str):
    """A ``!function`` reference, kept as a tag through load and dump."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Fn(loader.construct_scalar(node)))
_Dumper.add_representer(_Fn, lambda dumper, v: dumper.represent_scalar("!function", str(v)))

OUT = Path(__file__).parent / "local" / "mmlu"

TEMPLATE = """\
dataset_path: wina-local/mmlu
custom_dataset: !function wina.tasks.loaders.load_mmlu
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def main() -> None:
    import lm_eval
    src = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.yaml"):
        old.unlink()
    for old in OUT.glob("_default_template*"):
        old.unlink()
    template = yaml.load(TEMPLATE, Loader=_Loader)
    for f in sorted(src.glob("_mmlu*.yaml")):
        shutil.copyfile(f, OUT / f.name)
    n = 0
    for f in sorted(src.glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(f.read_text())
        subject = cfg["dataset_name"]
        cfg.pop("dataset_name")
        cfg.pop("include", None)          # the template is inlined: package data holds *.yaml only
        cfg = {**template, **cfg, "dataset_kwargs": {"subject": subject}}
        text = yaml.dump(cfg, Dumper=_Dumper, sort_keys=True, width=100)
        (OUT / f.name).write_text(f"# Local copy of lm-eval's mmlu/default/{f.name}; data: "
                                  f"<data_dir>/mmlu/test/{subject}_test.csv + dev/{subject}_dev.csv\n" + text)
        n += 1
    print(f"wrote {n} subject configs to {OUT}")


if __name__ == "__main__":
    main()
