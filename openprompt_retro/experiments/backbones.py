"""Backbones by name: a local folder or hub name through OpenPrompt's ``load_plm``, or a random tiny test model."""
from __future__ import annotations

from .. import prompt as _prompt  # noqa: F401  (makes openprompt importable on current transformers)


def load_backbone(model: str, model_type: str):
    """(plm, tokenizer, config, WrapperClass); 'tiny-bert' / 'tiny-roberta' build a random test model."""
    from openprompt.plms import load_plm

    import os

    if model.startswith("tiny-") and not os.path.isdir(os.path.expanduser(model)):  # a local folder wins
        from ..testing import ensure_tiny_mlm

        kind = model.split("-", 1)[1]
        return load_plm(kind, ensure_tiny_mlm(model))
    try:
        return load_plm(model_type, model)
    except OSError as e:  # not a local folder, and the hub has no such model (or cannot be reached)
        from ..errors import UserError

        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {model}: not a local model folder, and loading it from the Hugging Face hub "
                        f"failed: {first} (give a local folder or hub name, or set OPENPROMPT_RETRO_MODEL)") from None
