"""Retrievals that carry signal: scale-free scores, bounded weights, the loss gate, paired noise, baselines."""
import numpy as np
import pytest
import torch

import openprompt_retro as R
from openprompt_retro.prompt.batch import DEMO_KEY

from helpers import first_batch, retro_model, trainer


def _clustered_keys(seed=0, n=24, d=8):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    keys = rng.normal(size=(n, d)) + 3.0 * labels[:, None] * np.eye(d)[0]
    return keys.astype(np.float32), labels


# ------------------------------------------------------------------ scale-free scores
@pytest.mark.parametrize("c", [1e-3, 7.0, 400.0])
def test_zscore_knn_distribution_is_invariant_to_key_scale(c):
    keys, labels = _clustered_keys()
    queries = keys[:5] + 0.1
    a, b = R.KnowledgeStore(8, 2), R.KnowledgeStore(8, 2)
    a.build(keys, labels)
    b.build(keys * c, labels)
    pa = a.knn_distribution(queries, 8, 1.0, scale="zscore")
    pb = b.knn_distribution(queries * c, 8, 1.0, scale="zscore")
    np.testing.assert_allclose(pa, pb, atol=1e-5)
    np.testing.assert_allclose(pa.sum(1), 1.0, atol=1e-6)
    w = R.knn_weights(b.search(queries * c, 8).scores, 1.0, scale="zscore")
    assert np.all(w.max(1) < 0.8)  # not one-hot: with k = 8, z <= sqrt(7), so a weight stays below ~0.75


def test_raw_scores_on_large_norm_keys_are_one_hot_which_is_why_zscore_is_the_default():
    keys, labels = _clustered_keys()
    s = R.KnowledgeStore(8, 2)
    s.build(keys * 20.0, labels)  # mask keys of a real MLM have norms ~20
    raw = s.knn_distribution(keys[:5] * 20.0, 8, 1.0, exclude_ids=np.arange(5), scale="raw")
    assert np.all(raw.max(1) > 0.999)
    assert R.RetroConfig().knn_score_scale == "zscore"


def test_zscore_weights_hand_case():
    w = R.knn_weights(np.array([[3.0, 2.0, 1.0]]), temperature=1.0, scale="zscore")
    z = np.array([1.0, 0.0, -1.0]) / np.sqrt(2 / 3)
    np.testing.assert_allclose(w[0], np.exp(z) / np.exp(z).sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="scale must be one of"):
        R.knn_weights(np.zeros((1, 2)), 1.0, scale="cosine")


def test_model_p_knn_is_invariant_to_scaling_every_key(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="none", knn_k=4)
    tr = trainer(model, tiny_bert)
    loader, batch = first_batch(tr, examples)
    model.refresh_store(loader, progress=False)
    q = torch.from_numpy(np.asarray(model.store.keys[:3]).copy())
    p1 = model.knn_probs(q, k=4, temperature=1.0)
    model.store.build(np.asarray(model.store.keys) * 50.0, model.store.labels, model.store.guids, model.store.texts)
    p2 = model.knn_probs(q * 50.0, k=4, temperature=1.0)
    assert torch.allclose(p1, p2, atol=1e-5)


# ------------------------------------------------------------------ bounded weights and the gate
def test_loss_weights_are_bounded():
    p = torch.tensor([1e-9, 0.01, 0.5, 1.0])
    w = R.knn_loss_weights(p, "knn", beta=1.0, max_weight=3.0)
    assert float(w.max()) == pytest.approx(3.0) and float(w.min()) == pytest.approx(1.0)
    np.testing.assert_allclose(w[2].item(), 1 + np.log(2), rtol=1e-6)  # below the bound: unchanged
    assert R.knn_loss_weights(p, "knn", beta=5.0, max_weight=2.0).max() <= 2.0
    with pytest.raises(ValueError, match="max_loss_weight"):
        R.RetroConfig(max_loss_weight=0.5)


def test_knn_loss_is_off_while_the_store_is_at_chance(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="none", loss="knn", train_knn_k=3)
    tr = trainer(model, tiny_bert)
    loader, batch = first_batch(tr, examples)
    model.refresh_store(loader, progress=False)
    keys = np.asarray(model.store.keys)
    # labels alternating along a key direction the store cannot separate: leave-one-out kNN at/below chance
    model.store.build(keys, np.array([0, 1, 0, 1, 0, 1, 0, 1]), model.store.guids, model.store.texts)
    acc = model.lifecycle.update_gate()
    chance = 0.5
    assert model.knn_loss_active == (acc > chance)
    model.train()
    model.knn_loss_active = False
    model.loss(batch)
    assert torch.equal(model.last_loss_weights, torch.ones(len(examples)))
    model.knn_loss_active = True
    model.loss(batch)
    assert float(model.last_loss_weights.max()) <= model.config.max_loss_weight


