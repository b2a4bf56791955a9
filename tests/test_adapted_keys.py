"""Adapted and pair-aware keys, the logistic read-out and the mixture guard (issue: keys that learn from the
labels without memorising), on the tiny models: the losses and features against hand-computed cases, the spy
that no dev or test text reaches the adaptation, the loss store of pre-adaptation keys, determinism, the guard,
and saving / reloading an adapted run bit for bit."""
import math

import numpy as np
import pytest
import torch

import openprompt_retro as R
from openprompt_retro.core.knn import binomial_tail, store_guard
from openprompt_retro.core.readout import LogisticReadout, logistic_readout, readout_distribution
from openprompt_retro.core.store import KnowledgeStore
from openprompt_retro.prompt.key_adaptation import contrastive_pair_loss, segment_cosine_loss
from openprompt_retro.prompt.key_encoders import AdaptedMeanEncoder, FrozenMeanEncoder, relation_features
from openprompt_retro.prompt.saved_run import SavedRunError

from helpers import retro_model, trainer

ADAPTED = {"key_encoder": "adapted", "knn_readout": "auto", "adapt_steps": 3, "adapt_batch_size": 4,
           "adapt_lr": 1e-2}


def adapted_model(tiny, demonstrations="none", **config):
    return retro_model(tiny, demonstrations=demonstrations, **{**ADAPTED, **config})


def pairs(n=8):
    """Sentence pairs: each premise comes twice, with two different hypotheses (labels alternate)."""
    from openprompt.data_utils import InputExample

    words = ["a cat sat", "the dog ran", "birds sing", "rain fell"]
    return [InputExample(guid=f"p{i}", text_a=words[(i // 2) % 4], text_b=words[(i // 2 + 1 + i % 2) % 4],
                         label=i % 2) for i in range(n)]


# ------------------------------------------------------------------ the math, by hand
def test_the_contrastive_loss_weighs_same_and_other_class_pairs_alike():
    keys = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 2.0]])  # unit: (1, 0), (.6, .8), (0, 1)
    labels = torch.tensor([0, 0, 1])
    # same class: (0, 1) cos .6 -> (.6 - 1)^2 = .16; other: (0, 2) cos 0 -> 0, (1, 2) cos .8 -> .64
    assert contrastive_pair_loss(keys, labels).item() == pytest.approx(0.5 * 0.16 + 0.5 * (0.0 + 0.64) / 2)
    # only one kind of pair: its mean alone; a single example: 0 (and still differentiable)
    assert contrastive_pair_loss(keys[:2], labels[:2]).item() == pytest.approx(0.16)
    one = keys[:1].clone().requires_grad_(True)
    contrastive_pair_loss(one, labels[:1]).backward()
    assert one.grad is not None and float(one.grad.abs().sum()) == 0.0


def test_the_contrastive_loss_is_setfits_cosine_similarity_loss_on_each_kind_of_pair():
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    torch.manual_seed(0)
    keys, labels = torch.randn(6, 5), torch.tensor([0, 1, 0, 2, 1, 0])
    i, j = torch.triu_indices(6, 6, 1)
    same = labels[i] == labels[j]

    def setfit_loss(rows):  # SetFit's loss: MSE between cos(u, v) and the pair's label (1 same class, 0 not)
        loss = CosineSimilarityLoss.__new__(CosineSimilarityLoss)
        torch.nn.Module.__init__(loss)
        loss.loss_fct, loss.cos_score_transformation = torch.nn.MSELoss(), torch.nn.Identity()
        cos = torch.cosine_similarity(keys[i[rows]], keys[j[rows]])
        return loss.loss_fct(loss.cos_score_transformation(cos), same[rows].float())

    assert st is not None
    expected = 0.5 * setfit_loss(same) + 0.5 * setfit_loss(~same)
    assert contrastive_pair_loss(keys, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_pair_loss_fits_each_pairs_segment_cosine_to_its_class():
    u, v = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # cos: 1/sqrt 2 (target 1), 0 (target 0)
    assert segment_cosine_loss(u, v, torch.tensor([1.0, 0.0])).item() == pytest.approx((1 / math.sqrt(2) - 1) ** 2 / 2)


def test_relation_features_are_the_cosine_the_distance_and_the_product_normalised():
    u, v = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]])
    r = torch.tensor([[0.6, 0.4, 0.8, 0.6, 0.0]])  # cos, |u - v|, u * v
    torch.testing.assert_close(relation_features(u, v), r / r.norm())


