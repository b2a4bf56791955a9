"""The configs: one loss config (LossConfig) shared by text and CLIP, every field validated with an error
that names the field and the value."""
import dataclasses
import math

import pytest

from openprompt_retro.clip import RetroCoOpConfig, clip_mixture_grid
from openprompt_retro.core.config import LossConfig, RetroConfig
from openprompt_retro.core.knn import MixtureGrid

LOSS_FIELDS = [f.name for f in dataclasses.fields(LossConfig)]


def test_text_and_clip_configs_share_the_loss_fields_and_their_checks():
    assert LOSS_FIELDS == ["loss", "loss_beta", "focal_gamma", "max_loss_weight", "knn_loss_gate", "train_knn_k",
                           "train_knn_temperature"]
    for cls in (RetroConfig, RetroCoOpConfig):
        assert issubclass(cls, LossConfig)
        config = cls(loss="focal", loss_beta=2.0, focal_gamma=1.5, max_loss_weight=4.0, knn_loss_gate=False,
                     train_knn_k=3, train_knn_temperature=0.5)  # the keywords every caller used still work
        assert (config.loss, config.loss_beta, config.focal_gamma, config.max_loss_weight, config.knn_loss_gate,
                config.train_knn_k, config.train_knn_temperature) == ("focal", 2.0, 1.5, 4.0, False, 3, 0.5)
    # the same defaults, but T: text standardises scores (T in standard deviations), CLIP uses raw cosines
    text, image = RetroConfig(), RetroCoOpConfig()
    assert [getattr(text, f) for f in LOSS_FIELDS[:-1]] == [getattr(image, f) for f in LOSS_FIELDS[:-1]]
    assert (text.train_knn_temperature, image.train_knn_temperature) == (1.0, 0.05)


def test_retro_config_round_trips_through_its_dict():
    config = RetroConfig(knn_k=4, max_loss_weight=None)
    assert RetroConfig.from_dict(config.to_dict()) == config
    assert set(config.to_dict()) >= set(LOSS_FIELDS)


@pytest.mark.parametrize("cls", [RetroConfig, RetroCoOpConfig])
@pytest.mark.parametrize("field,value,message", [
    ("max_loss_weight", math.nan, "max_loss_weight must be a finite number >= 1, got nan"),
    ("max_loss_weight", math.inf, "max_loss_weight must be a finite number >= 1, got inf"),
    ("max_loss_weight", 0.5, "max_loss_weight must be a finite number >= 1, got 0.5"),
    ("loss_beta", -1.0, "loss_beta must be a finite number >= 0, got -1.0"),
    ("loss_beta", math.nan, "loss_beta must be a finite number >= 0, got nan"),
    ("focal_gamma", -0.5, "focal_gamma must be a finite number >= 0, got -0.5"),
    ("train_knn_k", 0, "train_knn_k must be at least 1, got 0"),
    ("train_knn_k", 2.5, "train_knn_k must be an integer, got 2.5"),
    ("train_knn_temperature", math.inf, "train_knn_temperature must be a finite number > 0, got inf"),
    ("train_knn_temperature", 0.0, "train_knn_temperature must be a finite number > 0, got 0.0"),
    ("loss", "hinge", "loss must be one of \\('ce', 'knn', 'focal'\\), got 'hinge'"),
    ("knn_loss_gate", "yes", "knn_loss_gate must be one of \\(True, False\\), got 'yes'"),
])
def test_bad_loss_fields_are_refused_by_both_configs(cls, field, value, message):
    with pytest.raises(ValueError, match=message):
        cls(**{field: value})


