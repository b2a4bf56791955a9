import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import openprompt_retro as R
from openprompt_retro.prompt.batch import DEMO_KEY, EXCLUDE_KEY, QUERY_KEY, SEGMENT_KEY, SLOT_KEY

from helpers import WORDS, base_template, base_verbalizer, first_batch, retro_model, trainer

TEMPLATES = ["manual", "mixed", "soft"]


# ------------------------------------------------------------------ the math
def test_demonstration_weights_hand_case():
    w = R.demonstration_weights(np.array([[[1.0, 2.0, 3.0], [5.0, -np.inf, -np.inf]]]))
    z = np.array([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3 + 1e-6)  # (s - mean) / std
    np.testing.assert_allclose(w[0, 0], np.exp(z) / np.exp(z).sum(), rtol=1e-5)
    np.testing.assert_allclose(w[0, 1], [1.0, 0.0, 0.0])  # one neighbour takes all the weight


def test_neural_demonstration_is_weighted_sum_of_class_keys():
    s = R.KnowledgeStore(2, 2)
    s.add([[1, 0], [2, 0], [0, 1], [0, 3]], [0, 0, 1, 1])
    d = R.neural_demonstrations(s, np.array([[1.0, 1.0]]), m=2).numpy()
    # class 0: scores 2 (id 1), 1 (id 0) -> z = +1, -1 -> weights e/(e+1/e), ...
    w_hi = math.exp(1 / math.sqrt(1 + 1e-6)) / (math.exp(1 / math.sqrt(1 + 1e-6)) + math.exp(-1 / math.sqrt(1 + 1e-6)))
    np.testing.assert_allclose(d[0, 0], [w_hi * 2 + (1 - w_hi) * 1, 0.0], rtol=1e-5)
    np.testing.assert_allclose(d[0, 1], [0.0, w_hi * 3 + (1 - w_hi) * 1], rtol=1e-5)


def test_beta_zero_is_plain_cross_entropy_and_weights_match_hand_case():
    logits = torch.tensor([[2.0, 0.5], [0.1, 0.3], [1.0, -1.0]])
    y = torch.tensor([0, 1, 1])
    p = torch.tensor([0.5, 0.25, 1.0])
    assert torch.allclose(R.knn_guided_loss(logits, y, p, "knn", beta=0.0), F.cross_entropy(logits, y))
    ce = F.cross_entropy(logits, y, reduction="none")
    want = (ce * torch.tensor([1 + math.log(2), 1 + math.log(4), 1.0])).mean()
    assert torch.allclose(R.knn_guided_loss(logits, y, p, "knn", beta=1.0), want)
    focal = (ce * torch.tensor([0.5 ** 2, 0.75 ** 2, 0.0])).mean()
    assert torch.allclose(R.knn_guided_loss(logits, y, p, "focal", gamma=2.0), focal)


def test_gradients_flow_through_cross_entropy_only():
    logits = torch.tensor([[2.0, 0.5], [0.1, 0.3]], requires_grad=True)
    p = torch.tensor([0.5, 0.25], requires_grad=True)
    y = torch.tensor([0, 1])
    R.knn_guided_loss(logits, y, p, "knn", beta=1.0).backward()
    assert p.grad is None  # p_kNN is a constant
    w = torch.tensor([1 + math.log(2), 1 + math.log(4)])
    logits2 = logits.detach().clone().requires_grad_(True)
    (F.cross_entropy(logits2, y, reduction="none") * w).mean().backward()
    assert torch.allclose(logits.grad, logits2.grad)


def test_model_loss_gradient_equals_weighted_ce_gradient(tiny_bert, examples):
    torch.manual_seed(0)
    model = retro_model(tiny_bert, demonstrations="none", loss="knn", loss_beta=1.0, knn_loss_gate=False)
    tr = trainer(model, tiny_bert)
    loader, batch = first_batch(tr, examples)
    model.refresh_store(loader, progress=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model.loss(batch)
    g1 = torch.autograd.grad(loss, params, allow_unused=True)
    # the same weights, applied by hand to plain CE
    prepared = model.prepare_batch(batch)
    logits, query = model.forward_with_keys(prepared)
    p = model.knn_probs(query, prepared[EXCLUDE_KEY], 3, 1.0)
    w = (1 + (-torch.log(p.gather(1, prepared["label"][:, None]).squeeze(1).clamp_min(1e-6)))).clamp_max(3.0)
    manual = (F.cross_entropy(logits, prepared["label"], reduction="none") * w).mean()
    g2 = torch.autograd.grad(manual, params, allow_unused=True)
    assert torch.allclose(loss, manual)
    for a, b in zip(g1, g2):
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------ demonstrations
@pytest.mark.parametrize("tname", TEMPLATES)
def test_demonstrations_change_embeddings_exactly_at_slots(tiny_bert, examples, tname):
    plm, tok, _, wrapper = tiny_bert
    model = retro_model(tiny_bert, template=tname)
    tr = trainer(model, tiny_bert)
    _, batch = first_batch(tr, examples, 3)
    slots = batch[SLOT_KEY].clone()
    assert (slots > 0).sum(1).tolist() == [2, 2, 2]  # one slot per class
    demos = torch.randn(3, 2, plm.config.hidden_size)
    without = model.template.base.process_batch(dict(input_ids=batch["input_ids"].clone(), attention_mask=batch["attention_mask"].clone(), soft_token_ids=batch["soft_token_ids"]))
    with_ = model.template.process_batch({**{k: batch[k] for k in batch}, DEMO_KEY: demos})
    e0 = without.get("inputs_embeds")
    if e0 is None:
        e0 = plm.get_input_embeddings()(batch["input_ids"])
    e1 = with_["inputs_embeds"]
    off = e1.shape[1] - slots.shape[1]
    changed = (e0 != e1).any(-1)
    expected = torch.zeros_like(changed)
    expected[:, off:] = slots > 0
    assert torch.equal(changed, expected)
    b, pos = torch.nonzero(slots > 0, as_tuple=True)
    assert torch.equal(e1[b, pos + off], demos[b, slots[b, pos] - 1])


def test_slot_is_followed_by_its_label_word(tiny_bert, examples):
    plm, tok, *_ = tiny_bert
    tr = trainer(retro_model(tiny_bert), tiny_bert)
    _, batch = first_batch(tr, examples, 1)
    ids, slots = batch["input_ids"][0], batch[SLOT_KEY][0]
    for c, word in enumerate(WORDS):
        pos = int(torch.nonzero(slots == c + 1)[0])
        assert tok.convert_ids_to_tokens(int(ids[pos + 1])) == word


def test_hidden_segment_gives_same_mask_key_as_no_demonstrations(tiny_bert, examples):
    plain = retro_model(tiny_bert, demonstrations="none")
    neural = retro_model(tiny_bert, demonstrations="neural")
    for m in (plain, neural):
        m.eval()
    k_plain = R.mask_keys(plain, first_batch(trainer(plain, tiny_bert), examples)[1])
    k_neural = R.mask_keys(neural, first_batch(trainer(neural, tiny_bert), examples)[1])
    assert torch.allclose(k_plain, k_neural, atol=1e-5)


def test_leave_one_out_in_training(tiny_bert, examples):
    model = retro_model(tiny_bert, demo_topk=4)
    tr = trainer(model, tiny_bert)
    loader, batch = first_batch(tr, examples)
    model.refresh_store(loader, progress=False)
    own = np.arange(len(examples))
    model.train()
    prepared = model.prepare_batch(batch)
    assert prepared[EXCLUDE_KEY].tolist() == own.tolist()
    assert torch.equal(prepared[QUERY_KEY], torch.from_numpy(model.store.keys))
    want = R.neural_demonstrations(model.store, model.store.keys, 4, exclude_ids=own)
    leaky = R.neural_demonstrations(model.store, model.store.keys, 4)
    assert torch.allclose(prepared[DEMO_KEY], want)
    assert not torch.allclose(prepared[DEMO_KEY], leaky)
    res = model.store.search_per_class(model.store.keys, 4, exclude_ids=own)
    assert all(i not in res.ids[i] for i in own)
    # in eval mode nothing is excluded (test examples are not in the store)
    model.eval()
    assert model.prepare_batch(batch)[EXCLUDE_KEY] is None


def test_text_demonstrations_show_nearest_example_per_class(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="text", pool=examples)
    tr = trainer(model, tiny_bert, max_seq_length=128)
    _, batch = first_batch(tr, examples, 1)
    _, tok, *_ = tiny_bert
    tokens = tok.convert_ids_to_tokens(batch["input_ids"][0][batch["attention_mask"][0] == 1])
    text = " ".join(tokens)
    # own example excluded; for each class one demonstration with its label word
    picked = model.template.text_retriever(examples[0])
    assert [c for c, _ in picked] == [0, 1] and all(e.guid != examples[0].guid for _, e in picked)
    for c, e in picked:
        assert f"{e.text_a} it was {WORDS[c]} ." in text
    assert tokens.count("[MASK]") == 1
    assert (batch[SEGMENT_KEY][0] == 1).sum() > 0


# ------------------------------------------------------------------ kNN inference
@pytest.mark.parametrize("vname", ["manual", "soft"])
def test_lambda_limits(tiny_bert, examples, vname):
    from openprompt import PromptForClassification

    plm, tok, _, wrapper = tiny_bert
    base_v = base_verbalizer(vname, plm, tok)
    template = base_template("manual", plm, tok)
    plain = PromptForClassification(plm, template, base_v).eval()
    knn_v = R.KnnVerbalizer(base_v, plm, k=3, temperature=2.0, lam=0.0)
    knn = PromptForClassification(plm, template, knn_v).eval()
    from openprompt import PromptDataLoader

    loader = PromptDataLoader(examples, template, tokenizer=tok, tokenizer_wrapper_class=wrapper,
                              max_seq_length=32, batch_size=len(examples))
    knn_v.store = R.build_store(plain, loader, progress=False)
    batch = next(iter(loader))
    with torch.no_grad():
        # lambda = 0: the wrapped verbalizer's output as log-probabilities (ManualVerbalizer's already are)
        assert torch.allclose(knn(batch), torch.log_softmax(plain(batch), -1), atol=1e-6)
        if vname == "manual":
            assert torch.allclose(knn(batch), plain(batch), atol=1e-6)
        knn_v.lam = 1.0
        p_knn = knn_v.store.knn_distribution(knn_v.store.keys, 3, 2.0, scale="zscore")  # the verbalizer's default
        np.testing.assert_allclose(torch.exp(knn(batch)).numpy(), p_knn, atol=1e-6)
        knn_v.lam = 0.3
        mixed = 0.3 * torch.from_numpy(p_knn) + 0.7 * torch.softmax(plain(batch), -1)
        assert torch.allclose(torch.exp(knn(batch)), mixed, atol=1e-6)


# ------------------------------------------------------------------ every combination trains
@pytest.mark.parametrize("tname", TEMPLATES)
@pytest.mark.parametrize("vname", ["manual", "soft"])
@pytest.mark.parametrize("demo", ["neural", "text"])
def test_all_templates_and_verbalizers_train_and_predict(tiny_bert, examples, tname, vname, demo):
    torch.manual_seed(0)
    model = retro_model(tiny_bert, template=tname, verbalizer=vname, demonstrations=demo, pool=examples,
                        knn_lambda=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tr = trainer(model, tiny_bert, epochs=1, lr=1e-3)
    history = tr.fit(examples[:6], examples[6:])
    assert math.isfinite(history[0]["loss"])
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed  # the optimiser moved the trainable parameters
    probs = tr.predict_proba(examples)
    assert probs.shape == (len(examples), 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert len(model.store) == 6
    assert set(tr.tuned) >= {"knn_lambda", "knn_k", "knn_temperature"}


# ------------------------------------------------------------------ open book, disk
def test_save_load_predict_identical(tiny_dirs, examples, tmp_path):
    from openprompt.plms import load_plm

    def fresh():
        torch.manual_seed(0)
        tiny = load_plm("bert", tiny_dirs["bert"])
        return retro_model(tiny, template="mixed", knn_lambda=0.4), tiny

    model, tiny = fresh()
    tr = trainer(model, tiny, lr=1e-3, tune_inference=False)
    tr.fit(examples[:6])
    before = tr.predict_proba(examples)
    tr.save(str(tmp_path / "run"))
    model2, tiny2 = fresh()
    tr2 = trainer(model2, tiny2).load(str(tmp_path / "run"))
    np.testing.assert_array_equal(tr2.predict_proba(examples), before)
    assert model2.config.knn_lambda == 0.4 and len(model2.store) == 6


def test_load_refuses_missing_folder(tiny_bert, tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved RetroPrompt model"):
        retro_model(tiny_bert).load(str(tmp_path))


def test_added_examples_change_neighbours_and_predictions(tiny_bert, examples):
    from openprompt.data_utils import InputExample

    model = retro_model(tiny_bert, demonstrations="none", knn_lambda=1.0, knn_k=1)
    tr = trainer(model, tiny_bert, tune_inference=False)
    tr.fit(examples[:4])
    query = InputExample(guid="q", text_a="brilliant and beautiful", label=1)
    before = tr.explain(query, top=1)
    assert before["neighbours"][0]["guid"] != "new"
    tr.add_examples([InputExample(guid="new", text_a="brilliant and beautiful", label=0)])
    after = tr.explain(query, top=1)
    assert after["neighbours"][0]["guid"] == "new" and after["neighbours"][0]["label"] == 0
    assert after["neighbours"][0]["text"] == "brilliant and beautiful"
    assert after["prediction"] == 0 and after["p_knn"] == [1.0, 0.0]


def test_neural_demonstrations_come_from_the_store_built_by_training(tiny_bert, examples):
    model = retro_model(tiny_bert)
    _, batch = first_batch(trainer(model, tiny_bert), examples, 2)
    with torch.no_grad():  # inference, and no training data seen: the plain model, no store built
        model.eval()(batch)
    assert len(model.store) == 0
    with pytest.warns(UserWarning, match="first training batch"):  # training: built from the batch's loader
        model.train()(batch)
    assert len(model.store) == 2


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="knn_lambda"):
        R.RetroConfig(knn_lambda=1.5)
    with pytest.raises(ValueError, match="loss must be one of"):
        R.RetroConfig(loss="hinge")


def test_three_line_entry_point(tiny_dirs, examples):
    from openprompt_retro.quick import retroprompt

    trainer = retroprompt("bert", tiny_dirs["bert"], '{"placeholder":"text_a"} it was {"mask"} .', WORDS,
                          epochs=1, progress=False, device="cpu", grid=R.MixtureGrid(ks=(2,), temperatures=(1.0,)))
    trainer.fit(examples[:6], examples[6:])
    assert trainer.predict(examples).shape == (len(examples),)
    assert isinstance(trainer.model, R.RetroPromptForClassification)


@pytest.mark.parametrize("tname", TEMPLATES)
@pytest.mark.parametrize("vname", ["manual", "soft"])
def test_mask_only_head_matches_full_sequence_head(tiny_bert, examples, tname, vname):
    if (tname, vname) == ("soft", "soft"):
        pytest.skip("OpenPrompt's SoftVerbalizer reads hidden states that SoftTemplate leaves unshifted: "
                    "its full-sequence path takes the wrong position, so it is no reference")
    model = retro_model(tiny_bert, template=tname, verbalizer=vname, demonstrations="none", knn_lambda=0.0).eval()
    _, batch = first_batch(trainer(model, tiny_bert), examples)
    with torch.no_grad():
        fast = model(batch)
        model.mask_only_head = False
        full = model(batch)
    assert torch.allclose(fast, full, atol=1e-5)


@pytest.mark.parametrize("progress", [True, False])
def test_progress_false_hides_the_tokenizing_bar(tiny_bert, examples, capsys, progress):
    tr = trainer(retro_model(tiny_bert, demonstrations="none"), tiny_bert, progress=progress)
    loader = tr.loader(examples)
    assert len(loader.tensor_dataset) == len(examples)
    assert ("tokenizing" in capsys.readouterr().err) == progress
