"""Retrieval-augmented prompt learning for images: a CLIP adapter module.

CLIP loads through transformers (`load_clip`, local folder or hub name); the
few-shot images' features form a cosine :class:`~openprompt_retro.KnowledgeStore`.
"""
from .data import ImageSet, check_images, k_shot_indices, load_image_arrays, load_image_folder
from .features import ClipFeatures, augment, load_clip, load_open_clip
from .methods import (ImageCache, RetroCoOp, RetroCoOpConfig, TipAdapter, ZeroShotKnn, clip_logits,
                      tip_adapter_logits, tune_mixture, zero_shot_text_features)
from .prompt_learner import CoOpPromptLearner

__all__ = ["ImageSet", "check_images", "k_shot_indices", "load_image_arrays", "load_image_folder", "ClipFeatures",
           "augment", "load_clip", "load_open_clip", "ImageCache", "RetroCoOp", "RetroCoOpConfig", "TipAdapter",
           "ZeroShotKnn", "clip_logits", "tip_adapter_logits", "tune_mixture", "zero_shot_text_features",
           "CoOpPromptLearner"]
