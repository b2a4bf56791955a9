"""Training and inference behaviours of RetroPromptForClassification / RetroTrainer: the best dev epoch
is kept (weights and store), the store follows the encoder, the tuned mixture is the one applied,
leave-one-out where it is asked for, and mixing in training only when asked for."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import openprompt_retro as R
from openprompt_retro.prompt.batch import EXCLUDE_KEY, QUERY_KEY
from openprompt_retro.prompt.trainer import linear_schedule

from helpers import first_batch, retro_model, trainer


# ------------------------------------------------------------------ fit
def test_fit_keeps_the_best_dev_epoch_weights_and_store_and_stops_on_patience(tiny_bert, examples):
    torch.manual_seed(0)
    model = retro_model(tiny_bert, demonstrations="none", loss="knn", knn_lambda=0.0)
    tr = trainer(model, tiny_bert, epochs=6, patience=2, lr=1e-2, tune_inference=False, shuffle=False)
    dev_accuracy = iter([0.5, 0.9, 0.9, 0.7, 0.95, 0.95])  # epoch 1 is best; a tie (epoch 2) keeps the earlier
    seen = []

    def scripted_evaluate(data):  # the state fit sees when it scores each epoch
        seen.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, model.store.keys.copy()))
        return {"accuracy": next(dev_accuracy), "n": 2}

    tr.evaluate = scripted_evaluate
    history = tr.fit(examples[:6], examples[6:])
    # epochs 2 and 3 do not improve on epoch 1: patience 2 stops after epoch 3
    assert [h["dev_accuracy"] for h in history] == [0.5, 0.9, 0.9, 0.7]
    best_state, best_keys = seen[1]
    last_state, last_keys = seen[3]
    assert any(not torch.equal(best_state[k], last_state[k]) for k in best_state)  # training moved on ...
    assert not np.allclose(best_keys, last_keys)
    for k, v in model.state_dict().items():  # ... and fit went back to epoch 1: weights and store
        assert torch.equal(v, best_state[k]), k
    np.testing.assert_array_equal(model.store.keys, best_keys)
    assert model.store.guids == [e.guid for e in examples[:6]]


def test_learning_rate_decays_linearly_to_zero_over_all_steps(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="none", loss="ce", knn_lambda=0.0)
    tr = trainer(model, tiny_bert, epochs=2, lr=1e-3, tune_inference=False)
    history = tr.fit(examples)  # 2 batches per epoch, S = 4 steps; last step of epoch e: s = 2 e + 1
    assert [h["lr"] for h in history] == pytest.approx([1e-3 * (4 - 1) / 4, 1e-3 * (4 - 3) / 4])


def test_store_holds_the_trained_encoders_keys_after_fit(tiny_bert, examples):
    torch.manual_seed(0)
    model = retro_model(tiny_bert, demonstrations="none", loss="knn")
    tr = trainer(model, tiny_bert, epochs=1, lr=1e-2, tune_inference=False)
    loader = tr.loader(examples)
    model.refresh_store(loader, progress=False)
    before = model.store.keys.copy()
    tr.fit(examples)
    now, _, _ = R.extract_keys(model, loader, progress=False)
    assert not np.allclose(now, before, atol=1e-3)  # the encoder moved
    np.testing.assert_allclose(model.store.keys, now, atol=1e-5)


def test_store_is_refreshed_between_epochs_without_an_evaluation(tiny_bert, examples):
    torch.manual_seed(0)
    model = retro_model(tiny_bert, demonstrations="none", loss="knn", knn_lambda=0.0)
    tr = trainer(model, tiny_bert, epochs=2, eval_every=4, lr=1e-2, tune_inference=False, shuffle=False)
    seen = []  # (store keys, the current encoder's keys) before each of the 4 steps (2 per epoch)
    step = tr._train_step

    def spy(run, batch):
        seen.append((model.store.keys.copy(), R.extract_keys(model, run.store_loader, progress=False)[0]))
        return step(run, batch)

    tr._train_step = spy
    tr.fit(examples)
    assert len(seen) == 4
    np.testing.assert_allclose(seen[0][0], seen[0][1], atol=1e-5)  # built before training
    np.testing.assert_array_equal(seen[1][0], seen[0][0])  # not within an epoch
    assert not np.allclose(seen[2][0], seen[0][0], atol=1e-3)  # after epoch 0: the encoder's new keys
    np.testing.assert_allclose(seen[2][0], seen[2][1], atol=1e-5)


def test_tuned_mixture_is_the_one_applied_and_reproduces_its_dev_accuracy(tiny_bert, examples):
    torch.manual_seed(0)
    model = retro_model(tiny_bert, demonstrations="none")
    tr = trainer(model, tiny_bert, ks=(2, 3), temperatures=(0.5, 2.0))
    tr.model.refresh_store(tr.loader(examples[:6]), progress=False)
    dev = examples[2:]
    tuned = tr.tune_inference(dev)
    p_plm, queries, labels = tr.collect(dev)
    want = R.select_mixture(p_plm, labels, lambda k, t: model.store.knn_distribution(queries, k, t),
                            tr.grid.lambdas, tr.grid.ks, tr.grid.temperatures)
    assert (tuned["knn_lambda"], tuned["knn_k"], tuned["knn_temperature"]) == (want.lam, want.k, want.temperature)
    c, m = model.config, model.mixing()
    assert (c.knn_lambda, c.knn_k, c.knn_temperature) == (m.lam, m.k, m.temperature) == (
        want.lam, want.k, want.temperature)
    assert m.store is model.knn_store  # the verbalizer gets all of it per call, and keeps no copy
    v = model.verbalizer
    assert v.store is None and (v.lam, v.k, v.temperature) == (0.5, 16, 1.0)
    assert tr.evaluate(dev)["accuracy"] == tuned["dev_accuracy"]


def test_fit_chooses_lambda_k_t_on_the_dev_split(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="none")
    tr = trainer(model, tiny_bert, epochs=1)
    collected = []
    collect = tr.collect
    tr.collect = lambda data: collected.append([e.guid for e in data.raw_dataset]) or collect(data)
    tr.fit(examples[:6], examples[6:])
    assert collected == [["ex6", "ex7"]]  # the dev examples only, never the training ones
    assert model.config.knn_lambda == tr.tuned["knn_lambda"]


def test_linear_schedule_warms_up_then_decays_to_zero():
    def rates(total, warmup_ratio):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = linear_schedule(opt, total, warmup_ratio)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert rates(4, 0.0) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    # 2 warm-up steps reach the full rate, then (total - s) / (total - warmup)
    assert rates(6, 1 / 3) == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


# ------------------------------------------------------------------ the kNN-guided loss
def test_loss_uses_the_training_k_and_temperature(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="none", loss="knn", knn_k=3, knn_temperature=1.0,
                        train_knn_k=2, train_knn_temperature=5.0, max_loss_weight=100.0, knn_loss_gate=False)
    loader, batch = first_batch(trainer(model, tiny_bert), examples)
    model.refresh_store(loader, progress=False)
    model.train()
    prepared = model.prepare_batch(batch)
    logits, query = model.forward_with_keys(prepared)
    p = model.store.knn_distribution(query, 2, 5.0, exclude_ids=np.arange(len(examples)),
                                     scale=model.config.knn_score_scale)
    p_gold = torch.from_numpy(p[np.arange(len(examples)), prepared["label"].numpy()])
    want = (F.cross_entropy(logits, prepared["label"], reduction="none") * (1 - torch.log(p_gold.clamp_min(1e-6)))).mean()
    assert torch.allclose(model.loss(batch), want, atol=1e-6)


# ------------------------------------------------------------------ inference
def test_exclude_self_in_eval_never_lets_an_entry_answer_for_itself(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="none", metric="cosine", knn_lambda=1.0, knn_k=1)
    loader, batch = first_batch(trainer(model, tiny_bert), examples)
    model.refresh_store(loader, progress=False)
    model.eval()
    own = np.arange(len(examples))
    with torch.no_grad():
        # by default a stored example is its own nearest neighbour (cosine 1): p_kNN is its own label
        assert [r["neighbours"][0]["id"] for r in model.explain_batch(batch, top=1)] == own.tolist()
        np.testing.assert_allclose(torch.exp(model(batch)).numpy(), np.eye(2)[model.store.labels], atol=1e-6)
        model.exclude_self_in_eval = True
        assert model.prepare_batch(batch)[EXCLUDE_KEY].tolist() == own.tolist()
        want = model.store.knn_distribution(model.store.keys, 1, 1.0, exclude_ids=own)
        np.testing.assert_allclose(torch.exp(model(batch)).numpy(), want, atol=1e-5)
        assert all(r["neighbours"][0]["id"] != i for i, r in enumerate(model.explain_batch(batch, top=1)))


def test_training_queries_are_the_stores_own_keys(tiny_bert, examples):
    """In training q(x) is x's store entry (refreshed this epoch), not a second, dropout-noisy pass."""
    plm = tiny_bert[0]
    model = retro_model(tiny_bert, loss="knn")
    tr = trainer(model, tiny_bert)
    loader = tr.loader(examples, batch_size=4)
    model.refresh_store(loader, progress=False)
    for m in plm.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    model.train()
    batches = iter(loader)
    next(batches)
    batch = next(batches)  # examples 4..7 of the training loader: a training forward
    torch.manual_seed(0)
    assert torch.equal(model.prepare_batch(batch)[QUERY_KEY], torch.from_numpy(model.store.keys[4:8]))


