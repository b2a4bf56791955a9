"""The figures (matplotlib, PNG): memorization, lambda sweep, accuracy against K, neighbours of a prediction."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

import numpy as np

from .results import row_shots


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
    """rows: {"method", "shots" (or "k"), "test_accuracy"} records; mean ± std over seeds per (method, K)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for method in sorted({r["method"] for r in rows}):
        ks = sorted({row_shots(r) for r in rows if r["method"] == method})
        acc = [[100 * r["test_accuracy"] for r in rows if r["method"] == method and row_shots(r) == k] for k in ks]
        ax.errorbar(ks, [np.mean(a) for a in acc], yerr=[np.std(a) for a in acc], marker="o", capsize=3, label=method)
    ax.set_xlabel("K (examples per class)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(sorted({row_shots(r) for r in rows}))
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


def run_figures(ns) -> None:
    """Lambda sweep on dev and the neighbours of one test prediction, from one RetroPrompt run."""
    import torch

    from ..core.knn import mix
    from .runs import check_single, load_split, method_trainer
    from .spec import RunSpec

    check_single(ns)
    os.makedirs(ns.out, exist_ok=True)
    run_spec = RunSpec.from_namespace(ns)
    data = load_split(ns.task, ns.seed, run_spec)
    if not 0 <= ns.example < len(data["test"]):
        from ..errors import UserError

        raise UserError(f"--example {ns.example}: the test split has examples 0..{len(data['test']) - 1}")
    torch.manual_seed(ns.seed)
    trainer, spec = method_trainer("retro", ns.task, run_spec, data["train"], ns.seed)
    trainer.args.tune_inference = True
    trainer.fit(data["train"], data["dev"])
    tuned = trainer.tuned
    p_plm, queries, labels = trainer.collect(data["dev"])
    p_knn = trainer.model.knn_distribution(queries)  # the tuned k and T (config)
    lambdas = [round(x, 2) for x in np.linspace(0, 1, 21)]
    accs = [float((mix(p_plm, p_knn, lam).argmax(1) == labels).mean()) for lam in lambdas]
    plot_lambda_sweep(lambdas, accs, tuned["knn_lambda"], os.path.join(ns.out, "lambda_sweep.png"),
                      f"{spec.name} seed {ns.seed}: dev accuracy against lambda (k={tuned['knn_k']}, "
                      f"T={tuned['knn_temperature']})")
    example = data["test"][ns.example]
    why = trainer.explain(example, top=8)
    plot_neighbours(example.text_a, why, spec.label_words, os.path.join(ns.out, "neighbours.png"))
    with open(os.path.join(ns.out, "figures.json"), "w") as f:
        json.dump({"task": spec.name, "seed": ns.seed, "tuned": tuned, "lambda_sweep": dict(zip(lambdas, accs)),
                   "example": example.text_a, "gold": example.label, "explanation": why}, f, indent=2)
    print(json.dumps({"tuned": tuned, "example_prediction": why["prediction"], "gold": example.label}))


def run_plot_k(ns) -> None:
    from .report import read_results

    rows = [r for r in read_results(ns.results) if r["task"] == ns.task]
    plot_accuracy_vs_k(rows, ns.png, f"{ns.task}: accuracy against K")
    print(ns.png)
