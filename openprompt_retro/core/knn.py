"""The method's central formulas: the kNN label distribution and its mixture with the PLM.

    w_j        = softmax_j(z_j / T)                 over the k nearest neighbours j of x
    z_j        = (s_j - mean_l s_l) / std_l s_l     ("zscore": scale-free, the default for text)
               = s_j                                ("raw": for scores with a fixed range, e.g. cosine)
    p_kNN(y|x) = sum_j w_j * 1[y_j = y]                  (1 / C for every y when x has no neighbour)
    P(y|x)     = lambda * p_kNN(y|x) + (1 - lambda) * p_PLM(y|x)      (probability space)

lambda, k and T are chosen on a dev / validation split (:func:`select_mixture`, which returns a
:class:`Mixture`), never on test. Text (``prompt/``) and vision (``clip/``) share these functions.

Optionally (:meth:`MixtureGrid.fine`) ties in dev accuracy are broken by the dev log-loss of P, and the PLM is
temperature-scaled first:

    p_PLM^T(y|x) = softmax_y(log p_PLM(y|x) / T_plm)     T_plm = argmin_T mean_i -log p_PLM^T(y_i|x_i) on dev
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Union

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


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p): the one-sided p-value of scoring ``successes`` of ``trials``
    by chance at rate ``p`` (computed in log space, so large ``trials`` do not underflow)."""
    import math

    successes, trials = int(successes), int(trials)
    if not 0 <= successes <= trials or not 0.0 <= p <= 1.0:
        raise ValueError(f"binomial_tail needs 0 <= successes <= trials and p in [0, 1], got {successes}, {trials}, {p}")
    if successes == 0:
        return 1.0
    if p in (0.0, 1.0):
        return float(p == 1.0)
    logs = [math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1) + i * math.log(p)
            + (trials - i) * math.log1p(-p) for i in range(successes, trials + 1)]
    top = max(logs)
    return float(min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs)))


def store_guard(store_probs, labels, enabled: bool = True) -> Dict[str, Union[float, bool, str, None]]:
    """Whether a store tuned into the mixture on dev may stay in it: its accuracy alone on ``labels`` (dev) must
    be above the majority-class rate r of those labels. A lenient test on purpose: dev already chose lambda for
    the mixture's accuracy, and with 32 dev examples a significance test would also throw out useful stores (at
    p < 0.1 a store right 70% of the time fails one run in four, one right 65% of the time one run in two). Returns ``{"accuracy", "chance", "p_value",
    "passes", "reason"}``, p = P(X >= correct | n, r) for the record; ``enabled=False`` always passes."""
    labels = np.asarray(labels, dtype=np.int64)
    correct = int((np.asarray(store_probs).argmax(-1) == labels).sum())
    chance = float(np.bincount(labels).max() / len(labels))
    p_value = binomial_tail(correct, len(labels), chance)
    passes = (not enabled) or correct > chance * len(labels)
    reason = None if passes else (f"the store alone scores {correct}/{len(labels)} on dev, no better than the "
                                  f"majority-class rate {chance:.3f}: kNN inference is off (lambda = 0)")
    return {"accuracy": correct / len(labels), "chance": chance, "p_value": p_value, "passes": bool(passes),
            "reason": reason}


def mix(p_plm, p_knn, lam: float):
    """P = lambda * p_kNN + (1 - lambda) * p_PLM (numpy arrays or torch tensors)."""
    return lam * p_knn + (1.0 - lam) * p_plm


def accuracy(probs, labels) -> float:
    """Fraction of rows whose argmax is the label."""
    return float((np.asarray(probs).argmax(-1) == np.asarray(labels)).mean())


#: probabilities are floored here in :func:`log_loss`: a gold label given probability 0 costs -log(1e-12) ~ 27.6
LOG_LOSS_FLOOR = 1e-12


