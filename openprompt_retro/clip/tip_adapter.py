"""Tip-Adapter and Tip-Adapter-F on the image cache.

    Tip-Adapter      l + alpha * exp(-beta (1 - f @ K^T)) @ onehot(V)     (l: zero-shot CLIP logits)
    Tip-Adapter-F    the same with the cache keys K trained (AdamW, cosine learning rate over all steps)

alpha and beta are chosen on a validation split (:meth:`TipAdapter.tune`).
"""
from __future__ import annotations

import itertools
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.knn import accuracy
from .cache import ImageCache, clip_logits
from .predictor import ClipPredictor, check_fits, read_predictor, saved_settings, tensor, write_predictor


def tip_adapter_logits(image_features: torch.Tensor, cache_keys: torch.Tensor, cache_labels: torch.Tensor,
                       num_classes: int, alpha: float, beta: float) -> torch.Tensor:
    """alpha * exp(-beta * (1 - f @ K^T)) @ onehot(V)."""
    affinity = torch.exp(-beta * (1.0 - image_features @ cache_keys.t()))
    return alpha * affinity @ F.one_hot(cache_labels, num_classes).to(affinity.dtype)


class TipAdapter(ClipPredictor, nn.Module):
    """Tip-Adapter (training-free) and, with ``train_keys=True`` + :meth:`fit`, Tip-Adapter-F."""

    def __init__(self, text_features: torch.Tensor, logit_scale: float, cache: ImageCache,
                 alpha: float = 1.0, beta: float = 5.0, train_keys: bool = False):
        super().__init__()
        self.register_buffer("text", text_features.detach().float())
        self.register_buffer("cache_labels", cache.labels.clone())
        self.keys = nn.Parameter(cache.keys.clone().float(), requires_grad=train_keys)
        self.scale, self.alpha, self.beta = logit_scale, alpha, beta
        self.num_classes = int(text_features.shape[0])
        self.history = []  # Tip-Adapter-F epochs (fit)

    def forward(self, feats: torch.Tensor, alpha: Optional[float] = None, beta: Optional[float] = None):
        a = self.alpha if alpha is None else alpha
        b = self.beta if beta is None else beta
        return clip_logits(feats, self.text, self.scale) + tip_adapter_logits(
            feats, self.keys, self.cache_labels, self.num_classes, a, b)

    def fit(self, feats: np.ndarray, labels: np.ndarray, epochs: int = 20, lr: float = 1e-3,
            batch_size: int = 32, seed: int = 0, progress: bool = True) -> "TipAdapter":
        """Tip-Adapter-F: train the cache keys with cross-entropy (everything else frozen).

        As in Tip-Adapter's official code: AdamW (eps 1e-4) and a cosine learning rate
        over all steps, stepped after every batch,

            lr_s = lr * (1 + cos(pi * s / S)) / 2,   S = epochs * batches per epoch,

        so the rate reaches 0 at the last step. ``self.history`` records each epoch's
        mean loss and the rate its last batch used.
        """
        self.keys.requires_grad_(True)
        x, y = torch.from_numpy(feats), torch.from_numpy(np.asarray(labels, dtype=np.int64))
        opt = torch.optim.AdamW([self.keys], lr=lr, eps=1e-4)
        batches = -(-len(y) // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * batches)
        gen = torch.Generator().manual_seed(seed)
        self.history = []
        for epoch in tqdm(range(epochs), desc="Tip-Adapter-F epochs", disable=not progress):
            losses = []
            for idx in torch.randperm(len(y), generator=gen).split(batch_size):
                loss = F.cross_entropy(self(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                lr_used = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                losses.append(loss.item())
            self.history.append({"epoch": epoch, "loss": float(np.mean(losses)), "lr": lr_used})
        return self

    @torch.no_grad()
    def tune(self, val_feats: np.ndarray, val_labels: np.ndarray, alphas=(0.5, 1.0, 2.0, 5.0, 10.0),
             betas=(1.0, 3.0, 5.0, 7.0, 10.0)) -> Dict:
        """Set alpha and beta to the pair with the best validation accuracy (ties: the first in grid order)."""
        x, best = torch.from_numpy(val_feats), None
        for a, b in itertools.product(alphas, betas):
            acc = accuracy(self(x, a, b).numpy(), val_labels)
            if best is None or acc > best["val_accuracy"]:
                best = {"val_accuracy": acc, "alpha": a, "beta": b}
        self.alpha, self.beta = best["alpha"], best["beta"]
        return best

    @torch.no_grad()
    def predict_proba(self, feats: np.ndarray) -> np.ndarray:
        return torch.softmax(self(torch.from_numpy(feats)), -1).numpy()

    def save(self, directory: str) -> None:
        """Write the text features, the cache keys (as trained, for Tip-Adapter-F) and labels, the logit scale,
        the tuned alpha and beta and the training history to the folder ``directory``
        (:mod:`~openprompt_retro.clip.predictor`)."""
        settings = {"logit_scale": float(self.scale), "alpha": self.alpha, "beta": self.beta,
                    "train_keys": self.keys.requires_grad, "history": self.history}
        write_predictor(directory, "TipAdapter", settings, self.state_dict())

    @classmethod
    def load(cls, directory: str) -> "TipAdapter":
        """The TipAdapter :meth:`save` wrote, alpha and beta included; it predicts bit for bit as the saved one."""
        settings, tensors, _ = read_predictor(directory, "TipAdapter")
        text, keys = tensor(tensors, "text", directory, 2), tensor(tensors, "keys", directory, 2)
        labels = tensor(tensors, "cache_labels", directory, 1)
        where = f"saved TipAdapter at {directory!r}"
        check_fits(where, {"the feature dimension": (text.shape[1], keys.shape[1])}, ("text features", "cache keys"))
        check_fits(where, {"the number of cache entries": (keys.shape[0], labels.shape[0])},
                   ("cache keys", "cache labels"))
        with saved_settings(directory, "TipAdapter"):
            model = cls(text, float(settings["logit_scale"]), ImageCache(keys.numpy(), labels.numpy(), len(text)),
                        float(settings["alpha"]), float(settings["beta"]), bool(settings["train_keys"]))
            model.history = list(settings["history"])
        with torch.no_grad():
            model.keys.copy_(keys)  # the cache normalised them; Tip-Adapter-F's trained keys are not unit-length
        return model
