"""Seeded subsets of a split: K examples per class (:func:`subsample_k`), and class-stratified subsets (a limit
on a test set keeps every class in proportion).

Test files are often sorted by class (LM-BFF's mr/cr/mpqa/subj, CIFAR-10), so their first N items
are a single-class "test set"; :func:`stratified_subset` draws N items with each class's share kept.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np


def stratified_subset(labels: Sequence, limit: Optional[int], seed: int) -> np.ndarray:
    """Sorted indices of ``limit`` items drawn with ``seed``, each class's share of ``labels`` kept.

    Each class gets ``limit * n_c / n`` items rounded by largest remainder (ties broken by the seed),
    and at least one while ``limit`` is no smaller than the number of classes. ``limit`` None or
    ``>= len(labels)``: every index. The same (labels, limit, seed) always gives the same subset.
    """
    labels = np.asarray(labels)
    n = int(labels.shape[0])
    if limit is None or int(limit) >= n:
        return np.arange(n)
    limit = int(limit)
    if limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = limit * counts / n
    quota = np.floor(exact).astype(np.int64)
    order = np.lexsort((rng.random(len(classes)), -(exact - quota)))  # largest remainder first
    quota[order[: limit - int(quota.sum())]] += 1
    if limit >= len(classes):
        for c in np.nonzero(quota == 0)[0]:  # a rare class still shows up once
            surplus = np.where(quota > 1, quota - exact, -np.inf)
            donor = int(np.argmax(surplus))
            quota[donor] -= 1
            quota[c] += 1
    picks = [rng.choice(np.nonzero(inverse == c)[0], int(q), replace=False) for c, q in enumerate(quota)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def subset_record(labels: Sequence, limit: Optional[int], seed: int, chosen: np.ndarray) -> dict:
    """What to record beside results computed on a subset: the limit, the seed and the class counts."""
    labels = np.asarray(labels)
    values, counts = np.unique(labels[chosen], return_counts=True)
    return {"limit": limit, "seed": seed, "stratified": True, "n": int(len(chosen)), "of": int(len(labels)),
            "class_counts": {str(v.item() if hasattr(v, "item") else v): int(c) for v, c in zip(values, counts)}}


def subsample_k(examples: Sequence, k: int, seed: int) -> List:
    """k examples per label, drawn with ``seed`` (from an LM-BFF 16-shot split, for K = 4 / 8)."""
    rng = np.random.default_rng(seed)
    labels = np.array([int(e.label) for e in examples])
    out = []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        if len(idx) < k:
            raise ValueError(f"label {c} has {len(idx)} examples, fewer than k={k}")
        out.extend(examples[i] for i in sorted(rng.choice(idx, k, replace=False)))
    return out
