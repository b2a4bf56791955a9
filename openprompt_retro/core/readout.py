"""Class-mean read-out of a knowledge store: p(y|x) from each class's mean key, not from single neighbours.

    u_i        = k_i / ||k_i||                          the store's keys, L2-normalised
    mu_c(x)    = sum_{i in S_c(x)} u_i                  S_c(x): the entries of class c (all, or the top-m most
                                                        similar to x), leaving out those excluded for x
    s_c(x)     = cos(q(x), mu_c(x))                     -inf where S_c(x) is empty
    p(y=c|x)   = softmax_c(s_c(x) / T)                  0 for a class scored -inf; 1 / C when every class is

T is chosen on dev by log-loss (:func:`~openprompt_retro.core.knn.choose_temperature` over the dev scores,
e.g. the grid :data:`CLASS_MEAN_TEMPERATURES`). The result is a (B, C) distribution like p_kNN, so it goes
through the same mixture (:func:`~openprompt_retro.core.knn.mix`). Top-k voting (:mod:`.knn`) stays the
read-out for large stores; this one suits few-shot stores, whose classes each hold a handful of keys.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from .knn import softmax_scores
from .store import KnowledgeStore, _as_float32, _integer_labels

#: cosines lie in [-1, 1] and the classes' scores differ by hundredths to tenths: T on that scale
CLASS_MEAN_TEMPERATURES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
#: queries scored at once (memory: rows x top-m x dim floats)
_CHUNK = 256


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (float64); an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_mean_scores(queries, keys, labels, num_classes: int, top_m: Optional[int] = None,
                      exclude_ids=None) -> np.ndarray:
    """s_c(x) for each query and class, shape (B, C) float64: the cosine of the query with the sum of the
    class's unit keys (all of them, or with ``top_m`` the m most similar to the query; ties in similarity go
    to the smaller id); -inf for a class with no entry left.

    ``exclude_ids``: per query, store ids that take no part (an int, -1 for none, or a list per query, as
    :meth:`KnowledgeStore.search` takes them), e.g. the query's own entry for leave-one-out.
    """
    q, k, y = _check_inputs(queries, keys, labels, num_classes, top_m)
    excl = KnowledgeStore._exclusions(exclude_ids, q.shape[0])
    bad = sorted({int(i) for e in excl for i in e if i >= len(y)})
    if bad:
        raise ValueError(f"exclude_ids {bad[:5]} are not store ids (the store has {len(y)} entries)")
    out = np.empty((q.shape[0], num_classes), dtype=np.float64)
    for start in range(0, q.shape[0], _CHUNK):
        rows = slice(start, start + _CHUNK)
        if top_m is None:
            out[rows] = _all_members(q[rows], k, y, num_classes, excl[rows])
        else:
            out[rows] = _top_members(q[rows], k, y, num_classes, int(top_m), excl[rows])
    return out


def class_mean_distribution(queries, keys, labels, num_classes: int, temperature: float,
                            top_m: Optional[int] = None, exclude_ids=None) -> np.ndarray:
    """p(y|x) = softmax_c(s_c(x) / T) over :func:`class_mean_scores`, shape (B, C) float32.

    A class without entries (for this query) gets 0; a query for which no class has one gets 1 / C, as a
    query without neighbours does in :func:`~openprompt_retro.core.knn.knn_label_distribution`.
    """
    if not 0 < temperature < np.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    scores = class_mean_scores(queries, keys, labels, num_classes, top_m, exclude_ids)
    return softmax_scores(scores, temperature).astype(np.float32)


def _check_inputs(queries, keys, labels, num_classes: int, top_m: Optional[int]):
    """(unit queries, unit keys, int64 labels); a ValueError naming the first bad input."""
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes!r}")
    if top_m is not None and (isinstance(top_m, bool) or int(top_m) != top_m or top_m < 1):
        raise ValueError(f"top_m must be None or an integer >= 1, got {top_m!r}")
    q, k = _as_float32(queries, "queries"), _as_float32(keys, "keys")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]}, keys {k.shape[1]}")
    y = _integer_labels(np.asarray(labels).reshape(-1))
    if len(y) != len(k) or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
        raise ValueError(f"labels must be {len(k)} class ids in [0, {num_classes}), got shape {y.shape} "
                         f"with values {np.unique(y)[:5].tolist()}")
    return unit_rows(q), unit_rows(k), y


def _all_members(q: np.ndarray, k: np.ndarray, y: np.ndarray, C: int, excl: List[np.ndarray]) -> np.ndarray:
    """Scores against each class's sum of unit keys, each query's excluded entries subtracted."""
    sums = np.zeros((C, k.shape[1]))
    np.add.at(sums, y, k)
    sums = np.repeat(sums[None], q.shape[0], axis=0)  # (b, C, D)
    counts = np.repeat(np.bincount(y, minlength=C)[None], q.shape[0], axis=0)
    ids = [np.unique(e) for e in excl]
    row = np.repeat(np.arange(q.shape[0]), [len(e) for e in ids])
    ids = np.concatenate(ids).astype(np.int64)
    np.subtract.at(sums, (row, y[ids]), k[ids])
    np.subtract.at(counts, (row, y[ids]), 1)
    scores = np.einsum("bd,bcd->bc", q, unit_rows(sums))
    return np.where(counts > 0, scores, -np.inf)


def _top_members(q: np.ndarray, k: np.ndarray, y: np.ndarray, C: int, m: int,
                 excl: List[np.ndarray]) -> np.ndarray:
    """Scores against the sum of each class's m unit keys most similar to the query (excluded ones left out)."""
    sims = q @ k.T  # (b, N) cosines
    for b, e in enumerate(excl):
        sims[b, e] = -np.inf
    out = np.full((q.shape[0], C), -np.inf)
    for c in range(C):
        members = np.nonzero(y == c)[0]
        if len(members) == 0:
            continue
        s = sims[:, members]
        order = np.argsort(-s, axis=1, kind="stable")[:, :m]
        valid = np.take_along_axis(s, order, 1) > -np.inf  # (b, m)
        mean = unit_rows((k[members[order]] * valid[..., None]).sum(1))
        out[:, c] = np.where(valid.any(1), (q * mean).sum(1), -np.inf)
    return out
