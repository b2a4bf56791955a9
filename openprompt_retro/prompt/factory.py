"""One wiring point: template, verbalizer, model and trainer from template text and label words given once.

    trainer = retroprompt("bert", "../shared/models/minilm-l6-mlm",
                          '{"placeholder":"text_a"} it was {"mask"} .', ["terrible", "great"])
    trainer.fit(train, dev); trainer.predict(test)

``method`` names a preset of :data:`METHODS` (``"prompt"``, ``"retro"``, the
ablations ...): it sets the demonstrations, the loss and whether lambda, k
and T are tuned on dev.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

from ..core.config import RetroConfig
from ..core.knn import MixtureGrid
from .model import RetroPromptForClassification
from .template import RetroTemplate
from .trainer import RetroTrainer
from .training_args import TrainingArgs

#: method name -> demonstrations, training loss and kNN inference (lambda, k, T tuned on dev)
METHODS: Dict[str, Dict] = {
    "prompt": dict(demonstrations="none", loss="ce", knn_inference=False),
    "demo-text": dict(demonstrations="text", loss="ce", knn_inference=False),
    "retro": dict(demonstrations="neural", loss="knn", knn_inference=True),
    "retro-no-demo": dict(demonstrations="none", loss="knn", knn_inference=True),
    "retro-no-knn-train": dict(demonstrations="neural", loss="ce", knn_inference=True),
    "retro-no-knn-infer": dict(demonstrations="neural", loss="knn", knn_inference=False),
}


def method_preset(method: str) -> Dict:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    return METHODS[method]


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

    With ``method``, its preset overrides ``demonstrations``, ``config.loss`` and ``args.tune_inference``.
    """
    config = dataclasses.replace(config) if config is not None else RetroConfig()
    args = dataclasses.replace(args) if args is not None else TrainingArgs()
    if method is not None:
        preset = method_preset(method)
        demonstrations = preset["demonstrations"]
        config.loss = preset["loss"]
        args.tune_inference = preset["knn_inference"]
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
