"""OpenPrompt's own tutorial loops (tutorial/0_basic, 1.1 mixed template, 1.2 soft verbalizer, 1.4 soft
template) with the README's edit, on the tiny model: they must train and evaluate WITH retrieval.

Each loop is written as the tutorial writes it: PromptDataLoader, its own optimizer(s),
``loss_func(logits, labels)`` on ``model(batch)``, evaluation as the tutorial does it (without
``eval()``, under ``torch.no_grad()``, or after ``eval()``). Hugging Face-style guids: ``idx`` restarts
at 0 in every split.
"""
import contextlib
import io
import warnings

import numpy as np
import pytest
import torch

import openprompt_retro as R
from openprompt_retro.prompt.batch import DEMO_KEY, EXCLUDE_KEY, QUERY_KEY

from store_spy import spy_store

TRAIN = ["a great movie with a wonderful story", "a terrible film , boring and dull", "the acting was excellent",
         "it was a waste of time", "i loved this movie , it was really fun", "the plot is a mess",
         "brilliant and beautiful", "the worst film of the year"]
VALID = ["a wonderful film , really fun", "boring , a mess", "excellent acting and music", "the worst plot"]
TEXT = '{"placeholder":"text_a"} it was {"mask"} .'
WORDS = [["terrible"], ["great"]]


def splits(guids=True):
    from openprompt.data_utils import InputExample

    def make(texts, labels):
        return [InputExample(guid=i if guids else None, text_a=t, label=y)
                for i, (t, y) in enumerate(zip(texts, labels))]

    return {"train": make(TRAIN, [1, 0, 1, 0, 1, 0, 1, 0]), "validation": make(VALID, [1, 0, 1, 0])}


def loader(data, template, tiny, shuffle=False, max_seq_length=64):
    from openprompt import PromptDataLoader

    _, tok, _, wrapper = tiny
    return PromptDataLoader(dataset=data, template=template, tokenizer=tok, tokenizer_wrapper_class=wrapper,
                            max_seq_length=max_seq_length, batch_size=4, shuffle=shuffle)


def train_loop(model, train_loader, optimizers, epochs=2):
    loss_func = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        for inputs in train_loader:
            logits = model(inputs)
            loss = loss_func(logits, inputs["label"])
            loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad()
    return loss.item()


def evaluate(model, val_loader, style):
    """Class probabilities, evaluated the way a tutorial does."""
    if style == "eval":
        model.eval()
    ctx = torch.no_grad() if style == "no_grad" else contextlib.nullcontext()
    with ctx:
        return torch.cat([torch.exp(model(inputs)).detach() for inputs in val_loader])


def assert_no_self_retrieval(calls):
    training_rows = 0
    for call in calls:
        own = call.own_entries()
        for row, j in enumerate(own):
            if j >= 0:
                training_rows += 1
                assert j not in call.ids[row], f"a training query retrieved its own entry {j} ({call.kind})"
    return training_rows


def assert_used_retrieval(model, calls, n_train, n_valid):
    assert len(model.store) == n_train
    assert assert_no_self_retrieval(calls) > 0  # training forwards searched the store, own entry left out
    inference = [c for c in calls if c.kind == "search" and c.exclude is None]
    assert sum(len(c.queries) for c in inference) >= n_valid  # p_kNN for every validation example


def check_lambda_matters(model, val_loader, probs):
    lam = model.config.knn_lambda
    model.apply_config(knn_lambda=0.0)
    try:
        plain = evaluate(model, val_loader, "no_grad")
    finally:
        model.apply_config(knn_lambda=lam)
    assert not torch.allclose(probs, plain)  # the mixture changed the output


