"""Retrieval-augmented prompt learning for images, on frozen CLIP features.

    CLIP logits      l = s * f @ t_c^T                       (f, t L2-normalised, s = CLIP's logit scale)
    p_kNN            sum_{j<=k} softmax_j(cos(f, f_j) / T) 1[y_j = c]   (image cache = KnowledgeStore)
    RetroCoOp        train the CoOp context with CE_i (1 + beta (-log p_kNN(y_i|x_i))), self left out;
                     predict P = lambda p_kNN + (1 - lambda) softmax(l)
    zero-shot + kNN  the same mixture with hand-written prompts, no training
    Tip-Adapter      l + alpha * exp(-beta (1 - f @ K^T)) @ onehot(V)
    Tip-Adapter-F    the same with the cache keys K trained (AdamW, cosine learning rate over all steps)

Every mixing / cache hyper-parameter is chosen on a validation split.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.knn import accuracy, mix, select_mixture
from ..core.loss import knn_guided_loss
from ..core.store import KnowledgeStore
from .prompt_learner import CoOpPromptLearner


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """s * f @ t^T for L2-normalised features."""
    return logit_scale * image_features @ text_features.t()


def tip_adapter_logits(image_features: torch.Tensor, cache_keys: torch.Tensor, cache_labels: torch.Tensor,
                       num_classes: int, alpha: float, beta: float) -> torch.Tensor:
    """alpha * exp(-beta * (1 - f @ K^T)) @ onehot(V)."""
    affinity = torch.exp(-beta * (1.0 - image_features @ cache_keys.t()))
    return alpha * affinity @ F.one_hot(cache_labels, num_classes).to(affinity.dtype)


class ImageCache:
    """The few-shot training images' features as a cosine KnowledgeStore."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, num_classes: int):
        self.store = KnowledgeStore(features.shape[1], num_classes, metric="cosine",
                                    built_by={"key_type": "clip-image"})
        self.store.build(features, labels, guids=[str(i) for i in range(len(labels))])
        self.keys = torch.from_numpy(np.ascontiguousarray(self.store.keys))
        self.labels = torch.from_numpy(self.store.labels)

    def p_knn(self, queries, k: int, temperature: float, exclude_self: bool = False) -> np.ndarray:
        exclude = np.arange(len(self.labels)) if exclude_self else None
        return self.store.knn_distribution(np.asarray(queries), k, temperature, exclude)


@dataclass
class RetroCoOpConfig:
    n_ctx: int = 16
    ctx_init: Optional[str] = None  # e.g. "a photo of a"
    class_specific: bool = False
    epochs: int = 50
    lr: float = 2e-3
    batch_size: int = 32
    loss: str = "knn"  # "ce" | "knn" | "focal"
    loss_beta: float = 1.0
    focal_gamma: float = 2.0
    train_knn_k: int = 16
    train_knn_temperature: float = 0.05
    lambdas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    ks: Sequence[int] = (4, 8, 16, 32)
    temperatures: Sequence[float] = (0.01, 0.02, 0.05, 0.1)
    seed: int = 0
    progress: bool = True


def tune_mixture(p_model: np.ndarray, cache: ImageCache, val_feats: np.ndarray, val_labels: np.ndarray,
                 lambdas, ks, temperatures) -> Dict:
    """Pick lambda, k, T on validation data (:func:`~openprompt_retro.core.knn.select_mixture`)."""
    best = select_mixture(p_model, val_labels, lambda k, t: cache.p_knn(val_feats, k, t), lambdas, ks, temperatures)
    return {"val_accuracy": best["accuracy"], "lambda": best["lambda"], "k": best["k"],
            "temperature": best["temperature"]}


