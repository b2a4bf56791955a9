"""What every CLIP predictor shares: ``predict`` and its folder on disk.

A saved predictor is one folder; nothing in it is unpickled:

    predictor.json        {"format_version", "predictor": the class name, "settings": its JSON settings (tuned
                          mixture / alpha / beta, config, class names, logit scale), "checksums": sha256 of
                          tensors.safetensors}
    tensors.safetensors   its tensors (text features, cache keys and labels, learned context)
    cache/                the image cache, where it keeps one: a KnowledgeStore folder (keys.npy, labels.npy,
                          index.faiss, store.json with checksums)

The files go to a new folder that replaces ``directory`` only once complete
(:func:`~openprompt_retro.core.folders.atomic_folder`): a failed save leaves the previous one as it was.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from ..core.folders import atomic_folder, sha256_file
from .cache import ImageCache

FORMAT_VERSION = 1
PREDICTOR_FILE, TENSORS_FILE, CACHE_DIR = "predictor.json", "tensors.safetensors", "cache"


class ClipPredictor:
    """The prediction API every CLIP predictor adds to its ``predict_proba(feats)``."""

    def predict(self, feats: np.ndarray) -> np.ndarray:
        """(B,) the most probable class of each row of ``feats``: ``predict_proba(feats).argmax(-1)``."""
        return self.predict_proba(feats).argmax(-1)


def write_predictor(directory: str, predictor: str, settings: Dict, tensors: Dict[str, torch.Tensor],
                    cache: Optional[ImageCache] = None) -> None:
    """Save ``settings`` (JSON), ``tensors`` (safetensors) and ``cache`` into the folder ``directory``."""
    from safetensors.torch import save_file

    own = {PREDICTOR_FILE, TENSORS_FILE, CACHE_DIR}  # a user's other files in the folder are kept
    with atomic_folder(directory, markers=(PREDICTOR_FILE,), carry=lambda rel: rel.split("/")[0] not in own) as tmp:
        save_file({name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()},
                  os.path.join(tmp, TENSORS_FILE))
        if cache is not None:
            cache.save(os.path.join(tmp, CACHE_DIR))
        record = {"format_version": FORMAT_VERSION, "predictor": predictor, "settings": settings,
                  "checksums": {TENSORS_FILE: sha256_file(os.path.join(tmp, TENSORS_FILE))}}
        with open(os.path.join(tmp, PREDICTOR_FILE), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)


def read_predictor(directory: str, predictor: str,
                   with_cache: bool = False) -> Tuple[Dict, Dict[str, torch.Tensor], Optional[ImageCache]]:
    """(settings, tensors, image cache or None) of a ``predictor`` saved by :func:`write_predictor`.

    Raises a ValueError naming the problem: no saved predictor there, another class's folder, a damaged or
    missing file (the cache, ``with_cache``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    record = _read_record(directory)
    if record["predictor"] != predictor:
        raise ValueError(f"{directory!r} holds a saved {record['predictor']}, not a {predictor}: load it with "
                         f"{record['predictor']}.load")
    path = os.path.join(directory, TENSORS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"saved {predictor} at {directory!r} is incomplete: {TENSORS_FILE} is missing")
    if sha256_file(path) != record["checksums"].get(TENSORS_FILE):
        raise ValueError(f"saved {predictor} at {directory!r} has a corrupt {TENSORS_FILE}: its sha256 differs "
                         f"from the one {PREDICTOR_FILE} records")
    try:
        tensors = load_file(path)
    except SafetensorError as e:
        raise ValueError(f"saved {predictor} at {directory!r} has an unreadable {TENSORS_FILE}: {e}") from None
    cache_dir = os.path.join(directory, CACHE_DIR)
    if with_cache and not os.path.isdir(cache_dir):
        raise ValueError(f"saved {predictor} at {directory!r} is incomplete: its image cache {CACHE_DIR}/ is missing")
    return record["settings"], tensors, ImageCache.load(cache_dir) if with_cache else None


def _read_record(directory: str) -> Dict:
    path = os.path.join(directory, PREDICTOR_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"no saved CLIP predictor at {directory!r}: {PREDICTOR_FILE} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from None
    fields = {"format_version": int, "predictor": str, "settings": dict, "checksums": dict}
    if not isinstance(record, dict):
        raise ValueError(f"{path!r} is not a JSON object with the fields {list(fields)}")
    bad = [name for name, kind in fields.items() if not isinstance(record.get(name), kind)]
    if bad:
        raise ValueError(f"{path!r} lacks or mistypes the fields {bad}")
    if record["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path!r} has format version {record['format_version']}; this version reads "
                         f"{FORMAT_VERSION}")
    return record


@contextmanager
def saved_settings(directory: str, predictor: str) -> Iterator[None]:
    """Turn a missing or mistyped field met while rebuilding from the settings into one ValueError."""
    try:
        yield
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"saved {predictor} at {directory!r} has a bad {PREDICTOR_FILE}: missing or invalid "
                         f"setting {e}") from None


def check_fits(where: str, pairs: Dict[str, Tuple[object, object]], sides: Tuple[str, str], hint: str = "") -> None:
    """Raise one ValueError naming every ``pairs`` entry whose two values (``sides``) differ (then ``hint``)."""
    bad = [f"{name} is {a!r} in the {sides[0]} but {b!r} in the {sides[1]}" for name, (a, b) in pairs.items()
           if a != b]
    if bad:
        raise ValueError(f"{where} does not match: {'; '.join(bad)}{hint and ': ' + hint}")


def tensor(tensors: Dict[str, torch.Tensor], name: str, directory: str, ndim: Optional[int] = None) -> torch.Tensor:
    """``tensors[name]`` (with ``ndim`` dimensions), or a ValueError naming the missing or misshapen tensor."""
    if name not in tensors:
        raise ValueError(f"saved predictor at {directory!r} lacks the tensor {name!r} (it has {sorted(tensors)})")
    if ndim is not None and tensors[name].ndim != ndim:
        raise ValueError(f"saved predictor at {directory!r}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                         f"expected {ndim} dimensions")
    return tensors[name]