# ------------------------------------------------------------------ tutorial 0: basic
@pytest.mark.parametrize("style", ["no_eval", "no_grad", "eval"])
def test_basic_tutorial_with_a_wrapped_template(tiny_bert, style):
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert
    data = splits()
    # edit 1 of 2: wrap the template (the loader comes before the verbalizer here, so it names the label words)
    template = R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT), label_words=["terrible", "great"])
    train_loader = loader(data["train"], template, tiny_bert, shuffle=True)
    verbalizer = ManualVerbalizer(tok, num_classes=2, label_words=WORDS)
    # edit 2 of 2: the model class
    model = R.RetroPromptForClassification(plm=plm, template=template, verbalizer=verbalizer, freeze_plm=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with spy_store() as calls, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_loop(model, train_loader, [optimizer])
        val_loader = loader(data["validation"], template, tiny_bert)
        probs = evaluate(model, val_loader, style)
    assert any("first training batch (8 examples)" in str(w.message) for w in caught)  # says what it did
    assert probs.shape == (4, 2)
    assert_used_retrieval(model, calls, 8, 4)
    check_lambda_matters(model, val_loader, probs)


def test_swapping_only_the_model_class_is_not_a_plain_run(tiny_bert):
    """The one-line edit: plain template and verbalizer, RetroPromptForClassification instead of
    PromptForClassification: kNN-guided gradients in training and kNN inference at evaluation."""
    from openprompt import PromptForClassification
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert
    data = splits()
    template = ManualTemplate(tokenizer=tok, text=TEXT)
    train_loader = loader(data["train"], template, tiny_bert)
    val_loader = loader(data["validation"], template, tiny_bert)
    verbalizer = ManualVerbalizer(tok, num_classes=2, label_words=WORDS)
    model = R.RetroPromptForClassification(plm, template, verbalizer, False)
    batch = next(iter(train_loader))
    # the gradient of the tutorial's loss is that of the kNN-guided loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.warns(UserWarning, match="first training batch"):
        g_tutorial = torch.autograd.grad(torch.nn.CrossEntropyLoss()(model(batch), batch["label"]), params,
                                         allow_unused=True)
    g_knn = torch.autograd.grad(model.loss(batch), params, allow_unused=True)
    assert all(a is None or torch.allclose(a, b, atol=1e-6) for a, b in zip(g_tutorial, g_knn))
    plain = PromptForClassification(plm, template, verbalizer)
    g_plain = torch.autograd.grad(torch.nn.CrossEntropyLoss()(plain(batch), batch["label"]), params,
                                  allow_unused=True)
    assert not all(a is None or torch.allclose(a, b, atol=1e-6) for a, b in zip(g_tutorial, g_plain))
    train_loop(model, train_loader, [torch.optim.AdamW(model.parameters(), lr=1e-3)], epochs=1)
    probs = evaluate(model, val_loader, "no_eval")
    with torch.no_grad():
        plain_probs = torch.cat([torch.softmax(plain(b), -1) for b in val_loader])
    assert len(model.store) == 8 and not torch.allclose(probs, plain_probs)


# ------------------------------------------------------------------ tutorial 1.1: mixed template
def test_mixed_template_tutorial_two_optimizers(tiny_bert):
    from openprompt.prompts import ManualVerbalizer, MixedTemplate

    plm, tok, _, _ = tiny_bert
    data = splits()
    verbalizer = ManualVerbalizer(tok, num_classes=2, label_words=WORDS)
    template = R.RetroTemplate(MixedTemplate(model=plm, tokenizer=tok,
                                             text='{"placeholder":"text_a"} {"soft"} {"soft"} {"mask"} .'))
    model = R.RetroPromptForClassification(plm=plm, template=template, verbalizer=verbalizer)
    assert model.template.label_words == ["terrible", "great"]  # given once, to the verbalizer
    train_loader = loader(data["train"], template, tiny_bert, shuffle=True)
    model.attach(train_loader)
    no_decay = ["bias", "LayerNorm.weight"]
    named = list(model.plm.named_parameters())
    groups1 = [{"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
               {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]
    groups2 = [{"params": [p for n, p in model.template.named_parameters() if "raw_embedding" not in n]}]
    assert groups2[0]["params"]  # the soft tokens, reached through the wrapper
    soft_before = model.template.soft_embedding.weight.detach().clone()
    opt1, opt2 = torch.optim.AdamW(groups1, lr=1e-4), torch.optim.AdamW(groups2, lr=1e-3)
    with spy_store() as calls:
        train_loop(model, train_loader, [opt1, opt2])
        val_loader = loader(data["validation"], template, tiny_bert)
        probs = evaluate(model, val_loader, "no_eval")
    assert not torch.equal(model.template.soft_embedding.weight, soft_before)
    assert_used_retrieval(model, calls, 8, 4)
    check_lambda_matters(model, val_loader, probs)


# ------------------------------------------------------------------ tutorial 1.2: soft verbalizer
def test_soft_verbalizer_tutorial_parameter_groups(tiny_bert):
    from openprompt.prompts import ManualTemplate, SoftVerbalizer

    plm, tok, _, _ = tiny_bert
    data = splits()
    template = R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT), ["terrible", "great"])
    train_loader = loader(data["train"], template, tiny_bert, shuffle=True)
    verbalizer = R.KnnVerbalizer(SoftVerbalizer(tok, plm, num_classes=2, label_words=WORDS), plm)
    model = R.RetroPromptForClassification(plm=plm, template=template, verbalizer=verbalizer)
    groups1 = [{"params": [p for n, p in model.plm.named_parameters()], "weight_decay": 0.0}]
    groups2 = [{"params": model.verbalizer.group_parameters_1, "lr": 3e-5},
               {"params": model.verbalizer.group_parameters_2, "lr": 3e-4}]
    assert model.verbalizer.label_words_ids.shape[0] == 2
    head_before = [p.detach().clone() for p in model.verbalizer.group_parameters_2]
    opt1, opt2 = torch.optim.AdamW(groups1, lr=3e-5), torch.optim.AdamW(groups2)
    with spy_store() as calls, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_loop(model, train_loader, [opt1, opt2])
        val_loader = loader(data["validation"], template, tiny_bert)
        probs = evaluate(model, val_loader, "eval")
    assert any(not torch.equal(a, b) for a, b in zip(model.verbalizer.group_parameters_2, head_before))
    assert_used_retrieval(model, calls, 8, 4)
    check_lambda_matters(model, val_loader, probs)


# ------------------------------------------------------------------ tutorial 1.4: soft template, checkpoint
def test_soft_template_tutorial_with_checkpoint_reload(tiny_bert, tmp_path):
    from openprompt.prompts import ManualVerbalizer, SoftTemplate

    plm, tok, _, _ = tiny_bert
    data = splits()
    template = R.RetroTemplate(SoftTemplate(model=plm, tokenizer=tok, text=TEXT, num_tokens=3))
    verbalizer = ManualVerbalizer(tok, classes=["negative", "positive"], label_words=WORDS)
    model = R.RetroPromptForClassification(plm=plm, template=template, verbalizer=verbalizer, freeze_plm=True)
    assert model.template.num_tokens == 3 and model.template.soft_embeds.shape[0] == 3
    train_loader = loader(data["train"], template, tiny_bert, shuffle=True)
    val_loader = loader(data["validation"], template, tiny_bert)
    optimizer = torch.optim.AdamW([p for n, p in model.template.named_parameters() if "raw_embedding" not in n],
                                  lr=0.3)
    with spy_store() as calls, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train()
        train_loop(model, train_loader, [optimizer], epochs=1)
        before = evaluate(model, val_loader, "eval")  # the tutorial's evaluate(): eval(), then train() again
        torch.save(model.state_dict(), tmp_path / "best.ckpt")
        model.train()
        train_loop(model, train_loader, [optimizer], epochs=1)
    assert_used_retrieval(model, calls, 8, 4)
    # a new model, as the script would build it after a restart, loads the checkpoint and predicts the same
    fresh = R.RetroPromptForClassification(plm, R.RetroTemplate(SoftTemplate(model=plm, tokenizer=tok, text=TEXT,
                                                                             num_tokens=3)),
                                           ManualVerbalizer(tok, classes=["negative", "positive"], label_words=WORDS),
                                           True)
    fresh.load_state_dict(torch.load(tmp_path / "best.ckpt"))
    assert len(fresh.store) == 8
    torch.testing.assert_close(evaluate(fresh, val_loader, "eval"), before)


# ------------------------------------------------------------------ the store refreshes itself
def test_store_is_rebuilt_once_per_pass_and_before_evaluation(tiny_bert):
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert
    data = splits()
    model = R.RetroPromptForClassification(plm, R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT)),
                                           ManualVerbalizer(tok, num_classes=2, label_words=WORDS))
    train_loader = loader(data["train"], model.template, tiny_bert, shuffle=True)
    val_loader = loader(data["validation"], model.template, tiny_bert)
    builds = []
    build = model.store.build
    model.store.build = lambda *a, **k: builds.append(len(a[0])) or build(*a, **k)
    model.attach(train_loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_loop(model, train_loader, [optimizer], epochs=3)
    assert builds == [8, 8, 8]  # attach, then at the start of passes 2 and 3
    keys = model.store.keys.copy()
    evaluate(model, val_loader, "no_eval")  # training moved the encoder since the last build
    assert builds == [8, 8, 8, 8] and not np.array_equal(model.store.keys, keys)
    evaluate(model, val_loader, "no_eval")
    assert len(builds) == 4  # nothing trained since: no rebuild


def test_evaluation_without_training_data_names_the_fix(tiny_bert):
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert
    model = R.RetroPromptForClassification(plm, R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT)),
                                           ManualVerbalizer(tok, num_classes=2, label_words=WORDS))
    batch = next(iter(loader(splits()["validation"], model.template, tiny_bert)))
    with pytest.raises(ValueError, match=r"attach\(train_loader\)"):
        model.eval()(batch)


