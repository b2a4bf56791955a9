"""Retrieval for input: neural demonstrations and LM-BFF-style text demonstrations."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from .keys import example_text
from .store import KnowledgeStore


def demonstration_weights(scores: np.ndarray) -> np.ndarray:
    """Per class: z-normalise the top-m similarities, then softmax them.

    scores (B, C, m) with -inf for missing neighbours -> weights (B, C, m), 0 where missing.
        z_j = (s_j - mean(s)) / std(s),   w_j = exp(z_j) / sum_l exp(z_l)
    """
    valid = np.isfinite(scores)
    n = valid.sum(-1, keepdims=True)
    s = np.where(valid, scores, 0.0).astype(np.float64)
    mean = s.sum(-1, keepdims=True) / np.maximum(n, 1)
    var = np.where(valid, (s - mean) ** 2, 0.0).sum(-1, keepdims=True) / np.maximum(n, 1)
    z = np.where(valid, (s - mean) / np.sqrt(var + 1e-6), -np.inf)
    z = z - np.where(n > 0, np.max(np.where(valid, z, -np.inf), -1, keepdims=True), 0.0)
    e = np.where(valid, np.exp(z), 0.0)
    return (e / np.maximum(e.sum(-1, keepdims=True), 1e-30)).astype(np.float32)


def neural_demonstrations(store: KnowledgeStore, query_keys, m: int, exclude_ids=None) -> torch.Tensor:
    """d_c = sum_j w_j * key_j over the top-m entries of class c: a (B, C, D) tensor.

    A class with no entry in the store gets a zero vector.
    """
    res = store.search_per_class(query_keys, m, exclude_ids)
    w = demonstration_weights(res.scores)  # (B, C, m)
    keys = store.keys[np.maximum(res.ids, 0)]  # (B, C, m, D); missing slots have weight 0
    return torch.from_numpy(np.einsum("bcm,bcmd->bcd", w, keys).astype(np.float32))


class TfidfDemoRetriever:
    """For a query, the most similar labeled example of each class (TF-IDF cosine).

    The query's own example (same guid) is never returned. Classes with no
    example in the pool are skipped.
    """

    def __init__(self, pool: Sequence, num_classes: int):
        from sklearn.feature_extraction.text import TfidfVectorizer

        if len(pool) == 0:
            raise ValueError("the demonstration pool is empty")
        labels = np.array([int(e.label) for e in pool])
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"demonstration pool labels must lie in [0, {num_classes})")
        self.pool, self.labels, self.num_classes = list(pool), labels, num_classes
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        self.matrix = self.vectorizer.fit_transform([example_text(e) for e in pool])
        self.guids = np.array([str(e.guid) for e in pool])

    def __call__(self, example) -> List[Tuple[int, object]]:
        q = self.vectorizer.transform([example_text(example)])
        sims = (self.matrix @ q.T).toarray().ravel()
        sims[self.guids == str(example.guid)] = -np.inf
        out = []
        for c in range(self.num_classes):
            members = np.nonzero((self.labels == c) & np.isfinite(sims))[0]
            if len(members):
                best = members[np.argmax(sims[members])]  # ties: the earliest example
                out.append((c, self.pool[best]))
        return out
