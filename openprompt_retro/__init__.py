"""openprompt-retro: retrieval-augmented prompt learning (RetroPrompt) for OpenPrompt.

Importing this package first makes ``openprompt`` importable on current
transformers (see :mod:`openprompt_retro.compat`).
"""
from . import compat

compat.apply()

from .config import RetroConfig  # noqa: E402
from .demonstrations import TfidfDemoRetriever, demonstration_weights, neural_demonstrations  # noqa: E402
from .keys import MaskKeyHead, build_store, extract_keys, mask_keys  # noqa: E402
from .loss import knn_guided_loss, knn_loss_weights  # noqa: E402
from .model import RetroPromptForClassification  # noqa: E402
from .store import KnowledgeStore, SearchResult, StoreError, knn_label_distribution  # noqa: E402
from .template import RetroTemplate  # noqa: E402
from .trainer import RetroTrainer, TrainingArgs  # noqa: E402
from .verbalizer import KnnVerbalizer, mix_distributions  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "KnowledgeStore", "SearchResult", "StoreError", "knn_label_distribution",
    "MaskKeyHead", "build_store", "extract_keys", "mask_keys",
    "RetroConfig", "RetroTemplate", "KnnVerbalizer", "mix_distributions",
    "TfidfDemoRetriever", "neural_demonstrations", "demonstration_weights",
    "knn_guided_loss", "knn_loss_weights",
    "RetroPromptForClassification", "RetroTrainer", "TrainingArgs", "compat",
]
