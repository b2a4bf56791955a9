"""Zero-shot CLIP + kNN: hand-written prompts mixed with the image cache's p_kNN, no training.

    P = lambda p_kNN + (1 - lambda) softmax(s * f @ t_c^T),   t_c = CLIP("a photo of a {class}.")
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch

from ..core.knn import Mixture, MixtureGrid
from .cache import UNTUNED, ImageCache, clip_logits, clip_mixture_grid, tune_mixture
from .predictor import ClipPredictor, check_fits, read_predictor, saved_settings, tensor, write_predictor


def zero_shot_text_features(features, classnames: Sequence[str], template: str = "a photo of a {}.") -> torch.Tensor:
    return features.text_features([template.format(c.replace("_", " ")) for c in classnames])


class ZeroShotKnn(ClipPredictor):
    """Training-free: zero-shot CLIP mixed with the image cache's p_kNN (lambda, k, T tuned on validation)."""

    def __init__(self, text_features: torch.Tensor, logit_scale: float, cache: ImageCache):
        self.text, self.scale, self.cache = text_features, logit_scale, cache
        self.mixture: Mixture = UNTUNED

    def zero_shot_probs(self, feats: np.ndarray) -> np.ndarray:
        return torch.softmax(clip_logits(torch.from_numpy(feats), self.text, self.scale), -1).numpy()

    def tune(self, val_feats, val_labels, grid: Optional[MixtureGrid] = None) -> Mixture:
        """Set ``mixture`` to the best point of ``grid`` (default :func:`clip_mixture_grid`) on validation."""
        self.mixture = tune_mixture(self.zero_shot_probs(val_feats), self.cache, val_feats, val_labels,
                                    grid or clip_mixture_grid())
        return self.mixture

    def predict_proba(self, feats: np.ndarray) -> np.ndarray:
        return self.cache.mixed(self.zero_shot_probs(feats), feats, self.mixture)

    def save(self, directory: str) -> None:
        """Write the text features, the image cache, the logit scale and the mixture to the folder ``directory``
        (:mod:`~openprompt_retro.clip.predictor`)."""
        settings = {"logit_scale": float(self.scale), "mixture": dataclasses.asdict(self.mixture)}
        write_predictor(directory, "ZeroShotKnn", settings, {"text": self.text}, self.cache)

    @classmethod
    def load(cls, directory: str) -> "ZeroShotKnn":
        """The ZeroShotKnn :meth:`save` wrote; it predicts bit for bit as the saved one did."""
        settings, tensors, cache = read_predictor(directory, "ZeroShotKnn", with_cache=True)
        text = tensor(tensors, "text", directory, 2)
        check_fits(f"saved ZeroShotKnn at {directory!r}", {
            "the number of classes": (text.shape[0], cache.store.num_classes),
            "the feature dimension": (text.shape[1], cache.store.dim)}, ("text features", "image cache"))
        with saved_settings(directory, "ZeroShotKnn"):
            model = cls(text, float(settings["logit_scale"]), cache)
            model.mixture = Mixture(**settings["mixture"])
        return model
