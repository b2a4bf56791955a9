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

from helpers import MASK
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


def wraps_the_query(template, example):
    """The tutorials print ``mytemplate.wrap_one_example(dataset['train'][0])`` right after building the
    template, before any model gave it label words: the query as the base template wraps it (before, an error)."""
    wrapped, others = template.wrap_one_example(example)
    base, _ = template.base.wrap_one_example(example)
    assert [p["text"] for p in wrapped] == [p["text"] for p in base] and others is not None
    return wrapped


def held_back(model):
    """Whether the guard keeps the store out of the mixture (its leave-one-out accuracy is at chance: likely for
    a random tiny model), and it says why."""
    if model.effective_lambda > 0:
        return False
    assert model.config.knn_lambda > 0 and model.lifecycle.loo_p_value >= model.config.store_guard_alpha
    return True


def assert_used_retrieval(model, calls, n_train, n_valid):
    assert len(model.knn_store) == n_train
    assert assert_no_self_retrieval(calls) > 0  # training forwards searched the store, own entry left out
    inference = [c for c in calls if c.kind in ("search", "class_mean", "logistic") and c.exclude is None]
    if held_back(model):  # a chance-level store is not mixed in: nothing is read at inference
        assert not inference
    else:
        assert sum(len(c.queries) for c in inference) >= n_valid  # p_kNN for every validation example


def check_lambda_matters(model, val_loader, probs):
    lam, alpha = model.config.knn_lambda, model.config.store_guard_alpha
    model.apply_config(knn_lambda=0.0)
    try:
        plain = evaluate(model, val_loader, "no_grad")
    finally:
        model.apply_config(knn_lambda=lam)
    if held_back(model):  # the output is the plain model's; without the guard the same loop would mix
        torch.testing.assert_close(probs, plain)
        model.apply_config(store_guard_alpha=None)
        try:
            probs = evaluate(model, val_loader, "no_grad")
        finally:
            model.apply_config(store_guard_alpha=alpha)
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
    # the loaders came before any retro class, so they carry no example identities: attach names the data;
    # the gate is off so that the kNN weights apply whatever the random tiny store knows
    model = R.RetroPromptForClassification(plm, template, verbalizer, False,
                                           config=R.RetroConfig(knn_loss_gate=False))
    model.attach(train_loader)
    batch = next(iter(train_loader))
    # the gradient of the tutorial's loss is that of the kNN-guided loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
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
    assert len(model.knn_store) == 8
    if held_back(model):  # a chance-level store is kept out: the plain output, until the guard is lifted
        torch.testing.assert_close(probs, plain_probs)
        model.apply_config(store_guard_alpha=None)
        probs = evaluate(model, val_loader, "no_eval")
    assert not torch.allclose(probs, plain_probs)


# ------------------------------------------------------------------ tutorial 1.1: mixed template
def test_mixed_template_tutorial_two_optimizers(tiny_bert):
    from openprompt.prompts import ManualVerbalizer, MixedTemplate

    plm, tok, _, _ = tiny_bert
    data = splits()
    verbalizer = ManualVerbalizer(tok, num_classes=2, label_words=WORDS)
    template = R.RetroTemplate(MixedTemplate(model=plm, tokenizer=tok,
                                             text='{"placeholder":"text_a"} {"soft"} {"soft"} {"mask"} .'))
    wraps_the_query(template, data["train"][0])
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
    template = R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT))  # as the README writes it
    wraps_the_query(template, data["train"][0])
    train_loader = loader(data["train"], template, tiny_bert, shuffle=True)  # waits for the label words
    verbalizer = SoftVerbalizer(tok, plm, num_classes=2, label_words=WORDS)
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
    wraps_the_query(template, data["train"][0])
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


def test_untagged_loader_needs_attach_which_tags_it(tiny_bert):
    """A loader whose examples carry no identity (built before the package was imported) cannot be found
    from its batches: a clear error at the first training forward, and attach() fixes it."""
    from openprompt.prompts import ManualTemplate, ManualVerbalizer
    from openprompt_retro.prompt.batch import EXAMPLE_KEY

    plm, tok, _, _ = tiny_bert
    model = R.RetroPromptForClassification(plm, R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT)),
                                           ManualVerbalizer(tok, num_classes=2, label_words=WORDS),
                                           config=R.RetroConfig(knn_loss_gate=False))
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


