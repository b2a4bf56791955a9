"""Make ``openprompt`` 1.0.1 importable and runnable on transformers 4.40 - 5.23 (supported: 4.39.3 - 5.23).

OpenPrompt was written against transformers 4.x. Five things it relies on have
since moved or disappeared. :func:`apply` restores each one *only where it is
missing*, so on transformers <= 4.39 it changes nothing. It is idempotent and is
called before ``openprompt`` is first imported: by :mod:`openprompt_retro.prompt`, and by the
import hook that ``import openprompt_retro`` installs (so ``import openprompt_retro`` then
``import openprompt`` works too).

=====================================  ==========================================
what OpenPrompt uses                   restored as
=====================================  ==========================================
``transformers.generation_utils``      alias of ``transformers.generation``
``transformers.AdamW``                 ``torch.optim.AdamW`` with the old HF
                                       defaults (eps=1e-6, weight_decay=0.0)
``transformers.tokenization_utils.X``  missing public names copied from
                                       ``tokenization_utils_base``
``transformers.data.processors.utils`` small stand-ins (type hints only)
``tok.build_inputs_with_special_tokens`` rebuilt from the tokenizer's own
``tok.get_special_tokens_mask(ids)``   post-processor (fast tokenizers, 5.x)
=====================================  ==========================================

One OpenPrompt bug is fixed the same way (only where it shows):
``KnowledgeableVerbalizer(..., label_words=...)`` raises ``AttributeError:
'max_token_split'`` because its constructor sets that attribute after the base
constructor has already used it; its settings are now in place first.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.abc
import importlib.util
import sys
import types
from typing import Dict, List, Optional

#: The transformers versions this module was verified against.
SUPPORTED_TRANSFORMERS = ">=4.39.3,<5.24"  # as in setup.cfg; the suite runs on both ends

_applied = False
#: Names of the fixes that :func:`apply` actually installed (empty on old versions).
applied_fixes: List[str] = []


def apply() -> List[str]:
    """Install every missing piece; return the names of the fixes applied."""
    global _applied
    if _applied:
        return applied_fixes
    # The first import of processing_utils re-executes transformers/__init__ on
    # some 5.x releases and replaces sys.modules["transformers"]; patches made
    # before it would be lost, so trigger it first.
    try:
        importlib.import_module("transformers.processing_utils")
    except Exception:  # pragma: no cover - very old or stripped-down installs
        pass
    import transformers

    _fix_generation_utils(transformers)
    _fix_adamw(transformers)
    _fix_tokenization_utils_names()
    _fix_data_processors()
    _fix_special_tokens()
    _after_import("openprompt.prompts.knowledgeable_verbalizer", _fix_knowledgeable_verbalizer)
    _applied = True
    return applied_fixes


# ---------------------------------------------------------------------------
# OpenPrompt's own bugs (fixed when the module that has them is imported)
# ---------------------------------------------------------------------------

class _AfterImport(importlib.abc.MetaPathFinder):
    """Run ``fix(module)`` right after the module ``name`` is executed, then step aside."""

    def __init__(self, name: str, fix):
        self.name, self.fix = name, fix

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        fix = self.fix
        return spec_then(fullname, lambda: fix(sys.modules[fullname]))


def spec_then(fullname: str, after):
    """The module spec of ``fullname``, set to call ``after()`` once the module has been executed.

    For a meta-path finder that has stepped aside (it must no longer be on ``sys.meta_path``).
    """
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
        return spec
    exec_module = spec.loader.exec_module

    def exec_then(module):
        exec_module(module)
        after()

    spec.loader.exec_module = exec_then
    return spec


def _after_import(name: str, fix) -> None:
    if name in sys.modules:
        fix(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, fix))


class _ProbeTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [1]


def _fix_knowledgeable_verbalizer(module) -> None:
    """Set KnowledgeableVerbalizer's own settings before its base constructor reads them (label_words=...)."""
    import contextlib
    import inspect
    import io

    cls = module.KnowledgeableVerbalizer
    if getattr(cls, "_openprompt_retro_patched", False):
        return
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its generate_parameters prints
            cls(tokenizer=_ProbeTokenizer(), classes=["a"], label_words=[["a"]])
        return  # constructs fine: nothing to fix
    except AttributeError as e:
        if "max_token_split" not in str(e):
            return
    original = cls.__init__
    own = {n: p.default for n, p in inspect.signature(original).parameters.items()
           if n in ("max_token_split", "verbalizer_lr", "candidate_frac", "pred_temp")}

    def __init__(self, *args, **kwargs):
        for name, default in own.items():
            object.__setattr__(self, name, kwargs.get(name, default))
        original(self, *args, **kwargs)

    __init__.__doc__ = original.__doc__
    cls.__init__ = __init__
    cls._openprompt_retro_patched = True
    applied_fixes.append("KnowledgeableVerbalizer(label_words=...)")


def _fix_generation_utils(transformers) -> None:
    try:
        importlib.import_module("transformers.generation_utils")
        return
    except ImportError:
        pass
    from transformers.generation import GenerationMixin

    mod = types.ModuleType("transformers.generation_utils")
    mod.GenerationMixin = GenerationMixin
    sys.modules["transformers.generation_utils"] = mod
    transformers.generation_utils = mod
    applied_fixes.append("generation_utils")


