"""Retrieval for input, LM-BFF style: the most similar labeled example of each class, as text.

Similar by TF-IDF cosine (:class:`TfidfDemoRetriever`), or by the cosine of a sentence encoder's keys
(:class:`EncoderDemoRetriever`, as LM-BFF does with SBERT; RetroPromptForClassification uses its key encoder
when it has one).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from .text import example_text


class PoolDemoRetriever:
    """For a query, the most similar labeled example of each class of a pool (by :meth:`similarities`).

    The query's own example is never returned: the pool entry that *is* the
    query (the same object, as when the pool is the training list), or a copy
    of it (same guid and same text). A guid alone never excludes: guid-less
    examples all share ``None``, and dev/test guids repeat training guids
    (Hugging Face's ``idx``). Classes with no example in the pool are skipped.
    """

    def __init__(self, pool: Sequence, num_classes: int):
        if len(pool) == 0:
            raise ValueError("the demonstration pool is empty")
        labels = np.array([int(e.label) for e in pool])
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"demonstration pool labels must lie in [0, {num_classes})")
        self.pool, self.labels, self.num_classes = list(pool), labels, num_classes
        self.texts = [example_text(e) for e in pool]
        self._position = {id(e): i for i, e in enumerate(self.pool)}
        self._by_guid: Dict[str, List[int]] = {}
        for i, e in enumerate(self.pool):
            if getattr(e, "guid", None) is not None:
                self._by_guid.setdefault(str(e.guid), []).append(i)

    def own_entries(self, example) -> List[int]:
        """Pool positions that are ``example`` itself (see the class docstring)."""
        own = [self._position[id(example)]] if id(example) in self._position else []
        guid = getattr(example, "guid", None)
        if guid is not None:
            text = example_text(example)
            own += [i for i in self._by_guid.get(str(guid), []) if self.texts[i] == text and i not in own]
        return own

    def similarities(self, example) -> np.ndarray:
        """The similarity of ``example`` to each pool entry, shape (len(pool),)."""
        raise NotImplementedError

    def __call__(self, example) -> List[Tuple[int, object]]:
        sims = np.array(self.similarities(example), dtype=np.float64)
        sims[self.own_entries(example)] = -np.inf
        out = []
        for c in range(self.num_classes):
            members = np.nonzero((self.labels == c) & np.isfinite(sims))[0]
            if len(members):
                best = members[np.argmax(sims[members])]  # ties: the earliest example
                out.append((c, self.pool[best]))
        return out


class TfidfDemoRetriever(PoolDemoRetriever):
    """The pool entry of each class with the largest TF-IDF cosine (word 1- and 2-grams) to the query."""

    def __init__(self, pool: Sequence, num_classes: int):
        from sklearn.feature_extraction.text import TfidfVectorizer

        super().__init__(pool, num_classes)
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        self.matrix = self.vectorizer.fit_transform(self.texts)

    def similarities(self, example) -> np.ndarray:
        return (self.matrix @ self.vectorizer.transform([example_text(example)]).T).toarray().ravel()


class EncoderDemoRetriever(PoolDemoRetriever):
    """The pool entry of each class whose key is nearest the query's: ``encoder`` is anything with
    ``encode(examples) -> (n, D)`` unit-length keys (a :mod:`.key_encoders` encoder), so scores are cosines."""

    def __init__(self, pool: Sequence, num_classes: int, encoder):
        super().__init__(pool, num_classes)
        self.encoder = encoder
        self._keys, self._keys_of = None, None

    @property
    def keys(self) -> np.ndarray:
        """The pool's keys by the encoder as it is now (encoded again after it was adapted or its pair keys were
        settled)."""
        state = (getattr(self.encoder, "dim", None), getattr(self.encoder, "_fingerprint", None),
                 getattr(self.encoder, "adaptation", None) is not None)
        if self._keys is None or state != self._keys_of:
            self._keys = np.asarray(self.encoder.encode(self.pool), dtype=np.float32)
            self._keys_of = state
        return self._keys

    def similarities(self, example) -> np.ndarray:
        return self.keys @ np.asarray(self.encoder.encode([example]), dtype=np.float32)[0]
