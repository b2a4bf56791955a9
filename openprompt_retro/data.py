"""LM-BFF-format few-shot data: task specs (template, label words) and loaders.

Folder layout (as in ../shared/data/text/k-shot): ``<root>/<TASK>/<K>-<SEED>/{train,dev,test}.{tsv,csv}``.
Templates and label words follow LM-BFF (Gao et al., 2021), lower-cased for
uncased models.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence

from openprompt.data_utils import InputExample

DEFAULT_DATA_ROOT = os.environ.get("OPENPROMPT_RETRO_DATA", os.path.join("..", "shared", "data", "text"))
DEFAULT_MODEL = os.environ.get("OPENPROMPT_RETRO_MODEL", os.path.join("..", "shared", "models", "minilm-l6-mlm"))

_SENT = '{"placeholder":"text_a"} it was {"mask"} .'
_PAIR_NLI = '{"placeholder":"text_a"} ? {"mask"} , {"placeholder":"text_b"}'


@dataclass
class TaskSpec:
    name: str
    labels: List[str]  # label values as written in the files, in class order
    label_words: List[str]
    template: str
    fmt: str  # "csv" (label,text) | "sst2" | "cola" | "glue-pair"
    columns: Sequence[str] = ()  # glue-pair: (text_a, text_b, label) column names
    test_file: str = "test"

    @property
    def num_classes(self) -> int:
        return len(self.labels)


TASKS: Dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("SST-2", ["0", "1"], ["terrible", "great"], _SENT, "sst2"),
    TaskSpec("sst-5", ["0", "1", "2", "3", "4"], ["terrible", "bad", "okay", "good", "great"], _SENT, "csv"),
    TaskSpec("mr", ["0", "1"], ["terrible", "great"], _SENT, "csv"),
    TaskSpec("cr", ["0", "1"], ["terrible", "great"], _SENT, "csv"),
    TaskSpec("mpqa", ["0", "1"], ["terrible", "great"], _SENT, "csv"),
    TaskSpec("subj", ["0", "1"], ["subjective", "objective"], '{"placeholder":"text_a"} this is {"mask"} .', "csv"),
    TaskSpec("trec", ["0", "1", "2", "3", "4", "5"],
             ["description", "entity", "expression", "human", "location", "number"],
             '{"mask"} : {"placeholder":"text_a"}', "csv"),
    TaskSpec("CoLA", ["0", "1"], ["incorrect", "correct"], '{"placeholder":"text_a"} this is {"mask"} .', "cola"),
    TaskSpec("QNLI", ["not_entailment", "entailment"], ["no", "yes"], _PAIR_NLI, "glue-pair",
             ("question", "sentence", "label")),
    TaskSpec("RTE", ["not_entailment", "entailment"], ["no", "yes"], _PAIR_NLI, "glue-pair",
             ("sentence1", "sentence2", "label")),
    TaskSpec("MRPC", ["0", "1"], ["no", "yes"], '{"placeholder":"text_a"} {"mask"} , {"placeholder":"text_b"}',
             "glue-pair", ("#1 String", "#2 String", "Quality")),
    TaskSpec("MNLI", ["contradiction", "entailment", "neutral"], ["no", "yes", "maybe"], _PAIR_NLI, "glue-pair",
             ("sentence1", "sentence2", "gold_label"), test_file="pool-dev"),
    TaskSpec("SNLI", ["contradiction", "entailment", "neutral"], ["no", "yes", "maybe"], _PAIR_NLI, "glue-pair",
             ("sentence1", "sentence2", "gold_label"), test_file="pool-dev"),
    # topic sets (../shared/data/text/topic): 1000-row dev and test files, no k-shot splits
    TaskSpec("ag_news", ["0", "1", "2", "3"], ["world", "sports", "business", "technology"],
             '{"mask"} news : {"placeholder":"text_a"}', "topic"),
]}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        lowered = {k.lower(): k for k in TASKS}
        if name.lower() in lowered:
            return TASKS[lowered[name.lower()]]
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


def _label_index(spec: TaskSpec, value, path: str, row: int) -> int:
    value = str(value).strip()
    if value not in spec.labels:
        raise ValueError(f"{path}, row {row}: label {value!r} is not one of {spec.labels}")
    return spec.labels.index(value)


def read_split(spec: TaskSpec, path: str, prefix: str = "") -> List[InputExample]:
    """Read one LM-BFF data file into InputExamples (guids ``<prefix><row>``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file at {path!r}")
    out: List[InputExample] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        if spec.fmt == "csv":
            rows = [(",".join(r[1:]), None, r[0]) for r in csv.reader(f) if r]  # unquoted commas stay text
        elif spec.fmt == "sst2":
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = [(r["sentence"], None, r["label"]) for r in reader]
        elif spec.fmt == "cola":
            rows = [(r[3], None, r[1]) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
        else:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            a, b, y = spec.columns
            rows = [(r[a], r[b], r[y]) for r in reader]
    for i, (text_a, text_b, label) in enumerate(rows):
        out.append(InputExample(guid=f"{prefix}{i}", text_a=text_a, text_b=text_b or "",
                                label=_label_index(spec, label, path, i)))
    if not out:
        raise ValueError(f"{path!r} holds no examples")
    return out


def _find(folder: str, stem: str) -> str:
    for name in (f"{stem}.tsv", f"{stem}.csv", f"{stem}_matched.tsv"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"no {stem}.tsv/.csv in {folder!r}")


def _read_json(root: str, kind: str, task: str, split: str):
    """``<root>/<kind>/<task>/<split>.json`` -> (path, parsed dict)."""
    path = os.path.join(root, kind, task, f"{split}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {kind} file at {path!r}")
    with open(path, encoding="utf-8") as f:
        return path, json.load(f)


def load_pool(root: str, task: str, split: str = "train") -> List[InputExample]:
    """A larger labeled pool: ``<root>/pools/<task>/<split>.json``."""
    spec = get_task(task)
    path, data = _read_json(root, "pools", spec.name, split)
    return [InputExample(guid=f"pool-{split}-{k}", text_a=v["text_a"], text_b=v.get("text_b") or "",
                         label=_label_index(spec, v["label"], path, int(k))) for k, v in data.items()]


def load_topic(root: str, task: str, split: str) -> List[InputExample]:
    """``<root>/topic/<task>/<split>.json`` rows ``{"ori": text, "label": "2"}``."""
    spec = get_task(task)
    path, data = _read_json(root, "topic", spec.name, split)
    return [InputExample(guid=f"{split}-{k}", text_a=v["ori"], text_b="", label=_label_index(spec, v["label"], path, i))
            for i, (k, v) in enumerate(data.items())]


def load_unlabeled_pool(root: str, task: str) -> List[InputExample]:
    """A pool for zero-shot use: the task's labeled pool (pools/<task>/train.json) or, for topic sets,
    the 1000-row dev file. Callers must ignore the labels and drop test overlaps."""
    spec = get_task(task)
    return load_topic(root, spec.name, "dev") if spec.fmt == "topic" else load_pool(root, spec.name, "train")


def load_test(root: str, task: str, k: int = 16, seed: int = 42) -> List[InputExample]:
    spec = get_task(task)
    return load_topic(root, spec.name, "test") if spec.fmt == "topic" else load_few_shot(root, spec.name, k, seed)["test"]


def load_few_shot(root: str, task: str, k: int = 16, seed: int = 42) -> Dict[str, List[InputExample]]:
    """train/dev/test of one LM-BFF split. MNLI/SNLI (no test file) use the pool's dev.json as test."""
    spec = get_task(task)
    folder = os.path.join(root, "k-shot", spec.name, f"{k}-{seed}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no few-shot split at {folder!r} (task {spec.name}, K={k}, seed={seed})")
    out = {s: read_split(spec, _find(folder, s), prefix=f"{s}-") for s in ("train", "dev")}
    if spec.test_file == "pool-dev":
        out["test"] = load_pool(root, spec.name, "dev")
    else:
        out["test"] = read_split(spec, _find(folder, "test"), prefix="test-")
    return out