# ------------------------------------------------------------------ protocol: steps, evaluations, paired noise
def test_step_based_training_evaluates_on_schedule(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="none", loss="ce")
    tr = trainer(model, tiny_bert, batch_size=2, max_steps=7, eval_every=3, tune_inference=False)
    history = tr.fit(examples, examples[:4])
    assert [h["step"] for h in history] == [3, 6, 7]
    for h in history:
        assert {"dev_accuracy", "loss_weight_mean", "loss_weight_max", "store_loo_accuracy"} <= set(h)


def _losses(tiny_dirs, examples, dev, tune):
    from openprompt.plms import load_plm

    torch.manual_seed(0)
    tiny = load_plm("bert", tiny_dirs["bert"])
    model = retro_model(tiny, demonstrations="none", loss="ce")
    tr = trainer(model, tiny, epochs=3, batch_size=2, tune_inference=tune)
    history = tr.fit(examples, dev)
    return [h["loss"] for h in history], [p.detach().clone() for p in model.plm.parameters()][:3]


def test_evaluations_and_refreshes_do_not_change_training(tiny_dirs, examples):
    """Adding dev evaluations and store refreshes draws nothing from the training stream."""
    bare, _ = _losses(tiny_dirs, examples, None, tune=False)            # no evaluation, no refresh
    evaluated, _ = _losses(tiny_dirs, examples, examples[:4], tune=False)  # + an evaluation per epoch
    refreshed, _ = _losses(tiny_dirs, examples, examples[:4], tune=True)   # + a store refresh per epoch
    assert bare == evaluated == refreshed


# ------------------------------------------------------------------ demonstrations: reliance
def test_permuted_demonstrations_are_the_next_class(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="neural")
    tr = trainer(model, tiny_bert)
    loader, batch = first_batch(tr, examples)
    model.refresh_store(loader, progress=False)
    model.eval()
    plain = model.prepare_batch(batch)[DEMO_KEY]
    model.demo_ablation = "permute"
    permuted = model.prepare_batch(batch)[DEMO_KEY]
    assert torch.equal(permuted[:, 1], plain[:, 0]) and torch.equal(permuted[:, 0], plain[:, 1])
    model.demo_ablation = None
    reliance = tr.demonstration_reliance(examples)
    assert reliance["accuracy"] == tr.evaluate(examples)["accuracy"]
    assert reliance["permuted_change"] == pytest.approx(reliance["permuted"] - reliance["accuracy"])
    calls = []
    evaluate = tr.evaluate
    tr.evaluate = lambda *a, **k: calls.append(1) or evaluate(*a, **k)
    again = tr.demonstration_reliance(examples, known_accuracy=reliance["accuracy"])
    assert again == reliance and len(calls) == 2  # permuted and removed only: the known accuracy is not redone


def test_demonstration_variants_norm_and_centre(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="neural", demo_norm="match", demo_center=True)
    tr = trainer(model, tiny_bert)
    loader, batch = first_batch(tr, examples)
    model.refresh_store(loader, progress=False)
    model.eval()
    demos = model.prepare_batch(batch)[DEMO_KEY]
    target = model.plm.get_input_embeddings().weight.norm(dim=-1).mean()
    assert torch.allclose(demos.norm(dim=-1), target.expand(demos.shape[:2]), rtol=1e-4)


def test_warm_start_hides_demonstrations_for_the_first_steps_only(tiny_bert, examples):
    """demo_warmup 0.5 over 6 steps: the PLM sees zero d_c in steps 0-2 and the real ones from step 3."""
    model = retro_model(tiny_bert, demonstrations="neural", demo_warmup=0.5)
    tr = trainer(model, tiny_bert, batch_size=2, max_steps=6, eval_every=6, tune_inference=False)
    seen = []
    shape = model._shape_demonstrations

    def spy(demos, hidden=False):
        out = shape(demos, hidden)
        if model.training:
            seen.append(bool(out.abs().sum() == 0))
        return out

    model._shape_demonstrations = spy
    tr.fit(examples)
    assert seen == [True, True, True, False, False, False]
    assert model.lifecycle.training_forwards == 6 and model.lifecycle.total_training_steps == 6
    with pytest.raises(ValueError, match="demo_warmup"):
        R.RetroConfig(demo_warmup=1.0)


# ------------------------------------------------------------------ the grid and the baselines
def test_mixture_grids():
    assert R.MixtureGrid().ks == (16,) and len(R.MixtureGrid().lambdas) == 4
    assert len(R.MixtureGrid.named("wide").lambdas) == 11
    assert R.MixtureGrid.named("fixed").lambdas == (0.5,)
    with pytest.raises(ValueError, match="mixture grid"):
        R.MixtureGrid.named("huge")