def test_the_tutorial_import_order_leaves_openprompt_unpatched_until_a_retro_class_is_used(tiny_dirs):
    """``import openprompt_retro`` at the top, then OpenPrompt's imports and loaders: OpenPrompt is as it
    was (no patch) until a retro class is constructed. Swapping only the model class after the loaders were
    built: the first training forward names attach(train_loader), which then makes it work."""
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
from openprompt.plms.utils import TokenizerWrapper
print("patched before:", hasattr(PromptDataLoader, "_retro_patched"), hasattr(TokenizerWrapper, "_retro_patched"))
plm, tok, _, W = load_plm("bert", {tiny_dirs["bert"]!r})
data = [InputExample(text_a=t, label=i % 2) for i, t in enumerate(["a great movie", "a bad film", "fun", "dull"])]
template = ManualTemplate(tokenizer=tok, text={TEXT!r})
train_loader = PromptDataLoader(data, template, tokenizer=tok, tokenizer_wrapper_class=W, max_seq_length=32,
                                batch_size=2)
verbalizer = ManualVerbalizer(tok, num_classes=2, label_words={WORDS!r})
model = R.RetroPromptForClassification(plm, template, verbalizer)
print("patched after:", hasattr(PromptDataLoader, "_retro_patched"))
warnings.simplefilter("ignore")
try:
    model(next(iter(train_loader)))
except ValueError as e:
    print("error:", e)
model.attach(train_loader)
for batch in train_loader:
    model(batch).sum().backward()
print(len(model.knn_store))
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert "patched before: False False" in lines and "patched after: True" in lines
    assert any(line.startswith("error:") and "attach(train_loader)" in line for line in lines)
    assert lines[-1] == "4"


