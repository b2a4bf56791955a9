"""The class-mean read-out of core/readout.py on hand-computed cases: cosine with each class's mean unit key,
per-class top-m, leave-one-out, empty classes, and its temperature chosen on dev by log-loss."""
import math

import numpy as np
import pytest

from openprompt_retro.core.knn import choose_temperature
from openprompt_retro.core.readout import (CLASS_MEAN_TEMPERATURES, class_mean_distribution,
                                           class_mean_scores)

R2 = 1 / math.sqrt(2)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_each_class_is_scored_by_the_cosine_with_its_mean_unit_key():
    keys = np.array([[5.0, 0.0], [0.0, 1.0], [-2.0, 0.0]])  # the norms play no part
    labels = np.array([0, 0, 1])
    queries = np.array([[3.0, 0.0], [0.0, -1.0]])
    s = class_mean_scores(queries, keys, labels, 2)
    # class 0: mean of (1, 0) and (0, 1) -> (1, 1) / sqrt 2; class 1: (-1, 0)
    np.testing.assert_allclose(s, [[R2, -1.0], [-R2, 0.0]], atol=1e-12)
    p = class_mean_distribution(queries, keys, labels, 2, temperature=0.5)
    np.testing.assert_allclose(p[:, 0], [sigmoid((R2 + 1) / 0.5), sigmoid(-R2 / 0.5)], rtol=1e-6)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    assert p.dtype == np.float32


def test_top_m_averages_the_class_keys_most_similar_to_the_query():
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    labels = np.array([0, 0, 0, 1])
    q = np.array([[1.0, 0.0]])
    # class 0 has similarities 1, 0, -1: its full mean (0, 1/3) is orthogonal to q
    np.testing.assert_allclose(class_mean_scores(q, keys, labels, 2), [[0.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(class_mean_scores(q, keys, labels, 2, top_m=1), [[1.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(class_mean_scores(q, keys, labels, 2, top_m=2), [[R2, 0.0]], atol=1e-12)
    # m beyond a class's size takes the whole class
    np.testing.assert_allclose(class_mean_scores(q, keys, labels, 2, top_m=10), [[0.0, 0.0]], atol=1e-12)


def test_leave_one_out_removes_the_query_entry_from_its_class_mean():
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = np.array([0, 0, 1])
    for top_m, row2 in ((None, -R2), (1, 0.0), (5, -R2)):  # top-1 of class 0 for (-1, 0) is (0, 1)
        s = class_mean_scores(keys, keys, labels, 2, top_m=top_m, exclude_ids=np.arange(3))
        # row 0 sees only (0, 1) in class 0; row 2 leaves class 1 empty
        np.testing.assert_allclose(s[0], [0.0, -1.0], atol=1e-12)
        np.testing.assert_allclose(s[1], [0.0, 0.0], atol=1e-12)
        assert s[2, 0] == pytest.approx(row2, abs=1e-12) and s[2, 1] == -np.inf
        p = class_mean_distribution(keys, keys, labels, 2, 1.0, top_m=top_m, exclude_ids=[[0], [1], [2]])
        np.testing.assert_array_equal(p[2], [1.0, 0.0])  # the empty class gets 0
        assert p[0, 0] == pytest.approx(sigmoid(1.0))
    # without exclusions the query's own entry counts
    np.testing.assert_allclose(class_mean_scores(keys[:1], keys, labels, 2), [[R2, -1.0]], atol=1e-12)


def test_classes_without_entries_get_0_and_a_query_with_no_class_left_gets_uniform():
    keys = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = class_mean_distribution(np.array([[1.0, 0.0]]), keys, np.array([0, 1]), 3, temperature=1.0)
    assert p[0, 2] == 0.0 and p[0, 0] == pytest.approx(sigmoid(1.0))
    one = np.array([[1.0, 0.0]])
    with np.errstate(all="raise"):
        p = class_mean_distribution(one, one, np.array([1]), 2, 1.0, exclude_ids=[0])  # its only entry left out
        np.testing.assert_array_equal(p, [[0.5, 0.5]])
        p = class_mean_distribution(one, np.zeros((0, 2)), np.zeros(0, dtype=np.int64), 4, 1.0)  # empty store
        np.testing.assert_array_equal(p, [[0.25] * 4])


def test_both_paths_agree_across_chunks_and_leave_one_out():
    rng = np.random.default_rng(0)
    keys, labels = rng.normal(size=(40, 8)), rng.integers(0, 3, size=40)
    queries = np.concatenate([keys, rng.normal(size=(260, 8))])  # > one chunk of 256 queries
    exclude = np.concatenate([np.arange(40), -np.ones(260, dtype=np.int64)])
    full = class_mean_scores(queries, keys, labels, 3, exclude_ids=exclude)
    np.testing.assert_allclose(class_mean_scores(queries, keys, labels, 3, top_m=40, exclude_ids=exclude), full,
                               atol=1e-12)
    np.testing.assert_array_equal(class_mean_scores(queries[::-1], keys, labels, 3, exclude_ids=exclude[::-1]),
                                  full[::-1])  # a query's scores do not depend on the others


def test_the_temperature_is_chosen_on_dev_by_log_loss():
    keys = np.array([[1.0, 0.0], [0.8, 0.6]])  # the query (1, 0) scores 1 and 0.8
    dev = np.array([[1.0, 0.0]] * 4)
    labels = np.array([0, 0, 0, 1])
    s = class_mean_scores(dev, keys, np.array([0, 1]), 2)
    # p(0) = sigmoid(0.2 / T); the log-loss -(3 log p(0) + log(1 - p(0))) / 4 is smallest at p(0) = 3 / 4,
    # T = 0.2 / log 3 = 0.18: of (0.1, 0.2, 0.5) the losses are 0.627, 0.563, 0.613
    choice = choose_temperature(s, labels, (0.5, 0.1, 0.2))
    assert choice.temperature == 0.2
    assert choice.log_loss == pytest.approx(-(3 * math.log(sigmoid(1.0)) + math.log(sigmoid(-1.0))) / 4)
    assert choose_temperature(s, labels, CLASS_MEAN_TEMPERATURES).temperature == 0.2


@pytest.mark.parametrize("kwargs, match", [
    (dict(keys=np.zeros((2, 3))), "queries have dimension 2, keys 3"),
    (dict(labels=np.array([0, 2])), r"labels must be 2 class ids in \[0, 2\)"),
    (dict(labels=np.array([0])), r"labels must be 2 class ids"),
    (dict(top_m=0), "top_m must be None or an integer >= 1"),
    (dict(exclude_ids=[5]), r"exclude_ids \[5\] are not store ids"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(queries=np.array([[np.nan, 0.0]])), "queries contain NaN"),
])
def test_bad_input_is_one_clear_error(kwargs, match):
    args = dict(queries=np.array([[1.0, 0.0]]), keys=np.eye(2), labels=np.array([0, 1]), num_classes=2,
                temperature=1.0)
    with pytest.raises(ValueError, match=match):
        class_mean_distribution(**{**args, **kwargs})