def test_untagged_loader_needs_attach_which_tags_it(tiny_bert):
    """A loader whose examples carry no identity (built before the package was imported) cannot be found
    from its batches: a clear error at the first training forward, and attach() fixes it."""
    from openprompt.prompts import ManualTemplate, ManualVerbalizer
    from openprompt_retro.prompt.batch import EXAMPLE_KEY

    plm, tok, _, _ = tiny_bert
    model = R.RetroPromptForClassification(plm, R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT)),
                                           ManualVerbalizer(tok, num_classes=2, label_words=WORDS))
    train_loader = loader(splits()["train"], model.template, tiny_bert)
    for f in train_loader.tensor_dataset:
        f[EXAMPLE_KEY] = None
    train_loader._retro_serial = None
    with pytest.raises(ValueError, match=r"attach\(train_loader\)"):
        model(next(iter(train_loader)))
    model.attach(train_loader)
    with spy_store() as calls:
        model(next(iter(train_loader)))
    assert assert_no_self_retrieval(calls) == 4 * 2  # demonstrations and loss weights, own entries left out


# ------------------------------------------------------------------ constructor, wrappers, state
def test_openprompt_positional_signature_and_keyword_only_config(tiny_bert):
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert
    t, v = ManualTemplate(tokenizer=tok, text=TEXT), ManualVerbalizer(tok, num_classes=2, label_words=WORDS)
    model = R.RetroPromptForClassification(plm, t, v, True, True)
    assert model.prompt_model.freeze_plm and model.prompt_model.plm_eval_mode
    assert not any(p.requires_grad for p in model.plm.parameters())
    with pytest.raises(TypeError, match="config is keyword-only"):
        R.RetroPromptForClassification(plm, t, v, R.RetroConfig())
    assert R.RetroPromptForClassification(plm, t, v, config=R.RetroConfig(knn_k=5)).config.knn_k == 5