# ------------------------------------------------------------------ issue 22: the README's recipe as written
def test_readme_recipe_as_written_in_the_basic_tutorial(tiny_bert):
    """tutorial/0_basic with the README's three changed lines and nothing else: the RetroTemplate gets no
    label words, the loaders are built before the model exists, and the tutorial's own loop trains with
    loss_func(prompt_model(inputs), labels) and evaluates."""
    from openprompt import PromptDataLoader
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tokenizer, _, WrapperClass = tiny_bert
    dataset = splits()
    mytemplate = R.RetroTemplate(ManualTemplate(tokenizer=tokenizer, text=TEXT))   # (2) wrap the template
    wrapped_example = mytemplate.wrap_one_example(dataset["train"][0])  # the tutorial's own next line
    assert wrapped_example == [wraps_the_query(mytemplate, dataset["train"][0]), wrapped_example[1]]
    train_dataloader = PromptDataLoader(dataset=dataset["train"], template=mytemplate, tokenizer=tokenizer,
                                        tokenizer_wrapper_class=WrapperClass, max_seq_length=64, batch_size=4,
                                        shuffle=True, teacher_forcing=False, predict_eos_token=False,
                                        truncate_method="head")
    validation_dataloader = PromptDataLoader(dataset=dataset["validation"], template=mytemplate,
                                             tokenizer=tokenizer, tokenizer_wrapper_class=WrapperClass,
                                             max_seq_length=64, batch_size=4, shuffle=False)
    myverbalizer = ManualVerbalizer(tokenizer, num_classes=2, label_words=WORDS)
    prompt_model = R.RetroPromptForClassification(plm=plm, template=mytemplate, verbalizer=myverbalizer,
                                                  freeze_plm=False)              # (3) swap the model class
    loss_func = torch.nn.CrossEntropyLoss()
    no_decay = ["bias", "LayerNorm.weight"]
    grouped = [{"params": [p for n, p in prompt_model.named_parameters() if not any(nd in n for nd in no_decay)],
                "weight_decay": 0.01},
               {"params": [p for n, p in prompt_model.named_parameters() if any(nd in n for nd in no_decay)],
                "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(grouped, lr=1e-4)
    with spy_store() as calls, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in range(2):
            for step, inputs in enumerate(train_dataloader):
                logits = prompt_model(inputs)
                labels = inputs["label"]
                loss = loss_func(logits, labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        allpreds, alllabels = [], []
        for step, inputs in enumerate(validation_dataloader):
            logits = prompt_model(inputs)
            alllabels.extend(inputs["label"].cpu().tolist())
            allpreds.extend(torch.argmax(logits, dim=-1).cpu().tolist())
    assert mytemplate.label_words == ["terrible", "great"] and len(allpreds) == 4 == len(alllabels)
    assert len(train_dataloader) == 2 and next(iter(validation_dataloader))[DEMO_KEY] is None  # tokenized late
    assert_used_retrieval(prompt_model, calls, 8, 4)


def test_a_loader_waiting_for_label_words_that_never_come_names_the_fix(tiny_bert):
    from openprompt.prompts import ManualTemplate, SoftVerbalizer

    plm, tok, _, _ = tiny_bert
    template = R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT))
    waiting = loader(splits()["train"], template, tiny_bert)
    with pytest.raises(ValueError, match=r"not tokenized yet.*RetroPromptForClassification.*label_words"):
        iter(waiting)
    with pytest.raises(ValueError, match="pass label_words"):
        R.RetroPromptForClassification(plm, template, SoftVerbalizer(tok, plm, num_classes=2))


def test_a_model_without_a_store_is_the_plain_model(tiny_bert):
    """Zero-shot and calibration (tutorial 1.3): no training data, no store - every forward is the plain
    PromptForClassification's (demonstration segment hidden, nothing mixed in), and calibrate() runs."""
    from openprompt import PromptForClassification
    from openprompt.data_utils import InputExample
    from openprompt.prompts import ManualTemplate, ManualVerbalizer
    from openprompt.utils.calibrate import calibrate

    plm, tok, _, _ = tiny_bert
    base = ManualTemplate(tokenizer=tok, text=TEXT)
    verbalizer = ManualVerbalizer(tok, num_classes=2, label_words=WORDS)
    template = R.RetroTemplate(base)
    model = R.RetroPromptForClassification(plm, template, verbalizer)
    plain = PromptForClassification(plm, base, verbalizer)
    retro_batch = next(iter(loader(splits()["validation"], template, tiny_bert)))
    plain_batch = next(iter(loader(splits()["validation"], base, tiny_bert)))
    model.eval()
    plain.eval()
    with torch.no_grad():
        want = torch.log_softmax(plain(plain_batch), -1)
        torch.testing.assert_close(model(retro_batch), want, atol=1e-5, rtol=1e-5)
    support = loader([InputExample(text_a="", label=-1)], template, tiny_bert)
    with contextlib.redirect_stderr(io.StringIO()):
        cc_logits = calibrate(model, support)
    assert cc_logits.shape == (len(tok),) and len(model.store) == 0


def train_and_checkpoint(model, tiny, path):
    """Two epochs of a hand loop, then ``torch.save(model.state_dict(), path)``; returns a validation loader."""
    train_loader = loader(splits()["train"], model.template, tiny, shuffle=True)
    val_loader = loader(splits()["validation"], model.template, tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_loop(model, train_loader, [torch.optim.AdamW(model.parameters(), lr=1e-2)], epochs=2)
    torch.save(model.state_dict(), path)
    return val_loader


def test_state_dict_right_after_training_carries_the_store_the_model_uses(tiny_bert, tmp_path):
    """No evaluation between training and torch.save: the checkpoint holds the store rebuilt with the
    trained encoder, so a fresh model that loads it predicts what the saved model predicts."""
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert

    def build():
        return R.RetroPromptForClassification(plm, R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT)),
                                               ManualVerbalizer(tok, num_classes=2, label_words=WORDS),
                                               config=R.RetroConfig(**MASK))

    model = build()
    val_loader = train_and_checkpoint(model, tiny_bert, tmp_path / "ckpt")
    fresh = build()
    fresh.load_state_dict(torch.load(tmp_path / "ckpt"))
    torch.testing.assert_close(evaluate(fresh, val_loader, "eval"), evaluate(model, val_loader, "eval"))