def test_an_encoder_in_relation_mode_keys_pairs_by_how_their_segments_relate(tiny_bert):
    plm, tok, _, _ = tiny_bert
    enc = FrozenMeanEncoder(plm, tok)
    u, v = enc.segment_keys(["a cat sat"]), enc.segment_keys(["the dog ran"])
    enc.relation = True
    from openprompt.data_utils import InputExample

    keys = enc.encode([InputExample(guid="p", text_a="a cat sat", text_b="the dog ran"),
                       InputExample(guid="s", text_a="a cat sat")])
    assert keys.shape == (2, 2 * 32 + 1) and enc.dim == 65
    np.testing.assert_allclose(keys[0], relation_features(torch.from_numpy(u), torch.from_numpy(v))[0], atol=1e-6)
    # a single text is the pair (a, "")
    np.testing.assert_allclose(keys[1], enc.encode_texts(["a cat sat"], [""])[0], atol=1e-6)


# ------------------------------------------------------------------ the logistic read-out
def test_the_logistic_read_out_is_scikit_learns_regression_and_cross_fits_excluded_entries():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    keys = rng.normal(size=(12, 3)).astype(np.float32)
    labels = np.arange(12) % 2
    keys[labels == 1] += 1.5
    readout = LogisticReadout(keys, labels, num_classes=3, c=1.0, folds=3)
    full = LogisticRegression(C=1.0, max_iter=2000).fit(keys.astype(np.float64), labels)
    s = readout.scores(keys[:2])
    np.testing.assert_allclose(s[:, :2], full.predict_log_proba(keys[:2].astype(np.float64)), rtol=1e-9)
    assert np.all(s[:, 2] == -np.inf)  # a class with no entry
    # entry 0 excluded: scored by the fit without its fold (class members dealt round-robin into 3 folds)
    fold0 = np.nonzero(readout.fold == readout.fold[0])[0]
    keep = np.setdiff1d(np.arange(12), fold0)
    without = LogisticRegression(C=1.0, max_iter=2000).fit(keys[keep].astype(np.float64), labels[keep])
    np.testing.assert_allclose(readout.scores(keys[:1], [[0]])[:, :2],
                               without.predict_log_proba(keys[:1].astype(np.float64)), rtol=1e-9)
    # refitted on the same entries, the same scores (a reloaded run reads the same p)
    np.testing.assert_array_equal(LogisticReadout(keys, labels, 3, folds=3).scores(keys), readout.scores(keys))


def test_the_logistic_read_out_follows_the_store_and_is_a_distribution():
    store = KnowledgeStore(2, 2)
    store.build(np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), [0, 0, 1, 1])
    first = logistic_readout(store)
    assert logistic_readout(store) is first  # fitted once per state of the store
    p = readout_distribution("logistic", store, np.array([[1.0, 0.0], [0.0, 1.0]]), temperature=0.5)
    assert p.argmax(1).tolist() == [0, 1] and np.allclose(p.sum(1), 1.0)
    store.add(np.array([[0.5, 0.5]]), [1])
    assert logistic_readout(store) is not first
    with pytest.raises(ValueError, match="readout must be one of"):
        readout_distribution("nearest", store, np.zeros((1, 2)), 1.0)


