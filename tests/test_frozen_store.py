"""The store keyed by a frozen encoder (RetroConfig.key_encoder, knn_readout, demo_retrieval, plm_temperature)
wired through RetroPromptForClassification: every number is checked against the formula computed by hand
from an independently loaded pre-trained PLM."""
import math

import numpy as np
import pytest
import torch

import openprompt_retro as R
from openprompt_retro.core.knn import PLM_TEMPERATURES, MixtureGrid, choose_temperature
from openprompt_retro.core.readout import CLASS_MEAN_TEMPERATURES, class_mean_distribution, class_mean_scores
from openprompt_retro.prompt.batch import DEMO_KEY, EXAMPLE_KEY
from openprompt_retro.prompt.key_encoders import FrozenMeanEncoder, SentenceEncoder
from openprompt_retro.prompt.saved_run import SavedRunError

from helpers import WORDS, base_template, base_verbalizer, first_batch, retro_model, trainer

FROZEN = {"key_encoder": "frozen-mean", "knn_readout": "class-mean"}


def frozen_model(tiny, demonstrations="none", **config):
    return retro_model(tiny, demonstrations=demonstrations, **{**FROZEN, **config})


def pretrained_keys(tiny_dirs, examples):
    """Keys of a frozen encoder over a PLM loaded afresh from disk (the pre-trained weights)."""
    from openprompt.plms import load_plm

    plm, tok, _, _ = load_plm("bert", tiny_dirs["bert"])
    return FrozenMeanEncoder(plm, tok).encode(examples)


def labels_of(examples):
    return np.array([e.label for e in examples])


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("fields, message", [
    ({"key_encoder": "sentence"}, "key_encoder_path"),
    ({"key_encoder_path": "some/folder"}, "key_encoder_path"),
    ({"key_encoder": "mask", "demo_retrieval": "key-encoder"}, "needs key_encoder='frozen-mean', 'adapted' or 'sentence'"),
    ({"knn_readout": "mean"}, "knn_readout must be one of"),
    ({"key_encoder": "frozen"}, "key_encoder must be one of"),
    ({"class_mean_temperature": 0.0}, "class_mean_temperature"),
    ({"plm_temperature": -1.0}, "plm_temperature"),
])
def test_bad_key_encoder_settings_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        R.RetroConfig(**fields)


def test_the_key_encoder_is_fixed_when_the_model_is_built(tiny_bert):
    model = frozen_model(tiny_bert)
    with pytest.raises(ValueError, match="key_encoder is fixed when the model is built"):
        model.apply_config(key_encoder="mask")
    assert model.config.key_encoder == "frozen-mean"
    model.apply_config(knn_readout="topk")  # the read-out may change: it reads the same store
    assert model.mixing().readout == "topk"


def test_named_grids_take_the_plm_temperature_suffix():
    assert MixtureGrid.named("fine-tplm").plm_temperatures == PLM_TEMPERATURES
    assert MixtureGrid.named("fine").plm_temperatures == (1.0,)
    assert MixtureGrid.named("fine").lambdas[-1] == 1.0
    with pytest.raises(ValueError, match="optionally suffixed '-tplm'"):
        MixtureGrid.named("fine-tplm-tplm")


# ------------------------------------------------------------------ the store and its keys
def test_training_never_changes_the_frozen_keys_and_no_mask_store_is_kept(tiny_bert, tiny_dirs, examples):
    torch.manual_seed(0)
    model = frozen_model(tiny_bert, loss="knn", knn_loss_gate=False)
    plm_before = {n: p.detach().clone() for n, p in model.plm.named_parameters()}
    tr = trainer(model, tiny_bert, epochs=3, lr=1e-2, tune_inference=False)
    tr.fit(examples, examples)
    assert any(not torch.equal(p, plm_before[n]) for n, p in model.plm.named_parameters())  # the PLM did train
    np.testing.assert_allclose(model.knn_store.keys, pretrained_keys(tiny_dirs, examples), atol=1e-6)
    np.testing.assert_array_equal(model.knn_store.labels, labels_of(examples))
    assert len(model.store) == 0  # no neural demonstrations: the [MASK] store is never built
    encoder_ptrs = {p.data_ptr() for p in model.key_encoder.model.parameters()}
    assert encoder_ptrs.isdisjoint(p.data_ptr() for p in model.parameters())  # out of the optimizer
    assert not any(p.requires_grad for p in model.key_encoder.model.parameters())
    state = model.state_dict()
    assert "retro_key_store.keys" in state and not any("key_encoder" in k for k in state)