def test_a_frozen_store_checkpoint_loads_only_into_a_model_with_the_same_key_encoder(tiny_bert, tiny_dirs, tmp_path):
    """A store keyed by a frozen copy of the pre-trained encoder: a checkpoint loads into a model built from the
    pre-trained PLM and predicts the same; a model whose copy was taken from the trained PLM is refused, naming
    the key encoder."""
    from openprompt.plms import load_plm
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    def build(plm, tok):
        return R.RetroPromptForClassification(plm, R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT)),
                                               ManualVerbalizer(tok, num_classes=2, label_words=WORDS),
                                               config=R.RetroConfig(key_encoder="frozen-mean"))

    plm, tok, _, _ = tiny_bert
    model = build(plm, tok)
    val_loader = train_and_checkpoint(model, tiny_bert, tmp_path / "ckpt")
    fresh_plm, fresh_tok, _, _ = load_plm("bert", tiny_dirs["bert"])  # the pre-trained weights again
    fresh = build(fresh_plm, fresh_tok)
    fresh.load_state_dict(torch.load(tmp_path / "ckpt"))
    torch.testing.assert_close(evaluate(fresh, val_loader, "eval"), evaluate(model, val_loader, "eval"))
    with pytest.warns(UserWarning):  # built on a trained PLM: told so
        on_trained = build(plm, tok)  # its frozen copy is of the trained PLM
    with pytest.raises(RuntimeError, match="the key store was built by a key encoder with weights"):
        on_trained.load_state_dict(torch.load(tmp_path / "ckpt"))


def test_a_checkpoint_of_the_default_adapted_keys_carries_them(tiny_bert, tiny_dirs, tmp_path):
    """The default store (keys adapted to the training labels): ``state_dict()`` carries the adapted encoder, so
    a model built fresh from the pre-trained PLM loads the checkpoint and predicts the same."""
    from openprompt.plms import load_plm
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    def build(plm, tok):
        return R.RetroPromptForClassification(plm, R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT)),
                                               ManualVerbalizer(tok, num_classes=2, label_words=WORDS))

    plm, tok, _, _ = tiny_bert
    model = build(plm, tok)
    assert model.config.key_encoder == "adapted"  # the default
    val_loader = train_and_checkpoint(model, tiny_bert, tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt")
    assert any(k.startswith("retro_key_encoder.") for k in state)
    fresh_plm, fresh_tok, _, _ = load_plm("bert", tiny_dirs["bert"])
    fresh = build(fresh_plm, fresh_tok)
    fresh.load_state_dict(state)
    torch.testing.assert_close(evaluate(fresh, val_loader, "eval"), evaluate(model, val_loader, "eval"))


def test_a_neural_loader_fed_to_a_model_without_that_template_is_refused(tiny_bert):
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert
    base = ManualTemplate(tokenizer=tok, text=TEXT)
    retro_loader = loader(splits()["train"], R.RetroTemplate(base, ["terrible", "great"]), tiny_bert)
    swapped = R.RetroPromptForClassification(plm, base, ManualVerbalizer(tok, num_classes=2, label_words=WORDS))
    with pytest.raises(ValueError, match="another template"):
        swapped.eval()(next(iter(retro_loader)))
    other = R.RetroPromptForClassification(plm, R.RetroTemplate(base, ["bad", "good"]),
                                           ManualVerbalizer(tok, num_classes=2, label_words=[["bad"], ["good"]]))
    with pytest.raises(ValueError, match="another template"):
        other.eval()(next(iter(retro_loader)))


# ------------------------------------------------------------------ issue 22: RetroConfig in a hand loop
def test_hand_loop_recomputes_the_gate_after_every_store_build(tiny_bert):
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert
    model = R.RetroPromptForClassification(plm, R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT)),
                                           ManualVerbalizer(tok, num_classes=2, label_words=WORDS),
                                           config=R.RetroConfig(train_knn_k=3))
    train_loader = loader(splits()["train"], model.template, tiny_bert, shuffle=True)
    gates = []
    update = model.lifecycle.update_gate
    model.lifecycle.update_gate = lambda: gates.append(update()) or gates[-1]
    model.attach(train_loader)
    train_loop(model, train_loader, [torch.optim.AdamW(model.parameters(), lr=1e-3)], epochs=3)
    assert len(gates) == 3  # attach, then the rebuilds at the start of passes 2 and 3
    chance = 0.5
    assert model.knn_loss_active == (model.store_loo_accuracy > chance) and model.store_loo_accuracy == gates[-1]