def log_loss(probs, labels) -> float:
    """mean_i -log max(P(y_i|x_i), 1e-12), in float64 (finite even where the gold label gets probability 0)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    gold = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(gold, LOG_LOSS_FLOOR)).mean())


def softmax_scores(scores, temperature: float) -> np.ndarray:
    """softmax_c(s_c / T) per row of ``scores`` (B, C) in float64; classes scored -inf get 0, and a row with
    no finite score is uniform (1 / C), like a query without neighbours in :func:`knn_label_distribution`."""
    scores = np.asarray(scores, dtype=np.float64)
    p = knn_weights(scores, temperature, scores > -np.inf, "raw")
    p[~(scores > -np.inf).any(axis=1)] = 1.0 / scores.shape[1]
    return p


def log_probs(probs) -> np.ndarray:
    """log p in float64, -inf where p = 0 (without a warning)."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(probs, dtype=np.float64))


def temperature_scale(probs, temperature: float) -> np.ndarray:
    """p^T = softmax(log p / T) per row (float64): T > 1 flattens an overconfident distribution, T = 1 keeps
    it; the argmax never changes, and classes of probability 0 stay at 0."""
    return softmax_scores(log_probs(probs), temperature)


class TemperatureChoice(NamedTuple):
    """The temperature chosen on dev and the mean dev log-loss it gave."""

    temperature: float
    log_loss: float


def choose_temperature(scores, labels, grid: Sequence[float]) -> TemperatureChoice:
    """The T of ``grid`` whose softmax(scores / T) has the smallest mean log-loss on (``scores``, ``labels``).

    ``scores`` (B, C): class scores (e.g. class-mean cosines; -inf for a class without entries) or a model's
    log-probabilities (temperature scaling). Call it with dev data only. Only a strictly smaller loss
    replaces the best, so an exact tie goes to the smaller T.
    """
    temps = sorted(float(t) for t in grid)
    if not temps or any(not (np.isfinite(t) and t > 0) for t in temps):
        raise ValueError(f"choose_temperature needs at least one finite temperature > 0, got {list(grid)}")
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"choose_temperature needs scores (B, C) and labels (B,), got {scores.shape} and "
                         f"{labels.shape}")
    best: Optional[TemperatureChoice] = None
    for t in temps:
        loss = log_loss(softmax_scores(scores, t), labels)
        if best is None or loss < best.log_loss:
            best = TemperatureChoice(t, loss)
    return best


#: the tie-breaks :func:`select_mixture` knows (after accuracy, before the smaller lambda): larger is better;
#: log-losses equal to 12 decimals tie (the rounding error of mixing equal distributions is no preference)
_TIE_BREAK_SCORES = {"log-loss": lambda p, labels: -round(log_loss(p, labels), 12)}
TIE_BREAKS = tuple(_TIE_BREAK_SCORES)
#: T_plm candidates of ``MixtureGrid.fine(plm_temperature=True)``: 1 (no scaling) and values around it
PLM_TEMPERATURES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


@dataclass(frozen=True)
class Mixture:
    """The mixture P = lam p_kNN + (1 - lam) softmax(log p_PLM / T_plm), text and CLIP alike.

    lambda (``lam``), the read-out's k and temperature T, the dev accuracy that chose it (None for one set by
    hand) and the PLM's temperature T_plm (1: unscaled). For the text model also how p_kNN is read:
    ``readout`` "topk" (the k nearest entries at temperature T on score scale ``scale``), "class-mean" (each
    class's mean key, of its ``top_m`` nearest entries or all, at temperature T on the cosine scale) or
    "logistic" (a regression with C = ``logistic_c`` fitted on the store's keys, its log-probabilities divided
    by T), and the ``store`` to read (None: the verbalizer's own).
    """

    lam: float
    k: int
    temperature: float
    accuracy: Optional[float] = None
    plm_temperature: float = 1.0
    scale: str = "zscore"
    readout: str = "topk"
    top_m: Optional[int] = None
    logistic_c: float = 1.0
    store: Optional[object] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"the mixture's lambda must lie in [0, 1], got {self.lam!r}")
        if int(self.k) < 1 or not self.temperature > 0:
            raise ValueError(f"the mixture needs k >= 1 and temperature > 0, got k={self.k!r}, "
                             f"temperature={self.temperature!r}")
        if not 0 < self.plm_temperature < np.inf:
            raise ValueError(f"the mixture's plm_temperature must be a finite number > 0, got {self.plm_temperature!r}")

    def as_dict(self) -> Dict[str, Union[float, int, None]]:
        """``{"accuracy", "lambda", "k", "temperature"}`` for records and printing, plus ``"plm_temperature"``
        where the PLM was rescaled (T_plm != 1)."""
        out = {"accuracy": self.accuracy, "lambda": self.lam, "k": self.k, "temperature": self.temperature}
        if self.plm_temperature != 1.0:
            out["plm_temperature"] = self.plm_temperature
        return out


