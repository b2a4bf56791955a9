import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import openprompt_retro as R
from openprompt_retro.clip import (ClipFeatures, CoOpPromptLearner, ImageCache, ImageSet, RetroCoOp, RetroCoOpConfig,
                                   TipAdapter, ZeroShotKnn, check_images, k_shot_indices, load_clip,
                                   tip_adapter_logits)
from openprompt_retro.core.knn import Mixture
from openprompt_retro.testing import make_tiny_clip

CLASSES = ["cat", "dog", "ship"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return load_clip(make_tiny_clip(str(tmp_path_factory.mktemp("tiny-clip"))))


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_only_context_vectors_get_gradients(tiny_clip):
    clip, proc = tiny_clip
    for kw in (dict(n_ctx=4), dict(ctx_init="a photo of a"), dict(n_ctx=3, class_specific=True)):
        learner = CoOpPromptLearner(clip, proc.tokenizer, CLASSES, **kw)
        feats = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
        loss = (feats @ learner().t()).logsumexp(-1).sum()
        loss.backward()
        assert [n for n, p in learner.named_parameters()] == ["ctx"] and learner.ctx.grad is not None
        assert learner.ctx.grad.abs().sum() > 0
        assert all(p.grad is None for p in clip.parameters())
    assert learner.ctx.shape == (3, 3, 32)  # class-specific: one context per class


def test_context_goes_through_clip_text_transformer(tiny_clip):
    clip, proc = tiny_clip
    learner = CoOpPromptLearner(clip, proc.tokenizer, CLASSES, ctx_init="a photo of a")
    from openprompt_retro.clip.features import as_features

    # initialised from "a photo of a": identical to encoding the plain prompt text
    tok = proc.tokenizer([f"a photo of a {c}." for c in CLASSES], padding="max_length",
                         max_length=clip.config.text_config.max_position_embeddings, return_tensors="pt")
    with torch.no_grad():
        want = torch.nn.functional.normalize(as_features(clip.get_text_features(**tok)), dim=-1)
        assert torch.allclose(learner(), want, atol=1e-5)
        learner.ctx.add_(torch.randn_like(learner.ctx))  # (a constant shift would vanish in LayerNorm)
        assert not torch.allclose(learner(), want, atol=1e-3)


def test_tip_adapter_logits_hand_case():
    f = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    out = tip_adapter_logits(f, keys, labels, 2, alpha=2.0, beta=3.0)
    # affinities exp(-3 (1 - cos)): cos = 1, 0, 0.6
    want = [2.0 * 1.0, 2.0 * (math.exp(-3.0) + math.exp(-3.0 * 0.4))]
    assert torch.allclose(out, torch.tensor([want]))


def test_cache_neighbours_equal_brute_force():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 16)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    labels = rng.integers(0, 3, size=40)
    cache = ImageCache(feats, labels, 3)
    q = rng.normal(size=(7, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    res = cache.store.search(q, 5)
    brute = np.argsort(-(q @ feats.T), axis=1)[:, :5]
    np.testing.assert_array_equal(res.ids, brute)
    np.testing.assert_allclose(res.scores, np.take_along_axis(q @ feats.T, brute, 1), atol=1e-5)


def test_lambda_limits_of_the_mixture(tiny_clip):
    clip, proc = tiny_clip
    feats = ClipFeatures(clip, proc, progress=False)
    f_train = feats.image_features(images(12))
    labels = np.array([0, 1, 2] * 4)
    cache = ImageCache(f_train, labels, 3)
    f_test = feats.image_features(images(5, seed=1))
    text = feats.text_features([f"a photo of a {c}." for c in CLASSES])
    zs = ZeroShotKnn(text, float(clip.logit_scale.exp()), cache)
    zs.mixture = Mixture(lam=0.0, k=4, temperature=0.1)
    np.testing.assert_allclose(zs.predict_proba(f_test), zs.zero_shot_probs(f_test), atol=1e-6)
    zs.mixture = Mixture(lam=1.0, k=4, temperature=0.1)
    np.testing.assert_allclose(zs.predict_proba(f_test), cache.p_knn(f_test, 4, 0.1), atol=1e-6)
    m = RetroCoOp(clip, proc.tokenizer, CLASSES, RetroCoOpConfig(n_ctx=2, epochs=2, progress=False))
    m.fit(f_train, labels)
    m.mixture = Mixture(lam=0.0, k=4, temperature=0.1)
    np.testing.assert_allclose(m.predict_proba(f_test), m.prompt_probs(f_test), atol=1e-6)
    m.mixture = Mixture(lam=1.0, k=4, temperature=0.1)
    np.testing.assert_allclose(m.predict_proba(f_test), cache.p_knn(f_test, 4, 0.1), atol=1e-6)


def test_zero_shot_knn_tunes_its_mixture_on_the_grid_it_is_given(tiny_clip):
    from openprompt_retro.clip import clip_mixture_grid
    from openprompt_retro.core.knn import MixtureGrid, select_mixture

    clip, proc = tiny_clip
    feats = ClipFeatures(clip, proc, progress=False)
    cache = ImageCache(feats.image_features(images(12)), np.array([0, 1, 2] * 4), 3)
    f_val, y_val = feats.image_features(images(6, seed=2)), np.array([0, 1, 2] * 2)
    zs = ZeroShotKnn(feats.text_features([f"a photo of a {c}." for c in CLASSES]), float(clip.logit_scale.exp()),
                     cache)
    grid = clip_mixture_grid()
    want = select_mixture(zs.zero_shot_probs(f_val), y_val, lambda k, t: cache.p_knn(f_val, k, t), grid.lambdas,
                          grid.ks, grid.temperatures)
    assert zs.tune(f_val, y_val) == want == zs.mixture  # the default grid: the CLIP one
    fixed = zs.tune(f_val, y_val, MixtureGrid.fixed(0.3, 2, 0.02))
    assert (fixed.lam, fixed.k, fixed.temperature) == (0.3, 2, 0.02) and zs.mixture == fixed


def test_retro_coop_trains_only_context_and_tunes_on_validation(tiny_clip):
    clip, proc = tiny_clip
    feats = ClipFeatures(clip, proc, progress=False)
    f_train, labels = feats.image_features(images(12)), np.array([0, 1, 2] * 4)
    before = {n: p.clone() for n, p in clip.named_parameters()}
    m = RetroCoOp(clip, proc.tokenizer, CLASSES, RetroCoOpConfig(n_ctx=2, epochs=3, progress=False))
    ctx0 = m.learner.ctx.detach().clone()
    m.fit(f_train, labels, feats.image_features(images(6, seed=2)), np.array([0, 1, 2] * 2))
    assert not torch.equal(m.learner.ctx, ctx0)
    assert all(torch.equal(p, before[n]) for n, p in clip.named_parameters())
    assert m.mixture.accuracy is not None and m.mixture.lam in m.config.grid.lambdas


def test_tip_adapter_f_trains_only_cache_keys(tiny_clip):
    clip, proc = tiny_clip
    feats = ClipFeatures(clip, proc, progress=False)
    f_train, labels = feats.image_features(images(9)), np.array([0, 1, 2] * 3)
    cache = ImageCache(f_train, labels, 3)
    text = feats.text_features(CLASSES)
    tip = TipAdapter(text, 10.0, cache)
    assert not tip.keys.requires_grad
    keys0 = tip.keys.detach().clone()
    tip.fit(f_train, labels, epochs=2, progress=False)
    assert not torch.equal(tip.keys, keys0)
    assert [n for n, p in tip.named_parameters() if p.requires_grad] == ["keys"]
    assert torch.equal(tip.text, text)


def test_feature_cache_round_trip(tiny_clip, tmp_path):
    clip, proc = tiny_clip
    feats = ClipFeatures(clip, proc, model_id="tiny", cache_dir=str(tmp_path), progress=False)
    a = feats.image_features(images(4), augment_views=2, seed=3)
    assert len(os.listdir(tmp_path)) == 1
    np.testing.assert_array_equal(feats.image_features(images(4), augment_views=2, seed=3), a)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_k_shot_sampling_is_reproducible():
    labels = np.repeat(np.arange(3), 10)
    a, b = k_shot_indices(labels, 4, seed=7), k_shot_indices(labels, 4, seed=7)
    np.testing.assert_array_equal(a, b)
    assert np.bincount(labels[a]).tolist() == [4, 4, 4]
    assert not np.array_equal(a, k_shot_indices(labels, 4, seed=8))
    val = k_shot_indices(labels, 4, seed=9, exclude=a)
    assert not set(val) & set(a)


def test_bad_image_input():
    with pytest.raises(ValueError, match="grayscale"):
        check_images(np.zeros((2, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="channels first"):
        check_images(np.zeros((2, 3, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        check_images(np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="do not match the 2 class names"):
        ImageSet(np.zeros((3, 8, 8, 3), dtype=np.uint8), [0, 1, 2], ["cat", "dog"])
    with pytest.raises(ValueError, match="unique"):
        ImageSet(np.zeros((2, 8, 8, 3), dtype=np.uint8), [0, 1], ["cat", "cat"])
    with pytest.raises(ValueError, match="class 1 has 2 images available, fewer than K=4"):
        k_shot_indices(np.array([0, 0, 0, 0, 1, 1]), 4, seed=0)


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "..", "shared", "data", "images", "cifar10", "test.npz")),
                    reason="../shared CIFAR-10 not present")
def test_clip_example_runs_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "examples/clip_cifar10.py", "--model", "tiny-clip", "--epochs", "2",
                          "--test-limit", "500", "--out", str(tmp_path / "r.json"), "--cache-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RetroCoOp" in out.stdout and (tmp_path / "r.json").exists()
    subset = json.loads((tmp_path / "r.json").read_text())["test_subset"]  # test.npz is sorted by class
    assert subset["limit"] == 500 and subset["seed"] == 1 and subset["stratified"]
    assert subset["class_counts"] == {str(c): 50 for c in range(10)}  # before: the first 500 were all airplanes


def test_tip_adapter_tune_picks_the_alpha_beta_with_the_best_validation_accuracy():
    # one cache entry k (class 0); A = k (label 0), B orthogonal to k (label 1); CLIP favours class 1 by
    # 1.5 on A and 0.15 on B. Cache logit of class 0: alpha exp(-beta (1 - cos)) = alpha on A, alpha e^-beta on B.
    # A right iff alpha > 1.5; B right iff alpha e^-beta < 0.15: only (2, 3) and (2.5, 3), tied: the first wins.
    cache = ImageCache(np.array([[1.0, 0.0, 0.0]], dtype=np.float32), np.array([0]), 2)
    text = torch.tensor([[0.0, 0.0, 0.0], [1.5, 0.15, 0.0]])
    tip = TipAdapter(text, 1.0, cache)
    val = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    best = tip.tune(val, np.array([0, 1]), alphas=(1.0, 2.0, 2.5, 4.0), betas=(0.1, 3.0))
    assert best == {"val_accuracy": 1.0, "alpha": 2.0, "beta": 3.0}
    assert (tip.alpha, tip.beta) == (2.0, 3.0)
    assert tip.predict_proba(val).argmax(1).tolist() == [0, 1]


def test_image_cache_leaves_each_image_out_of_its_own_p_knn():
    feats = np.eye(3, dtype=np.float32)[[0, 0, 1, 2]] + np.float32(0.01) * np.arange(4)[:, None]
    cache = ImageCache(feats, np.array([0, 1, 1, 2]), 3)  # images 0 and 1 nearly equal, labels differ
    own = cache.p_knn(feats, k=1, temperature=0.1)
    np.testing.assert_allclose(own, np.eye(3)[[0, 1, 1, 2]], atol=1e-6)
    loo = cache.p_knn(feats, k=1, temperature=0.1, exclude_self=True)
    np.testing.assert_allclose(loo[:2], np.eye(3)[[1, 0]], atol=1e-6)  # each finds its twin, never itself


def _first_epoch_loss(tiny_clip, **config):
    """(RetroCoOp after one full-batch epoch on 9 random images, the initial logits, the labels, the features)."""
    from openprompt_retro.clip import clip_logits

    clip, proc = tiny_clip
    feats = ClipFeatures(clip, proc, progress=False)
    f_train, labels = feats.image_features(images(9)), np.array([0, 1, 2] * 3)
    m = RetroCoOp(clip, proc.tokenizer, CLASSES, RetroCoOpConfig(
        n_ctx=2, epochs=1, batch_size=16, train_knn_k=2, train_knn_temperature=0.05, progress=False, **config))
    with torch.no_grad():  # one batch per epoch: the epoch's loss is taken at the initial context
        logits = clip_logits(torch.from_numpy(f_train), m.learner(), m.logit_scale)
    m.fit(f_train, labels)
    return m, logits, torch.from_numpy(labels), f_train


def test_retro_coop_loss_weights_leave_each_image_out_and_are_capped_like_text(tiny_clip):
    from openprompt_retro.core.loss import knn_guided_loss

    m, logits, y, f_train = _first_epoch_loss(tiny_clip, knn_loss_gate=False)
    p_loo = m.cache.p_knn(f_train, 2, 0.05, exclude_self=True)[np.arange(9), y.numpy()]
    p_self = m.cache.p_knn(f_train, 2, 0.05)[np.arange(9), y.numpy()]
    assert m.config.max_loss_weight == R.RetroConfig().max_loss_weight == 3.0
    want = knn_guided_loss(logits, y, torch.from_numpy(p_loo), "knn", 1.0, max_weight=3.0)
    leaky = knn_guided_loss(logits, y, torch.from_numpy(p_self), "knn", 1.0, max_weight=3.0)
    unbounded = knn_guided_loss(logits, y, torch.from_numpy(p_loo), "knn", 1.0)
    assert m.history[0]["loss"] == pytest.approx(float(want), rel=1e-5)
    assert float(leaky) != pytest.approx(float(want), rel=1e-3)
    assert float(unbounded) > 2 * float(want)  # p_kNN(gold) = 0 for most images: weight 14.8 without the cap
    m, *_ = _first_epoch_loss(tiny_clip, knn_loss_gate=False, max_loss_weight=None)
    assert m.history[0]["loss"] == pytest.approx(float(unbounded), rel=1e-5)


def test_retro_coop_trains_with_plain_ce_while_the_cache_is_at_chance(tiny_clip):
    import torch.nn.functional as F

    m, logits, y, _ = _first_epoch_loss(tiny_clip)  # random images: leave-one-out accuracy 2/9 < 1/3
    assert m.knn_loss_active is False and m.store_loo_accuracy < 1 / 3
    assert m.history[0]["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


def test_the_clip_package_exports_every_name_it_had_before_the_split():
    import openprompt_retro.clip as clip_pkg

    before = ["ImageSet", "check_images", "k_shot_indices", "load_image_arrays", "load_image_folder", "ClipFeatures",
              "augment", "load_clip", "load_open_clip", "ImageCache", "RetroCoOp", "RetroCoOpConfig", "TipAdapter",
              "ZeroShotKnn", "clip_logits", "tip_adapter_logits", "tune_mixture", "zero_shot_text_features",
              "CoOpPromptLearner"]
    assert set(before) <= set(clip_pkg.__all__) and all(hasattr(clip_pkg, name) for name in before)


def _fitted(tiny_clip):
    """(clip, proc, train / val / test features and labels, text features) on random images."""
    clip, proc = tiny_clip
    feats = ClipFeatures(clip, proc, progress=False)
    data = {name: (feats.image_features(images(n, seed)), np.array([0, 1, 2] * (n // 3)))
            for name, n, seed in (("train", 12, 0), ("val", 6, 1), ("test", 7, 2))}
    return clip, proc, data, feats.text_features([f"a photo of a {c}." for c in CLASSES])


def test_tip_adapter_save_load_keeps_tuned_alpha_beta_and_trained_keys(tiny_clip, tmp_path):
    clip, proc, data, text = _fitted(tiny_clip)
    tip = TipAdapter(text, float(clip.logit_scale.exp()), ImageCache(*data["train"], 3), train_keys=True)
    tip.fit(*data["train"], epochs=2, batch_size=4, progress=False)
    tip.tune(*data["val"], alphas=(3.0,), betas=(9.0,))  # not the constructor's 1.0 and 5.0
    tip.save(str(tmp_path / "tip"))
    loaded = TipAdapter.load(str(tmp_path / "tip"))
    assert (loaded.alpha, loaded.beta, loaded.scale) == (3.0, 9.0, tip.scale)  # before: back to 1.0 and 5.0
    assert torch.equal(loaded.keys, tip.keys) and loaded.keys.requires_grad and loaded.history == tip.history
    f_test = data["test"][0]
    np.testing.assert_array_equal(loaded.predict_proba(f_test), tip.predict_proba(f_test))
    np.testing.assert_array_equal(loaded.predict(f_test), tip.predict_proba(f_test).argmax(1))


def test_zero_shot_knn_and_retro_coop_save_load_round_trip_without_pickle(tiny_clip, tmp_path):
    clip, proc, data, text = _fitted(tiny_clip)
    f_test = data["test"][0]
    zs = ZeroShotKnn(text, float(clip.logit_scale.exp()), ImageCache(*data["train"], 3))
    zs.mixture = Mixture(lam=0.4, k=3, temperature=0.05, accuracy=0.5)
    zs.save(str(tmp_path / "zs"))
    loaded = ZeroShotKnn.load(str(tmp_path / "zs"))
    assert loaded.mixture == zs.mixture and loaded.scale == zs.scale
    np.testing.assert_array_equal(loaded.predict_proba(f_test), zs.predict_proba(f_test))
    grid = R.MixtureGrid(lambdas=(0.0, 0.3), ks=(2,), temperatures=(0.1,))
    config = RetroCoOpConfig(n_ctx=2, class_specific=True, epochs=2, batch_size=4, grid=grid, progress=False)
    coop = RetroCoOp(clip, proc.tokenizer, CLASSES, config).fit(*data["train"], *data["val"])
    coop.save(str(tmp_path / "coop"))
    loaded = RetroCoOp.load(str(tmp_path / "coop"), clip, proc.tokenizer)
    assert loaded.config == coop.config and loaded.classnames == CLASSES and loaded.mixture == coop.mixture
    assert loaded.history == coop.history and loaded.knn_loss_active == coop.knn_loss_active
    assert torch.equal(loaded.learner.ctx, coop.learner.ctx)
    np.testing.assert_array_equal(loaded.predict_proba(f_test), coop.predict_proba(f_test))
    files = sorted(os.listdir(tmp_path / "coop")) + sorted(os.listdir(tmp_path / "coop" / "cache"))
    assert files == ["cache", "predictor.json", "tensors.safetensors", "index.faiss", "keys.npy", "labels.npy",
                     "store.json"]


def test_loading_what_does_not_match_names_the_mismatch(tiny_clip, tmp_path):
    clip, proc, data, text = _fitted(tiny_clip)
    coop = RetroCoOp(clip, proc.tokenizer, CLASSES, RetroCoOpConfig(n_ctx=2, epochs=1, progress=False))
    coop.fit(*data["train"]).save(str(tmp_path / "coop"))
    other, other_proc = load_clip(make_tiny_clip(str(tmp_path / "other-clip"), seed=1))  # same shapes, other weights
    with pytest.raises(ValueError, match="the CLIP's text_projection_sha256 is '[0-9a-f]+' in the CLIP given but"):
        RetroCoOp.load(str(tmp_path / "coop"), other, other_proc.tokenizer)
    with pytest.raises(ValueError, match="holds a saved RetroCoOp, not a TipAdapter: load it with RetroCoOp.load"):
        TipAdapter.load(str(tmp_path / "coop"))
    zs = ZeroShotKnn(text, float(clip.logit_scale.exp()), ImageCache(*data["train"], 3))
    zs.save(str(tmp_path / "zs"))
    ImageCache(data["train"][0], data["train"][1], 4).save(str(tmp_path / "zs" / "cache"))  # a 4-class cache
    with pytest.raises(ValueError, match="the number of classes is 3 in the text features but 4 in the image cache"):
        ZeroShotKnn.load(str(tmp_path / "zs"))


def test_a_failed_save_keeps_the_previous_one(tiny_clip, tmp_path, monkeypatch):
    from openprompt_retro import SaveFailed  # exported at the top level

    clip, proc, data, text = _fitted(tiny_clip)
    zs = ZeroShotKnn(text, float(clip.logit_scale.exp()), ImageCache(*data["train"], 3))
    zs.mixture = Mixture(lam=0.4, k=3, temperature=0.05)
    zs.save(str(tmp_path / "zs"))
    zs.mixture = Mixture(lam=0.9, k=2, temperature=0.1)

    def disk_full(directory):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(zs.cache, "save", disk_full)
    with pytest.raises(SaveFailed, match="nothing was changed"):
        zs.save(str(tmp_path / "zs"))
    assert ZeroShotKnn.load(str(tmp_path / "zs")).mixture.lam == 0.4


def test_clip_mixture_search_is_the_grids_own_with_tie_breaks_and_plm_temperatures():
    """Before, tune_mixture called select_mixture with lambdas, ks and temperatures only: a grid's tie-breaks
    and PLM temperatures were silently dropped (text and CLIP chose differently from the same grid)."""
    from openprompt_retro.clip.cache import ImageCache, tune_mixture
    from openprompt_retro.core.knn import MixtureGrid

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(12, 4)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    labels = np.arange(12) % 3
    cache = ImageCache(feats, labels, num_classes=3)
    p_model = rng.dirichlet(np.ones(3), size=12).astype(np.float32)
    grid = MixtureGrid.fine(plm_temperature=True)
    want = grid.select(p_model, labels, lambda k, t: cache.p_knn(feats, k, t))
    got = tune_mixture(p_model, cache, feats, labels, grid)
    assert got == want
    mixed = cache.mixed(p_model, feats, got)
    from openprompt_retro.core.knn import mix, temperature_scale

    expected = mix(temperature_scale(p_model, got.plm_temperature), cache.p_knn(feats, got.k, got.temperature), got.lam)
    np.testing.assert_allclose(mixed, expected, rtol=1e-6)
