"""The store-lifecycle room (prompt/store_lifecycle.py) on its own: when the store is rebuilt, what a checkpoint
of it must match, and the guard's input it computes after every build."""
import numpy as np
import pytest
import torch

from openprompt_retro.core.knn import binomial_tail
from openprompt_retro.prompt.keys import extract_keys

from helpers import first_batch, retro_model, trainer


def test_an_inference_forward_after_training_forwards_reads_a_rebuilt_store(tiny_bert, examples):
    """[MASK] keys move with the encoder: the first inference forward after training forwards rebuilds the store
    from the trained encoder (else p_kNN would read keys of weights that no longer exist)."""
    model = retro_model(tiny_bert, demonstrations="none", key_encoder="mask")
    tr = trainer(model, tiny_bert)
    loader, batch = first_batch(tr, examples)
    model.attach(loader)
    before = model.store.keys.copy()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    torch.nn.CrossEntropyLoss()(model(batch), batch["label"]).backward()
    optimizer.step()
    assert model.lifecycle.stale
    model.eval()
    with torch.no_grad():
        model(batch)
    assert not model.lifecycle.stale
    fresh, _, _ = extract_keys(model, loader)
    assert not np.allclose(model.store.keys, before)
    np.testing.assert_allclose(model.store.keys, fresh, atol=1e-5)


def test_a_checkpoint_of_a_key_store_loads_only_into_a_model_with_that_key_encoder(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="none", key_encoder="frozen-mean", knn_readout="class-mean")
    model.attach(trainer(model, tiny_bert).loader(examples))
    state = model.state_dict()
    plm = tiny_bert[0]
    with torch.no_grad():
        next(plm.base_model.parameters()).add_(1.0)  # a copy taken now is of other weights
    with pytest.warns(UserWarning, match="differs from its checkpoint"):
        other = retro_model(tiny_bert, demonstrations="none", key_encoder="frozen-mean", knn_readout="class-mean")
    with pytest.raises(RuntimeError, match="the key store was built by a key encoder with weights"):
        other.load_state_dict(state)


def test_every_build_recomputes_the_gate_and_the_guards_p_value(tiny_bert, examples):
    model = retro_model(tiny_bert, demonstrations="none", key_encoder="frozen-mean", knn_readout="class-mean")
    tr = trainer(model, tiny_bert)
    model.attach(tr.loader(examples))
    acc, n = model.store_loo_accuracy, len(examples)
    assert model.lifecycle.loo_p_value == pytest.approx(binomial_tail(int(round(acc * n)), n, 0.5))
    assert model.knn_loss_active == (acc > 0.5)
    fewer = examples[:4]
    model.refresh_store(tr.loader(fewer), progress=False)  # another store: the gate and the guard read it anew
    acc, n = model.store_loo_accuracy, len(fewer)
    assert len(model.knn_store) == 4
    assert model.lifecycle.loo_p_value == pytest.approx(binomial_tail(int(round(acc * n)), n, 0.5))


def test_the_lifecycle_knows_its_owner_only_through_a_host(tiny_bert, examples):
    """The lifecycle never sees the model: a host with the config, the sizes and a [MASK]-key function builds the
    store, counts training forwards and computes the gate; a deep copy of a model gets a lifecycle of its own."""
    import copy

    from openprompt_retro.core.config import RetroConfig
    from openprompt_retro.prompt.keys import MaskKeyHead
    from openprompt_retro.prompt.store_lifecycle import StoreHost, StoreLifecycle

    model = retro_model(tiny_bert, demonstrations="none", key_encoder="mask")
    loader = trainer(model, tiny_bert).loader(examples)
    keys = np.eye(len(examples), 4, dtype=np.float32) + np.array([[0, 0, 1, 1]], dtype=np.float32)
    calls = []

    class Host(StoreHost):
        config, num_classes, key_size = RetroConfig(key_encoder="mask", knn_readout="topk", knn_lambda=0.5), 2, 4

        def device(self):
            return torch.device("cpu")

        def demonstrations(self):
            return "none"

        def uses_store(self):
            return True

        def uses_neural_demos(self):
            return False

        def mask_keys(self, dl, progress=True, example_ids=False):
            calls.append(example_ids)
            labels = np.array([e.label for e in examples])
            return keys, labels, [e.guid for e in examples], np.arange(len(examples)) * 0 - 1

    lifecycle = StoreLifecycle(Host(), MaskKeyHead(tiny_bert[0]), None)
    lifecycle.refresh(loader, progress=False)
    assert calls == [True]
    np.testing.assert_array_equal(lifecycle.store.keys, keys)
    assert lifecycle.store_loo_accuracy is not None  # the gate read the host's config after the build
    assert not any(isinstance(v, torch.nn.Module) for v in vars(lifecycle).values())
    assert lifecycle.note_training_forward() is False and lifecycle.stale and lifecycle.training_forwards == 1
    twin = copy.deepcopy(model)
    assert twin.lifecycle.host.num_classes == 2 and twin.lifecycle is not model.lifecycle
    assert twin.lifecycle.host.device() == next(twin.plm.parameters()).device
    assert twin.lifecycle.host._model is twin
