"""One obvious entry point for notebooks: a ready RetroTrainer in one call."""
from __future__ import annotations

from typing import Optional, Sequence

from .config import RetroConfig
from .model import RetroPromptForClassification
from .template import RetroTemplate
from .trainer import RetroTrainer, TrainingArgs


def retroprompt(model_type: str, model_name_or_path: str, template_text: str, label_words: Sequence[str],
                demonstrations: str = "neural", config: Optional[RetroConfig] = None,
                text_pool: Optional[Sequence] = None, **training_args) -> RetroTrainer:
    """Load a masked LM (local folder or hub name) and wire up RetroPrompt around it.

    ``template_text`` is OpenPrompt's ManualTemplate syntax; ``label_words``
    has one word per class; ``training_args`` go to :class:`TrainingArgs`.
    """
    from openprompt.plms import load_plm
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    plm, tokenizer, _, wrapper = load_plm(model_type, model_name_or_path)
    template = RetroTemplate(ManualTemplate(tokenizer=tokenizer, text=template_text), label_words,
                             demonstrations=demonstrations, plm=plm, text_pool=text_pool)
    verbalizer = ManualVerbalizer(tokenizer, num_classes=len(label_words), label_words=[[w] for w in label_words])
    model = RetroPromptForClassification(plm, template, verbalizer, config)
    return RetroTrainer(model, tokenizer, wrapper, TrainingArgs(**training_args))