def test_plm_probabilities_for_tuning_leave_the_knn_mixture_out(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="none", knn_lambda=1.0)
    loader, batch = first_batch(trainer(model, tiny_bert), examples)
    model.refresh_store(loader, progress=False)
    model.eval()
    p_plm, _ = model.plm_probs_and_queries(batch)
    assert model.config.knn_lambda == 1.0 and model.mixing().lam == 1.0  # restored
    model.apply_config(knn_lambda=0.0)
    with torch.no_grad():
        assert torch.allclose(p_plm, torch.exp(model(batch)), atol=1e-6)


@pytest.mark.parametrize("mix_in_training", [False, True])
def test_mixing_in_training_only_when_asked(tiny_bert, examples, mix_in_training):
    model = retro_model(tiny_bert, demonstrations="none", knn_lambda=0.4, knn_k=3, knn_temperature=2.0)
    loader, batch = first_batch(trainer(model, tiny_bert), examples)
    model.refresh_store(loader, progress=False)
    v, scale = model.verbalizer, model.config.knn_score_scale
    # the verbalizer's own rule, as it runs when OpenPrompt code calls it directly: its own settings (the model
    # keeps none on it: its forwards hand it a Mixture per call)
    v.store, v.lam, v.k, v.temperature, v.scale = model.knn_store, 0.4, 3, 2.0, scale
    v.mix_in_training = mix_in_training
    model.train()
    prepared = model.prepare_batch(batch)  # a training forward: batch of the store's loader, gradients on
    outputs, mask_batch = model._main_pass(prepared)
    at_mask = [model.extract_at_mask(o, mask_batch) for o in v.gather_outputs(outputs)]
    p_plm = torch.softmax(v.base.process_outputs(at_mask[0], batch=prepared), -1).detach()
    query = v.key_head(at_mask[1]).detach()
    train_out = torch.exp(v.process_outputs(at_mask, batch=prepared)).detach()
    own = np.arange(len(examples))  # in training the own entry is left out of p_kNN
    p_knn = torch.from_numpy(model.store.knn_distribution(query, 3, 2.0, exclude_ids=own, scale=scale))
    mixed = 0.4 * p_knn + 0.6 * p_plm
    assert torch.allclose(train_out, mixed if mix_in_training else p_plm, atol=1e-6)
    assert not torch.allclose(mixed, p_plm, atol=1e-3)
    model.eval()  # an inference forward always mixes
    with torch.no_grad():
        p_knn_eval = torch.from_numpy(model.store.knn_distribution(query, 3, 2.0, scale=scale))
        eval_batch = model.prepare_batch(batch)
        assert torch.allclose(torch.exp(v.process_outputs(at_mask, batch=eval_batch)),
                              0.4 * p_knn_eval + 0.6 * p_plm, atol=1e-6)