def test_label_word_count_must_match_the_verbalizer(tiny_bert):
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert
    template = R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT), ["terrible", "great"])
    verbalizer = ManualVerbalizer(tok, num_classes=3, label_words=[["terrible"], ["great"], ["fine"]])
    with pytest.raises(ValueError, match="2 label words .* verbalizer has 3 classes"):
        R.RetroPromptForClassification(plm, template, verbalizer)


def test_neural_template_without_label_words_says_when_it_needs_them(tiny_bert):
    from openprompt.prompts import ManualTemplate, SoftVerbalizer

    plm, tok, _, _ = tiny_bert
    template = R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT))
    with pytest.raises(ValueError, match="does not know the label words yet"):
        loader(splits()["train"], template, tiny_bert)
    with pytest.raises(ValueError, match="pass label_words"):
        R.RetroPromptForClassification(plm, template, SoftVerbalizer(tok, plm, num_classes=2))


def test_template_wrapped_after_the_loader_was_built_is_refused(tiny_bert):
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert
    base = ManualTemplate(tokenizer=tok, text=TEXT)
    train_loader = loader(splits()["train"], base, tiny_bert)  # tokenized without a demonstration segment
    model = R.RetroPromptForClassification(plm, R.RetroTemplate(base), ManualVerbalizer(tok, num_classes=2,
                                                                                         label_words=WORDS))
    with pytest.raises(ValueError, match="build the PromptDataLoader with the RetroTemplate itself"):
        model.attach(train_loader)


