"""Bad labels and mismatched shapes are clear errors before any tensor work (prompt/checks.py)."""
import warnings

import numpy as np
import pytest

import openprompt_retro as R
from helpers import TEXT, WORDS, retro_model, trainer
from openprompt_retro.errors import UserError


def _ex(labels, prefix="ex"):
    from openprompt.data_utils import InputExample

    texts = ["a great movie", "a terrible film", "the acting was excellent", "a waste of time", "loved it", "a mess"]
    return [InputExample(guid=f"{prefix}{i}", text_a=texts[i % len(texts)], label=y) for i, y in enumerate(labels)]


def _no_tokenizing(tr, monkeypatch):
    """Fail the test if the trainer gets as far as tokenizing."""
    import openprompt_retro.prompt.trainer as trainer_module

    class Refuse(trainer_module.PromptDataLoader):
        def __init__(self, *a, **k):
            raise AssertionError("tokenized before the labels were checked")

    monkeypatch.setattr(trainer_module, "PromptDataLoader", Refuse)


def test_a_string_label_names_the_example_and_its_class(tiny_bert, monkeypatch):
    tr = trainer(retro_model(tiny_bert), tiny_bert)
    _no_tokenizing(tr, monkeypatch)
    with pytest.raises(ValueError,
                       match=r"train example 1 \(guid 'ex1'\) has label 'great', a string: labels are class "
                             r"indices 0\.\.1; label word 'great' is class 1"):
        tr.fit(_ex([0, "great", 0, 1]))
    with pytest.raises(ValueError, match=r"has label 1\.0 of type float"):
        tr.fit(_ex([0, 1.0, 0, 1]))
    with pytest.raises(ValueError, match=r"example 0 \(guid 'ex0'\) has label 'great', a string"):
        tr.predict(_ex(["great"]))  # predict needs no label, but a given one must be a class index


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_labels_outside_the_classes_name_split_guid_and_value(tiny_bert, examples, split):
    tr = trainer(retro_model(tiny_bert), tiny_bert)
    bad = _ex([0, 1, 5, 1, 7], prefix=split)
    pattern = (rf"{split} example 2 \(guid '{split}2'\) has label 5, outside the model's 2 classes 0\.\.1 "
               rf"\(label words 0='terrible', 1='great'\) \(and 1 more bad label\(s\) in {split}\)")
    with pytest.raises(ValueError, match=pattern):
        if split == "train":
            tr.fit(bad)
        elif split == "dev":
            tr.fit(examples, bad)
        else:
            tr.fit(examples)
            tr.evaluate(bad, split="test")  # before: accuracy with the bad rows counted as misses


def test_an_already_tokenized_loader_is_checked_too(tiny_bert, examples):
    from openprompt import PromptDataLoader

    tr = trainer(retro_model(tiny_bert), tiny_bert, tune_inference=False)
    tr.fit(examples)
    loader = PromptDataLoader(_ex([0, 3]), tr.model.template, tokenizer=tiny_bert[1],
                              tokenizer_wrapper_class=tiny_bert[3], max_seq_length=64)
    with pytest.raises(ValueError, match=r"eval example 1 \(guid 'ex1'\) has label 3, outside"):
        tr.evaluate(loader)
    with pytest.raises(ValueError, match="has label -1"):
        tr.add_examples(_ex([-1]))


def test_data_errors_are_user_errors_for_the_cli(tiny_bert):
    from openprompt_retro.prompt.checks import DataError

    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


def test_leave_one_out_needs_two_training_examples(tiny_bert, monkeypatch):
    tr = trainer(retro_model(tiny_bert), tiny_bert)
    _no_tokenizing(tr, monkeypatch)
    with pytest.raises(ValueError, match=r"train: 1 example; retrieval leaves each example's own store entry out "
                                         r"\(leave-one-out\), so it needs at least 2 training examples"):
        tr.fit(_ex([1]))  # before: 'zero-size array to reduction operation maximum' inside numpy
    monkeypatch.undo()
    two = trainer(retro_model(tiny_bert), tiny_bert, tune_inference=False)
    assert np.isfinite(two.fit(_ex([1, 0]))[0]["loss"])  # two are enough
    plain = trainer(retro_model(tiny_bert, demonstrations="none", loss="ce", knn_lambda=0.0), tiny_bert,
                    tune_inference=False)
    with pytest.warns(UserWarning, match=r"no examples of class\(es\) \[0\]"):
        assert np.isfinite(plain.fit(_ex([1]))[0]["loss"])  # without the store one example is fine


def _three_word_model(tiny, template_words=("terrible", "great", "fine")):
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny
    t = R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT), list(template_words), demonstrations="neural",
                        plm=plm)
    v = ManualVerbalizer(tok, num_classes=3, label_words=[["terrible"], ["great"], ["fine"]])
    return R.RetroPromptForClassification(plm, t, v, config=R.RetroConfig(demo_topk=2, knn_k=3, train_knn_k=3))


