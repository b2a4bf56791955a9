"""Inference wall time: plain prompt model vs + kNN inference vs full RetroPrompt.

All three share one backbone and one test set; the store is built from the
training split. Times are medians over repeats, after one warm-up pass. A
store refresh is compared with one plain inference pass over the training set.
With a key encoder (``RetroConfig.key_encoder`` other than "mask") a query's key
is computed once per text and cached: ``*_cold_s`` time passes with the cache
emptied first (examples never seen), the others a pass over examples seen before.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict

import numpy as np
import torch


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cold(trainer, loader):
    """One prediction pass with the key encoder's cache emptied: every query key is computed."""
    trainer.model.lifecycle.forget_keys()
    return trainer.predict_proba(loader)


def measure_speed(ns) -> Dict:
    from ..core.config import RetroConfig
    from .sampling import stratified_subset, subset_record
    from ..prompt.factory import build_trainer
    from ..prompt.training_args import TrainingArgs
    from .backbones import load_backbone
    from .runs import check_single, load_split
    from .spec import RunSpec
    from .tasks import get_task

    check_single(ns)
    spec = get_task(ns.task)
    data = load_split(spec.name, ns.seed, RunSpec.from_namespace(ns))
    labels = [e.label for e in data["test"]]
    chosen = stratified_subset(labels, ns.limit, ns.seed)  # test files are often sorted by class
    test = [data["test"][i] for i in chosen]
    torch.manual_seed(ns.seed)
    plm, tok, _, wrapper = load_backbone(ns.model, ns.model_type)
    args = TrainingArgs(max_seq_length=ns.max_seq_length, progress=False, eval_batch_size=32,
                        device=ns.device or "auto", amp=ns.amp)

    def model_for(demonstrations: str):
        return build_trainer(plm, tok, wrapper, spec.template, spec.label_words, demonstrations,
                             RetroConfig(knn_lambda=0.0), args=args)

    plain, full = model_for("none"), model_for("neural")
    t0 = time.perf_counter()
    plain_test = plain.loader(test)
    tokenize_s = time.perf_counter() - t0
    full_test = full.loader(test)
    plain_train, full_train = plain.loader(data["train"]), full.loader(data["train"])
    plain.model.refresh_store(plain_train, progress=False)
    full.model.refresh_store(full_train, progress=False)

    out = {"task": spec.name, "n_test": len(test), "n_train": len(data["train"]), "model": ns.model,
           "torch_threads": torch.get_num_threads(), "repeats": ns.repeats, "device": args.device, "amp": args.amp,
           "test_subset": subset_record(labels, ns.limit, ns.seed, chosen) if ns.limit else None}
    out["tokenize_test_s"] = tokenize_s
    out["plain_s"] = _median_time(lambda: plain.predict_proba(plain_test), ns.repeats)
    plain.model.apply_config(knn_lambda=0.5)
    out["knn_s"] = _median_time(lambda: plain.predict_proba(plain_test), ns.repeats)
    full.model.apply_config(knn_lambda=0.5)
    out["retro_s"] = _median_time(lambda: full.predict_proba(full_test), ns.repeats)
    if plain.model.key_encoder is not None:
        out["key_encoder"] = plain.model.config.key_encoder
        out["knn_cold_s"] = _median_time(lambda: _cold(plain, plain_test), ns.repeats)
        out["retro_cold_s"] = _median_time(lambda: _cold(full, full_test), ns.repeats)
    queries = np.random.default_rng(0).normal(size=(len(test), plain.model.knn_store.dim)).astype(np.float32)
    out["knn_search_only_s"] = _median_time(lambda: plain.model.knn_distribution(queries, 16), ns.repeats)
    out["store_refresh_s"] = _median_time(lambda: full.model.refresh_store(full_train, progress=False), ns.repeats)
    plain.model.apply_config(knn_lambda=0.0)
    out["train_forward_s"] = _median_time(lambda: plain.predict_proba(plain_train), ns.repeats)  # plain inference
    out["knn_over_plain"] = out["knn_s"] / out["plain_s"]
    out["retro_over_plain"] = out["retro_s"] / out["plain_s"]
    out["refresh_over_train_forward"] = out["store_refresh_s"] / out["train_forward_s"]
    if "knn_cold_s" in out:
        out["knn_cold_over_plain"] = out["knn_cold_s"] / out["plain_s"]
        out["retro_cold_over_plain"] = out["retro_cold_s"] / out["plain_s"]
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in out.items()}  # 4 significant digits


def run_speed(ns) -> None:
    """``openprompt-retro speed``: print the timings as JSON."""
    import json

    print(json.dumps(measure_speed(ns), indent=2))