def test_wrappers_pass_through_what_openprompt_code_uses(tiny_bert):
    from openprompt.prompts import ManualVerbalizer, SoftTemplate, SoftVerbalizer

    plm, tok, _, _ = tiny_bert
    soft = SoftTemplate(model=plm, tokenizer=tok, text=TEXT, num_tokens=2)
    t = R.RetroTemplate(soft, ["terrible", "great"])
    assert t.soft_embeds is soft.soft_embeds and t.num_tokens == 2 and t.raw_embedding is soft.raw_embedding
    assert t.get_default_loss_ids() == soft.get_default_loss_ids()
    with pytest.raises(AttributeError):
        t.no_such_attribute
    sv = SoftVerbalizer(tok, plm, num_classes=2, label_words=WORDS)
    v = R.KnnVerbalizer(sv, plm)
    assert v.group_parameters_1 == sv.group_parameters_1 and v.group_parameters_2 == sv.group_parameters_2
    mv = ManualVerbalizer(tok, num_classes=2, label_words=WORDS)
    k = R.KnnVerbalizer(mv, plm)
    assert torch.equal(k.label_words_ids, mv.label_words_ids)
    k.label_words = [["bad"], ["good"]]  # sets the base's
    assert mv.label_words == [[" bad"], [" good"]]
    logits = torch.randn(2, len(tok))
    assert torch.equal(k.process_logits(logits), mv.process_logits(logits))
    k.register_calibrate_logits(torch.ones(len(tok)))
    assert torch.equal(mv._calibrate_logits, torch.ones(len(tok)))
    # nn.Module bookkeeping is intact: the base's parameters are the wrapper's, once
    assert {id(p) for p in t.parameters()} == {id(p) for p in soft.parameters()}


def test_openprompt_calibrate_runs_on_the_model(tiny_bert):
    from openprompt.data_utils import InputExample
    from openprompt.prompts import ManualTemplate, ManualVerbalizer
    from openprompt.utils.calibrate import calibrate

    plm, tok, _, _ = tiny_bert
    verbalizer = ManualVerbalizer(tok, num_classes=2, label_words=WORDS)
    model = R.RetroPromptForClassification(plm, ManualTemplate(tokenizer=tok, text=TEXT), verbalizer,
                                           config=R.RetroConfig(knn_lambda=0.0))
    support = loader([InputExample(text_a="", label=-1)], model.template, tiny_bert)
    with contextlib.redirect_stderr(io.StringIO()):
        cc_logits = calibrate(model, support)
    assert cc_logits.shape == (len(tok),)
    batch = next(iter(loader(splits()["validation"], model.template, tiny_bert)))
    before = model(batch)
    model.verbalizer.register_calibrate_logits(cc_logits)
    assert verbalizer._calibrate_logits is not None and not torch.allclose(model(batch), before)


