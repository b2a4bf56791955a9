"""The retrieval room (prompt/retrieval.py) on its own: what one batch retrieves - query keys, the entries it must
not see, neural demonstrations - for training and inference forwards, whoever chooses the neighbours."""
import numpy as np
import torch

from openprompt_retro.prompt.batch import DEMO_KEY, EXCLUDE_KEY, QUERY_KEY
from openprompt_retro.prompt.retrieval import retrieve

from helpers import first_batch, retro_model, trainer
from store_spy import spy_store


def prepared(tiny, examples, **config):
    model = retro_model(tiny, demonstrations="neural", **config)
    tr = trainer(model, tiny)
    loader, batch = first_batch(tr, examples)
    model.attach(loader)
    return model, loader, batch


def test_a_training_batch_never_draws_its_own_entry_as_a_demonstration_neighbour(tiny_bert, examples):
    """Demonstrations drawn by the frozen keys (demo_retrieval "auto" with a key encoder) leave each training
    example's own entry out, as those drawn by the [MASK] keys do."""
    for config in ({"key_encoder": "frozen-mean", "knn_readout": "class-mean"}, {"key_encoder": "mask"}):
        model, loader, batch = prepared(tiny_bert, examples, **config)
        model.train()
        with spy_store() as calls:
            batch, record = retrieve(model, batch, training=True, need_query=True)
        own = model.lifecycle.own_ids(batch, training=True)
        assert (own >= 0).all() and record.exclude.tolist() == own.tolist()
        per_class = [c for c in calls if c.kind == "per_class"]
        assert len(per_class) == 1, config
        for row, ids in enumerate(per_class[0].ids):
            assert own[row] not in ids.tolist(), (config, row)
        assert batch[DEMO_KEY].shape[:2] == (len(examples), 2)


def test_training_queries_are_the_stored_keys_and_inference_queries_are_encoded(tiny_bert, examples):
    model, loader, batch = prepared(tiny_bert, examples, key_encoder="frozen-mean", knn_readout="class-mean")
    model.train()
    _, trained = retrieve(model, batch, training=True, need_query=True)
    own = model.lifecycle.own_ids(batch, training=True)
    np.testing.assert_array_equal(trained.query.numpy(), model.knn_store.keys[own])
    model.eval()
    _, inferred = retrieve(model, batch, training=False, need_query=True)
    assert inferred.exclude is None  # nothing is left out in inference (exclude_self_in_eval is off)
    np.testing.assert_allclose(inferred.query.numpy(), model.key_encoder.encode(examples), atol=1e-6)
    model.exclude_self_in_eval = True
    _, own_left_out = retrieve(model, batch, training=False, need_query=True)
    assert own_left_out.exclude.tolist() == own.tolist()


def test_a_model_without_a_store_retrieves_nothing_and_drops_the_segment(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="neural", loss="ce", knn_lambda=0.0)
    tr = trainer(model, tiny_bert)
    _, batch = first_batch(tr, examples)
    model.eval()
    out, record = retrieve(model, batch, training=False, need_query=False)
    assert record.query is None and record.exclude is None and record.demos is None
    assert out[QUERY_KEY] is None and out[EXCLUDE_KEY] is None and out["input_ids"].shape[1] < batch["input_ids"].shape[1]
    assert torch.equal(out["input_ids"], out["input_ids"])  # a copy: the loader's batch is left as it was


def test_retrieval_knows_its_model_only_through_the_host(tiny_bert, examples):
    """A Retriever holds the lifecycle, not the model: everything it needs of the model comes through the
    lifecycle's host (what the template shows, exclusions in eval, a batch's [MASK] keys, the shaping of d_c),
    and a host that answers differently changes what is retrieved."""
    from openprompt_retro.prompt.retrieval import Retriever
    from openprompt_retro.prompt.store_lifecycle import ModelHost

    model, loader, batch = prepared(tiny_bert, examples, key_encoder="mask")
    model.eval()
    _, expected = model.retriever(batch, training=False, need_query=True)

    asked = []

    class Recording(ModelHost):
        def __getattribute__(self, name):
            if not name.startswith("_"):
                asked.append(name)
            return super().__getattribute__(name)

        def exclude_self_in_eval(self) -> bool:  # this host leaves each example's own entry out in eval
            return True

    model.lifecycle.host = Recording(model)
    retriever = Retriever(model.lifecycle)
    assert all(v is not model for v in vars(retriever).values())
    _, got = retriever(batch, training=False, need_query=True)
    assert {"uses_neural_demos", "has_demonstrations", "exclude_self_in_eval", "batch_mask_keys",
            "shape_demonstrations"} <= set(asked)
    torch.testing.assert_close(got.query, expected.query)  # the [MASK] query came from the host's batch pass
    assert expected.exclude is None
    own = model.lifecycle.own_ids(batch, training=False)
    assert got.exclude.tolist() == own.tolist()  # the host's answer, not the model's attribute (False)
    assert model.exclude_self_in_eval is False
