import os

import pytest

from openprompt_retro.experiments.tasks import TASKS, get_task, load_few_shot, load_test, load_unlabeled_pool, read_split

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "text")
needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "k-shot")), reason="../shared data not present")


@needs_data
@pytest.mark.parametrize("task,n_test,classes", [("SST-2", 872, 2), ("trec", 500, 6), ("RTE", 277, 2),
                                                 ("sst-5", 2210, 5)])
def test_lm_bff_splits_load_balanced(task, n_test, classes):
    d = load_few_shot(DATA, task, 16, 13)
    assert len(d["test"]) == n_test
    assert sorted({e.label for e in d["train"]}) == list(range(classes))
    assert all(sum(e.label == c for e in d["train"]) == 16 for c in range(classes))
    assert all(e.text_b == "" for e in d["train"]) == (TASKS[task].fmt != "glue-pair")


@needs_data
def test_topic_and_pool_loading():
    assert len(load_test(DATA, "ag_news")) == 1000
    pool = load_unlabeled_pool(DATA, "SST-2")
    assert len(pool) > 1000 and {e.label for e in pool} == {0, 1}


def test_bad_data_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    assert get_task("sst-2").name == "SST-2"
    bad = tmp_path / "train.csv"
    bad.write_text("0,fine\n7,odd label\n")
    with pytest.raises(ValueError, match="row 1: label '7' is not one of"):
        read_split(get_task("mr"), str(bad))
    with pytest.raises(FileNotFoundError, match="no few-shot split"):
        load_few_shot(str(tmp_path), "SST-2", 16, 42)
