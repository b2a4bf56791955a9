import pytest
import torch

import openprompt_retro  # noqa: F401  (applies the compatibility fixes)
from openprompt_retro.testing import make_tiny_mlm


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    return {kind: make_tiny_mlm(kind, str(tmp_path_factory.mktemp(f"tiny-{kind}"))) for kind in ("bert", "roberta")}


@pytest.fixture(params=["bert", "roberta"])
def tiny_plm(request, tiny_dirs):
    """(kind, plm, tokenizer, model_config, WrapperClass) loaded through openprompt.plms.load_plm."""
    from openprompt.plms import load_plm

    torch.manual_seed(0)
    plm, tok, cfg, wrapper = load_plm(request.param, tiny_dirs[request.param])
    return request.param, plm, tok, cfg, wrapper


@pytest.fixture
def tiny_bert(tiny_dirs):
    from openprompt.plms import load_plm

    torch.manual_seed(0)
    return load_plm("bert", tiny_dirs["bert"])


SENTENCES = [
    ("a great movie with a wonderful story", 1),
    ("a terrible film , boring and dull", 0),
    ("the acting was excellent", 1),
    ("it was a waste of time", 0),
    ("i loved this movie , it was really fun", 1),
    ("the plot is a mess", 0),
    ("brilliant and beautiful", 1),
    ("the worst film of the year", 0),
]


@pytest.fixture
def examples():
    from openprompt.data_utils import InputExample

    return [InputExample(guid=f"ex{i}", text_a=t, label=y) for i, (t, y) in enumerate(SENTENCES)]
