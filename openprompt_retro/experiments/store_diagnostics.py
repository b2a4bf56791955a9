"""How good a run's store is on examples whose keys never saw their labels: the honest leave-out accuracy.

A store keyed by an encoder adapted on its own entries' labels looks perfect on those entries (each key was
pulled towards its class), so its leave-one-out accuracy says nothing. The held-out-fold accuracy does: the
training examples are dealt into folds class by class; for each fold, a fresh key encoder is adapted on the
other folds only (same settings), the read-out is fitted on their keys, and the fold is read. Frozen keys
never saw a label: their leave-one-out accuracy is already honest (:meth:`StoreLifecycle.update_gate`).
"""
from __future__ import annotations

import time
from typing import Dict, Sequence

import numpy as np


def fold_of(labels: np.ndarray, folds: int) -> np.ndarray:
    """Fold index of each example: each class's members are dealt round-robin, so every fold has its share."""
    out = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        out[members] = np.arange(len(members)) % folds
    return out


def held_out_fold_accuracy(plm, tokenizer, train: Sequence, config, num_classes: int, seed: int,
                           folds: int = 2) -> Dict[str, object]:
    """Accuracy of the store read by ``config``'s read-out (its tuned temperature) on each fold of ``train``, keys
    adapted without that fold (``config.key_encoder == "adapted"``). ``plm``: the *pre-trained* PLM (a fresh
    copy is adapted per fold; ``plm`` itself is left as it is). Returns ``{"accuracy", "folds", "seconds"}``."""
    from ..core.readout import readout_distribution
    from ..core.store import KnowledgeStore
    from ..prompt.key_encoders import AdaptedMeanEncoder

    t0 = time.time()
    train = list(train)
    labels = np.array([int(e.label) for e in train])
    fold = fold_of(labels, folds)
    relation = config.pair_keys == "relation"
    correct = 0
    for f in range(folds):
        fit = [e for e, g in zip(train, fold) if g != f]
        held = [e for e, g in zip(train, fold) if g == f]
        encoder = AdaptedMeanEncoder(plm, tokenizer)
        encoder.relation = relation
        encoder.adapt(fit, config.adapt_steps, config.adapt_lr, config.adapt_batch_size, seed + f,
                      pairs=config.adapt_pairs)
        store = KnowledgeStore(encoder.dim, num_classes)
        store.build(encoder.encode(fit), [int(e.label) for e in fit])
        p = readout_distribution(config.readout, store, encoder.encode(held), config.readout_temperature(),
                                 k=config.knn_k, scale=config.knn_score_scale, top_m=config.class_mean_top_m,
                                 logistic_c=config.logistic_c)
        correct += int((p.argmax(-1) == np.array([int(e.label) for e in held])).sum())
    return {"accuracy": correct / len(train), "folds": folds, "seconds": round(time.time() - t0, 2)}


__all__ = ["fold_of", "held_out_fold_accuracy"]
