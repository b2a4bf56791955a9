"""What the public classes promise: log-probabilities out of the verbalizer, the real neighbour
weights in explanations, a clear error for a kNN loss without a store, Tip-Adapter-F's schedule."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F


from helpers import first_batch, retro_model, trainer


# ------------------------------------------------------------------ the verbalizer returns log-probabilities
@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("vname", ["manual", "soft"])
def test_predict_proba_rows_sum_to_one(tiny_bert, examples, vname, lam):
    model = retro_model(tiny_bert, verbalizer=vname, demonstrations="none")
    tr = trainer(model, tiny_bert)
    loader, _ = first_batch(tr, examples)
    model.refresh_store(loader, progress=False)
    model.apply_config(knn_lambda=lam)  # forced: no dev tuning that could pick another lambda
    probs = tr.predict_proba(examples)
    assert probs.shape == (len(examples), 2) and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_soft_verbalizer_training_loss_is_cross_entropy_on_its_logits(tiny_bert, examples):
    """log_softmax leaves cross-entropy unchanged: CE(log_softmax(z), y) = CE(z, y)."""
    model = retro_model(tiny_bert, verbalizer="soft", demonstrations="none", loss="ce")
    loader, batch = first_batch(trainer(model, tiny_bert), examples)
    model.refresh_store(loader, progress=False)
    model.train()
    prepared = model.prepare_batch(batch)
    outputs, mask_batch = model._main_pass(prepared)
    at_mask = [model.extract_at_mask(o, mask_batch) for o in model.verbalizer.gather_outputs(outputs)]
    z = model.verbalizer.base.process_outputs(at_mask[0], batch=prepared)  # SoftVerbalizer: raw logits
    assert not torch.allclose(torch.exp(z).sum(-1), torch.ones(len(examples)), atol=1e-3)
    logits, _ = model.forward_with_keys(prepared)
    assert torch.allclose(logits, torch.log_softmax(z, -1), atol=1e-6)
    assert torch.allclose(model.loss(batch), F.cross_entropy(z, prepared["label"]), atol=1e-6)


# ------------------------------------------------------------------ explain shows the weights behind p_kNN
def test_explain_shows_the_weights_of_the_k_neighbours_behind_p_knn(tiny_bert, examples):
    T = 5.0
    model = retro_model(tiny_bert, demonstrations="none", knn_k=4, knn_temperature=T, knn_lambda=0.5)
    tr = trainer(model, tiny_bert)
    loader, batch = first_batch(tr, examples)
    model.refresh_store(loader, progress=False)
    model.eval()
    out = model.explain_batch(batch, top=2)
    _, query = model.plm_probs_and_queries(batch)
    res = model.store.search(query, 4)
    assert model.config.knn_score_scale == "zscore"
    for i, row in enumerate(out):
        s = res.scores[i].astype(np.float64)
        z = (s - s.mean()) / s.std()  # the scores standardised over the k = 4 neighbours
        e = np.exp((z - z.max()) / T)
        w = e / e.sum()  # softmax over the k = 4 neighbours, not over the 2 shown
        assert [n["id"] for n in row["neighbours"]] == res.ids[i, :2].tolist()
        np.testing.assert_allclose([n["weight"] for n in row["neighbours"]], w[:2], rtol=1e-5)
        assert sum(n["weight"] for n in row["neighbours"]) < 1.0
        p_knn = np.zeros(2)
        np.add.at(p_knn, res.labels[i], w)
        np.testing.assert_allclose(row["p_knn"], p_knn, rtol=1e-5)
        np.testing.assert_allclose(row["probs"], 0.5 * p_knn + 0.5 * np.array(row["p_plm"]), rtol=1e-5)
    np.testing.assert_allclose([r["p_knn"] for r in out], model.knn_probs(query).numpy(), rtol=1e-5)


# ------------------------------------------------------------------ a kNN loss needs a store
@pytest.mark.parametrize("loss", ["knn", "focal"])
def test_knn_loss_on_an_empty_store_is_a_clear_error(tiny_bert, examples, loss):
    # an inference forward (eval mode) builds no store; the loss must not quietly become plain CE
    model = retro_model(tiny_bert, demonstrations="none", loss=loss, knn_lambda=0.0)
    _, batch = first_batch(trainer(model, tiny_bert), examples)
    model.eval()
    with pytest.raises(ValueError, match=r"the store is empty: .*call model.attach\(train_loader\) / "
                                         r"refresh_store\(train_loader\) first"):
        model.loss(batch)
    assert len(model.store) == 0


def test_plain_cross_entropy_needs_no_store(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="none", loss="ce", knn_lambda=0.0)
    _, batch = first_batch(trainer(model, tiny_bert), examples)
    model.train()
    logits, _ = model.forward_with_keys(model.prepare_batch(batch))
    assert torch.allclose(model.loss(batch), F.cross_entropy(logits, batch["label"]))


# ------------------------------------------------------------------ Tip-Adapter-F follows the reference schedule
def test_tip_adapter_f_uses_a_cosine_rate_over_all_steps():
    from openprompt_retro.clip import ImageCache, TipAdapter

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(9, 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    labels = np.array([0, 1, 2] * 3)
    text = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    tip = TipAdapter(text, 10.0, ImageCache(feats, labels, 3))
    tip.fit(feats, labels, epochs=2, lr=1e-2, batch_size=4, progress=False)
    # 3 batches per epoch, S = 6 steps; the last batch of epoch e is step s = 3 (e + 1) - 1
    want = [1e-2 * (1 + math.cos(math.pi * s / 6)) / 2 for s in (2, 5)]
    assert [h["lr"] for h in tip.history] == pytest.approx(want, rel=1e-6)


def test_explain_given_a_list_and_a_length_the_model_cannot_read_are_one_line(tiny_bert, examples):
    """Before: explain([a, b]) failed deep inside tokenization; a max_seq_length above the model's positions
    failed at the first long input with an index error."""
    from helpers import retro_model, trainer

    model = retro_model(tiny_bert, demonstrations="none")
    trainer(model, tiny_bert).fit(examples)
    with pytest.raises(TypeError, match=r"explain takes one InputExample, got a list of 2"):
        model.explain(examples[:2])
    limit = model.plm.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"max_seq_length {limit + 1} is above what BertForMaskedLM can read: {limit}"):
        model.set_tokenization(max_seq_length=limit + 1)
    with pytest.raises(ValueError, match="above what"):
        trainer(model, tiny_bert, max_seq_length=limit + 1)
    model.set_tokenization(max_seq_length=limit)  # the limit itself is fine