class RetroCoOp:
    """CoOp context trained with the kNN-guided loss; kNN-mixed prediction.

    Works on precomputed, L2-normalised image features (CLIP is frozen, so
    they never change); the text side runs CLIP's text transformer each step.
    """

    def __init__(self, clip_model, tokenizer, classnames: Sequence[str], config: Optional[RetroCoOpConfig] = None):
        self.config = config or RetroCoOpConfig()
        self.classnames = list(classnames)
        self.clip = clip_model
        self.learner = CoOpPromptLearner(clip_model, tokenizer, classnames, self.config.n_ctx, self.config.ctx_init,
                                         self.config.class_specific, seed=self.config.seed)
        self.logit_scale = float(clip_model.logit_scale.exp())
        self.mixture = {"lambda": 0.0, "k": 16, "temperature": 0.05}
        self.cache: Optional[ImageCache] = None
        self.history = []

    def fit(self, train_feats: np.ndarray, train_labels: np.ndarray, val_feats: Optional[np.ndarray] = None,
            val_labels: Optional[np.ndarray] = None) -> "RetroCoOp":
        c = self.config
        torch.manual_seed(c.seed)
        self.cache = ImageCache(train_feats, train_labels, len(self.classnames))
        feats, labels = self.cache.keys, self.cache.labels
        p_knn = self.cache.p_knn(train_feats, c.train_knn_k, c.train_knn_temperature, exclude_self=True)
        p_gold = torch.from_numpy(p_knn[np.arange(len(labels)), labels.numpy()])
        opt = torch.optim.SGD(self.learner.parameters(), lr=c.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, c.epochs)
        gen = torch.Generator().manual_seed(c.seed)
        for epoch in tqdm(range(c.epochs), desc="RetroCoOp epochs", disable=not c.progress):
            order, losses = torch.randperm(len(labels), generator=gen), []
            for i in range(0, len(order), c.batch_size):
                idx = order[i:i + c.batch_size]
                logits = clip_logits(feats[idx], self.learner(), self.logit_scale)
                loss = knn_guided_loss(logits, labels[idx], p_gold[idx], c.loss, c.loss_beta, c.focal_gamma)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            sched.step()
            self.history.append({"epoch": epoch, "loss": float(np.mean(losses))})
        if val_feats is not None:
            self.mixture = tune_mixture(self.prompt_probs(val_feats), self.cache, val_feats, val_labels,
                                        c.lambdas, c.ks, c.temperatures)
        return self

    @torch.no_grad()
    def prompt_probs(self, feats: np.ndarray) -> np.ndarray:
        text = self.learner()
        return torch.softmax(clip_logits(torch.from_numpy(feats), text, self.logit_scale), -1).numpy()

    def predict_proba(self, feats: np.ndarray) -> np.ndarray:
        m = self.mixture
        p = self.prompt_probs(feats)
        if m["lambda"] == 0.0:
            return p
        return mix(p, self.cache.p_knn(feats, m["k"], m["temperature"]), m["lambda"])


def zero_shot_text_features(features, classnames: Sequence[str], template: str = "a photo of a {}.") -> torch.Tensor:
    return features.text_features([template.format(c.replace("_", " ")) for c in classnames])


class ZeroShotKnn:
    """Training-free: zero-shot CLIP mixed with the image cache's p_kNN (lambda, k, T tuned on validation)."""

    def __init__(self, text_features: torch.Tensor, logit_scale: float, cache: ImageCache):
        self.text, self.scale, self.cache = text_features, logit_scale, cache
        self.mixture = {"lambda": 0.0, "k": 16, "temperature": 0.05}

    def zero_shot_probs(self, feats: np.ndarray) -> np.ndarray:
        return torch.softmax(clip_logits(torch.from_numpy(feats), self.text, self.scale), -1).numpy()

    def tune(self, val_feats, val_labels, lambdas=RetroCoOpConfig.lambdas, ks=RetroCoOpConfig.ks,
             temperatures=RetroCoOpConfig.temperatures) -> Dict:
        self.mixture = tune_mixture(self.zero_shot_probs(val_feats), self.cache, val_feats, val_labels,
                                    lambdas, ks, temperatures)
        return self.mixture

    def predict_proba(self, feats: np.ndarray) -> np.ndarray:
        m, p = self.mixture, self.zero_shot_probs(feats)
        return mix(p, self.cache.p_knn(feats, m["k"], m["temperature"]), m["lambda"])


class TipAdapter(nn.Module):
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
