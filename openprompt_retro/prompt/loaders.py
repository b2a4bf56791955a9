"""Example identity, pass counting and a registry of OpenPrompt's ``PromptDataLoader``\\ s.

Every ``PromptDataLoader`` built once a retro class was constructed
(:func:`.patches.install`; or passed to ``model.attach``) tags each of its examples with

    uid = (serial << 32) | position

``serial`` is unique to the loader within the process and ``position`` is the
example's index in the dataset the loader was built from. Leave-one-out and
"is this a training example?" use this identity, never the guid text: examples
without a guid (OpenPrompt's default ``guid=None``) stay distinct, and guids
that repeat across splits (Hugging Face's ``idx`` restarts at 0 in each split)
cannot make a dev example look like a training example.

The patched loader also counts how often it has been iterated
(:func:`passes`), so a model can refresh its store once per pass over its
training loader, and the registry (weak references) lets a model find the
loader that a training batch came from.
"""
from __future__ import annotations

import functools
import itertools
import weakref
from typing import Dict, Optional

import numpy as np
import torch

from .batch import EXAMPLE_KEY

SHIFT = 32
_SERIALS = itertools.count(1)
_LOADERS: Dict[int, weakref.ref] = {}


def tag_loader(loader) -> int:
    """Give ``loader`` a serial (once) and each of its examples its identity; returns the serial."""
    serial = getattr(loader, "_retro_serial", None)
    if serial is None or loader_of(serial) is None:
        serial = next(_SERIALS)
        loader._retro_serial = serial
        _LOADERS[serial] = weakref.ref(loader, lambda _, s=serial: _LOADERS.pop(s, None))
    base = serial << SHIFT
    for position, features in enumerate(loader.tensor_dataset):
        features[EXAMPLE_KEY] = torch.tensor(base + position, dtype=torch.long)
    return serial


def serial_of(loader) -> Optional[int]:
    return getattr(loader, "_retro_serial", None)


def loader_of(serial: int):
    """The live loader with this serial, or None."""
    ref = _LOADERS.get(int(serial))
    return ref() if ref is not None else None


def serials(uids: np.ndarray) -> np.ndarray:
    return np.asarray(uids, dtype=np.int64) >> SHIFT


def positions(uids: np.ndarray) -> np.ndarray:
    return np.asarray(uids, dtype=np.int64) & ((1 << SHIFT) - 1)


def passes(loader) -> int:
    """How many times ``iter(loader)`` has been called (0 for loaders we did not patch)."""
    return int(getattr(loader, "_retro_passes", 0))


def in_order(loader):
    """The loader's examples in dataset order, batched like the loader (no shuffling, no pass counted)."""
    from openprompt.data_utils import InputFeatures
    from torch.utils.data import DataLoader

    features = getattr(loader, "tensor_dataset", None)
    if features is None:
        return loader
    return DataLoader(features, batch_size=getattr(loader, "batch_size", None) or 32,
                      collate_fn=InputFeatures.collate_fct)


def _deferred_error(loader) -> ValueError:
    return ValueError(f"this PromptDataLoader ({len(loader.raw_dataset)} examples) is not tokenized yet: its "
                      "RetroTemplate shows a label word per class and was given none; build "
                      "RetroPromptForClassification(plm, template, verbalizer) with that template (it hands the "
                      "verbalizer's label words over and the loader is tokenized then), or pass label_words=[...] "
                      "to RetroTemplate")


def build_deferred(loader) -> None:
    """Tokenize a loader whose RetroTemplate has just received its label words."""
    args, kwargs = loader.__dict__.pop("_retro_deferred")
    type(loader).__init__(loader, *args, **kwargs)


def patch_prompt_data_loader() -> None:
    """Patch ``PromptDataLoader`` (idempotent): tag examples after tokenizing, count passes, and defer a
    loader whose RetroTemplate waits for its label words (tokenized when they come: :func:`build_deferred`)."""
    import inspect

    from openprompt import PromptDataLoader

    if getattr(PromptDataLoader, "_retro_patched", False):
        return
    init, iterate = PromptDataLoader.__init__, PromptDataLoader.__iter__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        template = bound.arguments.get("template")
        if getattr(template, "waits_for_label_words", False):  # nothing tokenized (or iterable) until then
            self.raw_dataset, self.template, self._retro_deferred = bound.arguments["dataset"], template, (args, kwargs)
            self.wrapped_dataset, self.tensor_dataset, self.dataloader = [], [], []
            template.defer(self)
            return
        init(self, *args, **kwargs)
        tag_loader(self)

    @functools.wraps(iterate)
    def __iter__(self):
        if "_retro_deferred" in self.__dict__:
            raise _deferred_error(self)
        self._retro_passes = passes(self) + 1
        return iterate(self)

    PromptDataLoader.__init__, PromptDataLoader.__iter__ = __init__, __iter__
    PromptDataLoader._retro_patched = True