def test_class_mean_inference_is_the_formula_on_pre_trained_keys(tiny_bert, tiny_dirs, examples):
    model = frozen_model(tiny_bert, knn_lambda=1.0, class_mean_temperature=0.1)
    tr = trainer(model, tiny_bert)
    train, test = examples[:6], examples[6:] + examples[:2]
    model.attach(tr.loader(train))
    keys, queries = pretrained_keys(tiny_dirs, train), pretrained_keys(tiny_dirs, test)
    p_cm = class_mean_distribution(queries, keys, labels_of(train), 2, 0.1)
    np.testing.assert_allclose(model.predict_proba(test), p_cm, atol=1e-5)
    model.apply_config(knn_lambda=0.0)
    p_plm = model.predict_proba(test)
    model.apply_config(knn_lambda=0.3)
    np.testing.assert_allclose(model.predict_proba(test), 0.3 * p_cm + 0.7 * p_plm, atol=1e-5)


def test_a_loaders_first_batch_encodes_its_whole_dataset_once(tiny_bert, tiny_dirs, examples):
    """Predicting batch by batch, the key encoder runs once, over every example of the loader (sorted by
    length, so with little padding), and gives the keys each text has alone."""
    model = frozen_model(tiny_bert, knn_lambda=1.0, class_mean_temperature=0.1)
    tr = trainer(model, tiny_bert)
    train, test = examples[:4], examples[4:] + examples[:2]
    model.attach(tr.loader(train))
    encoder, calls = model.key_encoder, []
    encode_texts = encoder.encode_texts
    encoder.encode_texts = lambda a, b=None: calls.append(list(a)) or encode_texts(a, b)
    probs = model.predict_proba(model.loader(test, batch_size=2))
    assert calls == [[e.text_a for e in examples[4:]]]  # the training texts were cached when the store was built
    keys = pretrained_keys(tiny_dirs, train)
    one_by_one = np.concatenate([pretrained_keys(tiny_dirs, [e]) for e in test])
    np.testing.assert_allclose(probs, class_mean_distribution(one_by_one, keys, labels_of(train), 2, 0.1),
                               atol=1e-5)


def test_plm_temperature_rescales_the_plm_distribution(tiny_bert, examples):
    model = frozen_model(tiny_bert, knn_lambda=0.0)
    model.attach(trainer(model, tiny_bert).loader(examples))
    p1 = model.predict_proba(examples).astype(np.float64)
    model.apply_config(plm_temperature=2.0)
    scaled = np.exp(np.log(p1) / 2.0)
    np.testing.assert_allclose(model.predict_proba(examples), scaled / scaled.sum(1, keepdims=True), atol=1e-5)


def test_knn_loss_weights_come_from_the_frozen_store_leaving_each_example_out(tiny_bert, tiny_dirs, examples):
    model = frozen_model(tiny_bert, loss="knn", loss_beta=1.0, max_loss_weight=None, knn_loss_gate=False,
                         class_mean_temperature=0.05)
    tr = trainer(model, tiny_bert)
    loader, batch = first_batch(tr, examples)
    model.attach(loader)
    model.train()
    model.loss(batch)
    keys, y = pretrained_keys(tiny_dirs, examples), labels_of(examples)
    p = class_mean_distribution(keys, keys, y, 2, 0.05, exclude_ids=np.arange(len(y)))
    want = 1.0 - np.log(p[np.arange(len(y)), y])
    np.testing.assert_allclose(model.last_loss_weights.numpy(), want, rtol=1e-5)
    assert model.store_loo_accuracy == pytest.approx(float((p.argmax(1) == y).mean()))


