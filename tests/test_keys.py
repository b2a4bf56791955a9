import numpy as np
import pytest
import torch

from openprompt_retro import MaskKeyHead, build_store, extract_keys
from openprompt_retro.prompt.keys import hidden_at_mask


def _pipeline(tiny_plm, examples, batch_size=3):
    from openprompt import PromptDataLoader, PromptForClassification
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    kind, plm, tok, _, wrapper = tiny_plm
    template = ManualTemplate(tokenizer=tok, text='{"placeholder":"text_a"} it was {"mask"} .')
    verbalizer = ManualVerbalizer(tok, num_classes=2, label_words=[["terrible"], ["great"]])
    loader = PromptDataLoader(examples, template, tokenizer=tok, tokenizer_wrapper_class=wrapper,
                              max_seq_length=32, batch_size=batch_size)
    return PromptForClassification(plm, template, verbalizer), loader


def test_key_extraction_shape_and_determinism(tiny_plm, examples):
    model, loader = _pipeline(tiny_plm, examples)
    keys1, labels, guids = extract_keys(model, loader, progress=False)
    keys2, _, _ = extract_keys(model, loader, progress=False)
    assert keys1.shape == (len(examples), model.plm.config.hidden_size) and keys1.dtype == np.float32
    np.testing.assert_array_equal(keys1, keys2)
    assert labels.tolist() == [e.label for e in examples]
    assert guids == [e.guid for e in examples]
    # batching does not change the keys
    model_b, loader_b = _pipeline(tiny_plm, examples, batch_size=1)
    keys3, _, _ = extract_keys(model, loader_b, progress=False)
    np.testing.assert_allclose(keys1, keys3, atol=1e-5)


def test_key_is_lm_head_transform_at_mask(tiny_plm, examples):
    kind, plm, *_ = tiny_plm
    model, loader = _pipeline(tiny_plm, examples)
    head = MaskKeyHead(plm)
    assert head.kind == {"bert": "bert-transform", "roberta": "roberta-transform"}[kind]
    batch = next(iter(loader))
    model.eval()
    with torch.no_grad():
        out = plm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        h = out.hidden_states[-1][batch["loss_ids"] == 1]
        if kind == "bert":
            t = plm.cls.predictions.transform
            want = t.LayerNorm(t.transform_act_fn(t.dense(h)))
        else:
            want = plm.lm_head.layer_norm(torch.nn.functional.gelu(plm.lm_head.dense(h)))
    keys, _, _ = extract_keys(model, loader, progress=False)
    np.testing.assert_allclose(keys[: len(want)], want.numpy(), atol=1e-5)


def test_build_store_records_texts_and_model(tiny_plm, examples):
    model, loader = _pipeline(tiny_plm, examples)
    store = build_store(model, loader, progress=False)
    assert len(store) == len(examples) and store.num_classes == 2
    assert store.texts[1] == examples[1].text_a
    assert store.built_by["key_type"].endswith("transform")
    # leave-one-out retrieval over real keys never returns the query itself
    res = store.search(store.keys, k=3, exclude_ids=np.arange(len(store)))
    assert all(i not in res.ids[i] for i in range(len(store)))


def test_template_without_mask_is_refused(tiny_bert):
    from openprompt.prompts import ManualTemplate

    _, tok, _, _ = tiny_bert
    with pytest.raises(RuntimeError, match="'mask' position not found"):
        ManualTemplate(tokenizer=tok, text='{"placeholder":"text_a"} it was great .')
    with pytest.raises(ValueError, match="no <mask> position in rows \\[1\\]"):
        hidden_at_mask(torch.zeros(2, 4, 3), torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]]))


def test_streaming_build_matches_build_store(tiny_plm, examples, capsys):
    from openprompt_retro import build_store_streaming

    kind, plm, tok, _, wrapper = tiny_plm
    model, loader = _pipeline(tiny_plm, examples)
    full = build_store(model, loader, progress=False)
    capsys.readouterr()
    streamed = build_store_streaming(model, iter(examples), tok, wrapper, num_classes=2, max_seq_length=32,
                                     batch_size=3, chunk_size=3, progress=False)
    assert "tokenizing" not in capsys.readouterr().err  # progress=False hides every chunk's bar
    np.testing.assert_allclose(streamed.keys, full.keys, atol=1e-5)
    assert streamed.guids == full.guids and streamed.texts == full.texts
    assert streamed.labels.tolist() == full.labels.tolist()


@pytest.mark.parametrize("train_size", [4, 100])  # trained mid-stream / only at the end
def test_streaming_build_with_a_trained_index_matches_in_memory_build(tiny_bert, examples, train_size):
    from openprompt_retro import build_store_streaming

    plm, tok, _, wrapper = tiny_bert
    model, loader = _pipeline(("bert", plm, tok, None, wrapper), examples)
    full = build_store(model, loader, progress=False, index_factory="IVF4,Flat", nprobe=4)
    streamed = build_store_streaming(model, iter(examples), tok, wrapper, num_classes=2, max_seq_length=32,
                                     batch_size=3, chunk_size=3, train_size=train_size, progress=False,
                                     index_factory="IVF4,Flat", nprobe=4)
    assert streamed.index.is_trained and streamed.index.ntotal == len(streamed) == len(examples)
    assert streamed.guids == full.guids and streamed.labels.tolist() == full.labels.tolist()
    a, b = streamed.search(full.keys, 5, exclude_ids=np.arange(8)), full.search(full.keys, 5, exclude_ids=np.arange(8))
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4)
