"""What the CLIP methods share: CLIP's logits, the few-shot image cache and the kNN mixture tuned on it.

    CLIP logits  l = s * f @ t_c^T                                  (f, t L2-normalised, s = CLIP's logit scale)
    p_kNN        sum_{j<=k} softmax_j(cos(f, f_j) / T) 1[y_j = c]   (image cache = cosine KnowledgeStore)
    P            lambda p_kNN + (1 - lambda) p_model                (lambda, k, T chosen on validation)
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.knn import Mixture, MixtureGrid, mix, temperature_scale
from ..core.store import KnowledgeStore

#: the mixture before any tuning: the model alone
UNTUNED = Mixture(lam=0.0, k=16, temperature=0.05)


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """s * f @ t^T for L2-normalised features."""
    return logit_scale * image_features @ text_features.t()


def clip_mixture_grid() -> MixtureGrid:
    """The CLIP methods' (lambda, k, T) candidates: lambda in 0, 0.1, ..., 1, k in 4..32 and T on the cosine
    scale (cosines of CLIP image features lie within a few hundredths of each other)."""
    wide = MixtureGrid.wide()
    return MixtureGrid(lambdas=wide.lambdas, ks=wide.ks, temperatures=(0.01, 0.02, 0.05, 0.1))


BUILT_BY = {"key_type": "clip-image"}


class ImageCache:
    """The few-shot training images' features as a cosine KnowledgeStore."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, num_classes: int):
        store = KnowledgeStore(features.shape[1], num_classes, metric="cosine", built_by=BUILT_BY)
        self._attach(store.build(features, labels, guids=[str(i) for i in range(len(labels))]))

    def _attach(self, store: KnowledgeStore) -> None:
        self.store = store
        self.keys = torch.from_numpy(np.ascontiguousarray(store.keys))
        self.labels = torch.from_numpy(store.labels)

    def save(self, directory: str) -> None:
        """The store's folder (:meth:`KnowledgeStore.save`: keys.npy, labels.npy, index, JSON; no pickle)."""
        self.store.save(directory)

    @classmethod
    def load(cls, directory: str) -> "ImageCache":
        """The cache :meth:`save` wrote, its keys bit for bit (a StoreError, a ValueError, names any damage)."""
        cache = cls.__new__(cls)
        cache._attach(KnowledgeStore.load(directory, expected_built_by=BUILT_BY))
        return cache

    def p_knn(self, queries, k: int, temperature: float, exclude_self: bool = False) -> np.ndarray:
        """p_kNN of ``queries`` (B, C); ``exclude_self``: query i is cache entry i and never its own neighbour."""
        exclude = np.arange(len(self.labels)) if exclude_self else None
        return self.store.knn_distribution(np.asarray(queries), k, temperature, exclude)

    def mixed(self, p_model: np.ndarray, feats: np.ndarray, choice: Mixture) -> np.ndarray:
        """P = lambda p_kNN + (1 - lambda) p_model^T at ``choice`` (p_model temperature-scaled by the choice's
        T_plm, as the dev search mixed it); p_model itself (scaled) when lambda is 0."""
        if choice.plm_temperature != 1.0:
            p_model = temperature_scale(p_model, choice.plm_temperature).astype(np.asarray(p_model).dtype)
        if choice.lam == 0.0:
            return p_model
        return mix(p_model, self.p_knn(feats, choice.k, choice.temperature), choice.lam)


def tune_mixture(p_model: np.ndarray, cache: ImageCache, val_feats: np.ndarray, val_labels: np.ndarray,
                 grid: MixtureGrid) -> Mixture:
    """Pick lambda, k, T (and T_plm) on validation data by the grid's own search, tie-breaks and PLM temperatures
    included (:meth:`~openprompt_retro.core.knn.MixtureGrid.select`, the text side's too)."""
    return grid.select(p_model, val_labels, lambda k, t: cache.p_knn(val_feats, k, t))
