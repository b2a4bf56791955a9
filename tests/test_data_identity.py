"""Examples as OpenPrompt users build them: without guids (OpenPrompt's default), with guids that repeat
across splits (Hugging Face's ``idx``), or with duplicate guids by mistake."""
import warnings

import numpy as np
import pytest
import torch

import openprompt_retro as R
from openprompt_retro.prompt.batch import EXCLUDE_KEY, QUERY_KEY

from helpers import retro_model, trainer
from store_spy import spy_store
from test_tutorial_loops import TRAIN, VALID, assert_no_self_retrieval, loader, splits, train_loop


def split_gate_checks(calls, n):
    """(the store's leave-one-out checks - the kNN loss gate, after every store build -, the other searches)."""
    loo = [c for c in calls if c.exclude is not None and len(c.queries) == n
           and np.array_equal(np.asarray(c.exclude).ravel(), np.arange(n))]
    return loo, [c for c in calls if all(c is not g for g in loo)]


def test_guidless_training_never_retrieves_itself_in_a_tutorial_loop(tiny_bert):
    data = splits(guids=False)
    model = retro_model(tiny_bert, demo_topk=4, loss="knn", knn_loss_gate=False)
    train_loader = loader(data["train"], model.template, tiny_bert, shuffle=True)
    model.attach(train_loader)
    with spy_store() as calls:
        train_loop(model, train_loader, [torch.optim.AdamW(model.parameters(), lr=1e-3)], epochs=2)
    kinds = {c.kind for c in calls}
    assert kinds == {"search", "per_class"}  # kNN loss weights and neural demonstrations
    loo, calls = split_gate_checks(calls, len(model.store))
    assert len(loo) == 1  # the gate after the rebuild at the start of pass 2
    assert assert_no_self_retrieval(calls) == 2 * 2 * 8  # every training query, both searches, both passes
    assert all(c.exclude is not None and (np.asarray(c.exclude) >= 0).all() for c in calls)


def test_guidless_training_never_retrieves_itself_with_the_trainer(tiny_bert):
    from openprompt.data_utils import InputExample

    train = [InputExample(text_a=t, label=y) for t, y in zip(TRAIN, [1, 0] * 4)]
    dev = [InputExample(text_a=t, label=y) for t, y in zip(VALID, [1, 0] * 2)]
    model = retro_model(tiny_bert, demo_topk=4, loss="knn", knn_loss_gate=False)
    with spy_store() as calls:
        trainer(model, tiny_bert, epochs=2).fit(train, dev)
    loo, others = split_gate_checks(calls, len(model.store))
    # after the first refresh, each epoch's refresh, and the rebuild once the best state is restored
    assert len(loo) == 4
    assert assert_no_self_retrieval(others) == 2 * 2 * 8
    assert assert_no_self_retrieval(loo) == 4 * 8
    assert model.store.texts == TRAIN  # texts found by position, not by guid


def test_dev_examples_with_training_guids_get_their_own_keys(tiny_bert):
    """idx restarts at 0 in every split: validation example 0 is not training example 0, even when the
    tutorial evaluates in training mode (no eval())."""
    data = splits(guids=True)
    assert [e.guid for e in data["validation"]] == [0, 1, 2, 3]
    model = retro_model(tiny_bert, demo_topk=4)
    train_loader = loader(data["train"], model.template, tiny_bert)
    model.attach(train_loader)
    dev_batch = next(iter(loader(data["validation"], model.template, tiny_bert)))
    model.train()
    assert not model.is_training_forward(dev_batch)
    prepared = model.prepare_batch(dev_batch)
    assert prepared[EXCLUDE_KEY] is None  # nothing excluded as if it were a training example
    with torch.no_grad():
        own_keys = R.mask_keys(model, dev_batch)
    torch.testing.assert_close(prepared[QUERY_KEY], own_keys)
    assert not torch.allclose(prepared[QUERY_KEY], torch.from_numpy(model.store.keys[:4]))
    # the same examples in a training batch are training examples: own key, own entry left out
    train_batch = next(iter(train_loader))
    assert model.is_training_forward(train_batch)
    prepared = model.prepare_batch(train_batch)
    assert prepared[EXCLUDE_KEY].tolist() == [0, 1, 2, 3]
    assert torch.equal(prepared[QUERY_KEY], torch.from_numpy(model.store.keys[:4]))


