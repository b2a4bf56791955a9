"""The retrieval math of core/ on hand-computed cases: kNN weights, the (lambda, k, T) selection,
loss weights and demonstration weights at their edges."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from openprompt_retro.core.demonstrations import demonstration_weights
from openprompt_retro.core.knn import (PLM_TEMPERATURES, Mixture, MixtureGrid, choose_temperature,
                                       knn_label_distribution, knn_weights, log_loss, log_probs, mix, select_mixture,
                                       temperature_scale)
from openprompt_retro.core.loss import knn_loss_weights
from openprompt_retro.core.store import KnowledgeStore


def test_knn_weights_stay_finite_for_large_scores():
    # raw inner products of real mask keys reach the hundreds: exp(s / T) alone would overflow
    w = knn_weights(np.array([[1000.0, 999.0, -np.inf]]), temperature=1.0)
    e = math.exp(-1.0)
    np.testing.assert_allclose(w, [[1 / (1 + e), e / (1 + e), 0.0]], rtol=1e-12)


def test_missing_neighbours_take_no_part_in_p_knn():
    scores = np.array([[2.0, 1.0, 5.0]])
    labels = np.array([[1, 0, -1]])  # the third slot is empty (id -1): ignored whatever its score
    p = knn_label_distribution(scores, labels, num_classes=3, temperature=1.0)
    e = math.exp(-1.0)
    np.testing.assert_allclose(p, [[e / (1 + e), 1 / (1 + e), 0.0]], rtol=1e-6)


def test_select_mixture_ties_go_to_the_smaller_lambda_then_the_first_k_t():
    labels = np.array([0, 0])
    p_model = np.array([[0.4, 0.6], [0.4, 0.6]])  # lambda = 0 gets both wrong
    # k = 1: P(0) = 0.4 + 0.3 lambda > P(1) = 0.6 - 0.3 lambda  iff  lambda > 1/3
    # k = 2: P(0) = 0.4 + 0.6 lambda > P(1) = 0.6 - 0.6 lambda  iff  lambda > 1/6
    p_knn = {1: np.array([[0.7, 0.3]] * 2), 2: np.array([[1.0, 0.0]] * 2)}
    best = select_mixture(p_model, labels, lambda k, t: p_knn[k], (1.0, 0.5, 0.0, 0.2), (1, 2), (1.0,))
    # accuracy 1 at lambda 0.5 and 1 (k = 1), 0.2, 0.5 and 1 (k = 2): the smallest lambda wins, though its k is later
    assert best == Mixture(lam=0.2, k=2, temperature=1.0, accuracy=1.0)
    assert best.as_dict() == {"accuracy": 1.0, "lambda": 0.2, "k": 2, "temperature": 1.0}
    # the same p_kNN for every (k, T): the first (k, T) in grid order
    best = MixtureGrid((0.0, 0.5, 1.0), (4, 2), (3.0, 1.0)).select(p_model, labels, lambda k, t: p_knn[2])
    assert best == Mixture(lam=0.5, k=4, temperature=3.0, accuracy=1.0)


def test_mixture_choice_is_frozen_and_refuses_impossible_values():
    choice = Mixture(lam=0.5, k=4, temperature=1.0)
    with pytest.raises(AttributeError):
        choice.lam = 1.0
    for bad in (dict(lam=1.5), dict(lam=float("nan")), dict(k=0), dict(temperature=0.0)):
        with pytest.raises(ValueError, match="mixture"):
            Mixture(**{"lam": 0.5, "k": 4, "temperature": 1.0, **bad})


def test_mixture_grid_refuses_lambdas_outside_0_1():
    with pytest.raises(ValueError, match=r"lambdas must lie in \[0, 1\]"):
        MixtureGrid(lambdas=(0.0, 1.5))
    with pytest.raises(ValueError, match="ks must be >= 1"):
        MixtureGrid(ks=(0,))


def test_knn_loss_weight_is_finite_when_the_store_gives_the_gold_label_nothing():
    w = knn_loss_weights(torch.tensor([0.0, 1.0]), "knn", beta=2.0)
    assert torch.allclose(w, torch.tensor([1.0 + 2.0 * -math.log(1e-6), 1.0]))


def test_demonstration_weights_ignore_missing_neighbours():
    # two of three slots filled: z over the two only, (s - mean) / std = -1, +1
    w = demonstration_weights(np.array([[[1.0, 3.0, -np.inf]]]))
    z = 1 / math.sqrt(1 + 1e-6)
    np.testing.assert_allclose(w[0, 0], [1 / (1 + math.exp(2 * z)), 1 / (1 + math.exp(-2 * z)), 0.0], rtol=1e-5)


def test_a_query_without_neighbours_gets_the_uniform_p_knn():
    # k clipped to 0 (no column at all), or every slot empty (label -1): no neighbour, so p_kNN = 1 / C
    for scores, labels in ((np.zeros((2, 0)), np.zeros((2, 0), dtype=np.int64)),
                           (np.array([[1.0, 2.0], [3.0, 0.0]]), np.array([[-1, -1], [1, -1]]))):
        for scale in ("raw", "zscore"):
            with np.errstate(all="raise"):
                p = knn_label_distribution(scores, labels, num_classes=4, temperature=1.0, scale=scale)
                w = knn_weights(scores, 1.0, labels >= 0, scale)
            assert np.array_equal(p[0], np.full(4, 0.25, dtype=np.float32))
            assert np.array_equal(w[0], np.zeros(scores.shape[1]))
    assert np.array_equal(p[1], [0.0, 1.0, 0.0, 0.0])  # a row with a neighbour is untouched


def test_a_one_entry_store_with_its_entry_left_out_gives_uniform_p_knn_to_inference_and_the_loss():
    store = KnowledgeStore(3, 2).build(np.array([[1.0, 0.0, 0.0]], dtype=np.float32), [1])
    for scale in ("raw", "zscore"):
        p = store.knn_distribution(store.keys, 16, 1.0, exclude_ids=[0], scale=scale)  # leave-one-out
        np.testing.assert_array_equal(p, [[0.5, 0.5]])
        p_plm = np.array([[0.9, 0.1]], dtype=np.float32)
        np.testing.assert_allclose(mix(p_plm, p, 0.5), [[0.7, 0.3]])  # inference: p_PLM flattened, not NaN
        w = knn_loss_weights(torch.from_numpy(p[:, 1]), "knn", beta=1.0, max_weight=3.0)  # the loss weight
        assert torch.allclose(w, torch.tensor([1.0 + math.log(2.0)]))
    np.testing.assert_array_equal(store.knn_distribution(store.keys, 16, 1.0), [[0.0, 1.0]])  # not excluded


# ---------------------------------------------------------------------- the "fine" grid (issue 20)
def test_fine_grid_breaks_accuracy_ties_by_log_loss_not_towards_the_smaller_lambda():
    labels = np.array([0, 0, 1])
    p_plm = np.array([[0.6, 0.4], [0.6, 0.4], [0.1, 0.9]])
    p_knn = np.array([[1.0, 0.0], [1.0, 0.0], [0.7, 0.3]])
    # row 3: P(1) = 0.9 - 0.6 lambda > 0.5 iff lambda < 2/3, so accuracy is 1 for lambda <= 0.6, 2/3 above;
    # log-loss -(2 log(0.6 + 0.4 lambda) + log(0.9 - 0.6 lambda)) / 3 is smallest where 0.8 (0.9 - 0.6 lambda)
    # = 0.6 (0.6 + 0.4 lambda): lambda = 0.5
    fine = MixtureGrid.fine().select(p_plm, labels, lambda k, t: p_knn)
    assert fine == Mixture(lam=0.5, k=16, temperature=1.0, accuracy=1.0)
    assert log_loss(mix(p_plm, p_knn, 0.5), labels) == pytest.approx(-(2 * math.log(0.8) + math.log(0.6)) / 3)
    # the default grid and rule are unchanged: the smaller lambda wins the tie
    assert MixtureGrid().select(p_plm, labels, lambda k, t: p_knn).lam == 0.0
    assert MixtureGrid.named("wide").select(p_plm, labels, lambda k, t: p_knn).lam == 0.0


def test_fine_grid_can_choose_retrieval_alone():
    labels = np.array([0, 1])
    p_plm = np.array([[0.6, 0.4], [0.4, 0.6]])  # right, but less sure than the store
    p_knn = np.array([[1.0, 0.0], [0.0, 1.0]])
    # every lambda is 100% accurate; the log-loss -log(0.6 + 0.4 lambda) falls to 0 at lambda = 1
    assert MixtureGrid.named("fine").select(p_plm, labels, lambda k, t: p_knn).lam == 1.0
    assert MixtureGrid().select(p_plm, labels, lambda k, t: p_knn).lam == 0.0
    # exact ties in accuracy and log-loss (p_kNN = p_PLM) still go to the smaller lambda
    assert MixtureGrid.fine().select(p_plm, labels, lambda k, t: p_plm).lam == 0.0


def test_plm_temperature_is_chosen_on_dev_by_log_loss_and_applied_before_mixing():
    labels = np.array([0, 0, 0, 1])
    p_plm = np.array([[0.9, 0.1]] * 4)  # 3 of 4 right, each at 0.9: overconfident
    # p^T(0) = 1 / (1 + 9^(-1 / T)); the log-loss is smallest where p^T(0) = 3 / 4, i.e. 9^(1 / T) = 3: T = 2
    t = choose_temperature(log_probs(p_plm), labels, PLM_TEMPERATURES)
    assert t.temperature == 2.0
    assert t.log_loss == pytest.approx(-(3 * math.log(0.75) + math.log(0.25)) / 4)
    np.testing.assert_allclose(temperature_scale(p_plm, 2.0), [[0.75, 0.25]] * 4)
    p_knn = np.array([[0.5, 0.5]] * 3 + [[0.2, 0.8]])
    # lambda 0.5, row 4: P(1) = (0.1 + 0.8) / 2 = 0.45 unscaled (wrong), (0.25 + 0.8) / 2 = 0.525 scaled (right)
    plain = MixtureGrid.fixed(0.5).select(p_plm, labels, lambda k, tt: p_knn)
    scaled = MixtureGrid.named("fixed", plm_temperature=True).select(p_plm, labels, lambda k, tt: p_knn)
    assert (plain.accuracy, plain.plm_temperature) == (0.75, 1.0)
    assert (scaled.accuracy, scaled.plm_temperature) == (1.0, 2.0)
    assert scaled.as_dict() == {"accuracy": 1.0, "lambda": 0.5, "k": 16, "temperature": 1.0, "plm_temperature": 2.0}
    assert MixtureGrid.fine(plm_temperature=True).select(p_plm, labels, lambda k, tt: p_knn).plm_temperature == 2.0


def test_choose_temperature_ties_go_to_the_smaller_t():
    scores = np.array([[0.0, 0.0], [1.0, 1.0]])  # every T gives 1/2, 1/2: equal losses
    assert choose_temperature(scores, np.array([0, 1]), (4.0, 0.5, 1.0)) == (0.5, pytest.approx(math.log(2)))
    with pytest.raises(ValueError, match="at least one finite temperature > 0"):
        choose_temperature(scores, np.array([0, 1]), (1.0, 0.0))


def test_new_grid_fields_survive_the_trainers_json_round_trip_and_are_checked():
    for grid in (MixtureGrid(), MixtureGrid.fine(plm_temperature=True)):
        saved = json.loads(json.dumps({k: list(v) for k, v in dataclasses.asdict(grid).items()}))
        assert MixtureGrid(**{k: tuple(v) for k, v in saved.items()}) == grid
    assert MixtureGrid.fine().lambdas == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    for name in ("small", "wide", "fixed"):  # the existing grids keep today's rule
        grid = MixtureGrid.named(name)
        assert (tuple(grid.tie_breaks), tuple(grid.plm_temperatures)) == ((), (1.0,))
    for bad, match in ((dict(tie_breaks="log-loss"), "tie_breaks must be a sequence"),
                       (dict(tie_breaks=("brier",)), "tie_breaks must be a sequence"),
                       (dict(plm_temperatures=()), "plm_temperatures must be"),
                       (dict(plm_temperatures=(1.0, -2.0)), "plm_temperatures must be")):
        with pytest.raises(ValueError, match=match):
            MixtureGrid(**bad)
    with pytest.raises(ValueError, match="'fine'"):
        MixtureGrid.named("finer")
