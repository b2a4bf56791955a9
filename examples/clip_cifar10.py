"""Retrieval-augmented prompt learning for images (CLIP) on CIFAR-10, K-shot.

Compares zero-shot CLIP, zero-shot CLIP + kNN, Tip-Adapter, Tip-Adapter-F,
CoOp and RetroCoOp on the same K-shot split; every mixing/cache
hyper-parameter is chosen on a validation split drawn from the remaining
training images, never on test.

    python examples/clip_cifar10.py --model tiny-clip            # random tiny CLIP: mechanics only
    python examples/clip_cifar10.py --model openai/clip-vit-base-patch32   # real weights (online or local)
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import openprompt_retro  # noqa: E402,F401
from openprompt_retro.clip import (ClipFeatures, ImageCache, RetroCoOp, RetroCoOpConfig, TipAdapter,  # noqa: E402
                                   ZeroShotKnn, k_shot_indices, load_clip, load_image_arrays,
                                   zero_shot_text_features)

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default="tiny-clip", help="tiny-clip, a local CLIP folder, or a hub name")
p.add_argument("--data", default=os.environ.get("OPENPROMPT_RETRO_IMAGES", "../shared/data/images/cifar10"))
p.add_argument("--k", type=int, default=16, help="shots per class")
p.add_argument("--val-k", type=int, default=16, help="validation images per class (from the training pool)")
p.add_argument("--seed", type=int, default=1)
p.add_argument("--epochs", type=int, default=50)
p.add_argument("--n-ctx", type=int, default=16)
p.add_argument("--augment-views", type=int, default=0, help="cache keys averaged over this many augmentations")
p.add_argument("--test-limit", type=int, default=None,
               help="a seeded (--seed), class-stratified subset of N test images (default: all)")
p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "openprompt-retro-features"))
p.add_argument("--out", default=None, help="write the results as JSON here")
ns = p.parse_args()

t_start = time.time()
if ns.model == "tiny-clip":
    from openprompt_retro.testing import ensure_tiny_model

    model_id = ensure_tiny_model("tiny-clip")  # built once, atomically, safe for concurrent runs
else:
    model_id = ns.model
clip, processor = load_clip(model_id)
train_pool = load_image_arrays(os.path.join(ns.data, "train_1000_per_class.npz"))
test = load_image_arrays(os.path.join(ns.data, "test.npz"))
test_subset = None
if ns.test_limit:  # test.npz is sorted by class: its first N images would be airplanes only
    from openprompt_retro.experiments.sampling import stratified_subset, subset_record

    chosen = stratified_subset(test.labels, ns.test_limit, ns.seed)
    test_subset = subset_record(test.labels, ns.test_limit, ns.seed, chosen)
    test = test.subset(chosen)
train_idx = k_shot_indices(train_pool.labels, ns.k, ns.seed)
val_idx = k_shot_indices(train_pool.labels, ns.val_k, ns.seed + 1000, exclude=train_idx)
train, val = train_pool.subset(train_idx), train_pool.subset(val_idx)
classes = train_pool.classes

features = ClipFeatures(clip, processor, model_id=model_id, cache_dir=ns.cache_dir)
f_train = features.image_features(train.images, augment_views=ns.augment_views, seed=ns.seed)
f_val, f_test = features.image_features(val.images), features.image_features(test.images)
scale = float(clip.logit_scale.exp())
text = zero_shot_text_features(features, classes)
cache = ImageCache(f_train, train.labels, len(classes))


def acc(probs):
    return float((probs.argmax(-1) == test.labels).mean())


results = {}
zs = ZeroShotKnn(text, scale, cache)
results["zero-shot CLIP"] = acc(zs.zero_shot_probs(f_test))
zs.tune(f_val, val.labels)
results["zero-shot CLIP + kNN"] = (acc(zs.predict_proba(f_test)), zs.mixture.as_dict())
tip = TipAdapter(text, scale, cache)
tip_choice = tip.tune(f_val, val.labels)
results["Tip-Adapter"] = (acc(tip.predict_proba(f_test)), tip_choice)
tipf = TipAdapter(text, scale, cache).fit(f_train, train.labels, epochs=ns.epochs, seed=ns.seed)
results["Tip-Adapter-F"] = (acc(tipf.predict_proba(f_test)), tipf.tune(f_val, val.labels))
for name, loss in (("CoOp", "ce"), ("RetroCoOp", "knn")):
    cfg = RetroCoOpConfig(n_ctx=ns.n_ctx, epochs=ns.epochs, loss=loss, seed=ns.seed)
    m = RetroCoOp(clip, processor.tokenizer, classes, cfg)
    m.fit(f_train, train.labels, f_val if loss == "knn" else None, val.labels)
    results[name] = (acc(m.predict_proba(f_test)), m.mixture.as_dict())

print(f"\nCIFAR-10, {ns.k}-shot, seed {ns.seed}, model {ns.model}, {len(test.labels)} test images"
      + ("" if test_subset is None else f" (stratified subset, seed {ns.seed}, of {test_subset['of']})"))
for name, r in results.items():
    a, chosen = (r if isinstance(r, tuple) else (r, None))
    print(f"  {name:22s} {100 * a:5.1f}%  {'' if chosen is None else chosen}")
print(f"total {time.time() - t_start:.0f}s")
if ns.out:
    with open(ns.out, "w") as f:
        json.dump({"settings": vars(ns), "test_subset": test_subset, "results": results}, f, indent=2)