def test_tuning_chooses_the_class_mean_temperature_by_dev_log_loss(tiny_bert, tiny_dirs, examples):
    model = frozen_model(tiny_bert)
    tr = trainer(model, tiny_bert)
    train, dev = examples[:6], examples[6:] + examples[:2]
    model.attach(tr.loader(train))
    tuned = tr.tune_inference(dev)
    scores = class_mean_scores(pretrained_keys(tiny_dirs, dev), pretrained_keys(tiny_dirs, train),
                               labels_of(train), 2)
    want = choose_temperature(scores, labels_of(dev), CLASS_MEAN_TEMPERATURES).temperature
    assert tuned["class_mean_temperature"] == model.config.class_mean_temperature == want


# ------------------------------------------------------------------ demonstrations chosen by frozen keys
def test_demonstrations_can_average_other_vectors_than_the_keys_that_chose_them():
    s = R.KnowledgeStore(2, 2)
    s.add([[1, 0], [2, 0], [0, 1], [0, 3]], [0, 0, 1, 1])
    values = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    d = R.neural_demonstrations(s, np.array([[1.0, 1.0]]), m=2, values=values).numpy()
    z = 1 / math.sqrt(1 + 1e-6)
    w_hi = math.exp(z) / (math.exp(z) + math.exp(-z))  # the nearer of the two entries of each class
    np.testing.assert_allclose(d[0, 0], w_hi * values[1] + (1 - w_hi) * values[0], rtol=1e-5)
    np.testing.assert_allclose(d[0, 1], w_hi * values[3] + (1 - w_hi) * values[2], rtol=1e-5)
    with pytest.raises(ValueError, match="values has 3 rows for a store of 4 entries"):
        R.neural_demonstrations(s, np.array([[1.0, 1.0]]), m=2, values=values[:3])


def test_key_encoder_demonstrations_are_the_mask_states_of_frozen_neighbours(tiny_bert, tiny_dirs, examples):
    model = frozen_model(tiny_bert, demonstrations="neural", demo_retrieval="key-encoder", knn_lambda=0.5)
    tr = trainer(model, tiny_bert)
    loader, _ = first_batch(tr, examples)
    model.attach(loader)
    queries = examples[:3]
    q_loader, q_batch = first_batch(tr, queries)
    model.eval()
    with torch.no_grad():
        demos = model.prepare_batch(q_batch)[DEMO_KEY]
    want = R.neural_demonstrations(model.knn_store, pretrained_keys(tiny_dirs, queries), model.config.demo_topk,
                                   values=model.store.keys)
    np.testing.assert_allclose(demos.numpy(), want.numpy(), atol=1e-5)
    assert len(model.store) == len(model.knn_store) == len(examples)
    mask_drawn = R.neural_demonstrations(model.store, model.store.keys[:3], model.config.demo_topk)
    assert not np.allclose(demos.numpy(), mask_drawn.numpy(), atol=1e-4)  # the frozen keys chose other neighbours


def test_a_batch_that_cannot_be_traced_to_its_texts_is_refused(tiny_bert, examples):
    model = frozen_model(tiny_bert, knn_lambda=0.5)
    tr = trainer(model, tiny_bert)
    loader, batch = first_batch(tr, examples)
    model.attach(loader)
    batch[EXAMPLE_KEY] = None
    model.eval()
    with pytest.raises(ValueError, match="reads each example's raw text"):
        model(batch)


def test_a_sentence_encoder_given_by_path_builds_the_keys(tiny_bert, tiny_dirs, examples):
    model = retro_model(tiny_bert, demonstrations="none", key_encoder="sentence", key_encoder_path=tiny_dirs["bert"],
                        knn_readout="topk")
    model.attach(trainer(model, tiny_bert).loader(examples))
    np.testing.assert_allclose(model.knn_store.keys, SentenceEncoder(tiny_dirs["bert"]).encode(examples), atol=1e-6)
    assert model.knn_store.built_by["key_encoder"] == "sentence"
    assert model.knn_store.built_by["source"] == tiny_dirs["bert"]


