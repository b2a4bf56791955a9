"""Retrieval for training: the kNN-guided loss.

Examples the store finds hard (low p_kNN of the gold label) weigh more:

    L = mean_i CE_i * min(1 + beta * (-log p_kNN(y_i | x_i)), w_max)     ("knn")
    L = mean_i CE_i * (1 - p_kNN(y_i | x_i)) ** gamma                      ("focal")

w_max bounds the weights (a store that is wrong about one example cannot
multiply its loss by 14, as the 1e-6 clamp of p_kNN alone would allow).

p_kNN is computed with the example's own entry left out, and is a constant
(no gradient): gradients reach the parameters through CE_i only. The gate
(:func:`store_beats_chance`) turns the weights off while the store's
leave-one-out kNN accuracy is at or below chance.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

_EPS = 1e-6


def knn_loss_weights(p_knn_gold: torch.Tensor, loss: str = "knn", beta: float = 1.0,
                     gamma: float = 2.0, max_weight: Optional[float] = None) -> torch.Tensor:
    """Per-example weights w_i from p_kNN(y_i|x_i) (detached); ``max_weight`` caps the "knn" weights."""
    p = p_knn_gold.detach().float()
    if loss == "ce":
        return torch.ones_like(p)
    if loss == "knn":
        w = 1.0 + beta * (-torch.log(p.clamp_min(_EPS)))
        return w if max_weight is None else w.clamp_max(max_weight)
    if loss == "focal":
        return (1.0 - p).clamp_min(0.0) ** gamma
    raise ValueError(f"loss must be 'ce', 'knn' or 'focal', got {loss!r}")


def knn_guided_loss(logits: torch.Tensor, labels: torch.Tensor, p_knn_gold: torch.Tensor,
                    loss: str = "knn", beta: float = 1.0, gamma: float = 2.0,
                    max_weight: Optional[float] = None) -> torch.Tensor:
    """mean_i CE(logits_i, y_i) * w_i. ``logits`` may be logits or log-probabilities."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    w = knn_loss_weights(p_knn_gold, loss, beta, gamma, max_weight).to(ce.dtype)
    return (ce * w).mean()


def store_beats_chance(p_knn_loo: np.ndarray, labels: np.ndarray) -> Tuple[bool, float]:
    """(accuracy > chance, accuracy): the leave-one-out kNN accuracy, argmax p_kNN(.|x_i) == y_i over the
    store's entries, against chance, the majority-class rate of ``labels`` (so a one-entry store never beats it).
    """
    labels = np.asarray(labels)
    acc = float((np.asarray(p_knn_loo).argmax(1) == labels).mean())
    chance = float(np.bincount(labels).max() / len(labels))
    return acc > chance, acc