def _grads(model, batch, params):
    return torch.autograd.grad(torch.nn.CrossEntropyLoss()(model(batch), batch["label"]), params, allow_unused=True)


def test_gate_off_in_a_hand_loop_gives_plain_cross_entropy_gradients(tiny_bert):
    """The store at chance turns the kNN weights off: the tutorial loop's gradients are those of plain CE."""
    from openprompt import PromptForClassification
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert
    base, verbalizer = ManualTemplate(tokenizer=tok, text=TEXT), ManualVerbalizer(tok, num_classes=2,
                                                                                    label_words=WORDS)
    model = R.RetroPromptForClassification(plm, base, verbalizer, config=R.RetroConfig(loss_beta=5.0))
    train_loader = loader(splits()["train"], base, tiny_bert)
    model.attach(train_loader)
    model.train()
    batch = next(iter(train_loader))
    params = [p for p in model.parameters() if p.requires_grad]
    plain = _grads(PromptForClassification(plm, base, verbalizer), batch, params)
    model.knn_loss_active = True
    assert not all(a is None or torch.allclose(a, b, atol=1e-7) for a, b in zip(_grads(model, batch, params), plain))
    model.knn_loss_active = False  # what the gate decides for a store at chance
    assert all(a is None or torch.allclose(a, b, atol=1e-7) for a, b in zip(_grads(model, batch, params), plain))


def test_demo_warmup_in_a_hand_loop_counts_the_models_training_forwards(tiny_bert):
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert
    model = R.RetroPromptForClassification(plm, R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT)),
                                           ManualVerbalizer(tok, num_classes=2, label_words=WORDS),
                                           config=R.RetroConfig(demo_warmup=0.5))
    train_loader = loader(splits()["train"], model.template, tiny_bert)
    val_loader = loader(splits()["validation"], model.template, tiny_bert)
    model.attach(train_loader)
    with pytest.raises(ValueError, match=r"plan_training\(total_steps\)"):
        model(next(iter(train_loader)))
    model.plan_training(4)  # 2 epochs x 2 batches: the first 2 training forwards see no demonstrations
    hidden = []
    shape = model._shape_demonstrations
    model._shape_demonstrations = lambda d, h=False: hidden.append(h) or shape(d, h)
    train_loop(model, train_loader, [torch.optim.AdamW(model.parameters(), lr=1e-3)], epochs=2)
    assert hidden == [True, True, False, False]
    hidden.clear()
    model.plan_training(4)
    evaluate(model, val_loader, "no_eval")  # inference forwards never count, and never hide
    evaluate(model, val_loader, "eval")
    assert hidden == [False] * 2 and model.lifecycle.training_forwards == 0


def test_exclude_self_in_eval_matches_examples_not_guids(tiny_bert):
    """Guids restart in every split (Hugging Face idx): a dev example with a training example's guid keeps
    that entry; a training example scored through a new loader (the same InputExample) does not see itself."""
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tok, _, _ = tiny_bert
    model = R.RetroPromptForClassification(plm, R.RetroTemplate(ManualTemplate(tokenizer=tok, text=TEXT)),
                                           ManualVerbalizer(tok, num_classes=2, label_words=WORDS),
                                           config=R.RetroConfig(**MASK))  # batches of loaders no longer alive
    data = splits()
    model.attach(loader(data["train"], model.template, tiny_bert))
    model.exclude_self_in_eval = True
    model.eval()
    dev_batch = next(iter(loader(data["validation"], model.template, tiny_bert)))
    assert model.prepare_batch(dev_batch)[EXCLUDE_KEY].tolist() == [-1, -1, -1, -1]
    again = loader(data["train"][2:6], model.template, tiny_bert)
    assert model.prepare_batch(next(iter(again)))[EXCLUDE_KEY].tolist() == [2, 3, 4, 5]
