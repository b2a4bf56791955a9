"""Backbones by name: a local folder or hub name through OpenPrompt's ``load_plm``, or a random tiny test model."""
from __future__ import annotations

from .. import prompt as _prompt  # noqa: F401  (makes openprompt importable on current transformers)


def load_backbone(model: str, model_type: str):
    """(plm, tokenizer, config, WrapperClass); 'tiny-bert' / 'tiny-roberta' build a random test model."""
    from openprompt.plms import load_plm

    if model.startswith("tiny-"):
        from ..testing import ensure_tiny_mlm

        kind = model.split("-", 1)[1]
        return load_plm(kind, ensure_tiny_mlm(model))
    return load_plm(model_type, model)