@pytest.mark.parametrize("field,value,message", [
    ("knn_k", 0, "knn_k must be at least 1, got 0"),
    ("knn_k", -3, "knn_k must be at least 1, got -3"),
    ("demo_topk", 0, "demo_topk must be at least 1, got 0"),
    ("knn_temperature", math.inf, "knn_temperature must be a finite number > 0, got inf"),
    ("knn_temperature", math.nan, "knn_temperature must be a finite number > 0, got nan"),
    ("knn_lambda", math.nan, "knn_lambda must be a finite number in \\[0, 1\\], got nan"),
    ("demo_dropout", 1.0, "demo_dropout must be a finite number in \\[0, 1\\), got 1.0"),
    ("demo_warmup", math.nan, "demo_warmup must be a finite number in \\[0, 1\\), got nan"),
    ("knn_score_scale", "cosine", "knn_score_scale must be one of \\('zscore', 'raw'\\), got 'cosine'"),
    ("metric", "l2", "metric must be one of \\('ip', 'cosine'\\), got 'l2'"),
])
def test_bad_retro_config_fields_name_the_field_and_the_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        RetroConfig(**{field: value})


@pytest.mark.parametrize("field,value,message", [
    ("n_ctx", 0, "n_ctx must be at least 1, got 0"),
    ("lr", math.nan, "lr must be a finite number > 0, got nan"),
    ("batch_size", 0, "batch_size must be at least 1, got 0"),
    ("epochs", -1, "epochs must be at least 0, got -1"),
    ("grid", (0.0, 0.5), "grid must be a MixtureGrid, got \\(0.0, 0.5\\)"),
])
def test_bad_retro_coop_config_fields_name_the_field_and_the_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        RetroCoOpConfig(**{field: value})


def test_retro_coop_config_embeds_a_mixture_grid_with_the_old_clip_candidates():
    grid = RetroCoOpConfig().grid
    assert isinstance(grid, MixtureGrid) and grid == clip_mixture_grid()
    assert grid.lambdas == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert (grid.ks, grid.temperatures) == ((4, 8, 16, 32), (0.01, 0.02, 0.05, 0.1))
    assert RetroCoOpConfig().grid is not grid  # each config owns its grid


# ------------------------------------------------------------------ RetroConfig composed of small configs
def test_retro_config_is_composed_of_its_parts_and_gives_them_back():
    from openprompt_retro.core.config import KeyConfig, MixtureConfig

    composed = RetroConfig.compose(keys=KeyConfig(key_encoder="frozen-mean"), mixture=MixtureConfig(knn_lambda=0.3),
                                   demo_topk=4)
    assert composed == RetroConfig(key_encoder="frozen-mean", knn_lambda=0.3, demo_topk=4)  # the flat names
    assert composed.part("keys") == KeyConfig(key_encoder="frozen-mean")
    assert composed.part("mixture").knn_lambda == 0.3
    assert RetroConfig.from_dict(composed.to_dict()) == composed  # the flat JSON of saved runs and --config


def test_every_field_belongs_to_one_part_and_has_a_line_of_help():
    from openprompt_retro.core.config import PARTS

    owners = [f.name for cls in PARTS.values() for f in dataclasses.fields(cls)]
    assert sorted(owners) == sorted(f.name for f in dataclasses.fields(RetroConfig))
    assert len(owners) == len(set(owners))
    assert all(len(text) > 10 for text in RetroConfig.field_help().values())


def test_composing_names_what_is_wrong():
    from openprompt_retro.core.config import KeyConfig, ReadoutConfig

    with pytest.raises(ValueError, match=r"\['key_encoder'\] given twice"):
        RetroConfig.compose(keys=KeyConfig(), key_encoder="mask")
    with pytest.raises(ValueError, match="keys must be a KeyConfig, got ReadoutConfig"):
        RetroConfig.compose(keys=ReadoutConfig())
    with pytest.raises(ValueError, match=r"unknown RetroConfig fields: \['knn_lamda'\]"):
        RetroConfig.compose(knn_lamda=0.3)
    with pytest.raises(ValueError, match="unknown part 'mix'"):
        RetroConfig().part("mix")
    with pytest.raises(ValueError, match="key_encoder must be one of"):  # a part checks its own fields
        KeyConfig(key_encoder="bogus")
    with pytest.raises(ValueError, match="knn_k must be at least 1"):
        ReadoutConfig(knn_k=0)


def test_the_settings_page_is_the_code():
    import os

    from openprompt_retro.core.config import settings_markdown

    page = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "settings.md")
    with open(page, encoding="utf-8") as f:
        assert f.read() == settings_markdown(), "docs/settings.md is stale: write it from settings_markdown()"
