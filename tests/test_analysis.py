import numpy as np
import pytest
from openprompt.data_utils import InputExample

from openprompt_retro.experiments.memorization import leave_one_out_memorization, summarize_memorization
from openprompt_retro.experiments.sampling import subsample_k
from openprompt_retro.experiments.zero_shot import remove_overlap, select_confident


def ex(i, text, label=0):
    return InputExample(guid=str(i), text_a=text, label=label)


def test_select_confident_orders_by_confidence_and_balances():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.95, 0.05], [0.3, 0.7], [0.7, 0.3]])
    idx, pseudo = select_confident(probs, fraction=1.0)
    # class 0 predicted for rows 0,1,3,5 (conf .9,.6,.95,.7); class 1 for rows 2,4 -> balanced to 2 each
    assert idx.tolist() == [3, 0, 2, 4] and pseudo.tolist() == [0, 0, 1, 1]
    idx, _ = select_confident(probs, fraction=1.0, balanced=False)
    assert idx.tolist() == [3, 0, 5, 1, 2, 4]
    idx, _ = select_confident(probs, fraction=0.34)  # floor(0.34 * 6 / 2) = 1 per class
    assert idx.tolist() == [3, 2]
    with pytest.raises(ValueError, match="fraction"):
        select_confident(probs, fraction=0.0)


def test_a_never_predicted_class_gets_no_entries():
    idx, pseudo = select_confident(np.array([[0.9, 0.1], [0.8, 0.2]]), fraction=1.0)
    assert idx.tolist() == [0, 1] and pseudo.tolist() == [0, 0]


def test_remove_overlap_normalises_case_and_space():
    pool = [ex(0, "A great  movie"), ex(1, "boring"), ex(2, "fine")]
    test = [ex(9, "a great movie "), ex(8, "Fine")]
    assert [e.guid for e in remove_overlap(pool, test)] == ["1"]


def test_memorization_of_a_lookup_model_is_one_minus_chance():
    examples = [ex(i, f"t{i}", i % 2) for i in range(6)]

    def lookup(train, score):  # memorises its training set perfectly, knows nothing else
        seen = {e.guid for e in train}
        return np.array([[1.0 - e.label, float(e.label)] if e.guid in seen else [0.5, 0.5] for e in score])

    out = leave_one_out_memorization(lookup, examples, progress=False)
    np.testing.assert_allclose(out["scores"], 0.5)
    np.testing.assert_allclose(out["p_in"], 1.0)
    np.testing.assert_allclose(out["p_out"], 0.5)


def test_memorization_of_a_model_that_ignores_training_is_zero():
    examples = [ex(i, f"t{i}", i % 2) for i in range(4)]
    out = leave_one_out_memorization(lambda train, score: np.full((len(score), 2), 0.5), examples, progress=False)
    np.testing.assert_allclose(out["scores"], 0.0)
    s = summarize_memorization(np.array([0.0, 0.2, 0.4, -0.2]))
    assert s["mean"] == pytest.approx(0.1) and s["fraction_above_0.1"] == 0.5 and s["n"] == 4


def test_subsample_k_is_per_label_and_seeded():
    examples = [ex(i, f"t{i}", i % 2) for i in range(32)]
    a, b = subsample_k(examples, 4, seed=1), subsample_k(examples, 4, seed=1)
    assert [e.guid for e in a] == [e.guid for e in b]
    assert sorted(e.label for e in a) == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match="fewer than k=17"):
        subsample_k(examples, 17, seed=1)


def test_every_figure_writes_a_png(tmp_path):
    from openprompt_retro.experiments import figures as A

    A.plot_memorization({"prompt": np.array([0.1, 0.5]), "retro": np.array([0.0, 0.2])}, str(tmp_path / "m.png"))
    A.plot_lambda_sweep([0.0, 0.5, 1.0], [0.5, 0.7, 0.6], 0.5, str(tmp_path / "l.png"))
    rows = [{"method": m, "k": k, "test_accuracy": a} for m, a in (("prompt", 0.6), ("retro", 0.7)) for k in (4, 16)]
    A.plot_accuracy_vs_k(rows, str(tmp_path / "k.png"))
    explanation = {"prediction": 1, "neighbours": [{"label": 1, "text": "great film", "weight": 0.7},
                                                   {"label": 0, "text": None, "weight": 0.3}]}
    A.plot_neighbours("a fine movie", explanation, ["bad", "good"], str(tmp_path / "n.png"))
    for name in ("m", "l", "k", "n"):
        with open(tmp_path / f"{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