#: the earlier name of :class:`Mixture` (a point chosen by :func:`select_mixture`)
MixtureChoice = Mixture


def select_mixture(p_model: np.ndarray, labels: np.ndarray, p_knn_for: Callable[[int, float], np.ndarray],
                   lambdas: Sequence[float], ks: Sequence[int], temperatures: Sequence[float],
                   tie_breaks: Sequence[str] = (), plm_temperatures: Sequence[float] = (1.0,)) -> Mixture:
    """Grid search of (lambda, k, T) by accuracy of ``mix(p_model, p_knn_for(k, T), lambda)``.

    Call it with dev / validation data only. Ties in accuracy go through ``tie_breaks`` in order
    (``"log-loss"``: the smaller :func:`log_loss` of the mixture, to 12 decimals), then to the smaller
    lambda, then to the first (k, T) in grid order.

    ``plm_temperatures``: candidates for T_plm, chosen first on the PLM alone by :func:`choose_temperature`;
    the search then mixes ``temperature_scale(p_model, T_plm)``. The default ``(1.0,)`` leaves p_model as is.
    """
    unknown = [b for b in tie_breaks if b not in TIE_BREAKS]
    if unknown:
        raise ValueError(f"tie_breaks must be taken from {TIE_BREAKS}, got {unknown}")
    t_plm = 1.0
    if tuple(plm_temperatures) != (1.0,):
        t_plm = choose_temperature(log_probs(p_model), labels, plm_temperatures).temperature
        p_model = temperature_scale(p_model, t_plm)
    best, best_rank = None, None
    for k, t in itertools.product(ks, temperatures):
        p_knn = p_knn_for(int(k), float(t))
        for lam in sorted(lambdas):
            p = mix(p_model, p_knn, lam)
            acc = accuracy(p, labels)
            rank = (acc, *(_TIE_BREAK_SCORES[b](p, labels) for b in tie_breaks), -lam)  # larger is better
            if best is None or rank > best_rank:
                best = Mixture(lam=float(lam), k=int(k), temperature=float(t), accuracy=acc,
                               plm_temperature=t_plm)
                best_rank = rank
    if best is None:
        raise ValueError("select_mixture needs at least one lambda, k and temperature")
    return best


#: the named grids of :meth:`MixtureGrid.named` (each also with the suffix "-tplm")
GRID_NAMES = ("small", "wide", "fixed", "fine")