# ------------------------------------------------------------------ the guard
def test_the_binomial_tail_and_the_guard_by_hand():
    assert binomial_tail(3, 3, 0.5) == pytest.approx(0.125)
    assert binomial_tail(2, 3, 0.5) == pytest.approx(0.5)  # P(X >= 2) = (3 + 1) / 8
    labels = np.array([0, 1] * 16)
    right = np.eye(2)[labels]
    good = store_guard(right, labels)
    assert good["passes"] and good["reason"] is None and good["p_value"] == pytest.approx(2.0 ** -32)
    at_chance = store_guard(np.eye(2)[np.r_[labels[:16], 1 - labels[16:]]], labels)  # 16 of 32: the majority rate
    assert at_chance["p_value"] == pytest.approx(binomial_tail(16, 32, 0.5))
    assert not at_chance["passes"] and "no better than the majority-class rate" in at_chance["reason"]
    assert store_guard(np.eye(2)[np.r_[labels[:17], 1 - labels[17:]]], labels)["passes"]  # 17 of 32: above it
    assert store_guard(np.eye(2)[1 - labels], labels, enabled=False)["passes"]


def test_a_store_at_chance_on_dev_is_not_mixed_in_and_the_record_says_why(tiny_bert, examples):
    model = adapted_model(tiny_bert, store_guard_alpha=0.1)
    tr = trainer(model, tiny_bert, epochs=1, lr=1e-3)
    tr.fit(examples, examples)
    flipped = [type(e)(guid=f"f{i}", text_a=e.text_a, label=1 - e.label) for i, e in enumerate(examples)]
    tuned = tr.tune_inference(tr.loader(flipped))  # the store is wrong on every one of these
    assert tuned["store_guard"]["passes"] is False and model.config.knn_lambda == 0.0
    assert tuned["knn_lambda"] == 0.0 and "lambda = 0" in tuned["store_guard"]["reason"]
    model.apply_config(store_guard_alpha=None)
    assert tr.tune_inference(tr.loader(flipped))["store_guard"]["passes"] is True


# ------------------------------------------------------------------ adaptation in the model
def test_the_adaptation_reads_the_training_examples_and_nothing_else(tiny_bert, examples, monkeypatch):
    seen = []
    pooled = AdaptedMeanEncoder.pooled

    def spy(self, texts_a, texts_b=None):
        seen.extend(texts_a)
        seen.extend(t for t in (texts_b or []) if t)
        return pooled(self, texts_a, texts_b)

    monkeypatch.setattr(AdaptedMeanEncoder, "pooled", spy)
    train, dev = examples[:6], examples[6:]
    test = [type(e)(guid=f"t{i}", text_a=e.text_a + " indeed", label=e.label) for i, e in enumerate(examples)]
    model = adapted_model(tiny_bert, demonstrations="neural")
    tr = trainer(model, tiny_bert, epochs=2, lr=1e-3)
    tr.fit(train, dev)
    tr.predict(test)
    model.add_examples(test[:2])
    assert seen and set(seen) <= {e.text_a for e in train}
    assert model.key_encoder.adaptation["examples"] == len(train) and model.key_encoder.adaptation["steps"] == 3


def test_adapted_keys_move_and_the_loss_reads_the_keys_from_before(tiny_bert, tiny_dirs, examples):
    from openprompt.plms import load_plm

    model = adapted_model(tiny_bert, loss="knn")
    tr = trainer(model, tiny_bert, epochs=1, lr=1e-3)
    tr.fit(examples, examples)
    plm, tok, _, _ = load_plm("bert", tiny_dirs["bert"])
    pretrained = FrozenMeanEncoder(plm, tok).encode(examples)
    np.testing.assert_allclose(model.lifecycle.loss_store.keys, pretrained, atol=1e-6)  # honest: never adapted
    assert not np.allclose(model.knn_store.keys, pretrained, atol=1e-3)  # the store's keys did move
    assert model.lifecycle.loss_store is not model.knn_store
    # the gate's leave-one-out accuracy is the pre-adaptation store's, read by the read-out training used
    # ("auto" reads as logistic until dev chooses), each entry without its own fold
    p = readout_distribution("logistic", model.lifecycle.loss_store, pretrained, 1.0, np.arange(len(examples)))
    assert model.store_loo_accuracy == pytest.approx(float((p.argmax(1) == [e.label for e in examples]).mean()))