# ------------------------------------------------------------------ saved runs
@pytest.mark.parametrize("save_plm", [True, False])
def test_a_saved_frozen_run_rebuilds_bit_identical(tiny_bert, tiny_dirs, examples, tmp_path, save_plm):
    torch.manual_seed(0)
    model = frozen_model(tiny_bert, demonstrations="neural", demo_retrieval="key-encoder", loss="knn")
    tr = trainer(model, tiny_bert, epochs=2, lr=1e-2)
    tr.fit(examples, examples)
    before = model.predict_proba(examples)
    model.save(str(tmp_path / "run"), save_plm=save_plm)
    again = R.RetroPromptForClassification.from_pretrained(str(tmp_path / "run"),
                                                           plm_path=None if save_plm else tiny_dirs["bert"])
    np.testing.assert_array_equal(again.predict_proba(examples), before)
    assert again.key_encoder.fingerprint() == model.key_encoder.fingerprint()


def test_a_frozen_run_is_refused_by_another_key_encoder(tiny_bert, tiny_dirs, examples, tmp_path):
    from openprompt.plms import load_plm

    from openprompt_retro.testing import make_tiny_mlm

    model = frozen_model(tiny_bert)
    model.attach(trainer(model, tiny_bert).loader(examples))
    model.save(str(tmp_path / "run"))
    mask_model = retro_model(tiny_bert, demonstrations="none")
    with pytest.raises(SavedRunError, match="key encoder differs: saved .*frozen-mean.*model 'mask'"):
        mask_model.load(str(tmp_path / "run"))
    other = load_plm("bert", make_tiny_mlm("bert", str(tmp_path / "other"), seed=1))  # other pre-trained weights
    with pytest.raises(SavedRunError, match="key encoder differs: .*weights_sha256"):
        frozen_model(other).load(str(tmp_path / "run"))


# ------------------------------------------------------------------ LM-BFF text demonstrations by the key encoder
def test_text_demonstrations_are_chosen_by_the_key_encoder(tiny_bert, tiny_dirs, examples):
    pool = examples
    model = retro_model(tiny_bert, demonstrations="text", pool=pool, key_encoder="frozen-mean")
    retriever = model.template.text_retriever
    assert isinstance(retriever, R.EncoderDemoRetriever)
    keys = pretrained_keys(tiny_dirs, pool)
    query = examples[0]
    sims = keys @ keys[0]
    sims[0] = -np.inf  # the query itself is never its own demonstration
    y = labels_of(pool)
    want = [(c, pool[int(np.argmax(np.where(y == c, sims, -np.inf)))]) for c in (0, 1)]
    assert retriever(query) == want
    assert isinstance(retro_model(tiny_bert, demonstrations="text", pool=pool).template.text_retriever,
                      R.TfidfDemoRetriever)  # [MASK] keys: TF-IDF, as before


