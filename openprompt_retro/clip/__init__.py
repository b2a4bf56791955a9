"""Retrieval-augmented prompt learning for images: a CLIP adapter module.

CLIP loads through transformers (`load_clip`, local folder or hub name); the
few-shot images' features form a cosine :class:`~openprompt_retro.KnowledgeStore`.
One module per method: :mod:`.zero_shot_knn`, :mod:`.tip_adapter`, :mod:`.retro_coop`;
:mod:`.cache` holds what they share, :mod:`.predictor` their ``predict`` and saved folder.
"""
from .cache import ImageCache, clip_logits, clip_mixture_grid, tune_mixture
from .data import ImageSet, check_images, k_shot_indices, load_image_arrays, load_image_folder
from .features import ClipFeatures, augment, load_clip, load_open_clip
from .prompt_learner import CoOpPromptLearner
from .retro_coop import RetroCoOp, RetroCoOpConfig
from .tip_adapter import TipAdapter, tip_adapter_logits
from .zero_shot_knn import ZeroShotKnn, zero_shot_text_features

__all__ = ["ImageSet", "check_images", "k_shot_indices", "load_image_arrays", "load_image_folder", "ClipFeatures",
           "augment", "load_clip", "load_open_clip", "ImageCache", "RetroCoOp", "RetroCoOpConfig", "TipAdapter",
           "ZeroShotKnn", "clip_logits", "tip_adapter_logits", "tune_mixture", "zero_shot_text_features",
           "CoOpPromptLearner", "clip_mixture_grid"]