def test_a_training_loader_built_again_from_the_same_data_stays_training_data(tiny_bert):
    data = splits(guids=False)
    model = retro_model(tiny_bert, knn_loss_gate=False)
    first = loader(data["train"], model.template, tiny_bert)
    model.attach(first)
    again = loader(data["train"], model.template, tiny_bert)
    model.train()
    assert model.is_training_forward(next(iter(again)))
    with spy_store() as calls, warnings.catch_warnings():
        warnings.simplefilter("error")  # not a fresh auto-attach: the new loader replaces the attached one
        model(next(iter(again)))
    loo, calls = split_gate_checks(calls, len(model.store))
    assert len(loo) == 1  # the new source is encoded again, then the gate
    assert assert_no_self_retrieval(calls) == 2 * 4
    assert model.lifecycle.source is again


def test_duplicate_guids_are_named(tiny_bert):
    from openprompt.data_utils import InputExample

    data = [InputExample(guid=g, text_a=t, label=i % 2) for i, (g, t) in enumerate(zip([0, 1, 1, 2, 3, 3], TRAIN))]
    model = retro_model(tiny_bert)
    with pytest.raises(ValueError, match=r"2 duplicate guids, e\.g\. \['1', '3'\]"):
        model.attach(loader(data, model.template, tiny_bert))
    assert len(model.store) == 0


def test_text_demonstrations_exclude_the_example_itself_not_its_guid():
    from openprompt.data_utils import InputExample

    pool = [InputExample(text_a=t, label=y) for t, y in zip(TRAIN, [1, 0] * 4)]  # guid None everywhere
    retriever = R.TfidfDemoRetriever(pool, 2)
    for example in pool:
        demos = retriever(example)
        assert [c for c, _ in demos] == [0, 1]  # not silently empty
        assert all(d is not example for _, d in demos)
    # a copy of a pool example (same guid, same text) is that example
    named = [InputExample(guid=i, text_a=t, label=y) for i, (t, y) in enumerate(zip(TRAIN, [1, 0] * 4))]
    retriever = R.TfidfDemoRetriever(named, 2)
    copy = InputExample(guid=0, text_a=TRAIN[0], label=1)
    assert all(d.guid != 0 for _, d in retriever(copy))
    # a dev example whose guid repeats a pool guid is not: its nearest pool example may be shown
    dev = InputExample(guid=2, text_a="the acting was excellent , really", label=1)
    assert dict(retriever(dev))[1] is named[2]


def test_text_demonstrations_in_a_guidless_loader(tiny_bert, examples):
    from openprompt.data_utils import InputExample

    plm, tok, *_ = tiny_bert
    pool = [InputExample(text_a=e.text_a, label=e.label) for e in examples]
    model = retro_model(tiny_bert, demonstrations="text", pool=pool)
    batch = next(iter(loader(pool[:1], model.template, tiny_bert, max_seq_length=128)))
    ids = batch["input_ids"][0][batch["attention_mask"][0] == 1]
    text = " ".join(tok.convert_ids_to_tokens(ids))
    assert "it was terrible ." in text and "it was great ." in text  # one demonstration per class
    assert text.count(pool[0].text_a) == 1  # the query itself is not one of its demonstrations


def test_add_examples_takes_a_hugging_face_split_whose_idx_repeats_the_training_guids(tiny_bert, tmp_path):
    """Hugging Face's ``idx`` restarts in every split: before, add_examples(dataset['validation']) was refused
    for 'duplicate guids'. Entries are known by identity; the store keeps both, saves and reloads them."""
    data = splits()  # guids "0", "1", ... in each split
    assert {e.guid for e in data["validation"]} <= {e.guid for e in data["train"]}
    model = retro_model(tiny_bert, demonstrations="none", key_encoder="frozen-mean", knn_readout="class-mean")
    tr = trainer(model, tiny_bert, epochs=1)
    tr.fit(data["train"])
    ids = model.add_examples(data["validation"])
    assert list(ids) == list(range(8, 12)) and len(model.knn_store) == 12
    assert model.knn_store.guids[8:] == [str(e.guid) for e in data["validation"]]
    assert model.knn_store.ids_of([data["train"][0].guid])[0] == 0  # a guid names its first entry
    before = model.predict_proba(data["validation"])
    model.save(str(tmp_path / "run"))
    again = R.RetroPromptForClassification.from_pretrained(str(tmp_path / "run"))
    assert len(again.knn_store) == 12
    np.testing.assert_array_equal(again.predict_proba(data["validation"]), before)
    with pytest.raises(Exception, match="duplicate guids"):  # one dataset with a guid twice is still a mistake
        model.add_examples([data["validation"][0], data["validation"][0]])
