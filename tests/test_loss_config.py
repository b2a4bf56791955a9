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
