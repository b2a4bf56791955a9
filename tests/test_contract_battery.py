"""The contracts every predictor keeps, checked on every text method preset and every CLIP predictor.

After PEFT's common tester and scikit-learn's ``check_estimator``: one battery, one row per predictor.

- probabilities are finite, non-negative and sum to 1 over the classes;
- ``predict`` is the argmax of ``predict_proba``;
- predictions do not depend on how the inputs are split into batches (one at a time vs all at once);
- save -> load gives bit-identical probabilities;
- ``fit`` at a fixed seed is reproducible (two fits from the same start, identical probabilities).

Public APIs only: ``build_trainer(method=...)``, ``RetroTrainer.fit / predict_proba / predict / save /
from_pretrained`` and the classes of :mod:`openprompt_retro.clip`. Tiny random models and a few steps, so
the numbers mean nothing; only the contracts do.
"""
import numpy as np
import pytest
import torch

import openprompt_retro as R
from openprompt_retro.prompt.factory import METHODS, build_trainer

from conftest import SENTENCES

TEMPLATE = '{"placeholder":"text_a"} it was {"mask"} .'
WORDS = ["terrible", "great"]
MORE = [("a fine and funny story", 1), ("a dull and ugly mess", 0), ("the best movie , really great", 1),
        ("boring , i hated it", 0), ("wonderful acting and music", 1), ("a poor script and bad actors", 0)]
TEST = [("it was a great film", 1), ("a terrible waste", 0), ("i enjoyed the music", 1),
        ("the story was dull", 0), ("excellent", 1)]
CONTRACTS = ("probabilities", "predict_is_argmax", "batch_split", "save_load", "reproducible_fit")


def _examples(rows, prefix):
    from openprompt.data_utils import InputExample

    return [InputExample(guid=f"{prefix}{i}", text_a=t, label=y) for i, (t, y) in enumerate(rows)]


# ------------------------------------------------------------------ text presets
class TextRun:
    """One preset trained twice from the same start, its test probabilities and a save -> load of the first."""

    def __init__(self, method, plm_dir, folder):
        train, dev = _examples(SENTENCES, "train"), _examples(MORE, "dev")
        self.test = _examples(TEST, "test")
        first, second = self._fit(method, plm_dir, train, dev), self._fit(method, plm_dir, train, dev)
        self.trainer = first
        self.proba = first.predict_proba(self.test)
        self.predicted = first.predict(self.test)
        self.one_by_one = np.concatenate([first.predict_proba([ex]) for ex in self.test])
        self.refit_proba = second.predict_proba(self.test)
        first.save(folder)
        self.loaded_proba = R.RetroTrainer.from_pretrained(folder, plm_path=plm_dir, model_type="bert",
                                                           device="cpu").predict_proba(self.test)

    @staticmethod
    def _fit(method, plm_dir, train, dev):
        from openprompt.plms import load_plm

        torch.manual_seed(0)  # the PLM's own random parts (none for the tiny BERT; kept for the contract)
        plm, tok, _, wrapper = load_plm("bert", plm_dir)
        args = R.TrainingArgs(max_steps=3, eval_every=3, batch_size=4, max_seq_length=64, progress=False,
                              device="cpu", seed=7)
        config = R.RetroConfig(demo_topk=2, knn_k=3, train_knn_k=3)
        trainer = build_trainer(plm, tok, wrapper, TEMPLATE, WORDS, config=config, args=args,
                                grid=R.MixtureGrid(ks=(2, 3)), method=method,
                                text_pool=train if METHODS[method].demonstrations == "text" else None)
        trainer.fit(train, dev)
        return trainer


@pytest.fixture(scope="module")
def text_runs(tiny_dirs, tmp_path_factory):
    runs = {}

    def get(method):
        if method not in runs:
            runs[method] = TextRun(method, tiny_dirs["bert"], str(tmp_path_factory.mktemp(f"run-{method}")))
        return runs[method]
    return get


