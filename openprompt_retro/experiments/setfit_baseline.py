"""The SetFit baseline: the real ``setfit`` package (Tunstall et al., 2022) on the same encoder, splits and seeds.

SetFit fine-tunes a sentence encoder contrastively on pairs drawn from the labelled examples, then fits a
logistic-regression head on its embeddings. It runs here with SetFit's own defaults (recorded in each row,
:func:`setfit_defaults`); only where files go is changed (a temporary folder, no checkpoints, no loggers).
Dev is used as SetFit uses it by default: not at all for training (its accuracy is reported, nothing is
chosen on it). The encoder folder is loaded as a sentence-transformer (mean pooling over the last layer).
A sentence pair is given as one text, ``text_a [SEP] text_b`` (the tokenizer's separator), since SetFit
classifies single texts.

Optional: ``pip install -e ".[setfit]"``.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Dict, Sequence

import numpy as np

SETFIT_MISSING = ("the setfit baseline needs the optional setfit package: pip install -e \".[setfit]\" "
                  "(pinned in setup.cfg to a release that works with this package's transformers range)")


def setfit_available() -> bool:
    try:
        import setfit  # noqa: F401
    except ImportError:
        return False
    return True


def _texts(examples: Sequence, sep: str):
    return [e.text_a if not getattr(e, "text_b", None) else f"{e.text_a} {sep} {e.text_b}" for e in examples]


def setfit_defaults(args) -> Dict[str, object]:
    """The SetFit training arguments that decide what it learns (JSON-able)."""
    return {"sampling_strategy": args.sampling_strategy, "num_iterations": args.num_iterations,
            "num_epochs": list(args.num_epochs), "batch_size": list(args.batch_size),
            "body_learning_rate": list(args.body_learning_rate), "head_learning_rate": args.head_learning_rate,
            "loss": args.loss.__name__, "end_to_end": args.end_to_end, "warmup_proportion": args.warmup_proportion,
            "l2_weight": args.l2_weight, "max_length": args.max_length, "seed": args.seed}


def run_setfit(model_path: str, train: Sequence, dev: Sequence, test: Sequence, seed: int,
               progress: bool = False) -> Dict[str, object]:
    """Train SetFit (its defaults, ``seed``) on ``train``; accuracy on dev (reported only) and test, timings."""
    try:
        import setfit
        from datasets import Dataset
        from setfit import SetFitModel, Trainer, TrainingArguments
    except ImportError:
        from ..errors import UserError

        raise UserError(SETFIT_MISSING) from None
    import sentence_transformers

    t0 = time.time()
    model = SetFitModel.from_pretrained(model_path)
    sep = model.model_body.tokenizer.sep_token or "[SEP]"
    with tempfile.TemporaryDirectory(prefix="setfit-") as out:
        args = TrainingArguments(output_dir=out, seed=seed, report_to="none", save_strategy="no",
                                 show_progress_bar=progress, logging_strategy="no")
        data = Dataset.from_dict({"text": _texts(train, sep), "label": [int(e.label) for e in train]})
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
    train_s = time.time() - t0

    def accuracy(examples):
        pred = np.asarray(model.predict(_texts(examples, sep), show_progress_bar=False))
        return float((pred.astype(np.int64) == np.array([int(e.label) for e in examples])).mean())

    dev_acc = accuracy(dev) if dev else None
    t0 = time.time()
    test_acc = accuracy(test)
    return {"test_accuracy": test_acc, "dev_accuracy": dev_acc, "n_test": len(test),
            "train_seconds": round(train_s, 2), "test_seconds": round(time.time() - t0, 2),
            "settings": {"setfit": setfit.__version__, "sentence_transformers": sentence_transformers.__version__,
                         "defaults": setfit_defaults(args), "effective_max_length": model.model_body.max_seq_length,
                         "head": type(model.model_head).__name__, "pair_join": sep,
                         "dev": "reported, not used", "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0)}}


__all__ = ["run_setfit", "setfit_available", "setfit_defaults", "SETFIT_MISSING"]
