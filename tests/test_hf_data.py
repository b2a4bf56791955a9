"""Few-shot splits from Hugging Face-style rows (a `datasets` split iterates as dicts)."""
import importlib.util
import json

import pytest

from openprompt_retro.experiments.tasks import examples_from_rows, few_shot_from_rows, get_task

SST2 = get_task("SST-2")


def rows(n_per_class, column="sentence"):
    return [{column: f"text {c} {i}", "label": c, "idx": i} for c in (0, 1) for i in range(n_per_class)]


def test_k_per_class_disjoint_train_dev_and_seeded():
    split = few_shot_from_rows(rows(20), rows(5), SST2, k=4, seed=13)
    for name in ("train", "dev"):
        assert sorted(ex.label for ex in split[name]) == [0] * 4 + [1] * 4
    assert not {ex.text_a for ex in split["train"]} & {ex.text_a for ex in split["dev"]}
    assert len(split["test"]) == 10
    again = few_shot_from_rows(rows(20), rows(5), SST2, k=4, seed=13)
    other = few_shot_from_rows(rows(20), rows(5), SST2, k=4, seed=21)
    assert [e.text_a for e in again["train"]] == [e.text_a for e in split["train"]]
    assert [e.text_a for e in other["train"]] != [e.text_a for e in split["train"]]


def test_text_column_guessed_or_named_and_label_map_applied():
    ex = examples_from_rows(rows(1, column="text"), SST2)
    assert [(e.text_a, e.label) for e in ex] == [("text 0 0", 0), ("text 1 0", 1)]
    flipped = examples_from_rows(rows(1, column="review_body"), SST2, text_fields=["review_body"],
                                 label_map={"0": 1, "1": 0})
    assert [e.label for e in flipped] == [1, 0]
    pair = examples_from_rows([{"premise": "a", "hypothesis": "b", "label": "entailment"}], get_task("RTE"))
    assert (pair[0].text_a, pair[0].text_b, pair[0].label) == ("a", "b", 1)


def test_bad_rows_are_clear_errors():
    with pytest.raises(ValueError, match="label -1"):
        examples_from_rows([{"sentence": "x", "label": -1}], SST2)
    with pytest.raises(ValueError, match="cannot tell the text column"):
        examples_from_rows([{"body": "x", "label": 0}], SST2)
    with pytest.raises(ValueError, match="no column 'body'"):
        examples_from_rows([{"sentence": "x", "label": 0}], SST2, text_fields=["body"])
    with pytest.raises(ValueError, match="label '7' is not one of"):
        examples_from_rows([{"sentence": "x", "label": 7}], SST2)
    with pytest.raises(ValueError, match="fewer than 2K = 8"):
        few_shot_from_rows(rows(5), rows(1), SST2, k=4, seed=1)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="optional 'datasets' not installed")
def test_load_hf_few_shot_through_datasets(tmp_path, monkeypatch):
    import datasets

    from openprompt_retro.experiments.tasks import load_hf_few_shot

    for split, n in (("train", 20), ("validation", 3)):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows(n)))
    files = {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "validation")}
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: real("json", data_files=files))
    split = load_hf_few_shot("local-json", "SST-2", k=4, seed=42)
    assert len(split["train"]) == len(split["dev"]) == 8 and len(split["test"]) == 6
    # the CLI path: --hf-dataset replaces --data-root for trained methods
    from openprompt_retro import cli

    out = tmp_path / "run"
    cli.main(["run", "--model", "tiny-bert", "--tasks", "SST-2", "--methods", "prompt", "--hf-dataset", "local-json",
              "--k", "4", "--epochs", "1", "--no-progress", "--out", str(out)])
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert (record["task"], record["shots"], record["n_test"]) == ("SST-2", 4, 6)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="optional 'datasets' not installed")
def test_an_hf_dataset_that_cannot_be_loaded_is_one_line(tmp_path, monkeypatch, capsys):
    """Offline (no hub): before, a ConnectionError traceback."""
    import datasets

    from openprompt_retro import cli

    def offline(name, config=None):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--model", "tiny-bert", "--tasks", "SST-2", "--methods", "prompt", "--hf-dataset",
                  "glue:sst2", "--no-progress", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("openprompt-retro run: error: --hf-dataset glue:sst2: could not be loaded "
                                            "(ConnectionError: Couldn't reach 'glue' on the Hub "
                                            "(LocalEntryNotFoundError))")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="optional 'datasets' not installed")
@pytest.mark.parametrize("splits, extra, message", [
    (("validation", "test"), [], "has no 'train' split"),
    (("train", "validation"), ["--hf-label-map", '{"0": 0, "1": 5}'], "label map sends '1' to class 5"),
    (("train", "validation"), ["--hf-label-map", '{"0": 0}'], "label 1 is not in the label map"),  # was already
    (("train", "validation"), ["--hf-label-map", '{"0": "zero", "1": 1}'], "label map sends '0' to 'zero'"),
])
def test_hugging_face_data_mistakes_are_one_line(tmp_path, monkeypatch, capsys, splits, extra, message):
    """Before: a KeyError traceback for a dataset without a train split, and tracebacks for label maps that send
    a label nowhere or to no class."""
    import datasets

    from openprompt_retro import cli

    for split in splits:
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows(20)))
    files = {s: str(tmp_path / f"{s}.jsonl") for s in splits}
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: real("json", data_files=files))
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--model", "tiny-bert", "--tasks", "SST-2", "--methods", "prompt", "--hf-dataset",
                  "local-json", "--k", "4", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert e.value.code == 2 and "Traceback" not in err and last.startswith("openprompt-retro run: error: ")
    assert message in last, last