def _fix_adamw(transformers) -> None:
    try:
        getattr(transformers, "AdamW")
        return
    except (AttributeError, ImportError):
        pass
    import torch

    class AdamW(torch.optim.AdamW):
        """``torch.optim.AdamW`` with the defaults of the removed ``transformers.AdamW``."""

        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
                     weight_decay=0.0, correct_bias=True, no_deprecation_warning=False):
            if not correct_bias:
                raise ValueError("AdamW without bias correction is not supported by torch.optim.AdamW")
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    transformers.AdamW = AdamW
    applied_fixes.append("AdamW")


def _fix_tokenization_utils_names() -> None:
    tu = importlib.import_module("transformers.tokenization_utils")
    base = importlib.import_module("transformers.tokenization_utils_base")
    missing = [n for n in dir(base) if not n.startswith("_") and not hasattr(tu, n)]
    for name in missing:
        setattr(tu, name, getattr(base, name))
    if missing:
        applied_fixes.append("tokenization_utils")


@dataclasses.dataclass
class _InputExample:
    guid: str
    text_a: str
    text_b: Optional[str] = None
    label: Optional[str] = None


@dataclasses.dataclass
class _InputFeatures:
    input_ids: List[int]
    attention_mask: Optional[List[int]] = None
    token_type_ids: Optional[List[int]] = None
    label: Optional[int] = None


def _fix_data_processors() -> None:
    try:
        importlib.import_module("transformers.data.processors.utils")
        return
    except ImportError:
        pass
    import transformers

    try:
        data = importlib.import_module("transformers.data")
    except ImportError:
        data = types.ModuleType("transformers.data")
        data.__path__ = []
        sys.modules["transformers.data"] = data
        transformers.data = data
    processors = types.ModuleType("transformers.data.processors")
    processors.__path__ = []
    utils = types.ModuleType("transformers.data.processors.utils")
    utils.InputExample = _InputExample
    utils.InputFeatures = _InputFeatures
    processors.utils = utils
    data.processors = processors
    sys.modules["transformers.data.processors"] = processors
    sys.modules["transformers.data.processors.utils"] = utils
    applied_fixes.append("data.processors.utils")


# ---------------------------------------------------------------------------
# special tokens for fast tokenizers on transformers 5.x
# ---------------------------------------------------------------------------

def _special_layout(tokenizer) -> Dict[str, List[tuple]]:
    """Where the post-processor puts special tokens, e.g. ``[101, 0, 102]`` for BERT.

    Each list holds ``("special", token_id)`` or ``("seq", 0 | 1)`` for "sequence A/B goes here".
    """
    cached = getattr(tokenizer, "_openprompt_retro_layout", None)
    if cached is not None:
        return cached
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer._tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    seq_a = backend.encode("a", add_special_tokens=False)
    seq_b = backend.encode("b", add_special_tokens=False)
    layout = {}
    for name, pair in (("single", None), ("pair", seq_b)):
        n_a = len(seq_a.ids)
        if backend.post_processor is None:
            out_ids = seq_a.ids + (pair.ids if pair else [])
            special = [0] * len(out_ids)
        else:
            out = backend.post_processor.process(seq_a, pair, True)
            out_ids, special = out.ids, out.special_tokens_mask
        # The special-tokens mask is reliable (sequence_ids is not, for pairs):
        # the first n_a ordinary positions are sequence A, the rest sequence B.
        pattern: List[tuple] = []
        seen, prev = 0, None
        for tid, is_special in zip(out_ids, special):
            if is_special:
                pattern.append(("special", tid))
                prev = None
                continue
            which = 0 if seen < n_a else 1
            if which != prev:
                pattern.append(("seq", which))
            seen, prev = seen + 1, which
        layout[name] = pattern
    tokenizer._openprompt_retro_layout = layout
    return layout


def _fill(layout, ids0: List[int], ids1: Optional[List[int]], mark_special: bool) -> List[int]:
    out: List[int] = []
    for kind, value in layout["single" if ids1 is None else "pair"]:
        if kind == "special":
            out.append(1 if mark_special else value)
        else:
            seq = ids0 if value == 0 else ids1
            out.extend([0] * len(seq) if mark_special else list(seq))
    return out


def _build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
    return _fill(_special_layout(self), token_ids_0, token_ids_1, mark_special=False)


def _fix_special_tokens() -> None:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    if getattr(PreTrainedTokenizerBase, "_openprompt_retro_patched", False):
        return
    if not hasattr(PreTrainedTokenizerBase, "build_inputs_with_special_tokens"):
        PreTrainedTokenizerBase.build_inputs_with_special_tokens = _build_inputs_with_special_tokens
        applied_fixes.append("build_inputs_with_special_tokens")
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # transformers 4.x: fast tokenizers already implement both
        return
    original = TokenizersBackend.get_special_tokens_mask

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        try:
            return original(self, token_ids_0, token_ids_1, already_has_special_tokens)
        except NotImplementedError:
            if already_has_special_tokens or getattr(self, "_tokenizer", None) is None:
                raise
            return _fill(_special_layout(self), token_ids_0, token_ids_1, mark_special=True)

    TokenizersBackend.get_special_tokens_mask = get_special_tokens_mask
    PreTrainedTokenizerBase._openprompt_retro_patched = True
    applied_fixes.append("get_special_tokens_mask")
