"""Every change this package makes to OpenPrompt's classes, in one place, applied by :func:`install`.

=======================================  ======================================================
patched                                  why
=======================================  ======================================================
``InputFeatures`` keys                   it drops per-example keys it does not know; the
                                         ``retro_*`` keys (:mod:`.batch`) are declared
OpenPrompt's logger                      it warns about every unknown key; ours are quiet
``PromptDataLoader.__init__/__iter__``   example identities and pass counts (:mod:`.loaders`);
                                         a loader built with a RetroTemplate that does not
                                         know its label words yet is tokenized once they come
``TokenizerWrapper.truncate``            RetroTemplate inputs truncated safely (:mod:`.truncation`)
``Template.text`` setter                 the raw template string is kept for run.json
=======================================  ======================================================

:func:`install` is idempotent and runs when a RetroTemplate, KnnVerbalizer,
RetroPromptForClassification or RetroTrainer is constructed - never on import, so
``import openprompt_retro; import openprompt`` leaves OpenPrompt as it is until a
retro class is used. Loaders built before then carry no example identities (give
them to ``model.attach``), and a MixedTemplate built before then cannot be rebuilt
by ``from_pretrained`` (its text is recorded only from then on).
"""
from __future__ import annotations

import logging

_installed = False


class _QuietOurKeys(logging.Filter):
    """OpenPrompt warns about every per-example key it did not define; ours are registered."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("unexpected key words" in msg and "retro_" in msg)


def _register_batch_keys() -> None:
    """Let OpenPrompt's InputFeatures carry our per-example fields (it drops unknown keys)."""
    from openprompt.data_utils import InputFeatures

    from .batch import ALL_KEYS, TENSOR_KEYS

    for key in ALL_KEYS:
        if key not in InputFeatures.all_keys:
            InputFeatures.add_keys(key)
        if not hasattr(InputFeatures, key):
            setattr(InputFeatures, key, None)  # default for features made without it
    for key in TENSOR_KEYS:
        if key not in InputFeatures.tensorable_keys:
            InputFeatures.add_tensorable_keys(key)


def _quiet_logger() -> None:
    from openprompt.utils.logging import logger

    if not any(isinstance(f, _QuietOurKeys) for f in logger.filters):
        logger.addFilter(_QuietOurKeys())


def _record_template_text() -> None:
    """Remember the string each OpenPrompt template's text was set from (``_retro_raw_text``).

    OpenPrompt parses the text on assignment and keeps only the parsed form, from
    which a MixedTemplate cannot be rebuilt; the raw string is what run.json records.
    """
    from openprompt.prompt_base import Template

    prop = Template.__dict__.get("text")
    if not isinstance(prop, property) or getattr(prop.fset, "_retro_raw_text", False):
        return

    def fset(self, text):
        if isinstance(text, str):
            self.__dict__["_retro_raw_text"] = text
        prop.fset(self, text)

    fset._retro_raw_text = True
    Template.text = property(prop.fget, fset, prop.fdel, prop.__doc__)


def install() -> None:
    """Apply every patch of the table above (once; later calls do nothing)."""
    global _installed
    if _installed:
        return
    from .. import compat
    from . import loaders, truncation

    compat.apply()
    _register_batch_keys()
    _quiet_logger()
    loaders.patch_prompt_data_loader()
    truncation.patch_truncate()
    _record_template_text()
    _installed = True