def test_linear_probe_picks_c_on_dev(tiny_bert, examples):
    from sklearn.linear_model import LogisticRegression

    from openprompt_retro.experiments.baselines import linear_probe, mean_pooled_embeddings

    plm, tok, _, _ = tiny_bert
    out = linear_probe(plm, tok, examples, examples[:4], examples[4:], cs=(0.01, 100.0))
    x = mean_pooled_embeddings(plm, tok, examples)
    y = np.array([e.label for e in examples])
    dev_accs = {c: LogisticRegression(C=c, max_iter=2000, random_state=0).fit(x, y).score(x[:4], y[:4])
                for c in (0.01, 100.0)}
    assert out["C"] == max(dev_accs, key=lambda c: (dev_accs[c], -c))
    assert out["dev_accuracy"] == dev_accs[out["C"]] and out["n_test"] == 4


def test_fine_tune_learns_its_training_set(tiny_bert, examples):
    from openprompt_retro.experiments.baselines import fine_tune

    plm, tok, _, _ = tiny_bert
    args = R.TrainingArgs(lr=3e-3, batch_size=4, max_steps=40, eval_every=10, progress=False, device="cpu")
    out = fine_tune(plm, tok, examples, examples, examples, 2, args)
    assert out["dev_accuracy"] == 1.0 and out["test_accuracy"] == 1.0
    assert [h["step"] for h in out["history"]][:2] == [10, 20]


def test_lambda_is_tuned_on_the_distribution_inference_uses(tiny_bert, examples):
    """The dev accuracy tune_inference reports is the accuracy the tuned model then gets on dev, and the
    one-pass fixed / PLM-only accuracies match the model's own predictions under those settings."""
    from openprompt_retro.experiments.runs import inference_settings_on

    torch.manual_seed(0)
    model = retro_model(tiny_bert, demonstrations="none", knn_lambda=0.0)
    tr = trainer(model, tiny_bert, epochs=2, lr=5e-3, ks=(2, 4), temperatures=(0.5, 1.0))
    tr.grid = R.MixtureGrid(lambdas=(0.0, 0.25, 0.5, 0.75, 1.0), ks=(2, 4), temperatures=(0.5, 1.0))
    dev = examples[2:]
    tr.fit(examples, dev)
    model.store.keys[:] *= 50.0  # large key norms: raw scores would make p_kNN one-hot, z-scores do not
    tr.model.store.build(model.store.keys, model.store.labels, model.store.guids, model.store.texts)
    scales = []
    search = model.store.knn_distribution

    def spy(*args, **kwargs):
        scales.append(kwargs.get("scale", args[4] if len(args) > 4 else "raw"))
        return search(*args, **kwargs)

    model.store.knn_distribution = spy
    tuned = tr.tune_inference(dev)
    assert scales and set(scales) == {"zscore"}  # the config's scale, as in the verbalizer
    assert tuned["dev_accuracy"] == tr.evaluate(dev)["accuracy"]
    loader = tr.loader(dev)
    settings = inference_settings_on(tr, loader)
    model.apply_config(knn_lambda=0.5, knn_k=16, knn_temperature=1.0)
    assert settings["fixed"] == tr.evaluate(loader)["accuracy"]
    model.apply_config(knn_lambda=0.0)
    assert settings["plm_only"] == tr.evaluate(loader)["accuracy"]
    model.apply_config(knn_lambda=1.0)
    assert settings["knn_only"] == tr.evaluate(loader)["accuracy"]
    assert 0.0 <= settings["knn_plm_agreement"] <= 1.0


# ------------------------------------------------------------------ issue 21: the benchmark's demonstration variants
def test_centring_subtracts_the_store_mean_and_nothing_else(tiny_bert, examples):
    """demo_center (the variant the grid is locked to): d_c centred = d_c uncentred - mean of the store keys,
    with no norm matching."""
    model = retro_model(tiny_bert, demonstrations="neural")
    tr = trainer(model, tiny_bert)
    loader, batch = first_batch(tr, examples)
    model.refresh_store(loader, progress=False)
    model.eval()
    with torch.no_grad():
        plain = model.prepare_batch(batch)[DEMO_KEY]
        model.apply_config(demo_center=True)
        centred = model.prepare_batch(batch)[DEMO_KEY]
    mean = torch.from_numpy(np.asarray(model.store.keys).mean(0))
    torch.testing.assert_close(centred, plain - mean)
    assert not torch.allclose(centred.norm(dim=-1), plain.norm(dim=-1))


def test_demo_dropout_drops_with_probability_p(tiny_bert, examples):
    """demo_dropout p: each example's whole demonstration set is zeroed with probability p (not 1 - p)."""
    model = retro_model(tiny_bert, demonstrations="neural", demo_dropout=0.2)
    model.train()
    demos = torch.ones(4000, 2, 8)
    out = model._shape_demonstrations(demos)
    dropped = (out.abs().sum(dim=(1, 2)) == 0).float()
    assert abs(float(dropped.mean()) - 0.2) < 0.03
    assert torch.equal(out[dropped == 0], demos[dropped == 0])  # the kept ones are untouched