def test_three_label_words_on_binary_data_warn(tiny_bert, examples):
    """A warning, not an error: a class without training examples can be deliberate (leave-one-out at K=1, a
    class known only by its label word, examples added to the store later), but it is never silent."""
    tr = trainer(_three_word_model(tiny_bert), tiny_bert, tune_inference=False)
    with pytest.warns(UserWarning, match=r"train: no examples of class\(es\) \[2\] \['fine'\] of the model's 3 "
                                         r"classes \(labels seen: \[0, 1\]\)"):
        tr.fit(examples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer(retro_model(tiny_bert), tiny_bert, tune_inference=False).fit(examples)  # all classes: no warning


def test_template_words_and_verbalizer_classes_must_agree(tiny_bert, examples, monkeypatch):
    with pytest.raises(ValueError, match=r"RetroTemplate has 2 label words \['terrible', 'great'\] but the "
                                         r"verbalizer has 3 classes"):
        _three_word_model(tiny_bert, WORDS)  # refused when the model is built, before any data
    tr = trainer(_three_word_model(tiny_bert, WORDS + ["okay"]), tiny_bert)
    tr.model.template.label_words = WORDS  # changed afterwards: fit checks again before tokenizing
    _no_tokenizing(tr, monkeypatch)
    with pytest.raises(ValueError, match=r"the template shows 2 label words \['terrible', 'great'\] but the "
                                         r"verbalizer has 3 classes"):
        tr.fit(examples)


# ---------------------------------------------------------------------- scores that cannot overflow
def test_huge_finite_keys_are_refused_instead_of_giving_nan():
    store = R.KnowledgeStore(4, 2)
    with pytest.raises(R.StoreError, match=r"keys have norm up to 2e\+30 \(rows \[0, 1, 2\]\).*overflow float32"):
        store.add(np.full((3, 4), 1e30, np.float32), [0, 1, 0])  # before: NaN probabilities, only a warning
    assert len(store) == 0
    store.add(np.ones((3, 4), np.float32), [0, 1, 0])
    with pytest.raises(R.StoreError, match="queries have norm"):
        store.knn_distribution(np.full((1, 4), 1e30, np.float32), 2)
    big = np.full((2, 4), 4e17, np.float32)  # the largest accepted norm (8e17) still gives finite probabilities
    ok = R.KnowledgeStore(4, 2)
    ok.add(big * [[1], [-1]], [0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = ok.knn_distribution(big[:1], 2, temperature=1.0)
    assert np.array_equal(p, [[1.0, 0.0]])


def test_cosine_store_normalises_huge_keys_without_overflow():
    store = R.KnowledgeStore(4, 2, metric="cosine")
    store.add(np.full((2, 4), 1e30, np.float32) * [[1], [-1]], [0, 1])
    assert np.allclose(np.linalg.norm(store.keys, axis=1), 1.0)  # before: x / inf = 0 vectors
    assert np.array_equal(store.knn_distribution(np.full((1, 4), 1e30, np.float32), 1), [[1.0, 0.0]])


def test_knn_weights_share_weight_among_infinite_scores():
    from openprompt_retro.core.knn import knn_weights

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = knn_weights(np.array([[np.inf, np.inf, 1.0], [3.0, 1.0, -np.inf]]), 1.0)
    assert np.allclose(w[0], [0.5, 0.5, 0.0]) and np.all(np.isfinite(w))
    assert np.allclose(w[1], [np.exp(2) / (1 + np.exp(2)), 1 / (1 + np.exp(2)), 0.0])


# ------------------------------------------------------------------ issue 22: clear errors
def test_fit_on_no_examples_is_a_clear_error(tiny_bert):
    tr = trainer(retro_model(tiny_bert), tiny_bert)
    with pytest.raises(ValueError, match="train: no examples given"):
        tr.fit([], _ex([0, 1]))


@pytest.mark.parametrize("top", [-1, 0, 1.5])
def test_explain_needs_a_positive_top(tiny_bert, top):
    tr = trainer(retro_model(tiny_bert), tiny_bert)
    with pytest.raises(ValueError, match="top must be a positive integer"):
        tr.explain(_ex([0])[0], top=top)


@pytest.mark.parametrize("text, what", [(None, "text_a=None"), ("fine \ud83d text", "lone surrogate")])
def test_text_that_cannot_be_tokenized_names_the_example(tiny_bert, text, what):
    from openprompt.data_utils import InputExample

    tr = trainer(retro_model(tiny_bert), tiny_bert)
    examples = _ex([0, 1, 0]) + [InputExample(guid="bad", text_a=text, label=1)]
    with pytest.raises(UserError, match=rf"train example 3 \(guid 'bad'\).*{what}"):
        tr.fit(examples)
    with pytest.raises(UserError, match=r"data example 0 \(guid 'bad'\)"):
        tr.predict(examples[3:])


def test_a_diverging_loss_stops_fit_naming_the_step_and_rate(tiny_bert):
    tr = trainer(retro_model(tiny_bert, demonstrations="none"), tiny_bert, lr=1e6, max_steps=40, eval_every=40)
    diverged = r"(loss is (nan|inf)|store keys are no longer finite) at step \d+ \(learning rate [\d.e+]+\)"
    with pytest.raises(UserError, match=diverged):
        tr.fit(_ex([0, 1, 0, 1, 0, 1]), _ex([0, 1]))


def test_a_rejected_config_value_never_reaches_the_model(tiny_bert):
    model = retro_model(tiny_bert, demonstrations="none")
    before = model.config.to_dict()
    with pytest.raises(ValueError, match="knn_k"):
        model.apply_config(knn_k=0, knn_lambda=0.25)
    assert model.config.to_dict() == before and model.mixing().lam == before["knn_lambda"]
