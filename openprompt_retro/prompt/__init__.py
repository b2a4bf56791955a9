"""The OpenPrompt extension: template, verbalizer, model and trainer subclasses that add retrieval.

Importing this package first makes ``openprompt`` importable on current
transformers (see :mod:`openprompt_retro.compat`).
"""
from .. import compat

compat.apply()

from .batch import batch_get, batch_guids  # noqa: E402
from .factory import METHODS, build_model, build_trainer, retroprompt  # noqa: E402
from .keys import MaskKeyHead, extract_keys, mask_keys  # noqa: E402
from .model import RetroPromptForClassification  # noqa: E402
from .patches import install  # noqa: E402
from .store_builder import build_store, build_store_streaming  # noqa: E402
from .template import RetroTemplate  # noqa: E402
from .text_demos import EncoderDemoRetriever, TfidfDemoRetriever  # noqa: E402
from .trainer import RetroTrainer  # noqa: E402
from .training_args import TrainingArgs  # noqa: E402
from .verbalizer import KnnVerbalizer  # noqa: E402

__all__ = ["compat", "batch_get", "batch_guids", "METHODS", "build_model", "build_trainer",
           "retroprompt", "MaskKeyHead", "extract_keys", "mask_keys", "RetroPromptForClassification", "build_store",
           "build_store_streaming", "RetroTemplate", "TfidfDemoRetriever", "EncoderDemoRetriever", "RetroTrainer", "TrainingArgs",
           "KnnVerbalizer", "install"]
