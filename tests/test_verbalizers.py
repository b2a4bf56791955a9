"""Every OpenPrompt classification verbalizer inside RetroPromptForClassification / KnnVerbalizer,
with ManualTemplate, MixedTemplate and SoftTemplate."""
import contextlib
import io

import pytest
import torch

import openprompt_retro as R

from helpers import MASK, NO_GUARD, WORDS, base_template
from store_spy import spy_store
from test_tutorial_loops import evaluate, loader, splits, train_loop

VERBALIZERS = ["manual", "one2one", "soft", "knowledgeable", "proto"]


def make_verbalizer(kind, plm, tok):
    from openprompt.prompts import (KnowledgeableVerbalizer, ManualVerbalizer, One2oneVerbalizer, ProtoVerbalizer,
                                    SoftVerbalizer)

    words = [[w] for w in WORDS]
    if kind == "manual":
        return ManualVerbalizer(tok, num_classes=2, label_words=words)
    if kind == "one2one":
        return One2oneVerbalizer(tok, num_classes=2, label_words=list(WORDS))
    if kind == "soft":
        return SoftVerbalizer(tok, plm, num_classes=2, label_words=words)
    if kind == "knowledgeable":  # label words in the constructor: OpenPrompt's ordering bug, fixed by compat
        with contextlib.redirect_stdout(io.StringIO()):
            return KnowledgeableVerbalizer(tok, classes=["negative", "positive"],
                                           label_words=[["terrible", "awful"], ["great", "good"]])
    return ProtoVerbalizer(tok, plm, num_classes=2, label_words=words)


@pytest.mark.parametrize("tname", ["manual", "mixed", "soft"])
@pytest.mark.parametrize("vname", VERBALIZERS)
def test_every_verbalizer_trains_and_evaluates_with_retrieval(tiny_bert, tname, vname):
    plm, tok, _, _ = tiny_bert
    torch.manual_seed(0)
    template = R.RetroTemplate(base_template(tname, plm, tok))
    model = R.RetroPromptForClassification(plm, template, make_verbalizer(vname, plm, tok),
                                           config=R.RetroConfig(demo_topk=2, knn_k=3, train_knn_k=3, **MASK, **NO_GUARD))
    assert model.template.label_words == ["terrible", "great"]
    data = splits()
    train_loader = loader(data["train"], template, tiny_bert, shuffle=True)
    model.attach(train_loader)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with spy_store() as calls:
        train_loop(model, train_loader, [torch.optim.AdamW(model.parameters(), lr=1e-3)], epochs=1)
        probs = evaluate(model, loader(data["validation"], template, tiny_bert), "no_grad")
    assert probs.shape == (4, 2) and torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert {c.kind for c in calls} == {"search", "per_class"}
    assert sum(len(c.queries) for c in calls if c.kind == "search" and c.exclude is None) == 4  # kNN inference


@pytest.mark.parametrize("tname", ["manual", "mixed"])
@pytest.mark.parametrize("trained", [False, True])
def test_proto_verbalizer_gives_what_openprompt_gives(tiny_bert, tname, trained):
    """Without retrieval (no demonstrations, lambda = 0) the numbers are OpenPrompt's own as log-probabilities
    (log_softmax of ProtoVerbalizer's logits), on both of its paths: label-word logits before train_proto,
    prototypes after."""
    from openprompt import PromptForClassification

    plm, tok, _, _ = tiny_bert
    template = base_template(tname, plm, tok)
    proto = make_verbalizer("proto", plm, tok)
    proto.trained = trained  # what train_proto sets (it needs CUDA: "cuda:{device}")
    plain = PromptForClassification(plm, template, proto).eval()
    model = R.RetroPromptForClassification(plm, template, proto, config=R.RetroConfig(knn_lambda=0.0, **MASK)).eval()
    val_loader = loader(splits()["validation"], template, tiny_bert)
    batch = lambda: next(iter(val_loader))  # noqa: E731  (MixedTemplate rewrites the batch it processes)
    with torch.no_grad():
        torch.testing.assert_close(model(batch()), torch.log_softmax(plain(batch()), -1), atol=1e-5, rtol=1e-5)
    # and with kNN inference on, a KnnVerbalizer around it mixes in p_kNN, also in OpenPrompt's own model
    model.attach(loader(splits()["train"], model.template, tiny_bert))
    model.apply_config(knn_lambda=0.5)
    knn = PromptForClassification(plm, template, R.KnnVerbalizer(proto, plm, store=model.store, k=3)).eval()
    with torch.no_grad():
        p_model, p_knn, p_plain = model(batch()), knn(batch()), plain(batch())
    assert not torch.allclose(p_model, p_plain) and not torch.allclose(p_knn, p_plain)


