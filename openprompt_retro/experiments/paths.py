"""Where the data and the offline model are by default (kept import-free: ``--help`` reads it).

Order: the environment variable, else ``../shared/...`` beside the checkout this
package is installed from (so the defaults work from any folder), else the same
path relative to the current folder.
"""
from __future__ import annotations

import os

DATA_ENV, MODEL_ENV = "OPENPROMPT_RETRO_DATA", "OPENPROMPT_RETRO_MODEL"
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shared(*parts: str) -> str:
    beside_checkout = os.path.join(os.path.dirname(_CHECKOUT), "shared", *parts)
    if os.path.exists(beside_checkout):
        return os.path.relpath(beside_checkout) if _is_below(os.getcwd(), os.path.dirname(_CHECKOUT)) \
            else beside_checkout
    return os.path.join("..", "shared", *parts)


def _is_below(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([os.path.abspath(path), os.path.abspath(root)]) == os.path.abspath(root)
    except ValueError:
        return False


def shared_data_root() -> str:
    """The shared text data beside the checkout (whatever the environment variable says)."""
    return os.path.join(os.path.dirname(_CHECKOUT), "shared", "data", "text")


def default_data_root() -> str:
    return os.environ.get(DATA_ENV) or _shared("data", "text")


def default_model() -> str:
    return os.environ.get(MODEL_ENV) or _shared("models", "minilm-l6-mlm")


DEFAULT_DATA_ROOT = default_data_root()
DEFAULT_MODEL = default_model()