@dataclass
class MixtureGrid:
    """The (lambda, k, T) candidates that :func:`select_mixture` searches on dev.

    The default tunes lambda only: with scale-free ("zscore") scores, k = 16 and T = 1 (one standard
    deviation of the neighbours' scores) mean the same thing on every backbone, and a 32-example dev set
    cannot tell 220 combinations apart. :meth:`wide` is the old 11 x 4 x 5 grid; :meth:`fixed` tunes nothing;
    :meth:`fine` tunes lambda in {0, 0.1, ..., 1} with ties broken by dev log-loss (so retrieval alone can win).

    ``tie_breaks`` and ``plm_temperatures`` are passed to :func:`select_mixture`; every field is a sequence,
    so a grid survives ``{k: list(v)}`` / ``{k: tuple(v)}`` round trips through JSON.
    """

    lambdas: Sequence[float] = (0.0, 0.25, 0.5, 0.75)
    ks: Sequence[int] = (16,)
    temperatures: Sequence[float] = (1.0,)
    tie_breaks: Sequence[str] = ()
    plm_temperatures: Sequence[float] = (1.0,)

    @classmethod
    def wide(cls) -> "MixtureGrid":
        return cls(lambdas=tuple(i / 10 for i in range(11)), ks=(4, 8, 16, 32), temperatures=(0.25, 0.5, 1.0, 2.0, 4.0))

    @classmethod
    def fixed(cls, lam: float = 0.5, k: int = 16, temperature: float = 1.0) -> "MixtureGrid":
        return cls(lambdas=(lam,), ks=(k,), temperatures=(temperature,))

    @classmethod
    def fine(cls, plm_temperature: bool = False) -> "MixtureGrid":
        """lambda in {0, 0.1, ..., 1} (1: retrieval alone), k = 16, T = 1; ties in dev accuracy go to the smaller
        dev log-loss, not to the smaller lambda: dev also picked the PLM's checkpoint, so dev flatters the PLM.
        ``plm_temperature``: also temperature-scale the PLM on dev (T_plm from :data:`PLM_TEMPERATURES`)."""
        return cls(lambdas=tuple(i / 10 for i in range(11)), tie_breaks=("log-loss",),
                   plm_temperatures=PLM_TEMPERATURES if plm_temperature else (1.0,))

    @classmethod
    def named(cls, name: str, plm_temperature: bool = False) -> "MixtureGrid":
        """``"small"`` (the default), ``"wide"``, ``"fixed"`` or ``"fine"``, each optionally suffixed
        ``"-tplm"``; the suffix (or ``plm_temperature``) adds the T_plm candidates :data:`PLM_TEMPERATURES`."""
        base = name[:-len("-tplm")] if name.endswith("-tplm") else name
        if base not in GRID_NAMES:
            raise ValueError(f"mixture grid must be one of {list(GRID_NAMES)}, optionally suffixed '-tplm', "
                             f"got {name!r}")
        grid = cls() if base == "small" else getattr(cls, base)()
        if plm_temperature or base != name:
            grid = dataclasses.replace(grid, plm_temperatures=PLM_TEMPERATURES)
        return grid

    def __post_init__(self):
        if not (self.lambdas and self.ks and self.temperatures):
            raise ValueError("MixtureGrid needs at least one lambda, k and temperature")
        if any(not 0.0 <= lam <= 1.0 for lam in self.lambdas):
            raise ValueError(f"lambdas must lie in [0, 1], got {list(self.lambdas)}")
        if any(int(k) < 1 for k in self.ks) or any(not t > 0 for t in self.temperatures):
            raise ValueError("ks must be >= 1 and temperatures > 0")
        if isinstance(self.tie_breaks, str) or any(b not in TIE_BREAKS for b in self.tie_breaks):
            raise ValueError(f"tie_breaks must be a sequence of {TIE_BREAKS}, got {self.tie_breaks!r}")
        if not self.plm_temperatures or any(not 0 < t < np.inf for t in self.plm_temperatures):
            raise ValueError(f"plm_temperatures must be finite numbers > 0 (at least one), got "
                             f"{list(self.plm_temperatures)}")

    def select(self, p_model: np.ndarray, labels: np.ndarray,
               p_knn_for: Callable[[int, float], np.ndarray]) -> Mixture:
        return select_mixture(p_model, labels, p_knn_for, self.lambdas, self.ks, self.temperatures,
                              self.tie_breaks, self.plm_temperatures)
