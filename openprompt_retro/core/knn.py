"""The method's central formulas: the kNN label distribution and its mixture with the PLM.

    w_j        = softmax_j(s_j / T)                 over the k nearest neighbours j of x
    p_kNN(y|x) = sum_j w_j * 1[y_j = y]
    P(y|x)     = lambda * p_kNN(y|x) + (1 - lambda) * p_PLM(y|x)      (probability space)

lambda, k and T are chosen on a dev / validation split (:func:`select_mixture`),
never on test. Text (``prompt/``) and vision (``clip/``) share these functions.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import numpy as np


def knn_weights(scores: np.ndarray, temperature: float, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """w_j = softmax_j(s_j / T) per row of ``scores`` (B, k); slots where ``valid`` is False (default: -inf
    or NaN scores) get 0.

    Computed in float64 after subtracting each row's maximum, so no finite score overflows; a row with
    +inf scores (an overflowed inner product) shares its weight among those slots instead of giving NaN.
    """
    scores = np.asarray(scores)
    if valid is None:
        valid = scores > -np.inf  # missing slots are -inf (NaN is never valid)
    logits = np.where(valid, scores.astype(np.float64) / temperature, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    if np.isposinf(top).any():  # the limit of softmax as those scores grow
        logits = np.where(np.isposinf(top), np.where(np.isposinf(logits), 0.0, -np.inf), logits)
        top = np.where(np.isposinf(top), 0.0, top)
    logits = logits - top
    w = np.where(valid, np.exp(logits), 0.0)
    return w / w.sum(axis=1, keepdims=True)


def knn_label_distribution(scores: np.ndarray, labels: np.ndarray, num_classes: int,
                           temperature: float) -> np.ndarray:
    """p_kNN = sum_j softmax_j(s_j / T) * onehot(y_j), shape (B, C); slots with label -1 are ignored."""
    valid = labels >= 0
    w = knn_weights(scores, temperature, valid)
    out = np.zeros((scores.shape[0], num_classes), dtype=np.float64)
    flat = valid.reshape(-1)
    np.add.at(out, (np.repeat(np.arange(scores.shape[0]), scores.shape[1])[flat], labels.reshape(-1)[flat]),
              w.reshape(-1)[flat])
    return out.astype(np.float32)


def mix(p_plm, p_knn, lam: float):
    """P = lambda * p_kNN + (1 - lambda) * p_PLM (numpy arrays or torch tensors)."""
    return lam * p_knn + (1.0 - lam) * p_plm


def accuracy(probs, labels) -> float:
    """Fraction of rows whose argmax is the label."""
    return float((np.asarray(probs).argmax(-1) == np.asarray(labels)).mean())


def select_mixture(p_model: np.ndarray, labels: np.ndarray, p_knn_for: Callable[[int, float], np.ndarray],
                   lambdas: Sequence[float], ks: Sequence[int], temperatures: Sequence[float]) -> Dict:
    """Grid search of (lambda, k, T) by accuracy of ``mix(p_model, p_knn_for(k, T), lambda)``.

    Call it with dev / validation data only. Ties go to the smaller lambda, then
    to the first (k, T) in grid order. Returns ``{"accuracy", "lambda", "k", "temperature"}``.
    """
    best: Optional[Dict] = None
    for k, t in itertools.product(ks, temperatures):
        p_knn = p_knn_for(int(k), float(t))
        for lam in sorted(lambdas):
            acc = accuracy(mix(p_model, p_knn, lam), labels)
            if best is None or acc > best["accuracy"] or (acc == best["accuracy"] and lam < best["lambda"]):
                best = {"accuracy": acc, "lambda": float(lam), "k": int(k), "temperature": float(t)}
    if best is None:
        raise ValueError("select_mixture needs at least one lambda, k and temperature")
    return best


@dataclass
class MixtureGrid:
    """The (lambda, k, T) candidates that :func:`select_mixture` searches on dev."""

    lambdas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    ks: Sequence[int] = (4, 8, 16, 32)
    temperatures: Sequence[float] = (1.0, 3.0, 10.0, 30.0, 100.0)

    def __post_init__(self):
        if not (self.lambdas and self.ks and self.temperatures):
            raise ValueError("MixtureGrid needs at least one lambda, k and temperature")
        if any(not 0.0 <= lam <= 1.0 for lam in self.lambdas):
            raise ValueError(f"lambdas must lie in [0, 1], got {list(self.lambdas)}")
        if any(int(k) < 1 for k in self.ks) or any(not t > 0 for t in self.temperatures):
            raise ValueError("ks must be >= 1 and temperatures > 0")

    def select(self, p_model: np.ndarray, labels: np.ndarray, p_knn_for: Callable[[int, float], np.ndarray]) -> Dict:
        return select_mixture(p_model, labels, p_knn_for, self.lambdas, self.ks, self.temperatures)
