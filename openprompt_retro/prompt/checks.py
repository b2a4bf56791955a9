"""Up-front checks of what a :class:`RetroTrainer` is given, in one place, before any tensor work.

A mistake is reported as one line naming the split, the example (position and guid) and the value,
instead of an error deep inside torch (a label given as a string), a crash inside numpy (a one-example
store) or a silently wrong number (labels outside the model's classes counted as misses).

- :func:`check_labels`: every label is an integer class index in ``[0, num_classes)`` (or None where
  labels are not needed, e.g. for ``predict``);
- :func:`check_training_set`: enough examples for leave-one-out retrieval, and a warning for classes
  that have no training example (e.g. 3 label words on binary data);
- :func:`check_model`: the template's label words, the verbalizer's classes and the store agree.
"""
from __future__ import annotations

import numbers
import warnings
from typing import List, Optional, Sequence

import numpy as np

from ..errors import UserError

#: leave-one-out retrieval needs another entry to retrieve
MIN_TRAIN_WITH_STORE = 2


class DataError(UserError, ValueError):
    """Examples the trainer cannot use as given (a label's type or range, too few examples)."""


def _where(split: str, i: int, example) -> str:
    guid = getattr(example, "guid", None)
    return f"{split} example {i}" + ("" if guid is None else f" (guid {guid!r})")


def _words(label_words: Optional[Sequence]) -> str:
    if not label_words:
        return ""
    return " (label words " + ", ".join(f"{c}={w!r}" for c, w in enumerate(label_words)) + ")"


def _label_of(example):
    return example["label"] if isinstance(example, dict) else getattr(example, "label", None)


def check_labels(examples: Sequence, num_classes: int, split: str = "data", required: bool = True,
                 label_words: Optional[Sequence[str]] = None) -> Optional[np.ndarray]:
    """The labels of ``examples`` as an int64 array, or a :class:`DataError` naming the first bad one.

    A label must be an integer class index in ``[0, num_classes)``. ``required=False`` (prediction)
    also allows None for every example; then None is returned when no example has a label.
    """
    labels: List[Optional[int]] = []
    bad: List[str] = []
    for i, e in enumerate(examples):
        y = _label_of(e)
        if y is None:
            if required:
                bad.append(f"{_where(split, i, e)} has no label (labels are needed to train and evaluate)")
            labels.append(None)
            continue
        if hasattr(y, "item") and getattr(y, "ndim", 1) == 0:  # numpy / torch scalar
            y = y.item()
        if isinstance(y, str):
            hint = ""
            if label_words and y in [str(w) for w in label_words]:
                hint = f"; label word {y!r} is class {[str(w) for w in label_words].index(y)}"
            bad.append(f"{_where(split, i, e)} has label {y!r}, a string: labels are class indices "
                       f"0..{num_classes - 1}{hint}")
        elif not isinstance(y, numbers.Integral):
            bad.append(f"{_where(split, i, e)} has label {y!r} of type {type(y).__name__}: labels are integer "
                       f"class indices 0..{num_classes - 1}")
        elif not 0 <= int(y) < num_classes:
            bad.append(f"{_where(split, i, e)} has label {int(y)}, outside the model's {num_classes} classes "
                       f"0..{num_classes - 1}{_words(label_words)}")
        else:
            labels.append(int(y))
            continue
        labels.append(None)
    if bad:
        more = f" (and {len(bad) - 1} more bad label(s) in {split})" if len(bad) > 1 else ""
        raise DataError(bad[0] + more)
    if all(y is None for y in labels):
        return None
    if any(y is None for y in labels):  # required=False: all or none
        i = next(i for i, y in enumerate(labels) if y is None)
        raise DataError(f"{_where(split, i, examples[i])} has no label while others have one: give every "
                        f"{split} example a label, or none")
    return np.asarray(labels, dtype=np.int64)


def check_training_set(labels: np.ndarray, num_classes: int, uses_store: bool,
                       label_words: Optional[Sequence[str]] = None, split: str = "train") -> None:
    """Leave-one-out needs at least 2 examples when the store is used; warn about classes without examples.

    A class with no training example is allowed (leave-one-out at K = 1, a class known only through its
    label word, examples added to the store later), but it is usually a mistake - e.g. 3 label words on
    binary data - and the store can never vote for that class, so it is never silent.
    """
    n = 0 if labels is None else int(len(labels))
    if n == 0:
        raise DataError(f"{split}: no examples given")
    if uses_store and n < MIN_TRAIN_WITH_STORE:
        raise DataError(f"{split}: {n} example; retrieval leaves each example's own store entry out "
                        f"(leave-one-out), so it needs at least {MIN_TRAIN_WITH_STORE} training examples "
                        "(or use method 'prompt' / loss='ce' without demonstrations and lambda 0)")
    counts = np.bincount(labels, minlength=num_classes)
    missing = [c for c in range(num_classes) if counts[c] == 0]
    if missing:
        words = [label_words[c] for c in missing] if label_words and len(label_words) == num_classes else None
        warnings.warn(f"{split}: no examples of class(es) {missing}" + (f" {words}" if words else "") +
                      f" of the model's {num_classes} classes (labels seen: {np.nonzero(counts)[0].tolist()}); "
                      "the store holds nothing for them. More label words than the data has classes?",
                      UserWarning, stacklevel=3)


def check_texts(examples: Sequence, split: str = "data") -> None:
    """Every example's ``text_a`` is a string (``text_b`` a string or empty) that UTF-8 can encode.

    A :class:`DataError` names the first bad example: ``text_a=None`` or a lone surrogate character
    (e.g. half of an emoji cut off by a byte-level slicer) would otherwise fail deep in the tokenizer.
    """
    for i, e in enumerate(examples):
        for field in ("text_a", "text_b"):
            text = e.get(field) if isinstance(e, dict) else getattr(e, field, None)
            if text is None and field == "text_b":
                continue
            if not isinstance(text, str):
                raise DataError(f"{_where(split, i, e)} has {field}={text!r}: the text must be a string")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise DataError(f"{_where(split, i, e)} has a character UTF-8 cannot encode in {field} at "
                                f"position {err.start} ({text[err.start]!r}, a lone surrogate): fix or drop "
                                "it before tokenizing") from None


def check_top(top) -> None:
    """``top`` (how many neighbours explain lists) is a positive integer."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer (how many neighbours to list), got {top!r}")


def check_model(model) -> None:
    """The template's label words, the verbalizer's classes and the store's classes agree."""
    verbalizer = getattr(model, "verbalizer", None)
    n = getattr(verbalizer, "num_classes", None)
    words = getattr(getattr(model, "template", None), "label_words", None)
    if n is not None and words is not None and len(words) != n:
        raise DataError(f"the template shows {len(words)} label words {list(words)} but the verbalizer has "
                        f"{n} classes: give one label word per class")
    store = getattr(model, "store", None)
    if n is not None and store is not None and store.num_classes != n:
        raise DataError(f"the knowledge store has {store.num_classes} classes but the verbalizer has {n}")


def label_words_of(model) -> Optional[List[str]]:
    words = getattr(getattr(model, "template", None), "label_words", None)
    if words is None:
        words = getattr(getattr(model, "verbalizer", None), "label_words", None)
        words = [w[0] if isinstance(w, (list, tuple)) and w else w for w in words] if words else None
    return list(words) if words else None