def test_knowledgeable_verbalizer_constructor_keeps_its_settings(tiny_bert):
    from openprompt.prompts import KnowledgeableVerbalizer

    from openprompt_retro import compat

    _, tok, _, _ = tiny_bert
    with contextlib.redirect_stdout(io.StringIO()):
        v = KnowledgeableVerbalizer(tok, classes=["n", "p"], label_words=[["terrible", "very bad"], ["great"]],
                                    max_token_split=1, candidate_frac=0.25)
    assert v.max_token_split == 1 and v.candidate_frac == 0.25
    assert v.label_words == [[" terrible"], [" great"]]  # "very bad" (2 tokens > max_token_split) dropped
    assert "KnowledgeableVerbalizer(label_words=...)" in compat.applied_fixes
    with contextlib.redirect_stdout(io.StringIO()):
        later = KnowledgeableVerbalizer(tok, classes=["n", "p"])
        later.label_words = [["terrible"], ["great"]]  # the path that always worked still does
    assert later.max_token_split == -1


def test_knn_verbalizer_alone_mixes_outside_training_forwards(tiny_bert):
    """In OpenPrompt's own PromptForClassification: no mixture in model.train() with gradients, a mixture
    after eval() and under torch.no_grad() (a tutorial that forgets eval() still gets kNN inference)."""
    from openprompt import PromptForClassification

    plm, tok, _, _ = tiny_bert
    template = base_template("manual", plm, tok)
    base = make_verbalizer("manual", plm, tok)
    knn = R.KnnVerbalizer(base, plm, k=3, lam=0.5)
    train_loader = loader(splits()["train"], template, tiny_bert)
    knn.store = R.build_store(PromptForClassification(plm, template, base), train_loader, progress=False)
    model, plain = PromptForClassification(plm, template, knn), PromptForClassification(plm, template, base)
    batch = lambda: next(iter(train_loader))  # noqa: E731
    model.train()
    assert torch.allclose(model(batch()), plain(batch()))
    with torch.no_grad():
        assert not torch.allclose(model(batch()), plain(batch()))
    model.eval()
    assert not torch.allclose(model(batch()), plain(batch()))


def test_text_and_clip_mix_by_one_mixture_object(tiny_bert):
    """The text model hands its verbalizer the same core Mixture that CLIP's models hold: lambda, the read-out
    and its settings from the config, and the store to read."""
    from helpers import retro_model
    from openprompt_retro.clip.cache import UNTUNED
    from openprompt_retro.core.knn import Mixture

    model = retro_model(tiny_bert, knn_readout="class-mean", knn_lambda=0.3, class_mean_top_m=4)
    m = model.mixing()
    assert type(m) is Mixture and type(UNTUNED) is Mixture
    assert (m.lam, m.readout, m.top_m, m.temperature) == (model.effective_lambda, "class-mean", 4,
                                                        model.config.readout_temperature())
    assert m.store is model.knn_store
    with pytest.raises(ValueError, match="lambda must lie in"):
        Mixture(lam=1.2, k=4, temperature=1.0)