def test_a_loader_built_before_the_model_is_warned_that_it_keeps_tfidf_demonstrations(tiny_bert, examples):
    """OpenPrompt wraps a loader's examples when it is built: one built before the model chose the key encoder
    holds TF-IDF demonstrations, and the user hears of it; building the loaders after the model is silent."""
    import warnings

    from openprompt import PromptDataLoader

    plm, tok, _, wrapper = tiny_bert
    template = R.RetroTemplate(base_template("manual", plm, tok), WORDS, demonstrations="text", plm=plm,
                               text_pool=examples)
    PromptDataLoader(examples[:2], template, tokenizer=tok, tokenizer_wrapper_class=wrapper, max_seq_length=64)
    config = R.RetroConfig(key_encoder="frozen-mean", demo_topk=2, knn_k=3, train_knn_k=3)
    with pytest.warns(UserWarning, match="PromptDataLoaders built before this keep the TF-IDF"):
        R.RetroPromptForClassification(plm, template, base_verbalizer("manual", plm, tok), config=config)
    assert isinstance(template.text_retriever, R.EncoderDemoRetriever)

    template = R.RetroTemplate(base_template("manual", plm, tok), WORDS, demonstrations="text", plm=plm,
                               text_pool=examples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        R.RetroPromptForClassification(plm, template, base_verbalizer("manual", plm, tok), config=config)
        PromptDataLoader(examples[:2], template, tokenizer=tok, tokenizer_wrapper_class=wrapper, max_seq_length=64)


def test_a_loader_waiting_for_the_label_words_gets_the_key_encoders_demonstrations(tiny_bert, examples):
    """A loader built before the model, with a template that has no label words yet, waits for them and is
    tokenized when the model hands them over: with the key encoder's demonstrations, as a loader built after
    the model, and without a warning."""
    import warnings

    from openprompt import PromptDataLoader

    plm, tok, _, wrapper = tiny_bert
    config = R.RetroConfig(key_encoder="frozen-mean", demo_topk=2, knn_k=3, train_knn_k=3)

    def ids_of(loader):
        return [f["input_ids"].tolist() for f in loader.tensor_dataset]

    def build(label_words):
        template = R.RetroTemplate(base_template("manual", plm, tok), label_words, demonstrations="text",
                                   plm=plm, text_pool=examples)
        return template, lambda: PromptDataLoader(examples, template, tokenizer=tok, tokenizer_wrapper_class=wrapper,
                                                  max_seq_length=64)

    template, loader = build(None)
    waiting = loader()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        R.RetroPromptForClassification(plm, template, base_verbalizer("manual", plm, tok), config=config)
    after = loader()
    assert isinstance(template.text_retriever, R.EncoderDemoRetriever)
    assert ids_of(waiting) == ids_of(after)
    _, tfidf_loader = build(WORDS)  # no model: TF-IDF chooses, and differently on these examples
    assert ids_of(tfidf_loader()) != ids_of(after)


# ------------------------------------------------------------------ big-pool
def test_big_pool_adds_the_pool_to_the_store_the_readout_reads(tmp_path):
    """``big-pool`` with the default store: the pool examples get frozen keys beside the 16-shot ones, each
    store's class-mean temperature is tuned on dev for that store, and each store stands beside a linear probe
    trained on its examples."""
    import json
    import os

    from openprompt_retro.cli import main

    data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "text")
    if not os.path.isdir(os.path.join(data, "pools")):
        pytest.skip("../shared data not present")
    main(["big-pool", "--model", "tiny-bert", "--task", "SST-2", "--seed", "13", "--max-steps", "2",
          "--eval-every", "2", "--pool-size", "40", "--no-progress", "--data-root", data, "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "big_pool.json").read_text())["rows"]
    assert [r["entries"] for r in rows] == [32, 72]  # 16 per class, then the 40 pool examples
    assert all(r["knn_readout"] == "class-mean" and r["class_mean_temperature"] in CLASS_MEAN_TEMPERATURES
               for r in rows)
    table = (tmp_path / "big_pool.md").read_text()
    assert f"class means, T {rows[1]['class_mean_temperature']}" in table
    # beside each store, a linear probe on its examples: on the 16-shot store, the grid's linear-probe baseline
    main(["run", "--model", "tiny-bert", "--tasks", "SST-2", "--seeds", "13", "--methods", "linear-probe",
          "--no-progress", "--data-root", data, "--out", str(tmp_path / "grid")])
    baseline = json.loads((tmp_path / "grid" / "results.jsonl").read_text().splitlines()[0])
    assert rows[0]["linear_probe_test_accuracy"] == baseline["test_accuracy"]
    assert rows[0]["linear_probe_C"] == baseline["settings"]["C"]


def test_a_sentence_encoder_is_known_by_its_weights_and_a_moved_one_can_be_pointed_at(tiny_bert, tiny_dirs, examples,
                                                                                      tmp_path):
    """Before: two loads of one folder had different fingerprints (a random pooler), so a sentence-key run was
    always refused on reload; a moved folder gave "Repo id must be in the form ..." with no way to point at its
    new place; the same weights at another path were refused by a path check."""
    import shutil

    assert SentenceEncoder(tiny_dirs["bert"]).fingerprint() == SentenceEncoder(tiny_dirs["bert"]).fingerprint()
    place = tmp_path / "encoder"
    shutil.copytree(tiny_dirs["bert"], place)
    model = retro_model(tiny_bert, demonstrations="none", key_encoder="sentence", key_encoder_path=str(place),
                        knn_readout="class-mean", store_guard_alpha=None)
    tr = trainer(model, tiny_bert, epochs=1, lr=1e-2)
    tr.fit(examples, examples)
    before = model.predict_proba(examples)
    model.save(str(tmp_path / "run"))
    np.testing.assert_array_equal(
        R.RetroPromptForClassification.from_pretrained(str(tmp_path / "run"), plm_path=tiny_dirs["bert"])
        .predict_proba(examples), before)
    moved = tmp_path / "moved"
    place.rename(moved)
    with pytest.raises(ValueError, match=r"no sentence encoder folder at .*key_encoder_path="):
        R.RetroPromptForClassification.from_pretrained(str(tmp_path / "run"), plm_path=tiny_dirs["bert"])
    again = R.RetroPromptForClassification.from_pretrained(str(tmp_path / "run"), plm_path=tiny_dirs["bert"],
                                                           key_encoder_path=str(moved))
    np.testing.assert_array_equal(again.predict_proba(examples), before)
    assert again.config.key_encoder_path == str(moved)
    # other weights at the new place are refused (by the key store's record of them), whatever the path says
    other = tmp_path / "other"
    shutil.copytree(moved, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    first = sorted(k for k in weights if "embeddings" in k)[0]
    weights[first] = weights[first] + 1.0
    save_file(weights, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match="weights_sha256"):
        R.RetroPromptForClassification.from_pretrained(str(tmp_path / "run"), plm_path=tiny_dirs["bert"],
                                                       key_encoder_path=str(other))


def test_a_model_built_on_an_already_trained_plm_says_so_and_its_run_rebuilds(tiny_bert, tiny_dirs, examples,
                                                                             tmp_path):
    """A notebook re-running its cells builds the model on a PLM trained before: the frozen copy is of trained
    weights. Before, nothing said so and the run saved without plm/ could not be rebuilt (fingerprint differs)."""
    plm, tok, _, _ = tiny_bert
    with torch.no_grad():
        next(plm.base_model.parameters()).add_(0.5)  # as if an earlier cell had trained it
    with pytest.warns(UserWarning, match="differs from its checkpoint .* trained already"):
        model = frozen_model(tiny_bert, store_guard_alpha=None)
    tr = trainer(model, tiny_bert, epochs=1, lr=1e-2)
    tr.fit(examples, examples)
    before = model.predict_proba(examples)
    model.save(str(tmp_path / "run"))
    assert (tmp_path / "run" / "key_encoder.safetensors").is_file()
    again = R.RetroPromptForClassification.from_pretrained(str(tmp_path / "run"), plm_path=tiny_dirs["bert"])
    np.testing.assert_array_equal(again.predict_proba(examples), before)
    again.save(str(tmp_path / "run2"))  # and again from the rebuilt one
    assert (tmp_path / "run2" / "key_encoder.safetensors").is_file()


def test_a_model_built_on_the_pretrained_plm_saves_no_copy(tiny_bert, examples, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = frozen_model(tiny_bert)
    assert model.key_encoder.trained_copy is False
    model.attach(trainer(model, tiny_bert).loader(examples))
    model.save(str(tmp_path / "run"))
    assert not (tmp_path / "run" / "key_encoder.safetensors").exists()


def test_a_run_whose_two_stores_do_not_match_is_refused_on_load(tiny_bert, tiny_dirs, examples, tmp_path):
    """A format-1 run (before every file had a checksum) could hold a [MASK] store and a key store of different
    entries: before, it loaded and failed at the first prediction."""
    import json

    from openprompt_retro.core.store import KnowledgeStore, sha256_file

    model = frozen_model(tiny_bert, demonstrations="neural")
    model.attach(trainer(model, tiny_bert).loader(examples))
    run = tmp_path / "run"
    model.save(str(run))
    key_store = KnowledgeStore.load(str(run / "key_store"))
    short = KnowledgeStore(key_store.dim, 2, built_by=key_store.built_by)
    short.build(key_store.keys[:-1], key_store.labels[:-1])
    short.save(str(run / "key_store"))
    meta = json.loads((run / "run.json").read_text())
    for name in list(meta["checksums"]):  # as if no checksum had guarded them
        meta["checksums"][name] = sha256_file(str(run / name))
    (run / "run.json").write_text(json.dumps(meta))
    with pytest.raises(SavedRunError, match="store of 8 entries and a key store of 7"):
        R.RetroPromptForClassification.from_pretrained(str(run), plm_path=tiny_dirs["bert"])
