"""The method's central formulas: the kNN label distribution and its mixture with the PLM.

    w_j        = softmax_j(z_j / T)                 over the k nearest neighbours j of x
    z_j        = (s_j - mean_l s_l) / std_l s_l     ("zscore": scale-free, the default for text)
               = s_j                                ("raw": for scores with a fixed range, e.g. cosine)
    p_kNN(y|x) = sum_j w_j * 1[y_j = y]                  (1 / C for every y when x has no neighbour)
    P(y|x)     = lambda * p_kNN(y|x) + (1 - lambda) * p_PLM(y|x)      (probability space)

lambda, k and T are chosen on a dev / validation split (:func:`select_mixture`, which returns a
:class:`MixtureChoice`), never on test. Text (``prompt/``) and vision (``clip/``) share these functions.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np


SCORE_SCALES = ("zscore", "raw")


def standardize_scores(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """z_j = (s_j - mean(s)) / std(s) over each row's valid slots (std floored at 1e-6 of the scores' scale).

    Multiplying every key by c multiplies inner products by c^2 and leaves z unchanged.
    """
    s = np.where(valid, scores.astype(np.float64), 0.0)
    n = np.maximum(valid.sum(1, keepdims=True), 1)
    mean = s.sum(1, keepdims=True) / n
    var = np.where(valid, (s - mean) ** 2, 0.0).sum(1, keepdims=True) / n
    floor = 1e-6 * np.maximum(np.abs(s).max(1, keepdims=True, initial=0.0), 1e-30)
    return np.where(valid, (s - mean) / np.maximum(np.sqrt(var), floor), 0.0)


def knn_weights(scores: np.ndarray, temperature: float, valid: Optional[np.ndarray] = None,
                scale: str = "raw") -> np.ndarray:
    """w_j = softmax_j(z_j / T) per row of ``scores`` (B, k); slots where ``valid`` is False (default: -inf
    or NaN scores) get 0, so a row without any valid slot (no neighbour) is all 0.

    ``scale="zscore"`` standardises each row's scores first (scale-free), ``"raw"`` uses them as they are.
    Computed in float64 after subtracting each row's maximum, so no finite score overflows; a row with
    +inf scores (an overflowed inner product) shares its weight among those slots instead of giving NaN.
    """
    if scale not in SCORE_SCALES:
        raise ValueError(f"scale must be one of {SCORE_SCALES}, got {scale!r}")
    scores = np.asarray(scores)
    if valid is None:
        valid = scores > -np.inf  # missing slots are -inf (NaN is never valid)
    if scale == "zscore":
        finite = np.isfinite(np.where(valid, scores, 0.0)).all(1, keepdims=True)
        scores = np.where(finite, standardize_scores(np.where(finite, scores, 0.0), valid), scores)
    logits = np.where(valid, scores.astype(np.float64) / temperature, -np.inf)
    found = valid.any(axis=1, keepdims=True)
    top = np.where(found, logits.max(axis=1, keepdims=True, initial=-np.inf), 0.0)
    if np.isposinf(top).any():  # the limit of softmax as those scores grow
        logits = np.where(np.isposinf(top), np.where(np.isposinf(logits), 0.0, -np.inf), logits)
        top = np.where(np.isposinf(top), 0.0, top)
    logits = logits - top
    w = np.where(valid, np.exp(logits), 0.0)
    return w / np.where(found, w.sum(axis=1, keepdims=True), 1.0)


def knn_label_distribution(scores: np.ndarray, labels: np.ndarray, num_classes: int,
                           temperature: float, scale: str = "raw") -> np.ndarray:
    """p_kNN = sum_j w_j * onehot(y_j), shape (B, C); slots with label -1 are ignored.

    A row with no neighbour at all (k clipped to 0 because the store's only entries are excluded, or every
    slot empty) knows nothing: its p_kNN is the uniform distribution 1 / C, so the mixture falls back to a
    flattened p_PLM and the "knn" loss weight to 1 + beta * log C (within its bound).
    """
    valid = labels >= 0
    w = knn_weights(scores, temperature, valid, scale)
    out = np.zeros((scores.shape[0], num_classes), dtype=np.float64)
    flat = valid.reshape(-1)
    np.add.at(out, (np.repeat(np.arange(scores.shape[0]), scores.shape[1])[flat], labels.reshape(-1)[flat]),
              w.reshape(-1)[flat])
    out[~valid.any(axis=1)] = 1.0 / num_classes
    return out.astype(np.float32)


def mix(p_plm, p_knn, lam: float):
    """P = lambda * p_kNN + (1 - lambda) * p_PLM (numpy arrays or torch tensors)."""
    return lam * p_knn + (1.0 - lam) * p_plm


def accuracy(probs, labels) -> float:
    """Fraction of rows whose argmax is the label."""
    return float((np.asarray(probs).argmax(-1) == np.asarray(labels)).mean())


@dataclass(frozen=True)
class MixtureChoice:
    """One point of the mixture P = lambda p_kNN + (1 - lambda) p_PLM: lambda (``lam``), k, T, and the dev
    accuracy that chose it (None for a choice set by hand)."""

    lam: float
    k: int
    temperature: float
    accuracy: Optional[float] = None

    def __post_init__(self):
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"MixtureChoice.lam must lie in [0, 1], got {self.lam!r}")
        if int(self.k) < 1 or not self.temperature > 0:
            raise ValueError(f"MixtureChoice needs k >= 1 and temperature > 0, got k={self.k!r}, "
                             f"temperature={self.temperature!r}")

    def as_dict(self) -> Dict[str, Union[float, int, None]]:
        """``{"accuracy", "lambda", "k", "temperature"}`` for records and printing."""
        return {"accuracy": self.accuracy, "lambda": self.lam, "k": self.k, "temperature": self.temperature}


def select_mixture(p_model: np.ndarray, labels: np.ndarray, p_knn_for: Callable[[int, float], np.ndarray],
                   lambdas: Sequence[float], ks: Sequence[int], temperatures: Sequence[float]) -> MixtureChoice:
    """Grid search of (lambda, k, T) by accuracy of ``mix(p_model, p_knn_for(k, T), lambda)``.

    Call it with dev / validation data only. Ties go to the smaller lambda, then
    to the first (k, T) in grid order.
    """
    best: Optional[MixtureChoice] = None
    for k, t in itertools.product(ks, temperatures):
        p_knn = p_knn_for(int(k), float(t))
        for lam in sorted(lambdas):
            acc = accuracy(mix(p_model, p_knn, lam), labels)
            if best is None or acc > best.accuracy or (acc == best.accuracy and lam < best.lam):
                best = MixtureChoice(lam=float(lam), k=int(k), temperature=float(t), accuracy=acc)
    if best is None:
        raise ValueError("select_mixture needs at least one lambda, k and temperature")
    return best


@dataclass
class MixtureGrid:
    """The (lambda, k, T) candidates that :func:`select_mixture` searches on dev.

    The default tunes lambda only: with scale-free ("zscore") scores, k = 16 and T = 1 (one standard
    deviation of the neighbours' scores) mean the same thing on every backbone, and a 32-example dev set
    cannot tell 220 combinations apart. :meth:`wide` is the old 11 x 4 x 5 grid; :meth:`fixed` tunes nothing.
    """

    lambdas: Sequence[float] = (0.0, 0.25, 0.5, 0.75)
    ks: Sequence[int] = (16,)
    temperatures: Sequence[float] = (1.0,)

    @classmethod
    def wide(cls) -> "MixtureGrid":
        return cls(lambdas=tuple(i / 10 for i in range(11)), ks=(4, 8, 16, 32), temperatures=(0.25, 0.5, 1.0, 2.0, 4.0))

    @classmethod
    def fixed(cls, lam: float = 0.5, k: int = 16, temperature: float = 1.0) -> "MixtureGrid":
        return cls(lambdas=(lam,), ks=(k,), temperatures=(temperature,))

    @classmethod
    def named(cls, name: str) -> "MixtureGrid":
        """``"small"`` (the default), ``"wide"`` or ``"fixed"``."""
        if name not in ("small", "wide", "fixed"):
            raise ValueError(f"mixture grid must be 'small', 'wide' or 'fixed', got {name!r}")
        return cls() if name == "small" else getattr(cls, name)()

    def __post_init__(self):
        if not (self.lambdas and self.ks and self.temperatures):
            raise ValueError("MixtureGrid needs at least one lambda, k and temperature")
        if any(not 0.0 <= lam <= 1.0 for lam in self.lambdas):
            raise ValueError(f"lambdas must lie in [0, 1], got {list(self.lambdas)}")
        if any(int(k) < 1 for k in self.ks) or any(not t > 0 for t in self.temperatures):
            raise ValueError("ks must be >= 1 and temperatures > 0")

    def select(self, p_model: np.ndarray, labels: np.ndarray,
               p_knn_for: Callable[[int, float], np.ndarray]) -> MixtureChoice:
        return select_mixture(p_model, labels, p_knn_for, self.lambdas, self.ks, self.temperatures)