def test_state_dict_carries_the_store_and_safetensors_still_saves(tiny_bert, tmp_path):
    from openprompt.prompts import ManualTemplate, ManualVerbalizer
    from safetensors.torch import load_model, save_model

    plm, tok, _, _ = tiny_bert
    model = R.RetroPromptForClassification(plm, R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT)),
                                           ManualVerbalizer(tok, num_classes=2, label_words=WORDS))
    save_model(model, str(tmp_path / "empty.safetensors"))  # an empty store saves too
    model.attach(loader(splits()["train"], model.template, tiny_bert))
    state = model.state_dict()
    assert state["retro_store.keys"].shape == (8, plm.config.hidden_size)
    assert state["retro_store.labels"].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    save_model(model, str(tmp_path / "m.safetensors"))
    keys = model.store.keys.copy()
    model.store.reset()
    missing, unexpected = load_model(model, str(tmp_path / "m.safetensors"))
    assert not unexpected and np.array_equal(model.store.keys, keys)
    bad = dict(state, **{"retro_store.labels": torch.full((8,), 5)})
    with pytest.raises(RuntimeError, match="labels out of range"):
        model.load_state_dict(bad)


def test_prompt_model_called_directly_gets_demonstrations(tiny_bert):
    """OpenPrompt code that calls model.prompt_model(batch) itself (ProtoVerbalizer.train_proto) works."""
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert
    model = R.RetroPromptForClassification(plm, R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT)),
                                           ManualVerbalizer(tok, num_classes=2, label_words=WORDS))
    train_loader = loader(splits()["train"], model.template, tiny_bert)
    model.attach(train_loader)
    batch = next(iter(train_loader))
    model.eval()
    with torch.no_grad():
        out = model.prompt_model(batch)
        prepared = model.prepare_batch(batch)
        want = model.prompt_model(prepared)
    assert prepared[DEMO_KEY] is not None and prepared[EXCLUDE_KEY] is None and prepared[QUERY_KEY] is not None
    torch.testing.assert_close(out.logits, want.logits)


def test_the_tutorial_import_order_tags_every_loader(tiny_dirs):
    """``import openprompt_retro`` at the top, then OpenPrompt's imports and loaders, and the model class
    only at the end (the one-line edit): the loaders carry example identities, so the model finds its
    training data by itself."""
    import os
    import subprocess
    import sys

    code = f"""
import warnings
import openprompt_retro as R
from openprompt.plms import load_plm
from openprompt.data_utils import InputExample
from openprompt import PromptDataLoader, PromptForClassification
from openprompt.prompts import ManualTemplate, ManualVerbalizer
plm, tok, _, W = load_plm("bert", {tiny_dirs["bert"]!r})
data = [InputExample(text_a=t, label=i % 2) for i, t in enumerate(["a great movie", "a bad film", "fun", "dull"])]
template = ManualTemplate(tokenizer=tok, text={TEXT!r})
train_loader = PromptDataLoader(data, template, tokenizer=tok, tokenizer_wrapper_class=W, max_seq_length=32,
                                batch_size=2)
verbalizer = ManualVerbalizer(tok, num_classes=2, label_words={WORDS!r})
model = R.RetroPromptForClassification(plm, template, verbalizer)
warnings.simplefilter("ignore")
for batch in train_loader:
    model(batch).sum().backward()
print(len(model.store))
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "4"