# ------------------------------------------------------------------ prediction on the model (issue 21)
def test_a_reloaded_model_predicts_explains_and_adds_examples_without_a_trainer(tiny_bert, examples, tmp_path):
    from openprompt.data_utils import InputExample

    model = retro_model(tiny_bert, loss="knn")
    tr = trainer(model, tiny_bert, max_steps=4, eval_every=4)
    tr.fit(examples[:6], examples[6:])
    want = tr.predict_proba(examples)
    tr.save(str(tmp_path / "run"), save_plm=True)
    loaded = R.RetroPromptForClassification.from_pretrained(str(tmp_path / "run"))
    assert loaded.max_seq_length == 64 and loaded.wrapper_class is tiny_bert[3]
    np.testing.assert_array_equal(loaded.predict_proba(examples), want)
    np.testing.assert_array_equal(loaded.predict(examples), want.argmax(-1))
    assert loaded.explain(examples[0], top=2)["prediction"] == int(want[0].argmax())
    ids = loaded.add_examples([InputExample(guid="new", text_a="brilliant", label=1)])
    assert ids.tolist() == [6] and loaded.store.guids[6] == "new"
    # a model built by hand knows OpenPrompt's wrapper class for its PLM
    assert retro_model(tiny_bert).wrapper_class is tiny_bert[3]


