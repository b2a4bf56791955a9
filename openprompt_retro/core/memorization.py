"""Memorization analysis: how much a model relies on rote memory of its training examples.

Memorization score of training example i (Feldman, 2020, estimated exactly by
leave-one-out retraining, affordable at small K):

    mem_i = p_theta(y_i | x_i) - p_theta\\i(y_i | x_i)

theta trained on all examples, theta\\i on all but i. Retrieval never lets an
example answer for itself (its own store entry is excluded), so the score is
what the *parameters* memorised; the prediction scored is p_PLM (lambda = 0).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import numpy as np
from tqdm.auto import tqdm

FitPredict = Callable[[List, List], np.ndarray]  # (train examples, examples to score) -> (n, C) probabilities


def leave_one_out_memorization(fit_predict: FitPredict, examples: Sequence, progress: bool = True) -> Dict:
    """mem_i for every example; ``fit_predict`` must be deterministic given its training set."""
    examples = list(examples)
    labels = np.array([int(e.label) for e in examples])
    p_in = fit_predict(examples, examples)[np.arange(len(examples)), labels]
    p_out = np.empty(len(examples))
    for i in tqdm(range(len(examples)), desc="leave-one-out retrains", disable=not progress):
        rest = examples[:i] + examples[i + 1:]
        p_out[i] = fit_predict(rest, [examples[i]])[0, labels[i]]
    return {"scores": p_in - p_out, "p_in": p_in, "p_out": p_out}


def summarize_memorization(scores: np.ndarray) -> Dict[str, float]:
    scores = np.asarray(scores, dtype=float)
    return {"mean": float(scores.mean()), "std": float(scores.std()), "median": float(np.median(scores)),
            "max": float(scores.max()), "fraction_above_0.1": float((scores > 0.1).mean()), "n": int(len(scores))}


def subsample_k(examples: Sequence, k: int, seed: int) -> List:
    """k examples per label, drawn with ``seed`` (from an LM-BFF 16-shot split, for K = 4 / 8)."""
    rng = np.random.default_rng(seed)
    labels = np.array([int(e.label) for e in examples])
    out = []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        if len(idx) < k:
            raise ValueError(f"label {c} has {len(idx)} examples, fewer than k={k}")
        out.extend(examples[i] for i in sorted(rng.choice(idx, k, replace=False)))
    return out