def test_adaptation_is_deterministic_and_leaves_the_callers_random_state(tiny_bert, tiny_dirs, examples):
    from openprompt.plms import load_plm

    results = []
    for _ in range(2):
        plm, tok, cfg, wrapper = load_plm("bert", tiny_dirs["bert"])
        model = adapted_model((plm, tok, cfg, wrapper))
        torch.manual_seed(7)
        model.attach(trainer(model, (plm, tok, cfg, wrapper)).loader(examples))
        results.append((model.key_encoder.fingerprint(), model.knn_store.keys.copy(), torch.rand(1).item()))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    torch.manual_seed(7)
    assert results[0][2] == torch.rand(1).item()  # the adaptation drew from a forked random state


def test_pair_keys_are_settled_by_the_data_and_the_cache_tells_pairs_apart(tiny_bert, examples):
    single = adapted_model(tiny_bert, pair_keys="auto")
    single.attach(trainer(single, tiny_bert).loader(examples))
    assert single.config.pair_keys == "joint" and single.knn_store.dim == 32
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert
    template = R.RetroTemplate(ManualTemplate(tokenizer=tok, text='{"placeholder":"text_a"} {"mask"} , '
                                                                   '{"placeholder":"text_b"}'), ["no", "yes"])
    model = R.RetroPromptForClassification(plm, template, ManualVerbalizer(tok, num_classes=2,
                                                                           label_words=[["no"], ["yes"]]),
                                           config=R.RetroConfig(key_encoder="frozen-mean", knn_readout="logistic"))
    data = pairs(8)
    model.attach(trainer(model, tiny_bert).loader(data))
    assert model.config.pair_keys == "relation" and model.knn_store.dim == 65
    assert model.mixing().store is model.knn_store
    # the same text_a with another text_b is another key (the cache is keyed by both segments)
    assert data[0].text_a == data[1].text_a and data[0].text_b != data[1].text_b
    assert not np.allclose(model.knn_store.keys[0], model.knn_store.keys[1], atol=1e-4)
    assert model.predict(data).shape == (8,)


def test_relation_keys_need_a_key_encoder():
    with pytest.raises(ValueError, match="pair_keys='relation'.*not 'mask'"):
        R.RetroConfig(key_encoder="mask", pair_keys="relation")
    with pytest.raises(ValueError, match="adapt_steps"):
        R.RetroConfig(adapt_steps=-1)


def test_auto_chooses_the_read_out_on_dev_and_names_it(tiny_bert, examples):
    model = adapted_model(tiny_bert)
    tr = trainer(model, tiny_bert, epochs=1, lr=1e-3)
    tr.fit(examples, examples)
    assert tr.tuned["knn_readout"] in ("topk", "class-mean", "logistic")
    assert set(tr.tuned["readout_dev"]) == {"topk", "class-mean", "logistic"}
    best = max(r["accuracy"] for r in tr.tuned["readout_dev"].values())
    assert tr.tuned["readout_dev"][tr.tuned["knn_readout"]]["accuracy"] == best
    assert model.config.knn_readout == tr.tuned["knn_readout"]


