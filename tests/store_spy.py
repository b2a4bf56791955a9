"""A spy on KnowledgeStore's searches and on the score read-outs (class-mean, logistic): which queries were
asked, what was excluded, what came back (for a score read-out: every entry that took part)."""
from contextlib import contextmanager

import numpy as np
import torch

from openprompt_retro.core.store import KnowledgeStore


class Call:
    def __init__(self, store, kind, queries, exclude_ids, result_ids, grad):
        self.kind, self.grad = kind, grad
        self.queries = np.asarray(queries.detach().cpu() if hasattr(queries, "detach") else queries, dtype=np.float32)
        self.exclude = None if exclude_ids is None else np.asarray(
            exclude_ids.detach().cpu() if hasattr(exclude_ids, "detach") else exclude_ids)
        self.ids = result_ids.reshape(result_ids.shape[0], -1)  # (B, k) or (B, C * m)
        self.store_keys = store.keys.copy()

    def own_entries(self):
        """Per query row, the store entry whose key *is* the query (-1: none) - a training query's own entry."""
        out = []
        for q in self.queries:
            hits = np.nonzero((self.store_keys == q).all(1))[0]
            out.append(int(hits[0]) if len(hits) else -1)
        return np.array(out)


class _Keys:
    def __init__(self, keys):
        self.keys = np.asarray(keys, dtype=np.float32)


@contextmanager
def spy_store():
    from openprompt_retro.core import readout as readout_module

    calls = []
    search, per_class = KnowledgeStore.search, KnowledgeStore.search_per_class
    readout = readout_module.readout_scores

    def spy_readout(kind, store, queries, exclude_ids=None, top_m=None, logistic_c=1.0):
        out = readout(kind, store, queries, exclude_ids, top_m, logistic_c)
        n = len(np.asarray(queries))
        taking_part = np.tile(np.arange(len(store.keys)), (n, 1))
        for row, excluded in enumerate(KnowledgeStore._exclusions(exclude_ids, n)):
            taking_part[row, excluded] = -1
        calls.append(Call(_Keys(store.keys), kind.replace("-", "_"), np.asarray(queries), exclude_ids, taking_part,
                          torch.is_grad_enabled()))
        return out

    def spy_search(self, queries, k, exclude_ids=None):
        res = search(self, queries, k, exclude_ids)
        calls.append(Call(self, "search", queries, exclude_ids, res.ids, torch.is_grad_enabled()))
        return res

    def spy_per_class(self, queries, m, exclude_ids=None):
        res = per_class(self, queries, m, exclude_ids)
        calls.append(Call(self, "per_class", queries, exclude_ids, res.ids, torch.is_grad_enabled()))
        return res

    KnowledgeStore.search, KnowledgeStore.search_per_class = spy_search, spy_per_class
    readout_module.readout_scores = spy_readout
    try:
        yield calls
    finally:
        KnowledgeStore.search, KnowledgeStore.search_per_class = search, per_class
        readout_module.readout_scores = readout
