"""Key encoders of prompt/key_encoders.py on the tiny models: unit-length mean-pooled keys of the raw text,
independent of the batch size, frozen against training of the PLM, and described for the store's record."""
import json

import numpy as np
import pytest
import torch

from openprompt_retro.prompt.key_encoders import FrozenMeanEncoder, SentenceEncoder


def test_keys_have_unit_norm_and_do_not_depend_on_the_batch_size(tiny_plm, examples):
    _, plm, tok, _, _ = tiny_plm
    examples = examples[:4]  # texts of 4 to 9 words: padded differently in each batching
    keys = FrozenMeanEncoder(plm, tok, batch_size=3).encode(examples)
    assert keys.shape == (4, plm.config.hidden_size) and keys.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, rtol=1e-5)
    for batch_size in (1, 4):
        np.testing.assert_allclose(FrozenMeanEncoder(plm, tok, batch_size=batch_size).encode(examples), keys,
                                   atol=1e-6)
    assert len(np.unique(keys.round(5), axis=0)) == 4  # different texts, different keys


def test_training_the_plm_leaves_the_frozen_keys_unchanged(tiny_bert, examples):
    plm, tok, _, _ = tiny_bert
    encoder = FrozenMeanEncoder(plm, tok)
    before = encoder.encode(examples)
    assert not any(p.requires_grad for p in encoder.model.parameters())
    frozen_ptrs = {p.data_ptr() for p in encoder.model.parameters()}
    assert frozen_ptrs.isdisjoint(p.data_ptr() for p in plm.parameters())  # a copy, not shared tensors
    plm.train()
    optimizer = torch.optim.SGD(plm.parameters(), lr=1.0)
    batch = tok(["a great movie", "a dull film"], return_tensors="pt", padding=True)
    plm(**batch).logits.logsumexp(-1).mean().backward()
    optimizer.step()
    assert encoder.model.training is False
    np.testing.assert_array_equal(encoder.encode(examples), before)
    # a copy taken now sees the trained weights: the step did change what the encoder would compute
    assert not np.allclose(FrozenMeanEncoder(plm, tok).encode(examples), before, atol=1e-4)


def test_the_raw_text_is_encoded_with_text_b_as_a_pair(tiny_plm):
    from openprompt.data_utils import InputExample

    _, plm, tok, _, _ = tiny_plm
    encoder = FrozenMeanEncoder(plm, tok)
    single = InputExample(guid="a", text_a="the movie was great")
    pair = InputExample(guid="b", text_a="the movie was great", text_b="it was fun")
    keys = encoder.encode([single, pair, single])
    assert not np.allclose(keys[0], keys[1], atol=1e-4)
    np.testing.assert_allclose(keys[2], keys[0], atol=1e-6)  # a pair in the same batch changes nothing else
    np.testing.assert_allclose(encoder.encode_texts(["the movie was great"], ["it was fun"])[0], keys[1], atol=1e-6)
    with pytest.raises(TypeError, match="text_a string"):
        encoder.encode(["the movie was great"])


def test_hooks_on_the_plm_do_not_reach_the_frozen_copy(tiny_bert, examples):
    plm, tok, _, _ = tiny_bert
    plain = FrozenMeanEncoder(plm, tok).encode(examples)
    plm.base_model.embeddings.register_forward_hook(lambda module, args, out: out * 0 + 1)
    np.testing.assert_array_equal(FrozenMeanEncoder(plm, tok).encode(examples), plain)


def test_describe_records_the_encoder_and_tells_weights_apart(tiny_dirs, tiny_bert, examples):
    plm, tok, _, _ = tiny_bert
    frozen = FrozenMeanEncoder(plm, tok)
    info = frozen.describe()
    assert json.loads(json.dumps(info)) == info
    assert {k: info[k] for k in ("key_encoder", "source", "dim", "pooling", "normalization", "max_length")} == {
        "key_encoder": "frozen-mean", "source": tiny_dirs["bert"], "dim": 32, "pooling": "mean",
        "normalization": "l2", "max_length": 128}
    with torch.no_grad():
        next(plm.parameters()).add_(1.0)
    assert FrozenMeanEncoder(plm, tok).describe()["weights_sha256"] != info["weights_sha256"]
    assert FrozenMeanEncoder(plm, tok).describe()["weights_sha256"] == FrozenMeanEncoder(plm, tok).fingerprint()


def test_sentence_encoder_loads_a_local_folder_and_pools_alike(tiny_dirs, tiny_bert, examples):
    plm, tok, _, _ = tiny_bert
    sentence = SentenceEncoder(tiny_dirs["bert"], batch_size=4)
    # the same checkpoint's encoder weights: the same keys as the frozen copy of the loaded PLM
    np.testing.assert_allclose(sentence.encode(examples), FrozenMeanEncoder(plm, tok).encode(examples), atol=1e-5)
    info = sentence.describe()
    assert (info["key_encoder"], info["source"], info["dim"]) == ("sentence", tiny_dirs["bert"], 32)
    assert not any(p.requires_grad for p in sentence.model.parameters())
    with pytest.raises(ValueError, match="no sentence encoder folder at .*was it moved"):
        SentenceEncoder(tiny_dirs["bert"] + "-missing")
    with pytest.raises(ValueError, match="cannot load a sentence encoder from"):
        SentenceEncoder(str(__import__("pathlib").Path(tiny_dirs["bert"]).parent))  # a folder, but no model


def test_bad_arguments_are_one_clear_error(tiny_bert):
    plm, tok, _, _ = tiny_bert
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        FrozenMeanEncoder(plm, tok, batch_size=0)
    with pytest.raises(TypeError, match="needs a transformers PreTrainedModel"):
        FrozenMeanEncoder(torch.nn.Linear(2, 2), tok)


def test_a_saved_store_records_its_encoder_and_refuses_another(tmp_path, tiny_bert, examples):
    from openprompt_retro.core.store import KnowledgeStore, StoreError

    plm, tok, _, _ = tiny_bert
    encoder = FrozenMeanEncoder(plm, tok)
    store = KnowledgeStore(encoder.dim, 2, metric="cosine", built_by=encoder.describe())
    store.build(encoder.encode(examples), [ex.label for ex in examples])
    store.save(str(tmp_path / "store"))
    assert KnowledgeStore.load(str(tmp_path / "store"), expected_built_by=encoder.describe()).built_by == \
        encoder.describe()
    with torch.no_grad():
        next(plm.parameters()).mul_(2.0)  # e.g. a fine-tuned PLM copied instead of the pre-trained one
    with pytest.raises(StoreError, match="was built with weights_sha256="):
        KnowledgeStore.load(str(tmp_path / "store"), expected_built_by=FrozenMeanEncoder(plm, tok).describe())


def test_a_sentence_encoder_folder_holding_only_pickled_weights_is_refused(tiny_dirs, tmp_path):
    """Before: a folder with pytorch_model.bin was loaded by unpickling (or failed with a long traceback)."""
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dirs["bert"], folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a model")
    with pytest.raises(ValueError, match=r"holds no .safetensors weights \(only \['pytorch_model.bin'\]: pickled"):
        SentenceEncoder(str(folder))
