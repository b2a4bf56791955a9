"""One wiring point: template, verbalizer, model and trainer from template text and label words given once
(:mod:`.rebuild` assembles them from a saved run's folder; :mod:`.saved_run` reads and writes the format).

    trainer = retroprompt("bert", "../shared/models/minilm-l6-mlm",
                          '{"placeholder":"text_a"} it was {"mask"} .', ["terrible", "great"])
    trainer.fit(train, dev); trainer.predict(test)

``method`` names a preset of :data:`openprompt_retro.methods.METHODS`
(``"prompt"``, ``"retro"``, the ablations ...): it sets the demonstrations, the
loss and whether kNN inference is on (lambda, k and T tuned on dev) or off
(lambda = 0).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from ..core.config import RetroConfig
from ..core.knn import MixtureGrid
from ..methods import METHODS, method_preset
from .model import RetroPromptForClassification
from .template import RetroTemplate
from .trainer import RetroTrainer
from .training_args import TrainingArgs

def build_model(plm, tokenizer, template_text: str, label_words: Sequence[str], demonstrations: str = "neural",
                config: Optional[RetroConfig] = None, text_pool: Optional[Sequence] = None
                ) -> RetroPromptForClassification:
    """A ManualTemplate + ManualVerbalizer RetroPrompt model; ``label_words`` has one word per class."""
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    words = [w if isinstance(w, str) else w[0] for w in label_words]
    template = RetroTemplate(ManualTemplate(tokenizer=tokenizer, text=template_text), words,
                             demonstrations=demonstrations, plm=plm, text_pool=text_pool)
    verbalizer = ManualVerbalizer(tokenizer, num_classes=len(words), label_words=[[w] for w in words])
    return RetroPromptForClassification(plm, template, verbalizer, config=config)


def build_trainer(plm, tokenizer, wrapper_class, template_text: str, label_words: Sequence[str],
                  demonstrations: str = "neural", config: Optional[RetroConfig] = None,
                  text_pool: Optional[Sequence] = None, args: Optional[TrainingArgs] = None,
                  grid: Optional[MixtureGrid] = None, method: Optional[str] = None) -> RetroTrainer:
    """A ready :class:`RetroTrainer` around an already loaded PLM (what ``load_plm`` returns).

    With ``method``, its preset (:data:`openprompt_retro.methods.METHODS`) overrides ``demonstrations``,
    ``config.loss`` and ``args.tune_inference``; a preset without kNN inference also sets ``config.knn_lambda``
    to 0, so the model predicts with the PLM alone.
    """
    config = dataclasses.replace(config) if config is not None else RetroConfig()
    args = dataclasses.replace(args) if args is not None else TrainingArgs()
    if method is not None:
        preset = method_preset(method)
        demonstrations = preset.demonstrations
        config.loss = preset.loss
        args.tune_inference = preset.knn_inference
        if not preset.knn_inference:
            config.knn_lambda = 0.0
    model = build_model(plm, tokenizer, template_text, label_words, demonstrations, config, text_pool)
    return RetroTrainer(model, tokenizer, wrapper_class, args, grid)


def retroprompt(model_type: str, model_name_or_path: str, template_text: str, label_words: Sequence[str],
                demonstrations: str = "neural", config: Optional[RetroConfig] = None,
                text_pool: Optional[Sequence] = None, method: Optional[str] = None,
                grid: Optional[MixtureGrid] = None, **training_args) -> RetroTrainer:
    """Load a masked LM (local folder or hub name) and wire up RetroPrompt around it.

    ``template_text`` is OpenPrompt's ManualTemplate syntax; ``label_words`` has
    one word per class; ``training_args`` go to :class:`TrainingArgs` (its
    defaults are the CLI's).
    """
    from openprompt.plms import load_plm

    plm, tokenizer, _, wrapper = load_plm(model_type, model_name_or_path)
    return build_trainer(plm, tokenizer, wrapper, template_text, label_words, demonstrations, config, text_pool,
                         TrainingArgs(**training_args), grid, method=method)


__all__ = ["METHODS", "method_preset", "build_model", "build_trainer", "retroprompt"]