# ------------------------------------------------------------------ it travels with the run
def test_an_adapted_run_saves_and_rebuilds_bit_identical(tiny_bert, tiny_dirs, examples, tmp_path):
    torch.manual_seed(0)
    model = adapted_model(tiny_bert, demonstrations="neural", store_guard_alpha=None)
    tr = trainer(model, tiny_bert, epochs=2, lr=1e-2)
    tr.fit(examples, examples)
    before = model.predict_proba(examples)
    run = tmp_path / "run"
    model.save(str(run))
    assert (run / "key_encoder.safetensors").is_file()
    again = R.RetroPromptForClassification.from_pretrained(str(run), plm_path=tiny_dirs["bert"])
    assert again.key_encoder.adapted and again.key_encoder.fingerprint() == model.key_encoder.fingerprint()
    np.testing.assert_array_equal(again.predict_proba(examples), before)
    # a torch checkpoint carries the adapted encoder too: a fresh model loads it and predicts the same
    from openprompt.plms import load_plm

    plm, tok, cfg, wrapper = load_plm("bert", tiny_dirs["bert"])
    fresh = adapted_model((plm, tok, cfg, wrapper), demonstrations="neural", store_guard_alpha=None)
    fresh.load_state_dict(model.state_dict())  # weights, store, adapted encoder and the tuned mixture
    fresh.set_tokenization(wrapper, model.max_seq_length)
    np.testing.assert_array_equal(fresh.predict_proba(examples), before)
    # the adapted weights are checksummed like every other file
    data = bytearray((run / "key_encoder.safetensors").read_bytes())
    data[-1] ^= 1
    (run / "key_encoder.safetensors").write_bytes(bytes(data))
    with pytest.raises(SavedRunError, match="key_encoder.safetensors"):
        R.RetroPromptForClassification.from_pretrained(str(run), plm_path=tiny_dirs["bert"])


def test_a_saved_pair_run_with_relation_keys_reloads(tiny_bert, tiny_dirs, tmp_path):
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, wrapper = tiny_bert
    template = R.RetroTemplate(ManualTemplate(tokenizer=tok, text='{"placeholder":"text_a"} {"mask"} , '
                                                                   '{"placeholder":"text_b"}'), ["no", "yes"])
    model = R.RetroPromptForClassification(plm, template, ManualVerbalizer(tok, num_classes=2,
                                                                           label_words=[["no"], ["yes"]]),
                                           config=R.RetroConfig(**{**ADAPTED, "adapt_pairs": True,
                                                                   "store_guard_alpha": None}))
    tr = R.RetroTrainer(model, tok, wrapper, R.TrainingArgs(epochs=1, batch_size=4, progress=False, device="cpu"))
    data = pairs(8)
    tr.fit(data, data)
    assert model.config.pair_keys == "relation" and model.key_encoder.adaptation["objective"] == "segment-cosine"
    before = model.predict_proba(data)
    model.save(str(tmp_path / "run"))
    again = R.RetroPromptForClassification.from_pretrained(str(tmp_path / "run"), plm_path=tiny_dirs["bert"])
    assert again.key_encoder.relation and again.knn_store.dim == 65
    np.testing.assert_array_equal(again.predict_proba(data), before)


def test_untuned_the_default_lambda_never_mixes_in_a_store_at_chance(tiny_bert, examples):
    """A hand loop never tunes on dev: before, it mixed at the default lambda 0.5 whatever the store was worth
    (the loss gate passed by one example on RTE). Now the store's leave-one-out accuracy must beat chance by
    the binomial test first, and the reason is the model's own p-value."""
    model = retro_model(tiny_bert, demonstrations="none", key_encoder="frozen-mean", knn_readout="class-mean",
                        store_guard_alpha=0.1)
    assert model.config.knn_lambda == 0.5 and not model.config.lambda_from_dev
    model.attach(trainer(model, tiny_bert).loader(examples))
    p = model.lifecycle.loo_p_value
    correct = int(round(model.store_loo_accuracy * len(examples)))
    assert p == pytest.approx(binomial_tail(correct, len(examples), 0.5))
    assert model.effective_lambda == (0.5 if p < 0.1 else 0.0)
    model.lifecycle.loo_p_value = 0.5  # as for a store at chance
    assert model.effective_lambda == 0.0 and model.mixing().lam == 0.0
    model.lifecycle.loo_p_value = 0.01  # a store that beats chance
    assert model.effective_lambda == 0.5
    model.lifecycle.loo_p_value = 0.5
    model.apply_config(knn_lambda=0.3, lambda_from_dev=True)  # chosen on dev: the dev guard decided already
    assert model.effective_lambda == 0.3
    model.apply_config(knn_lambda=0.3)  # set by hand: the leave-one-out guard applies again
    assert model.effective_lambda == 0.0
