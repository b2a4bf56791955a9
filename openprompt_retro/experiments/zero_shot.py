"""Zero-shot RetroPrompt: no labels at all.

1. the zero-shot prompt model (template + ManualVerbalizer, untrained) labels an
   unlabeled pool (test overlaps removed first);
2. the most confident fraction per class is kept, balanced across classes;
3. the store is built from those pseudo-labeled examples and predictions use
   kNN inference, P = lambda p_kNN + (1 - lambda) p_PLM.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from ..prompt.text import example_text, normalize_text


def remove_overlap(pool: Sequence, others: Sequence) -> List:
    """The pool without examples whose text (case/space-normalised) occurs in ``others`` (e.g. the test set)."""
    seen = {normalize_text(example_text(e)) for e in others}
    return [e for e in pool if normalize_text(example_text(e)) not in seen]


def select_confident(probs: np.ndarray, fraction: float, balanced: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Indices and pseudo-labels of the most confident predictions, per predicted class.

    Each class keeps its ``floor(fraction * N_c)`` most confident examples
    (N_c: how many are predicted as c; highest p(c|x) first, ties by
    position; at least one); ``balanced`` caps every class at the
    smallest count among the classes that are predicted at all, so that the
    store is class-balanced (a class the model never predicts gets no entry).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    probs = np.asarray(probs)
    pred, conf = probs.argmax(1), probs.max(1)
    by_class = [np.nonzero(pred == k)[0] for k in range(probs.shape[1])]
    by_class = [idx[np.argsort(-conf[idx], kind="stable")] for idx in by_class]
    keep = [max(1, int(fraction * len(ix))) if len(ix) else 0 for ix in by_class]
    if balanced:
        smallest = min(k for k in keep if k)
        keep = [min(k, smallest) for k in keep]
    idx = np.concatenate([ix[:k] for ix, k in zip(by_class, keep)]).astype(np.int64)
    return idx, pred[idx]
