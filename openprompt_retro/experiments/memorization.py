"""Memorization analysis (``openprompt-retro analyze``): how much a model relies on rote memory of its training
examples, plain prompt tuning vs RetroPrompt at small K.

Memorization score of training example i (Feldman, 2020, estimated exactly by
leave-one-out retraining, affordable at small K):

    mem_i = p_theta(y_i | x_i) - p_theta\\i(y_i | x_i)

theta trained on all examples, theta\\i on all but i. Retrieval never lets an
example answer for itself (its own store entry is excluded), so the score is
what the *parameters* memorised; the prediction scored is p_PLM (lambda = 0).
"""
from __future__ import annotations

import json
import os
import sys
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


def run_memorization(ns) -> None:
    """Leave-one-out memorization of plain prompt tuning vs RetroPrompt at small K."""
    from .figures import plot_memorization
    from .runs import check_single, method_trainer
    from .sampling import subsample_k
    from .spec import RunSpec
    from .tasks import load_few_shot

    check_single(ns, fixed_k=16)  # K = --shots drawn from the 16-shot split
    os.makedirs(ns.out, exist_ok=True)
    run_spec = RunSpec.from_namespace(ns)
    train = subsample_k(load_few_shot(ns.data_root, ns.task, 16, ns.seed)["train"], ns.shots, ns.seed)
    scores, summary = {}, {}
    for method in ns.methods:
        def fit_predict(train_examples, score_examples, method=method):
            import torch

            torch.manual_seed(ns.seed)
            trainer, _ = method_trainer(method, ns.task, run_spec, train_examples, ns.seed)
            trainer.fit(train_examples)
            trainer.model.exclude_self_in_eval = True  # an example's own entry never answers for it
            return trainer.predict_proba(score_examples)

        print(f"{method}: {len(train) + 1} trainings", file=sys.stderr, flush=True)
        out = leave_one_out_memorization(fit_predict, train, progress=not ns.no_progress)
        scores[method] = out["scores"]
        summary[method] = {**summarize_memorization(out["scores"]), "p_in": out["p_in"].tolist(),
                           "p_out": out["p_out"].tolist(), "scores": out["scores"].tolist()}
    title = f"{ns.task}, K={ns.shots}, seed {ns.seed}: leave-one-out memorization"
    plot_memorization(scores, os.path.join(ns.out, "memorization.png"), title)
    result = {"task": ns.task, "shots": ns.shots, "seed": ns.seed, "model": ns.model, "epochs": ns.epochs,
              "lr": ns.lr, "methods": summary}
    with open(os.path.join(ns.out, "memorization.json"), "w") as f:
        json.dump(result, f, indent=2)
    for method, s in summary.items():
        print(f"{method:8s} mean {s['mean']:.4f}  median {s['median']:.4f}  std {s['std']:.4f}  "
              f"max {s['max']:.4f}  >0.1: {s['fraction_above_0.1']:.2f}")