# ------------------------------------------------------------------ CLIP predictors
CLASSES = ["cat", "dog", "ship"]


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def clip_data(tmp_path_factory):
    """Tiny CLIP, its tokenizer, and (train, val, test) image features and labels."""
    from openprompt_retro.clip import ClipFeatures, load_clip
    from openprompt_retro.testing import make_tiny_clip

    clip, proc = load_clip(make_tiny_clip(str(tmp_path_factory.mktemp("tiny-clip"))))
    feats = ClipFeatures(clip, proc, progress=False)
    split = {name: (feats.image_features(_images(n, seed)), np.array([0, 1, 2] * (n // 3)))
             for name, n, seed in (("train", 12, 0), ("val", 6, 1), ("test", 7, 2))}
    text = feats.text_features([f"a photo of a {c}." for c in CLASSES])
    return clip, proc, text, split


def _zero_shot_knn(clip, proc, text, split):
    from openprompt_retro import MixtureGrid
    from openprompt_retro.clip import ImageCache, ZeroShotKnn, clip_mixture_grid

    zs = ZeroShotKnn(text, float(clip.logit_scale.exp()), ImageCache(*split["train"], len(CLASSES)))
    zs.tune(*split["val"], grid=MixtureGrid(lambdas=clip_mixture_grid().lambdas, ks=(2, 4), temperatures=(0.1,)))
    return zs


def _tip_adapter(clip, proc, text, split, train_keys=False):
    from openprompt_retro.clip import ImageCache, TipAdapter

    tip = TipAdapter(text, float(clip.logit_scale.exp()), ImageCache(*split["train"], len(CLASSES)),
                     train_keys=train_keys)
    if train_keys:
        tip.fit(*split["train"], epochs=2, batch_size=4, seed=3, progress=False)
    tip.tune(*split["val"])
    return tip


def _retro_coop(clip, proc, text, split):
    from openprompt_retro import MixtureGrid
    from openprompt_retro.clip import RetroCoOp, RetroCoOpConfig, clip_mixture_grid

    grid = MixtureGrid(lambdas=clip_mixture_grid().lambdas, ks=(2, 4), temperatures=(0.1,))
    config = RetroCoOpConfig(n_ctx=2, epochs=2, batch_size=4, grid=grid, seed=3, progress=False)
    return RetroCoOp(clip, proc.tokenizer, CLASSES, config).fit(*split["train"], *split["val"])


def _reload(predictor, folder, clip, proc):
    """The saved folder read back: RetroCoOp is given CLIP and its tokenizer (not saved), the others need nothing."""
    from openprompt_retro.clip import RetroCoOp

    if isinstance(predictor, RetroCoOp):
        return RetroCoOp.load(folder, clip, proc.tokenizer)
    return type(predictor).load(folder)


#: CLIP predictor -> how to build it from (clip, proc, text, split)
CLIP_PREDICTORS = {
    "ZeroShotKnn": _zero_shot_knn,
    "TipAdapter": _tip_adapter,
    "Tip-Adapter-F": lambda *a: _tip_adapter(*a, train_keys=True),
    "RetroCoOp": _retro_coop,
}


class ClipRun:
    """One CLIP predictor fitted twice from the same start, its test probabilities and a save -> load of the first."""

    def __init__(self, name, data, folder):
        test = data[3]["test"][0]
        first, second = CLIP_PREDICTORS[name](*data), CLIP_PREDICTORS[name](*data)
        self.proba = first.predict_proba(test)
        self.predicted = first.predict(test)
        self.one_by_one = np.concatenate([first.predict_proba(test[i:i + 1]) for i in range(len(test))])
        self.refit_proba = second.predict_proba(test)
        first.save(folder)
        self.loaded_proba = _reload(first, folder, *data[:2]).predict_proba(test)


@pytest.fixture(scope="module")
def clip_runs(clip_data, tmp_path_factory):
    runs = {}

    def get(name):
        if name not in runs:
            runs[name] = ClipRun(name, clip_data, str(tmp_path_factory.mktemp(f"clip-{name}")))
        return runs[name]
    return get


# ------------------------------------------------------------------ the battery
def _cases():
    """(family, predictor, contract): every contract on every text preset and every CLIP predictor."""
    for method in METHODS:
        for contract in CONTRACTS:
            yield pytest.param("text", method, contract, id=f"{method}-{contract}")
    for name in CLIP_PREDICTORS:
        for contract in CONTRACTS:
            yield pytest.param("clip", name, contract, id=f"clip-{name}-{contract}")


@pytest.mark.parametrize("family,name,contract", list(_cases()))
def test_contract(family, name, contract, text_runs, clip_runs):
    run = text_runs(name) if family == "text" else clip_runs(name)
    CHECKS[contract](run)


def check_probabilities(run):
    p = run.proba
    assert p.ndim == 2 and p.shape[0] == len(run.one_by_one)
    assert np.isfinite(p).all() and (p >= 0).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)


def check_predict_is_argmax(run):
    np.testing.assert_array_equal(run.predicted, run.proba.argmax(-1))


def check_batch_split(run):
    """One example per call vs all in one call: padding and matmul shapes move float32 bits (seen: 3e-6 under
    Tip-Adapter's scale-100 logits), nothing more; a different training seed moves them by 1e-3."""
    np.testing.assert_allclose(run.one_by_one, run.proba, rtol=0, atol=2e-5)


def check_save_load(run):
    np.testing.assert_array_equal(run.loaded_proba, run.proba)


def check_reproducible_fit(run):
    np.testing.assert_array_equal(run.refit_proba, run.proba)


CHECKS = {"probabilities": check_probabilities, "predict_is_argmax": check_predict_is_argmax,
          "batch_split": check_batch_split, "save_load": check_save_load,
          "reproducible_fit": check_reproducible_fit}
assert set(CHECKS) == set(CONTRACTS)
