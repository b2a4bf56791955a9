"""Plain-text helpers shared by the store's metadata, text demonstrations and zero-shot pools."""
from __future__ import annotations

import re


def example_text(example) -> str:
    """The text of an example with ``text_a`` / ``text_b`` attributes (text_a, then text_b if any)."""
    parts = [getattr(example, "text_a", None), getattr(example, "text_b", None)]
    return " ".join(p for p in parts if p)


def normalize_text(text: str) -> str:
    """Lower-cased, whitespace-collapsed text, for overlap checks."""
    return re.sub(r"\s+", " ", text.strip().lower())
