"""Leave-one-out memorization of plain prompt tuning vs RetroPrompt at small K (``openprompt-retro analyze``)."""
from __future__ import annotations

import json
import os
import sys


def run_memorization(ns) -> None:
    """Leave-one-out memorization of plain prompt tuning vs RetroPrompt at small K."""
    from ..core.memorization import leave_one_out_memorization, subsample_k, summarize_memorization
    from .figures import plot_memorization
    from .runs import check_single, method_trainer
    from .tasks import load_few_shot

    check_single(ns, fixed_k=16)  # K = --shots drawn from the 16-shot split
    os.makedirs(ns.out, exist_ok=True)
    train = subsample_k(load_few_shot(ns.data_root, ns.task, 16, ns.seed)["train"], ns.shots, ns.seed)
    scores, summary = {}, {}
    for method in ns.methods:
        def fit_predict(train_examples, score_examples, method=method):
            import torch

            torch.manual_seed(ns.seed)
            trainer, _ = method_trainer(method, ns.task, ns, train_examples)
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
