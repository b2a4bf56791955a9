"""openprompt-retro: retrieval-augmented prompt learning (RetroPrompt) for OpenPrompt.

Layers (each imports only the ones above it):

    core/         framework-free retrieval math: store, kNN distribution and mixture, loss, demonstrations
    prompt/       the OpenPrompt extension (transformers shims on import; OpenPrompt patched by patches.install)
    clip/         the vision adapter on CLIP (imports core/, never prompt/ or openprompt)
    experiments/  benchmarks, reports and figures behind the CLI (never imported by the library)

Public names load lazily (PEP 562): ``import openprompt_retro`` is cheap, and
``openprompt_retro.RetroTrainer`` imports the OpenPrompt layer on first use.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import List

__version__ = "0.2.0"

_EXPORTS = {
    "core": ["KnowledgeStore", "SearchResult", "StoreError", "SaveFailed", "knn_label_distribution", "knn_weights",
             "mix", "select_mixture", "MixtureGrid", "Mixture", "MixtureChoice", "LossConfig", "RetroConfig",
             "DemonstrationConfig", "KeyConfig", "ReadoutConfig", "MixtureConfig", "neural_demonstrations", "demonstration_weights",
             "knn_guided_loss", "knn_loss_weights", "class_mean_distribution", "class_mean_scores",
             "choose_temperature", "temperature_scale"],
    "prompt": ["MaskKeyHead", "build_store", "build_store_streaming", "extract_keys", "mask_keys", "RetroTemplate",
               "KnnVerbalizer", "TfidfDemoRetriever", "EncoderDemoRetriever", "RetroPromptForClassification", "RetroTrainer",
               "TrainingArgs", "build_model", "build_trainer", "retroprompt"],
    "prompt.key_encoders": ["FrozenMeanEncoder", "SentenceEncoder"],
}
_WHERE = {name: layer for layer, names in _EXPORTS.items() for name in names}
__all__: List[str] = sorted(_WHERE)


class _ShimsBeforeOpenPrompt(importlib.abc.MetaPathFinder):
    """Apply :mod:`.compat` the first time ``openprompt`` is imported, then step aside.

    So the OpenPrompt tutorials' order works: ``import openprompt_retro`` (cheap), then
    ``from openprompt.plms import load_plm`` on current transformers. OpenPrompt's own classes
    stay as they are until a retro class is constructed (:func:`.prompt.patches.install`).
    """

    def find_spec(self, name, path=None, target=None):
        if name == "openprompt":
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            from . import compat

            compat.apply()
        return None  # the usual finders load it


if "openprompt" not in sys.modules and not any(isinstance(f, _ShimsBeforeOpenPrompt) for f in sys.meta_path):
    sys.meta_path.insert(0, _ShimsBeforeOpenPrompt())


def __getattr__(name: str):
    layer = _WHERE.get(name)
    if layer is None:
        raise AttributeError(f"module 'openprompt_retro' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{layer}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(list(globals()) + __all__)
