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

from .. import prompt as _prompt  # noqa: F401  (makes openprompt importable on current transformers)
from openprompt.data_utils import InputExample  # noqa: E402

from .paths import DEFAULT_DATA_ROOT, DEFAULT_MODEL  # noqa: E402,F401

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


# ------------------------------------------------------------------ Hugging Face datasets (online users)
_TEXT_COLUMNS = ("sentence", "text", "question", "sentence1", "premise", "review")
_PAIR_COLUMNS = ("sentence2", "hypothesis", "sentence")


def _pick_columns(row: Dict, spec: TaskSpec, text_fields: Sequence[str], where: str) -> List[str]:
    if text_fields:
        missing = [c for c in text_fields if c not in row]
        if missing:
            raise ValueError(f"{where}: no column {missing[0]!r}; columns are {sorted(row)}")
        return list(text_fields)
    first = next((c for c in _TEXT_COLUMNS if c in row), None)
    if first is None:
        raise ValueError(f"{where}: cannot tell the text column among {sorted(row)}; name it with text_fields")
    if "text_b" not in spec.template:
        return [first]
    second = next((c for c in _PAIR_COLUMNS if c in row and c != first), None)
    if second is None:
        raise ValueError(f"{where}: task {spec.name} needs a second text column; name both with text_fields")
    return [first, second]


def examples_from_rows(rows: Sequence[Dict], spec: TaskSpec, text_fields: Sequence[str] = (),
                       label_field: str = "label", label_map: Dict[str, int] = None, prefix: str = "",
                       where: str = "rows") -> List[InputExample]:
    """Rows as dicts (a ``datasets`` split iterates as such) -> InputExamples.

    A label is mapped with ``label_map`` (raw value -> class index) when given, else read as one of
    ``spec.labels``. Unlabeled rows (label -1, as in GLUE's test splits) are an error.
    """
    rows = list(rows)
    if not rows:
        raise ValueError(f"{where} holds no examples")
    for raw, cls in (label_map or {}).items():
        if isinstance(cls, bool) or not isinstance(cls, int):
            raise ValueError(f"the label map sends {raw!r} to {cls!r}: map each label to a class index "
                             f"0..{spec.num_classes - 1} ({', '.join(spec.label_words)})")
        if not 0 <= cls < spec.num_classes:
            raise ValueError(f"the label map sends {raw!r} to class {cls}: {spec.name} has classes "
                             f"0..{spec.num_classes - 1} ({', '.join(spec.label_words)})")
    fields = _pick_columns(rows[0], spec, text_fields, where)
    if label_field not in rows[0]:
        raise ValueError(f"{where}: no label column {label_field!r}; columns are {sorted(rows[0])}")
    out = []
    for i, r in enumerate(rows):
        raw = r[label_field]
        if str(raw) == "-1":
            raise ValueError(f"{where}, row {i}: label -1 (unlabeled split); evaluate on a labeled split instead, "
                             "e.g. 'validation'")
        if label_map is not None:
            if str(raw) not in label_map:
                raise ValueError(f"{where}, row {i}: label {raw!r} is not in the label map {sorted(label_map)}")
            label = int(label_map[str(raw)])
        else:
            label = _label_index(spec, raw, where, i)
        out.append(InputExample(guid=f"{prefix}{i}", text_a=str(r[fields[0]]),
                                text_b=str(r[fields[1]]) if len(fields) > 1 else "", label=label))
    return out


def few_shot_from_rows(train_rows: Sequence[Dict], test_rows: Sequence[Dict], spec: TaskSpec, k: int, seed: int,
                       **fields) -> Dict[str, List[InputExample]]:
    """LM-BFF-style split from a full training set: K per class for train and another, disjoint, K per class
    for dev, both drawn with ``seed``; the test rows are kept whole."""
    import random

    pool = examples_from_rows(train_rows, spec, prefix="pool-", where="train split", **fields)
    by_class: Dict[int, List[InputExample]] = {c: [] for c in range(spec.num_classes)}
    for ex in pool:
        by_class[ex.label].append(ex)
    rng = random.Random(seed)
    train, dev = [], []
    for c, items in by_class.items():
        if len(items) < 2 * k:
            raise ValueError(f"class {c} ({spec.label_words[c]}) has {len(items)} training rows, fewer than "
                             f"2K = {2 * k} (K for train, K for dev)")
        picked = rng.sample(items, 2 * k)
        train += picked[:k]
        dev += picked[k:]
    return {"train": train, "dev": dev,
            "test": examples_from_rows(test_rows, spec, prefix="test-", where="test split", **fields)}


def load_hf_few_shot(dataset: str, task: str, k: int = 16, seed: int = 42, test_split: str = None,
                     text_fields: Sequence[str] = (), label_field: str = "label",
                     label_map: Dict[str, int] = None) -> Dict[str, List[InputExample]]:
    """A few-shot split of a Hugging Face dataset (needs ``pip install datasets`` and a network).

    ``dataset`` is ``name`` or ``name:config`` (e.g. ``glue:sst2``, ``rotten_tomatoes``); ``task`` names the
    TaskSpec whose template and label words are used. The test split defaults to ``test`` unless it is
    missing or unlabeled, then ``validation``.
    """
    from ..errors import UserError

    try:
        import datasets
    except ImportError:
        raise UserError("--hf-dataset needs the 'datasets' package: pip install 'openprompt-retro[hf]'") from None
    spec = get_task(task)
    name, _, config = dataset.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as e:  # offline, unknown name or config: datasets raises many kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"--hf-dataset {dataset}: could not be loaded ({type(e).__name__}: {first})") from None
    if test_split is None:
        labeled_test = "test" in ds and any(str(y) != "-1" for y in ds["test"][label_field][:100])
        test_split = "test" if labeled_test else "validation"
    if test_split not in ds:
        raise ValueError(f"{dataset} has no split {test_split!r}; splits are {list(ds)}")
    if "train" not in ds:
        raise ValueError(f"{dataset} has no 'train' split to draw the few-shot train and dev sets from; splits are "
                         f"{list(ds)}")
    return few_shot_from_rows(ds["train"], ds[test_split], spec, k, seed, text_fields=text_fields,
                              label_field=label_field, label_map=label_map)
