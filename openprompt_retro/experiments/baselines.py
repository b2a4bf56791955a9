"""The two simple baselines every accuracy claim is read against, on the same splits and backbone.

    linear-probe  logistic regression on the frozen encoder's mean-pooled embeddings; C chosen on dev
    fine-tune     a linear head on [CLS], the whole encoder trained with the prompt methods' protocol
                  (AdamW, linear decay, the same steps / evaluations; the best dev evaluation is kept)
"""
from __future__ import annotations

import copy
import time
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.knn import accuracy
from ..prompt.trainer import isolated_rng, linear_schedule, set_seed
from ..prompt.training_args import TrainingArgs

PROBE_CS = (0.01, 0.1, 1.0, 10.0, 100.0)


def _encoder(plm: nn.Module) -> nn.Module:
    """The PLM without its LM head (BertModel inside BertForMaskedLM, ...)."""
    base = getattr(plm, "base_model", None)
    return base if base is not None else plm


def _encode_batch(tokenizer, examples: Sequence, max_length: int, device) -> Dict[str, torch.Tensor]:
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if any(getattr(e, "text_b", "") for e in examples) else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _labels(examples: Sequence) -> np.ndarray:
    return np.array([int(e.label) for e in examples])


@torch.no_grad()
def mean_pooled_embeddings(plm, tokenizer, examples: Sequence, max_length: int = 128, batch_size: int = 32,
                           device: str = "cpu", progress: bool = False) -> np.ndarray:
    """Mean of the last hidden states over the attended tokens, one row per example."""
    encoder = _encoder(plm).to(device).eval()
    out = []
    for i in tqdm(range(0, len(examples), batch_size), desc="embeddings", disable=not progress, leave=False):
        inputs = _encode_batch(tokenizer, examples[i:i + batch_size], max_length, device)
        hidden = encoder(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float().cpu().numpy())
    return np.concatenate(out)


def linear_probe(plm, tokenizer, train: Sequence, dev: Sequence, test: Sequence, max_length: int = 128,
                 cs: Sequence[float] = PROBE_CS, seed: int = 0, device: str = "cpu") -> Dict:
    """Logistic regression on frozen mean-pooled embeddings; C is the dev-best of ``cs`` (ties: the smaller)."""
    from sklearn.linear_model import LogisticRegression

    x = {name: mean_pooled_embeddings(plm, tokenizer, list(split), max_length, device=device)
         for name, split in (("train", train), ("dev", dev), ("test", test))}
    y = {"train": _labels(train), "dev": _labels(dev), "test": _labels(test)}
    best = None
    for c in cs:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x["train"], y["train"])
        acc = float(clf.score(x["dev"], y["dev"]))
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    dev_acc, c, clf = best
    return {"dev_accuracy": dev_acc, "test_accuracy": float(clf.score(x["test"], y["test"])), "C": c,
            "n_test": int(len(test))}


class ClsClassifier(nn.Module):
    """encoder -> [CLS] (first token) -> dropout -> linear."""

    def __init__(self, plm: nn.Module, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = _encoder(plm)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(int(self.encoder.config.hidden_size), num_classes)

    def forward(self, **inputs) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(**inputs).last_hidden_state[:, 0]))


def fine_tune(plm, tokenizer, train: Sequence, dev: Sequence, test: Sequence, num_classes: int,
              args: TrainingArgs) -> Dict:
    """Standard fine-tuning with the prompt methods' protocol (steps, evaluations, best dev kept)."""
    set_seed(args.seed)
    model = ClsClassifier(plm, num_classes).to(args.device)
    train, y_train = list(train), torch.from_numpy(_labels(train))
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = -(-len(train) // args.batch_size)
    total = args.max_steps or args.epochs * steps_per_epoch
    eval_every = args.eval_every or steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = linear_schedule(optimizer, total, args.warmup_ratio)
    history: List[Dict] = []
    best, best_state, bad, step, t0 = -1.0, None, 0, 0, time.time()
    while step < total and bad < args.patience:
        order = torch.randperm(len(train), generator=gen) if args.shuffle else torch.arange(len(train))
        for idx in order.split(args.batch_size):
            model.train()
            inputs = _encode_batch(tokenizer, [train[i] for i in idx], args.max_seq_length, args.device)
            loss = nn.functional.cross_entropy(model(**inputs), y_train[idx].to(args.device))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % eval_every == 0 or step == total:
                with isolated_rng(args.device):
                    dev_acc = accuracy(predict_proba(model, tokenizer, dev, args), _labels(dev))
                history.append({"step": step, "dev_accuracy": dev_acc, "loss": float(loss.item())})
                if dev_acc > best:
                    best, bad, best_state = dev_acc, 0, copy.deepcopy(model.state_dict())
                else:
                    bad += 1
            if step >= total or bad >= args.patience:
                break
    train_s = time.time() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    t0 = time.time()
    test_acc = accuracy(predict_proba(model, tokenizer, test, args), _labels(test))
    return {"dev_accuracy": best, "test_accuracy": test_acc, "n_test": int(len(test)), "history": history,
            "steps_run": step, "train_seconds": round(train_s, 2), "test_seconds": round(time.time() - t0, 2)}


@torch.no_grad()
def predict_proba(model: ClsClassifier, tokenizer, examples: Sequence, args: TrainingArgs) -> np.ndarray:
    model.eval()
    examples = list(examples)
    out = [torch.softmax(model(**_encode_batch(tokenizer, examples[i:i + args.eval_batch_size],
                                                args.max_seq_length, args.device)), -1).float().cpu().numpy()
           for i in range(0, len(examples), args.eval_batch_size)]
    return np.concatenate(out)