def test_a_state_dict_checkpoint_carries_the_tuned_mixture(tiny_bert, tiny_dirs, examples):
    """Before, state_dict() held weights and store but not the dev-tuned lambda or read-out temperature: a fresh
    model loaded from it mixed at its own defaults and predicted differently."""
    from openprompt.plms import load_plm

    from helpers import retro_model, trainer

    torch.manual_seed(0)
    config = dict(key_encoder="frozen-mean", knn_readout="class-mean", store_guard_alpha=None)
    model = retro_model(tiny_bert, **config)
    tr = trainer(model, tiny_bert, epochs=2, lr=1e-2)
    tr.fit(examples, examples)
    model.apply_config(knn_lambda=0.7, class_mean_temperature=0.2, plm_temperature=2.0)  # as if dev chose them
    before = model.predict_proba(examples)
    plm, tok, cfg, wrapper = load_plm("bert", tiny_dirs["bert"])
    fresh = retro_model((plm, tok, cfg, wrapper), **config)
    fresh.set_tokenization(wrapper, model.max_seq_length)
    fresh.load_state_dict(model.state_dict())
    assert (fresh.config.knn_lambda, fresh.config.class_mean_temperature, fresh.config.plm_temperature) == \
        (0.7, 0.2, 2.0)
    np.testing.assert_array_equal(fresh.predict_proba(examples), before)
    other = retro_model((plm, tok, cfg, wrapper), key_encoder="mask")  # built otherwise: refused, named
    with pytest.raises(RuntimeError, match="built with key_encoder='frozen-mean'"):
        other.load_state_dict(model.state_dict())


def test_the_progress_bar_shows_the_learning_rate_as_it_is(tiny_bert, examples, monkeypatch):
    """Before, the bar rounded every number to 4 decimals: lr 5e-05 showed as lr=0."""
    from openprompt_retro.prompt import trainer as trainer_module
    from openprompt_retro.prompt.trainer import progress_postfix

    assert progress_postfix({"lr": 5e-05, "loss": 0.693147, "step": 3, "dev_accuracy": 0.5}) == \
        {"lr": "5e-05", "loss": "0.6931", "dev_accuracy": "0.5"}
    shown = []
    real = trainer_module.tqdm

    class Bar(real):
        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            shown.append(dict(ordered_dict or {}))
            return super().set_postfix(ordered_dict, refresh, **kwargs)

    monkeypatch.setattr(trainer_module, "tqdm", Bar)
    model = retro_model(tiny_bert)
    tr = trainer(model, tiny_bert, epochs=1, lr=5e-5, progress=True)
    tr.fit(examples, examples)
    assert shown and all(float(p["lr"]) > 0 for p in shown)
