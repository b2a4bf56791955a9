"""Memorization analysis and the figures (matplotlib, PNG).

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


# ---------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memorization(scores_by_method: Dict[str, np.ndarray], path: str, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo = min(float(np.min(s)) for s in scores_by_method.values())
    hi = max(float(np.max(s)) for s in scores_by_method.values())
    bins = np.linspace(min(lo, 0.0), max(hi, 0.0) + 1e-9, 16)
    for name, s in scores_by_method.items():
        ax.hist(s, bins=bins, alpha=0.55, label=f"{name} (mean {np.mean(s):.3f})")
    ax.set_xlabel("memorization score  p(y|x, trained with x) - p(y|x, trained without x)")
    ax.set_ylabel("training examples")
    ax.set_title(title or "Leave-one-out memorization", fontsize=9)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_lambda_sweep(lambdas: Sequence[float], accuracies: Sequence[float], chosen: float, path: str,
                      title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(lambdas, 100 * np.asarray(accuracies), marker="o")
    ax.axvline(chosen, color="gray", linestyle="--", label=f"chosen lambda = {chosen}")
    ax.set_xlabel("lambda  (P = lambda p_kNN + (1 - lambda) p_PLM)")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title(title or "kNN mixing weight on dev", fontsize=9)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_accuracy_vs_k(rows: List[Dict], path: str, title: str = "") -> None:
    """rows: {"method", "k", "test_accuracy"} records; mean ± std over seeds per (method, K)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for method in sorted({r["method"] for r in rows}):
        ks = sorted({r["k"] for r in rows if r["method"] == method})
        acc = [[100 * r["test_accuracy"] for r in rows if r["method"] == method and r["k"] == k] for k in ks]
        ax.errorbar(ks, [np.mean(a) for a in acc], yerr=[np.std(a) for a in acc], marker="o", capsize=3, label=method)
    ax.set_xlabel("K (examples per class)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(sorted({r["k"] for r in rows}))
    ax.set_title(title or "Accuracy against K", fontsize=9)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_neighbours(query: str, explanation: Dict, class_names: Sequence[str], path: str) -> None:
    """The store entries behind one prediction: similarity weight of each neighbour, coloured by label."""
    plt = _plt()
    nb = explanation["neighbours"]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(nb)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = [f"[{class_names[n['label']]}] {(n['text'] or '')[:60]}" for n in nb]
    ax.barh(range(len(nb)), [n["weight"] for n in nb], color=[colors[n["label"] % len(colors)] for n in nb])
    ax.set_yticks(range(len(nb)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("kNN weight softmax(s / T)")
    pred = class_names[explanation["prediction"]]
    ax.set_title(f"{query[:70]!r} -> {pred}", fontsize=8)
    _save(plt, fig, path)
