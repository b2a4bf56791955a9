"""Retrieval for input: neural demonstrations d_c from the knowledge store."""
from __future__ import annotations

import numpy as np
import torch

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


def neural_demonstrations(store: KnowledgeStore, query_keys, m: int, exclude_ids=None,
                          values=None) -> torch.Tensor:
    """d_c = sum_j w_j * v_j over the top-m entries j of class c (by the store's keys): a (B, C, D) tensor.

    v_j: the entry's key, or row j of ``values`` (N, D) where given (e.g. neighbours chosen by frozen keys,
    demonstrations built from the trained model's [MASK] states of the same entries).
    A class with no entry in the store gets a zero vector.
    """
    if values is not None and len(values) != len(store):
        raise ValueError(f"values has {len(values)} rows for a store of {len(store)} entries")
    res = store.search_per_class(query_keys, m, exclude_ids)
    w = demonstration_weights(res.scores)  # (B, C, m)
    source = store.keys if values is None else np.asarray(values, dtype=np.float32)
    keys = source[np.maximum(res.ids, 0)]  # (B, C, m, D); missing slots have weight 0
    return torch.from_numpy(np.einsum("bcm,bcmd->bcd", w, keys).astype(np.float32))

