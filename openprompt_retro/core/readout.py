"""Read-outs of a knowledge store: how p(y|x) is read from its keys and labels.

Three read-outs, one entry point (:func:`readout_distribution`; :data:`READOUTS`):

* "topk": the k nearest entries vote (:mod:`.knn`), for large stores;
* "class-mean": each class's mean key (below), for few-shot stores;
* "logistic": a logistic regression fitted on the store's keys and labels only (:class:`LogisticReadout`),
  the read-out relation keys of sentence pairs need (the classes are not clusters there).

"class-mean" and "logistic" give class scores s_c(x) and p(y|x) = softmax_c(s_c(x) / T) (:func:`readout_scores`);
T is chosen on dev by log-loss over :data:`READOUT_TEMPERATURES`.

The class-mean read-out: p(y|x) from each class's mean key, not from single neighbours.

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

import weakref
from typing import Dict, List, Optional, Tuple

import numpy as np

from .knn import softmax_scores
from .store import KnowledgeStore, _as_float32, _integer_labels

#: the read-outs :func:`readout_distribution` knows
READOUTS = ("topk", "class-mean", "logistic")
#: cosines lie in [-1, 1] and the classes' scores differ by hundredths to tenths: T on that scale
CLASS_MEAN_TEMPERATURES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
#: the logistic read-out's scores are log-probabilities: T = 1 keeps them, T > 1 flattens, T < 1 sharpens
LOGISTIC_TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0)
#: per score read-out, the T candidates chosen on dev by log-loss
READOUT_TEMPERATURES = {"class-mean": CLASS_MEAN_TEMPERATURES, "logistic": LOGISTIC_TEMPERATURES}
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


# ---------------------------------------------------------------------- the logistic read-out
class LogisticReadout:
    """p(y|x) from a logistic regression fitted on a store's keys and labels (nothing else):

        (W, b)    = argmin_{W, b}  sum_i -log softmax(W k_i + b)_{y_i} + ||W||^2 / (2 C)     (scikit-learn, lbfgs)
        s_c(x)    = log softmax_c(W q(x) + b)                                              the class scores
        p(y=c|x)  = softmax_c(s_c(x) / T)                                                  (T = 1: the fit's own)

    A query that must not see some entries (``exclude_ids``, e.g. its own entry in a training forward) is
    scored *cross-fitted*: by a regression fitted without the fold holding them (entries are dealt into
    ``folds`` folds class by class, so every fold has each class's share), or, when they lie in several
    folds, without exactly them. A class absent from a fit scores -inf. Deterministic: the same keys and
    labels give the same scores, so a saved run refits it bit for bit.
    """

    def __init__(self, keys, labels, num_classes: int, c: float = 1.0, folds: int = 5):
        if not 0 < c < np.inf:
            raise ValueError(f"the logistic read-out's C must be a finite number > 0, got {c!r}")
        if isinstance(folds, bool) or int(folds) < 2:
            raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
        self.keys = np.asarray(_as_float32(keys, "keys"), dtype=np.float64)
        self.labels = _integer_labels(np.asarray(labels).reshape(-1))
        if len(self.labels) != len(self.keys) or (len(self.labels) and
                                                  (self.labels.min() < 0 or self.labels.max() >= num_classes)):
            raise ValueError(f"labels must be {len(self.keys)} class ids in [0, {num_classes}), got shape "
                             f"{self.labels.shape}")
        if len(self.labels) == 0:
            raise ValueError("the logistic read-out needs at least one store entry")
        self.num_classes, self.c = int(num_classes), float(c)
        rank = np.zeros(len(self.labels), dtype=np.int64)  # position of each entry within its class
        for cls in np.unique(self.labels):
            members = np.nonzero(self.labels == cls)[0]
            rank[members] = np.arange(len(members))
        self.fold = rank % int(folds)
        self._fits: Dict[Tuple[int, ...], object] = {}

    def _fit(self, left_out: Tuple[int, ...]):
        """The regression fitted without the entries ``left_out`` (cached), or a class id when one class is left."""
        if left_out not in self._fits:
            from sklearn.linear_model import LogisticRegression

            keep = np.ones(len(self.labels), dtype=bool)
            keep[list(left_out)] = False
            present = np.unique(self.labels[keep])
            if len(present) == 0:
                self._fits[left_out] = None
            elif len(present) == 1:
                self._fits[left_out] = int(present[0])
            else:
                self._fits[left_out] = LogisticRegression(C=self.c, max_iter=2000).fit(self.keys[keep],
                                                                                      self.labels[keep])
        return self._fits[left_out]

    def _scores_by(self, fit, q: np.ndarray) -> np.ndarray:
        out = np.full((q.shape[0], self.num_classes), -np.inf)
        if fit is None:  # no entry left: no class is scored (a uniform p, like a query without neighbours)
            return out
        if isinstance(fit, int):
            out[:, fit] = 0.0
            return out
        with np.errstate(divide="ignore"):
            out[:, fit.classes_] = fit.predict_log_proba(q)
        return out

    def scores(self, queries, exclude_ids=None) -> np.ndarray:
        """s_c(x), shape (B, C) float64; ``exclude_ids`` as :meth:`KnowledgeStore.search` takes them."""
        q = np.asarray(_as_float32(queries, "queries"), dtype=np.float64)
        if q.shape[1] != self.keys.shape[1]:
            raise ValueError(f"queries have dimension {q.shape[1]}, keys {self.keys.shape[1]}")
        excl = KnowledgeStore._exclusions(exclude_ids, q.shape[0])
        bad = sorted({int(i) for e in excl for i in e if i >= len(self.labels)})
        if bad:
            raise ValueError(f"exclude_ids {bad[:5]} are not store ids (the store has {len(self.labels)} entries)")
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for row, e in enumerate(excl):
            e = np.unique(e)
            folds = np.unique(self.fold[e]) if len(e) else []
            key = (() if len(e) == 0 else
                   tuple(np.nonzero(self.fold == folds[0])[0].tolist()) if len(folds) == 1 else tuple(e.tolist()))
            groups.setdefault(key, []).append(row)
        out = np.empty((q.shape[0], self.num_classes))
        for left_out, rows in groups.items():
            out[rows] = self._scores_by(self._fit(left_out), q[rows])
        return out


#: one fitted LogisticReadout per store and C, refitted when the store's keys or labels change
_LOGISTIC: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def logistic_readout(store: KnowledgeStore, c: float = 1.0) -> LogisticReadout:
    """The :class:`LogisticReadout` of ``store``'s current entries (fitted once per state of the store)."""
    held = _LOGISTIC.get(store)
    if held is None or held[0] is not store.keys or held[1] is not store.labels or held[2].c != c:
        held = (store.keys, store.labels, LogisticReadout(store.keys, store.labels, store.num_classes, c))
        _LOGISTIC[store] = held
    return held[2]


# ---------------------------------------------------------------------- one entry point
def readout_scores(readout: str, store: KnowledgeStore, queries, exclude_ids=None, top_m: Optional[int] = None,
                   logistic_c: float = 1.0) -> np.ndarray:
    """s_c(x) (B, C) float64 of a score read-out ("class-mean": cosines with the class means; "logistic": the
    fitted regression's log-probabilities), so that p(y|x) = softmax_c(s_c(x) / T)."""
    if readout == "class-mean":
        return class_mean_scores(queries, store.keys, store.labels, store.num_classes, top_m, exclude_ids)
    if readout == "logistic":
        return logistic_readout(store, logistic_c).scores(queries, exclude_ids)
    raise ValueError(f"readout_scores reads 'class-mean' or 'logistic', got {readout!r}")


def readout_distribution(readout: str, store: KnowledgeStore, queries, temperature: float, exclude_ids=None,
                         k: int = 16, scale: str = "zscore", top_m: Optional[int] = None,
                         logistic_c: float = 1.0) -> np.ndarray:
    """p(y|x) (B, C) float32 from ``store`` by ``readout`` (:data:`READOUTS`): "topk" (the k nearest entries,
    T on the ``scale`` of their scores), "class-mean" or "logistic" (softmax_c(s_c(x) / T) over
    :func:`readout_scores`). ``exclude_ids``: per query, entries that take no part (e.g. its own)."""
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    if not 0 < temperature < np.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if readout == "topk":
        return store.knn_distribution(queries, k, temperature, exclude_ids, scale)
    return softmax_scores(readout_scores(readout, store, queries, exclude_ids, top_m, logistic_c),
                          temperature).astype(np.float32)
