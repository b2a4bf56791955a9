"""A small trainer: fit / evaluate / predict / explain, with dev-based early stopping
and lambda, k, T chosen on the dev split."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from openprompt import PromptDataLoader
from openprompt.data_utils import InputFeatures
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from . import distributed
from .keys import tokenizing_bar
from .model import RetroPromptForClassification


@dataclass
class TrainingArgs:
    epochs: int = 20
    batch_size: int = 8
    eval_batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_length: int = 128
    seed: int = 42
    patience: int = 5  # epochs without dev improvement before stopping
    tune_inference: bool = True
    lambdas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    ks: Sequence[int] = (4, 8, 16, 32)
    temperatures: Sequence[float] = (1.0, 3.0, 10.0, 30.0, 100.0)
    shuffle: bool = True  # shuffle training batches (seeded)
    progress: bool = True
    device: str = "cpu"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(-1) == labels).mean())


class RetroTrainer:
    """Train and use a :class:`RetroPromptForClassification` on lists of InputExamples.

    ``tokenizer`` and ``wrapper_class`` are what ``openprompt.plms.load_plm`` returns.
    Tokenized features are made once per example list and reused across epochs.
    """

    def __init__(self, model: RetroPromptForClassification, tokenizer, wrapper_class,
                 args: Optional[TrainingArgs] = None):
        self.model, self.tokenizer, self.wrapper_class = model, tokenizer, wrapper_class
        self.args = args or TrainingArgs()
        self.model.to(self.args.device)
        self.history: List[Dict] = []
        self._train_examples = None

    # ---------------------------------------------------------------- data
    def loader(self, examples, batch_size: Optional[int] = None, shuffle: bool = False) -> PromptDataLoader:
        if len(examples) == 0:
            raise ValueError("no examples given")
        with tokenizing_bar(self.args.progress):
            return PromptDataLoader(list(examples), self.model.template, tokenizer=self.tokenizer,
                                    tokenizer_wrapper_class=self.wrapper_class,
                                    max_seq_length=self.args.max_seq_length,
                                    batch_size=batch_size or self.args.eval_batch_size, shuffle=shuffle,
                                    truncate_method="tail")

    @staticmethod
    def _reload(loader: PromptDataLoader, batch_size: int, shuffle: bool, seed: int = 0) -> PromptDataLoader:
        """Same tokenized features, another batching - no re-tokenization."""
        other = copy.copy(loader)
        gen = torch.Generator().manual_seed(seed)
        other.dataloader = DataLoader(loader.tensor_dataset, batch_size=batch_size,
                                      sampler=RandomSampler(loader.tensor_dataset, generator=gen) if shuffle else None,
                                      collate_fn=InputFeatures.collate_fct)
        return other

    def _to_device(self, batch):
        return batch.to(self.args.device) if hasattr(batch, "to") else batch

    # ---------------------------------------------------------------- training
    def fit(self, train, dev=None) -> List[Dict]:
        """Train with the kNN-guided loss; refresh the store every epoch; keep the best dev epoch."""
        a, model = self.args, self.model
        set_seed(a.seed)
        self._train_examples = list(train)
        store_loader = self.loader(train)
        rank, world = distributed.rank_and_world()
        if world > 1:  # DDP: each rank takes batch_size / world examples of every global batch
            if a.batch_size % world:
                raise ValueError(f"batch_size {a.batch_size} must be divisible by the world size {world}")
            sampler = DistributedSampler(store_loader.tensor_dataset, world, rank, shuffle=a.shuffle, seed=a.seed)
            train_loader = DataLoader(store_loader.tensor_dataset, batch_size=a.batch_size // world,
                                      sampler=sampler, collate_fn=InputFeatures.collate_fct)
            step_model = distributed.wrap_ddp(model)
        else:
            sampler = None
            train_loader = self._reload(store_loader, a.batch_size, shuffle=a.shuffle, seed=a.seed)
            step_model = distributed.LossModule(model)
        dev_loader = self.loader(dev) if dev else None
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
        total = a.epochs * len(train_loader)
        warmup = int(a.warmup_ratio * total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)) * max(0.0, (total - s) / max(1, total - warmup))
            if warmup else max(0.0, (total - s) / total))
        needs_store = model.uses_store or (a.tune_inference and dev_loader is not None)
        if needs_store:
            model.refresh_store(store_loader, progress=a.progress)
        best, best_state, bad_epochs = -1.0, None, 0
        bar = tqdm(range(a.epochs), desc="epochs", disable=not a.progress or rank > 0)
        for epoch in bar:
            t0, losses = time.time(), []
            if sampler is not None:
                sampler.set_epoch(epoch)
            model.train()
            for batch in tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=not a.progress):
                loss = step_model(self._to_device(batch))
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
                optimizer.step()
                sched.step()
                losses.append(loss.item())
            if needs_store:
                model.refresh_store(store_loader, progress=a.progress)  # the encoder moved: new keys
            record = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": time.time() - t0}
            if dev_loader is not None:
                record["dev_accuracy"] = self.evaluate(dev_loader)["accuracy"]
                if record["dev_accuracy"] > best:
                    best, bad_epochs = record["dev_accuracy"], 0
                    best_state = self._snapshot()
                else:
                    bad_epochs += 1
            self.history.append(record)
            bar.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
            if dev_loader is not None and bad_epochs >= a.patience:
                break
        if best_state is not None:
            self._restore(best_state)
        if dev_loader is not None and a.tune_inference:
            self.tune_inference(dev_loader)
        return self.history

    def _snapshot(self):
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        s = self.model.store
        return state, (s.keys.copy(), s.labels.copy(), list(s.guids), list(s.texts))

    def _restore(self, snap) -> None:
        state, (keys, labels, guids, texts) = snap
        self.model.load_state_dict(state)
        self.model.store.build(keys, labels, guids, texts)

    # ---------------------------------------------------------------- inference
    def _as_loader(self, data):
        return data if isinstance(data, PromptDataLoader) else self.loader(data)

    @torch.no_grad()
    def predict_proba(self, data) -> np.ndarray:
        """P(y|x) for each example (kNN-mixed with the current lambda)."""
        self.model.eval()
        out = [torch.exp(self.model(self._to_device(b))).cpu().numpy()
               for b in tqdm(self._as_loader(data), desc="predict", leave=False, disable=not self.args.progress)]
        return np.concatenate(out)

    def predict(self, data) -> np.ndarray:
        return self.predict_proba(data).argmax(-1)

    def evaluate(self, data) -> Dict[str, float]:
        loader = self._as_loader(data)
        probs = self.predict_proba(loader)
        labels = np.array([int(f["label"]) for f in loader.tensor_dataset])
        return {"accuracy": accuracy(probs, labels), "n": int(len(labels))}

    @torch.no_grad()
    def collect(self, data) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p_PLM, query keys, labels) for every example - one pass."""
        self.model.eval()
        loader = self._as_loader(data)
        p, q = [], []
        for b in tqdm(loader, desc="collect", leave=False, disable=not self.args.progress):
            pp, qq = self.model.plm_probs_and_queries(self._to_device(b))
            p.append(pp.cpu().numpy())
            q.append(qq.cpu().numpy())
        labels = np.array([int(f["label"]) for f in loader.tensor_dataset])
        return np.concatenate(p), np.concatenate(q), labels

    def tune_inference(self, dev) -> Dict[str, float]:
        """Choose lambda, k and T on the dev split (never on test); ties go to the smaller lambda."""
        a = self.args
        p_plm, queries, labels = self.collect(dev)
        best = None
        for k, t in itertools.product(a.ks, a.temperatures):
            p_knn = self.model.store.knn_distribution(queries, k, t)
            for lam in sorted(a.lambdas):
                acc = accuracy(lam * p_knn + (1 - lam) * p_plm, labels)
                if best is None or acc > best[0] or (acc == best[0] and lam < best[1]):
                    best = (acc, lam, k, t)
        acc, lam, k, t = best
        self.model.apply_config(knn_lambda=float(lam), knn_k=int(k), knn_temperature=float(t))
        self.tuned = {"dev_accuracy": acc, "knn_lambda": lam, "knn_k": k, "knn_temperature": t,
                      "dev_accuracy_plm_only": accuracy(p_plm, labels)}
        return self.tuned

    # ---------------------------------------------------------------- open book
    def explain(self, example, top: int = 5) -> Dict:
        """The prediction for one InputExample and the neighbours behind it (text, label, weight)."""
        loader = self.loader([example], batch_size=1)
        return self.model.explain_batch(self._to_device(next(iter(loader))), top=top)[0]

    def add_examples(self, examples) -> np.ndarray:
        """Add labeled examples to the store now; later predictions use them (no retraining)."""
        return self.model.add_to_store(self.loader(examples), progress=self.args.progress)

    # ---------------------------------------------------------------- disk
    def save(self, directory: str) -> None:
        self.model.save(directory)
        args = dataclasses.asdict(self.args)
        with open(os.path.join(directory, "training_args.json"), "w") as f:
            json.dump({k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}, f, indent=2)

    def load(self, directory: str) -> "RetroTrainer":
        self.model.load(directory)
        return self
