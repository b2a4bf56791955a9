"""RetroCoOp: CoOp's context trained with the kNN-guided loss, predictions mixed with the image cache's p_kNN.

    train    the context with CE_i min(1 + beta (-log p_kNN(y_i|x_i)), w_max), image i left out of its own p_kNN
             (:mod:`openprompt_retro.core.loss`; plain CE while the cache's leave-one-out accuracy is at chance)
    predict  P = lambda p_kNN + (1 - lambda) softmax(s * f @ t_c^T),  lambda, k, T tuned on validation
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.config import LossConfig, check_choice, check_float, check_int
from ..core.knn import Mixture, MixtureGrid
from ..core.loss import knn_guided_loss, store_beats_chance
from .cache import UNTUNED, ImageCache, clip_logits, clip_mixture_grid, tune_mixture
from .predictor import ClipPredictor, check_fits, read_predictor, saved_settings, tensor, write_predictor
from .prompt_learner import CoOpPromptLearner


@dataclass
class RetroCoOpConfig(LossConfig):
    """The loss fields of :class:`~openprompt_retro.core.config.LossConfig` (T on the cosine scale) and:

        n_ctx, ctx_init, class_specific: CoOp's context (``ctx_init`` e.g. "a photo of a" sets its length).
        epochs, lr, batch_size, seed, progress: SGD with momentum 0.9 and a cosine learning rate per epoch.
        grid: the (lambda, k, T) candidates tuned on validation (:func:`clip_mixture_grid`).
    """

    train_knn_temperature: float = 0.05
    n_ctx: int = 16
    ctx_init: Optional[str] = None
    class_specific: bool = False
    epochs: int = 50
    lr: float = 2e-3
    batch_size: int = 32
    grid: MixtureGrid = field(default_factory=clip_mixture_grid)
    seed: int = 0
    progress: bool = True

    def validate(self) -> "RetroCoOpConfig":
        super().validate()
        if self.ctx_init is None:
            check_int(self, "n_ctx")
        elif not isinstance(self.ctx_init, str):
            raise ValueError(f"ctx_init must be a string or None, got {self.ctx_init!r}")
        check_choice(self, "class_specific", (True, False))
        check_int(self, "epochs", 0)
        check_float(self, "lr", 0.0, low_open=True)
        check_int(self, "batch_size")
        check_int(self, "seed", 0)
        check_choice(self, "progress", (True, False))
        if not isinstance(self.grid, MixtureGrid):
            raise ValueError(f"grid must be a MixtureGrid, got {self.grid!r}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        """Every field, ``grid`` as a dict of lists: JSON-ready."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RetroCoOpConfig":
        """The config :meth:`to_dict` gave; a ValueError names unknown fields."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown RetroCoOpConfig fields: {unknown}")
        d = dict(d)
        if "grid" in d:
            d["grid"] = MixtureGrid(**{name: tuple(values) for name, values in d["grid"].items()})
        return cls(**d)


def clip_signature(clip_model) -> Dict[str, Any]:
    """What identifies the frozen CLIP a context was trained on: its widths, logit scale and the sha256 of its
    text projection (float32), which differs between any two trained checkpoints."""
    projection = clip_model.text_projection.weight.detach().float().cpu().contiguous().numpy()
    return {"text_width": int(clip_model.text_model.embeddings.token_embedding.weight.shape[1]),
            "projection_dim": int(projection.shape[0]), "logit_scale": float(clip_model.logit_scale.exp()),
            "text_projection_sha256": hashlib.sha256(projection.tobytes()).hexdigest()}


class RetroCoOp(ClipPredictor):
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
        self.mixture: Mixture = UNTUNED
        self.cache: Optional[ImageCache] = None
        self.knn_loss_active: Optional[bool] = None  # set by fit: the gate's verdict
        self.store_loo_accuracy: Optional[float] = None
        self.history = []

    def _loss_kind(self, p_knn_loo: np.ndarray, labels: np.ndarray) -> str:
        """config.loss, or "ce" while the gate is on and the cache's leave-one-out accuracy is at chance."""
        beats, self.store_loo_accuracy = store_beats_chance(p_knn_loo, labels)
        self.knn_loss_active = beats or not self.config.knn_loss_gate
        return self.config.loss if self.knn_loss_active else "ce"

    def fit(self, train_feats: np.ndarray, train_labels: np.ndarray, val_feats: Optional[np.ndarray] = None,
            val_labels: Optional[np.ndarray] = None) -> "RetroCoOp":
        c = self.config
        torch.manual_seed(c.seed)
        self.cache = ImageCache(train_feats, train_labels, len(self.classnames))
        feats, labels = self.cache.keys, self.cache.labels
        p_knn = self.cache.p_knn(train_feats, c.train_knn_k, c.train_knn_temperature, exclude_self=True)
        p_gold = torch.from_numpy(p_knn[np.arange(len(labels)), labels.numpy()])
        kind = self._loss_kind(p_knn, labels.numpy())
        opt = torch.optim.SGD(self.learner.parameters(), lr=c.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, c.epochs)
        gen = torch.Generator().manual_seed(c.seed)
        for epoch in tqdm(range(c.epochs), desc="RetroCoOp epochs", disable=not c.progress):
            order, losses = torch.randperm(len(labels), generator=gen), []
            for i in range(0, len(order), c.batch_size):
                idx = order[i:i + c.batch_size]
                logits = clip_logits(feats[idx], self.learner(), self.logit_scale)
                loss = knn_guided_loss(logits, labels[idx], p_gold[idx], kind, c.loss_beta, c.focal_gamma,
                                       c.max_loss_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            sched.step()
            self.history.append({"epoch": epoch, "loss": float(np.mean(losses))})
        if val_feats is not None:
            self.mixture = tune_mixture(self.prompt_probs(val_feats), self.cache, val_feats, val_labels, c.grid)
        return self

    @torch.no_grad()
    def prompt_probs(self, feats: np.ndarray) -> np.ndarray:
        return torch.softmax(clip_logits(torch.from_numpy(feats), self.learner(), self.logit_scale), -1).numpy()

    def predict_proba(self, feats: np.ndarray) -> np.ndarray:
        return self.cache.mixed(self.prompt_probs(feats), feats, self.mixture)

    def save(self, directory: str) -> None:
        """Write the learned context, the image cache, the config, class names, tuned mixture, the gate's verdict,
        the history and the CLIP's :func:`clip_signature` to the folder ``directory``
        (:mod:`~openprompt_retro.clip.predictor`). CLIP itself is not saved: :meth:`load` is given it."""
        if self.cache is None:
            raise ValueError("RetroCoOp has no image cache yet: fit it before saving")
        settings = {"config": self.config.to_dict(), "classnames": self.classnames,
                    "mixture": dataclasses.asdict(self.mixture), "knn_loss_active": self.knn_loss_active,
                    "store_loo_accuracy": self.store_loo_accuracy, "history": self.history,
                    "clip": clip_signature(self.clip)}
        write_predictor(directory, "RetroCoOp", settings, {"ctx": self.learner.ctx}, self.cache)

    @classmethod
    def load(cls, directory: str, clip_model, tokenizer) -> "RetroCoOp":
        """The RetroCoOp :meth:`save` wrote, on ``clip_model`` and ``tokenizer`` (the ones it was trained with:
        a ValueError names what differs); it predicts bit for bit as the saved one did."""
        settings, tensors, cache = read_predictor(directory, "RetroCoOp", with_cache=True)
        ctx, where = tensor(tensors, "ctx", directory), f"saved RetroCoOp at {directory!r}"
        with saved_settings(directory, "RetroCoOp"):
            check_fits(where, {f"the CLIP's {name}": (value, settings["clip"].get(name))
                               for name, value in clip_signature(clip_model).items()}, ("CLIP given", "saved model"),
                       "load it with the CLIP it was trained on")
            model = cls(clip_model, tokenizer, settings["classnames"], RetroCoOpConfig.from_dict(settings["config"]))
            model.mixture = Mixture(**settings["mixture"])
            model.knn_loss_active = settings["knn_loss_active"]
            model.store_loo_accuracy = settings["store_loo_accuracy"]
            model.history = list(settings["history"])
        check_fits(where, {"the number of classes": (len(model.classnames), cache.store.num_classes),
                           "the feature dimension": (model.clip.config.projection_dim, cache.store.dim)},
                   ("class names", "image cache"))
        check_fits(where, {"the context shape": (tuple(model.learner.ctx.shape), tuple(ctx.shape))},
                   ("config", "saved context"))
        with torch.no_grad():
            model.learner.ctx.copy_(ctx)
        model.cache = cache
        return model
