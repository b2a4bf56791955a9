"""Saved runs: checked, all-or-nothing loads and from_pretrained from the folder alone."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

import openprompt_retro as R
from openprompt_retro.prompt.saved_run import SavedRunError

from helpers import MASK, TEXT, WORDS, retro_model, trainer


def load_tiny(path):
    from openprompt.plms import load_plm

    torch.manual_seed(0)
    return load_plm("bert", path)


def model_for(tiny, words=WORDS, text=TEXT, demonstrations="neural"):
    """A ManualTemplate + ManualVerbalizer model, as the factory builds it."""
    plm, tok, _, _ = tiny
    return R.build_model(plm, tok, text, words, demonstrations, R.RetroConfig(demo_topk=2, knn_k=3, train_knn_k=3, **MASK))


@pytest.fixture(scope="module")
def saved(tiny_dirs, tmp_path_factory):
    """A trained 2-class run saved by RetroTrainer.save, and its predictions."""
    from openprompt.data_utils import InputExample
    from conftest import SENTENCES

    examples = [InputExample(guid=f"ex{i}", text_a=t, label=y) for i, (t, y) in enumerate(SENTENCES)]
    tiny = load_tiny(tiny_dirs["bert"])
    tr = trainer(model_for(tiny), tiny, lr=1e-2)
    tr.fit(examples[:6], examples[6:])
    d = tmp_path_factory.mktemp("run") / "run"
    tr.save(str(d))
    return d, tr.predict_proba(examples), examples, tr


def copy_run(saved, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(saved[0], d)
    return d


def snapshot(model):
    s = model.store
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, model.config.to_dict(),
            (s.keys.copy(), s.labels.copy(), list(s.guids), len(s)))


def assert_unchanged(model, snap):
    state, config, (keys, labels, guids, n) = snap
    now = model.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"
    assert model.config.to_dict() == config
    s = model.store
    assert len(s) == n and np.array_equal(s.keys, keys) and np.array_equal(s.labels, labels) and s.guids == guids
    assert model.mixing().store is model.knn_store


# ------------------------------------------------------------------ the saved folder
def test_the_folder_records_what_the_run_is(saved, tiny_dirs):
    d = saved[0]
    run = json.loads((d / "run.json").read_text())
    fp = run["fingerprint"]
    assert fp["template_text"] == '{"placeholder": \'text_a\'} it was {"mask": None} .'
    # the text the template was built from: its raw spelling when the patches were installed before the template
    # was built (they record it), else the parsed form spelled back; either rebuilds the same template
    from openprompt.prompts import ManualTemplate

    tok = load_tiny(tiny_dirs["bert"])[1]
    assert ManualTemplate(tokenizer=tok, text=run["template"]["text"]).text == \
        ManualTemplate(tokenizer=tok, text=TEXT).text
    assert run["template"]["class"] == "ManualTemplate"
    assert fp["label_words"] == WORDS and fp["num_classes"] == 2 and fp["demonstrations"] == "neural"
    assert (fp["model_type"], fp["architecture"], fp["key_type"], fp["key_dim"]) == \
        ("bert", "BertForMaskedLM", "bert-transform", 32)
    assert run["plm"]["model_type"] == "bert" and run["plm"]["saved"] is False
    assert run["verbalizer"]["label_words"] == [[" terrible"], [" great"]]
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != "run.json")
    assert files == ["prompt_model.safetensors", "retro_config.json", "store/index.faiss", "store/keys.npy",
                     "store/labels.npy", "store/store.json", "trainer.json", "training_args.json"]
    assert run["checksums"] == {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in files}
    assert [p.name for p in d.parent.iterdir()] == ["run"]  # no temporary folder left beside it
    assert json.loads((d / "trainer.json").read_text())["tuned"]["knn_k"] == saved[3].tuned["knn_k"]
    assert json.loads((d / "training_args.json").read_text())["lr"] == 1e-2


# ------------------------------------------------------------------ loads that check first
@pytest.mark.parametrize("words,text,demos,msg", [
    (["great", "terrible"], TEXT, "neural",
     r"label words differ: saved \['terrible', 'great'\], model \['great', 'terrible'\]"),
    (["terrible", "great", "fine"], TEXT, "neural", "number of classes differs: saved 2, model 3"),
    (WORDS, '{"placeholder":"text_a"} all in all , {"mask"} .', "neural", "template text differs"),
    (WORDS, TEXT, "none", "demonstration mode differs: saved 'neural', model 'none'"),
])
def test_load_names_every_difference_and_changes_nothing(saved, tiny_dirs, words, text, demos, msg):
    model = model_for(load_tiny(tiny_dirs["bert"]), words, text, demos)
    snap = snapshot(model)
    with pytest.raises(SavedRunError, match=msg):
        model.load(str(saved[0]))
    assert_unchanged(model, snap)


def test_swapped_label_words_name_both_lists(saved, tiny_dirs):
    model = model_for(load_tiny(tiny_dirs["bert"]), ["great", "terrible"])
    with pytest.raises(SavedRunError) as err:
        model.load(str(saved[0]))
    assert "2 differences" in str(err.value)
    assert "verbalizer label words differ: saved [[' terrible'], [' great']], model [[' great'], [' terrible']]" \
        in str(err.value)


def _resum(d, name):
    """Record the checksum of an edited file in run.json, as if it had been saved like this."""
    if not (d / "run.json").exists():
        return
    run = json.loads((d / "run.json").read_text())
    run["checksums"][name] = hashlib.sha256((d / name).read_bytes()).hexdigest()
    (d / "run.json").write_text(json.dumps(run))


def _rewrite_weights(d, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "prompt_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "prompt_model.safetensors"))
    _resum(d, "prompt_model.safetensors")


def _bad_config(d):
    (d / "retro_config.json").write_text(json.dumps({"knn_k": 0}))
    _resum(d, "retro_config.json")


def _flip_byte(path, back=37):
    data = bytearray(path.read_bytes())
    data[len(data) - back] ^= 0x01
    path.write_bytes(bytes(data))


def _renamed_tensor(t):
    name = next(k for k in t if k.endswith("cls.predictions.transform.dense.weight"))
    t[name.replace("dense", "dense_renamed")] = t.pop(name)


FAULTS = {
    "missing retro_config.json": (lambda d: (d / "retro_config.json").unlink(), FileNotFoundError,
                                  "missing retro_config.json"),
    "missing store": (lambda d: shutil.rmtree(d / "store"), FileNotFoundError, "missing store/"),
    "missing weights": (lambda d: (d / "prompt_model.safetensors").unlink(), FileNotFoundError,
                        "missing prompt_model.safetensors"),
    "flipped byte in index.faiss": (lambda d: _flip_byte(d / "store" / "index.faiss"), SavedRunError,
                                    "corrupt .*store/index.faiss: its sha256 does not match the checksum in run.json"),
    "missing labels.npy": (lambda d: (d / "store" / "labels.npy").unlink(), SavedRunError,
                           "missing .*store/labels.npy, which run.json lists"),
    "flipped byte in the weights": (lambda d: _flip_byte(d / "prompt_model.safetensors", back=1000), SavedRunError,
                                    "corrupt .*prompt_model.safetensors: its sha256 does not match"),
    "edited config": (lambda d: (d / "retro_config.json").write_text(json.dumps({"knn_k": 0})), SavedRunError,
                      "corrupt .*retro_config.json: its sha256 does not match"),
    "bad config value": (_bad_config, SavedRunError, "corrupt .*retro_config.json: knn_k must be at least 1"),
    "renamed tensor": (lambda d: _rewrite_weights(d, _renamed_tensor), SavedRunError,
                       r"prompt_model.safetensors does not match this model's weights \(1 missing: "
                       r"\['prompt_model.plm.cls.predictions.transform.dense.weight'\]; 1 unexpected: "
                       r"\['prompt_model.plm.cls.predictions.transform.dense_renamed.weight'\]"),
    "reshaped tensor": (lambda d: _rewrite_weights(d, lambda t: t.update(
        {"verbalizer.base.label_words_ids": torch.zeros(3, 1, 1, dtype=torch.long)})), SavedRunError,
        r"1 with another shape: \['verbalizer.base.label_words_ids: saved \(3, 1, 1\), model \(2, 1, 1\)'\]"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failed_load_leaves_the_model_exactly_as_it_was(saved, tiny_dirs, tmp_path, fault):
    break_it, error, msg = FAULTS[fault]
    d = copy_run(saved, tmp_path)
    break_it(d)
    model = model_for(load_tiny(tiny_dirs["bert"]))
    model.store.build(np.ones((3, 32)), [0, 1, 0], guids=["a", "b", "c"])  # a store that must survive too
    snap = snapshot(model)
    with pytest.raises(error, match=msg):
        model.load(str(d))
    assert_unchanged(model, snap)


def test_a_folder_without_run_json_is_refused_naming_it(saved, tiny_dirs, tmp_path):
    d = copy_run(saved, tmp_path)
    (d / "run.json").unlink()
    swapped = model_for(load_tiny(tiny_dirs["bert"]), ["great", "terrible"])  # must not be overwritten
    snap = snapshot(swapped)
    with pytest.raises(SavedRunError, match=r"has no run.json .*prompt_model.safetensors.* a checksum of every "
                                            r"file.* saved again with this one"):
        swapped.load(str(d))
    assert_unchanged(swapped, snap)


def test_format_1_runs_load_with_a_warning_that_only_two_files_are_checked(saved, tiny_dirs, tmp_path):
    d = copy_run(saved, tmp_path)
    run = json.loads((d / "run.json").read_text())
    run["format_version"] = 1
    run["checksums"] = {k: run["checksums"][k] for k in ("prompt_model.safetensors", "retro_config.json")}
    (d / "run.json").write_text(json.dumps(run))
    model = model_for(load_tiny(tiny_dirs["bert"]))
    with pytest.warns(UserWarning, match="format 1.*cannot be checked; save the run again"):
        model.load(str(d))
    np.testing.assert_array_equal(trainer(model, load_tiny(tiny_dirs["bert"])).predict_proba(saved[2]), saved[1])


@pytest.mark.parametrize("entry", ["../outside.txt", "/etc/hostname", "store//keys.npy"])
def test_a_checksum_entry_outside_the_folder_is_refused(saved, tiny_dirs, tmp_path, entry):
    d = copy_run(saved, tmp_path)
    run = json.loads((d / "run.json").read_text())
    run["checksums"][entry] = "0" * 64
    (d / "run.json").write_text(json.dumps(run))
    with pytest.raises(SavedRunError, match="corrupt run.json .*bad checksum entry"):
        model_for(load_tiny(tiny_dirs["bert"])).load(str(d))


def test_a_run_json_that_drops_a_files_checksum_is_refused(saved, tiny_dirs, tmp_path):
    d = copy_run(saved, tmp_path)
    run = json.loads((d / "run.json").read_text())
    del run["checksums"]["store/keys.npy"]
    (d / "run.json").write_text(json.dumps(run))
    with pytest.raises(SavedRunError, match=r"corrupt run.json .*no checksum of \['store/keys.npy'\]"):
        model_for(load_tiny(tiny_dirs["bert"])).load(str(d))


# ------------------------------------------------------------------ from_pretrained
def test_trainer_from_pretrained_is_bit_identical(saved):
    d, probs, examples, tr = saved
    again = R.RetroTrainer.from_pretrained(str(d))
    np.testing.assert_array_equal(again.predict_proba(examples), probs)
    assert again.args == tr.args and again.grid == tr.grid and again.tuned == tr.tuned
    assert again.history == json.loads(json.dumps(tr.history))
    c = again.model.config
    assert (c.knn_lambda, c.knn_k, c.knn_temperature) == (tr.tuned["knn_lambda"], tr.tuned["knn_k"],
                                                          tr.tuned["knn_temperature"])
    model = R.RetroPromptForClassification.from_pretrained(str(d))
    assert model.template.label_words == WORDS and len(model.store) == 6


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_from_pretrained_with_save_plm_needs_nothing_but_the_folder(tmp_path, examples, kind):
    from openprompt.plms import load_plm
    from openprompt_retro.testing import make_tiny_mlm

    src = make_tiny_mlm(kind, str(tmp_path / "plm-src"))
    torch.manual_seed(0)
    tiny = load_plm(kind, src)
    tr = trainer(model_for(tiny, demonstrations="none"), tiny, lr=1e-2, tune_inference=False)
    tr.fit(examples[:6])
    tr.save(str(tmp_path / "run"), save_plm=True)
    probs = tr.predict_proba(examples)
    shutil.rmtree(src)  # the original PLM is gone
    again = R.RetroTrainer.from_pretrained(str(tmp_path / "run"), device="cpu")
    np.testing.assert_array_equal(again.predict_proba(examples), probs)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["plm"] == {"model_type": kind, "name_or_path": src, "saved": True}
    assert "plm/config.json" in run["checksums"]


@pytest.mark.parametrize("template,verbalizer,demos", [("mixed", "soft", "text"), ("soft", "manual", "neural")])
def test_from_pretrained_rebuilds_other_templates_and_verbalizers(tiny_dirs, tmp_path, examples, template,
                                                                   verbalizer, demos):
    tiny = load_tiny(tiny_dirs["bert"])
    model = retro_model(tiny, template=template, verbalizer=verbalizer, demonstrations=demos, pool=examples[:6],
                        knn_lambda=0.3)
    tr = trainer(model, tiny, lr=1e-2, tune_inference=False)
    tr.fit(examples[:6])
    tr.save(str(tmp_path / "run"))
    again = R.RetroTrainer.from_pretrained(str(tmp_path / "run"))
    np.testing.assert_array_equal(again.predict_proba(examples), tr.predict_proba(examples))
    assert type(again.model.template.base).__name__ == type(model.template.base).__name__


def test_from_pretrained_names_a_plm_that_is_not_the_runs(saved, tiny_dirs):
    with pytest.raises(SavedRunError, match="PLM architecture differs: saved 'BertForMaskedLM', model "
                                            "'RobertaForMaskedLM'.*vocabulary size differs"):
        R.RetroTrainer.from_pretrained(str(saved[0]), plm_path=tiny_dirs["roberta"], model_type="roberta")


def test_from_pretrained_refuses_other_folders(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing prompt_model.safetensors, retro_config.json, store/"):
        R.RetroTrainer.from_pretrained(str(tmp_path))
    d = copy_run(saved, tmp_path)
    (d / "run.json").rename(d / "other.json")
    with pytest.raises(SavedRunError, match="not a complete saved RetroPrompt run: it has no run.json"):
        R.RetroPromptForClassification.from_pretrained(str(d))
    run = json.loads((d / "other.json").read_text())
    (d / "run.json").write_text(json.dumps({"format": "clip-adapter run"}))
    with pytest.raises(SavedRunError, match="does not describe a RetroPrompt run"):
        R.RetroPromptForClassification.from_pretrained(str(d))
    (d / "run.json").write_text(json.dumps({**run, "template": {**run["template"], "class": "PtuningTemplate"}}))
    with pytest.raises(SavedRunError, match="from_pretrained rebuilds .* used PtuningTemplate .* call model.load"):
        R.RetroPromptForClassification.from_pretrained(str(d))
    (d / "run.json").write_text(json.dumps({**run, "plm": {**run["plm"], "name_or_path": str(tmp_path / "gone")}}))
    with pytest.raises(SavedRunError, match="is the folder .*gone', which does not exist here: pass plm_path="):
        R.RetroPromptForClassification.from_pretrained(str(d))


@pytest.mark.parametrize("classes", [2, 3])
def test_a_store_from_another_run_is_refused_naming_the_file(saved, tmp_path, classes):
    d = copy_run(saved, tmp_path)
    other = R.KnowledgeStore(32, classes, built_by=R.KnowledgeStore.load(str(d / "store")).built_by)
    other.add(np.random.default_rng(0).normal(size=(6, 32)), [0, 1, 0, 1, 0, 1])
    other.save(str(d / "store"))  # a complete, self-consistent store of the same shape
    with pytest.raises(SavedRunError, match=r"corrupt .*store/index.faiss: its sha256 does not match the checksum "
                                            r"in run.json .*another run"):
        R.RetroTrainer.from_pretrained(str(d))
    with pytest.raises(SavedRunError, match="store/index.faiss"):
        R.RetroPromptForClassification.from_pretrained(str(d))


def test_replaced_trainer_files_are_refused_naming_them(saved, tmp_path):
    d = copy_run(saved, tmp_path)
    (d / "trainer.json").write_text(json.dumps({"tuned": None, "history": []}))
    with pytest.raises(SavedRunError, match=r"corrupt .*trainer.json: its sha256 does not match"):
        R.RetroTrainer.from_pretrained(str(d))


def test_a_replaced_text_pool_is_refused_naming_it(tiny_dirs, tmp_path, examples):
    tiny = load_tiny(tiny_dirs["bert"])
    model = retro_model(tiny, demonstrations="text", pool=examples[:6])
    model.save(str(tmp_path / "run"))
    pool = tmp_path / "run" / "text_pool.json"
    records = json.loads(pool.read_text())
    pool.write_text(json.dumps([{**r, "label": 1 - r["label"]} for r in records]))  # labels swapped
    with pytest.raises(SavedRunError, match=r"corrupt .*text_pool.json: its sha256 does not match"):
        R.RetroPromptForClassification.from_pretrained(str(tmp_path / "run"))


def test_template_text_is_recovered_when_the_template_was_built_before_the_hook(tiny_bert):
    from openprompt.prompts import ManualTemplate
    from openprompt_retro.prompt.saved_run import canonical_template_text, template_text

    raw = '{"placeholder":"text_a", "shortenable": False} {"meta":"word", "post_processing": lambda s: s.lower()} ' \
          'so it was {"mask"} !'
    t = ManualTemplate(tokenizer=tiny_bert[1], text=raw)
    assert template_text(t) == raw
    t.__dict__.pop("_retro_raw_text")  # as if built before openprompt_retro.prompt was imported
    again = ManualTemplate(tokenizer=tiny_bert[1], text=template_text(t))
    assert canonical_template_text(again) == canonical_template_text(t)
    assert [{k: v for k, v in d.items() if k != "post_processing"} for d in again.text] == \
        [{k: v for k, v in d.items() if k != "post_processing"} for d in t.text]


def test_a_key_store_built_by_another_encoder_is_refused_even_with_its_checksums_rewritten(tiny_dirs, tmp_path):
    """A run's key store that records another key encoder (copied in from another run, run.json's checksums
    brought up to date) is refused by what built it, naming it, and nothing is loaded."""
    from openprompt.data_utils import InputExample
    from conftest import SENTENCES

    from openprompt_retro.core.store import StoreError

    examples = [InputExample(guid=f"ex{i}", text_a=t, label=y) for i, (t, y) in enumerate(SENTENCES)]
    plm, tok, _, _ = tiny = load_tiny(tiny_dirs["bert"])
    config = R.RetroConfig(demo_topk=2, knn_k=3, train_knn_k=3, key_encoder="frozen-mean", knn_readout="class-mean")
    tr = trainer(R.build_model(plm, tok, TEXT, WORDS, "neural", config), tiny, lr=1e-2)
    tr.fit(examples[:6], examples[6:])
    d = tmp_path / "run"
    tr.save(str(d))
    R.RetroTrainer.from_pretrained(str(d))  # as saved, it loads
    meta = json.loads((d / "key_store" / "store.json").read_text())
    assert meta["built_by"]["key_encoder"] == "frozen-mean"
    meta["built_by"]["key_encoder"] = "sentence"
    (d / "key_store" / "store.json").write_text(json.dumps(meta))
    _resum(d, "key_store/store.json")
    with pytest.raises(StoreError, match=r"built with key_encoder='sentence', expected 'frozen-mean'.*nothing was loaded"):
        R.RetroTrainer.from_pretrained(str(d))
