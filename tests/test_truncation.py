"""Truncation: whatever a plain template fits into max_seq_length, a RetroTemplate fits, with every
truncation method; demonstrations give way before the query; an input that cannot fit names the lengths."""
import pytest
import torch

import openprompt_retro as R
from openprompt_retro.prompt.batch import SEGMENT_KEY, SLOT_KEY

from helpers import WORDS, trainer

PAIR = '{"placeholder":"text_a"} question : {"placeholder":"text_b"} ? the answer : {"mask"} .'
METHODS = ["tail", "head", "balanced"]
PREMISE = ("the movie was a great story about the people of the world and what they love , the acting was "
           "excellent and the music was beautiful but the plot was a mess and the script was poor ") * 4
HYPOTHESIS = "the film was good and the actors were fine " * 3


def pairs(n=4, premise=PREMISE, hypothesis=HYPOTHESIS):
    from openprompt.data_utils import InputExample

    return [InputExample(guid=i, text_a=f"{i} {premise}", text_b=hypothesis, label=i % 2) for i in range(n)]


def build(template, data, tiny, length, method):
    from openprompt import PromptDataLoader

    _, tok, _, wrapper = tiny
    return PromptDataLoader(data, template, tokenizer=tok, tokenizer_wrapper_class=wrapper, max_seq_length=length,
                            batch_size=len(data), truncate_method=method)


def visible(batch, row=0):
    return batch["input_ids"][row][batch["attention_mask"][row] == 1]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("demonstrations", ["none", "neural", "text"])
def test_long_sentence_pairs_fit_the_default_length(tiny_plm, method, demonstrations):
    from openprompt.prompts import ManualTemplate

    kind, plm, tok, _, wrapper = tiny_plm
    tiny = (plm, tok, None, wrapper)
    data = pairs()
    plain = next(iter(build(ManualTemplate(tokenizer=tok, text=PAIR), data, tiny, 128, method)))
    retro = R.RetroTemplate(ManualTemplate(tokenizer=tok, text=PAIR), WORDS, demonstrations=demonstrations,
                            plm=plm, text_pool=data)
    batch = next(iter(build(retro, data, tiny, 128, method)))
    assert batch["input_ids"].shape == (4, 128) and (batch["attention_mask"].sum(1) == 128).all()
    assert ((batch["input_ids"] == tok.mask_token_id).sum(1) == 1).all()
    if demonstrations == "none":  # no demonstrations: token for token what the plain template gives
        assert torch.equal(batch["input_ids"], plain["input_ids"])
    if demonstrations == "neural":  # the query gave way; every class keeps its slot and label word
        assert all(set(row.tolist()) >= {1, 2} for row in batch[SLOT_KEY])
        for c, word in enumerate(WORDS):
            pos = (batch[SLOT_KEY][0] == c + 1).nonzero()[-1, 0]  # the word follows the slot
            assert tok.convert_ids_to_tokens(int(batch["input_ids"][0, pos + 1])).lstrip("Ġ") == word
    if demonstrations == "text":  # demonstrations were cut to their fixed parts before the query was cut
        shown = tok.decode(visible(batch))
        assert shown.count(" terrible") + shown.count(" great") >= 2 and (batch[SEGMENT_KEY][0] == 1).any()


def test_demonstrations_are_truncated_before_the_query(tiny_bert, examples):
    from openprompt.prompts import ManualTemplate

    plm, tok, _, wrapper = tiny_bert
    text = '{"placeholder":"text_a"} it was {"mask"} .'
    pool = [type(e)(guid=e.guid, text_a=e.text_a + " and the story was fun" * 3, label=e.label) for e in examples[1:]]
    retro = R.RetroTemplate(ManualTemplate(tokenizer=tok, text=text), WORDS, demonstrations="text", text_pool=pool)
    query = examples[0]
    batch = next(iter(build(retro, [query], tiny_bert, 40, "tail")))
    shown = " ".join(tok.convert_ids_to_tokens(visible(batch)))
    assert shown.startswith(f"[CLS] {query.text_a} it was [MASK] .")  # the query is whole
    assert len(visible(batch)) == 40  # the demonstrations took the rest
    # longest demonstration text first: both demonstrations keep some of their text
    segments = shown.split("[SEP]")[1:3]
    assert all(len(s.split()) > len("it was great .".split()) for s in segments)


@pytest.mark.parametrize("demonstrations", ["neural", "text"])
def test_demonstrations_are_dropped_whole_when_only_the_query_fits(tiny_bert, examples, demonstrations):
    from openprompt.prompts import ManualTemplate

    plm, tok, _, wrapper = tiny_bert
    text = '{"placeholder":"text_a"} it was {"mask"} .'
    plain = next(iter(build(ManualTemplate(tokenizer=tok, text=text), examples, tiny_bert, 8, "tail")))
    retro = R.RetroTemplate(ManualTemplate(tokenizer=tok, text=text), WORDS, demonstrations=demonstrations,
                            plm=plm, text_pool=examples)
    batch = next(iter(build(retro, examples, tiny_bert, 8, "tail")))
    assert torch.equal(batch["input_ids"], plain["input_ids"])  # "<s> x it was <mask> . </s>", no demonstration


def test_input_that_cannot_fit_names_the_lengths(tiny_bert, examples):
    from openprompt.prompts import ManualTemplate

    _, tok, _, _ = tiny_bert
    text = '{"placeholder":"text_a"} it was really a very good or a very bad movie , {"mask"} .'
    retro = R.RetroTemplate(ManualTemplate(tokenizer=tok, text=text), WORDS, demonstrations="none")
    with pytest.raises(ValueError, match=r"max_seq_length=10: .* fixed parts still take 14 tokens plus 2 special"):
        build(retro, examples, tiny_bert, 10, "tail")


@pytest.mark.parametrize("demonstrations", ["neural", "text"])
def test_trainer_fits_sentence_pairs_at_its_default_length(tiny_bert, demonstrations):
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, wrapper = tiny_bert
    data = pairs(6)
    template = R.RetroTemplate(ManualTemplate(tokenizer=tok, text=PAIR), demonstrations=demonstrations,
                               text_pool=data)
    model = R.RetroPromptForClassification(plm, template, ManualVerbalizer(tok, num_classes=2,
                                                                           label_words=[[w] for w in WORDS]),
                                           config=R.RetroConfig(demo_topk=2, knn_k=2, train_knn_k=2))
    tr = trainer(model, tiny_bert, max_seq_length=R.TrainingArgs().max_seq_length, tune_inference=False)
    assert tr.args.max_seq_length == 128
    tr.fit(data)
    assert tr.predict(pairs(2, premise=HYPOTHESIS * 9)).shape == (2,)


def test_text_demonstrations_at_length_64(tiny_bert, examples):
    plm, tok, _, wrapper = tiny_bert
    long = [type(e)(guid=e.guid, text_a=(e.text_a + " , ") * 6, label=e.label) for e in examples]
    from helpers import retro_model

    model = retro_model(tiny_bert, demonstrations="text", pool=long)
    tr = trainer(model, tiny_bert, max_seq_length=64, tune_inference=False)
    tr.fit(long)
    assert tr.predict(long).shape == (len(long),)
