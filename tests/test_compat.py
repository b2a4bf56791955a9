import sys

import torch

from openprompt_retro import compat


def test_apply_is_idempotent_and_openprompt_imports():
    first = list(compat.apply())
    assert compat.apply() == first
    import openprompt  # noqa: F401
    from openprompt import PromptDataLoader, PromptForClassification  # noqa: F401


def test_removed_modules_are_provided():
    from transformers.generation import GenerationMixin

    import transformers.generation_utils as gu  # noqa: F401  (the import OpenPrompt does)

    if "generation_utils" in compat.applied_fixes:
        assert sys.modules["transformers.generation_utils"].GenerationMixin is GenerationMixin
    else:  # transformers <= 4.39 still ships the module
        assert hasattr(gu, "GenerationMixin")
    from transformers.tokenization_utils import SPECIAL_TOKENS_MAP_FILE

    assert SPECIAL_TOKENS_MAP_FILE == "special_tokens_map.json"
    from transformers.data.processors.utils import InputExample, InputFeatures  # noqa: F401


def test_adamw_has_old_defaults():
    compat.apply()  # may re-execute transformers/__init__: read the module that is current now
    p = torch.nn.Parameter(torch.zeros(2))
    opt = sys.modules["transformers"].AdamW([p], lr=0.1)
    assert opt.defaults["eps"] == 1e-6 and opt.defaults["weight_decay"] == 0.0
    if "AdamW" in compat.applied_fixes:  # ours; on transformers <= 4.49 it is HF's own class
        assert isinstance(opt, torch.optim.AdamW)


def test_special_tokens_rebuilt_from_post_processor(tiny_plm):
    kind, _, tok, _, _ = tiny_plm
    a, b = [7, 8, 9], [10, 11]
    cls_, sep = (tok.cls_token_id, tok.sep_token_id)
    single = tok.build_inputs_with_special_tokens(a)
    pair = tok.build_inputs_with_special_tokens(a, b)
    if kind == "bert":
        assert single == [cls_] + a + [sep]
        assert pair == [cls_] + a + [sep] + b + [sep]
    else:
        assert single == [cls_] + a + [sep]
        assert pair == [cls_] + a + [sep, sep] + b + [sep]
    assert tok.get_special_tokens_mask(a) == [1 if t in (cls_, sep) else 0 for t in single]
    assert tok.get_special_tokens_mask(a, b) == [1 if t in (cls_, sep) else 0 for t in pair]


def test_supported_range_is_stated_once_and_matches_setup_cfg():
    import configparser
    import os

    from openprompt_retro.compat import SUPPORTED_TRANSFORMERS

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.cfg"))
    requires = [line.strip() for line in cfg["options"]["install_requires"].splitlines()]
    assert f"transformers{SUPPORTED_TRANSFORMERS.split()[0]}" in requires
