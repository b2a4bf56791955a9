"""Assembling a model from a saved run's folder: the PLM, tokenizer, template, verbalizer and model that
run.json describes, then every weight and store loaded with the checks of :mod:`.saved_run` (which reads and
writes the format and never builds a model). ``RetroPromptForClassification.from_pretrained`` and
``RetroTrainer.from_pretrained`` call :func:`rebuild_run` with their own class."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from ..core.config import RetroConfig
from .saved_run import (CONFIG, KEY_ENCODER_WEIGHTS, PLM_DIR, REBUILDABLE_TEMPLATES, REBUILDABLE_VERBALIZERS,
                        RUN_FILE, TEXT_POOL, SavedRunError, check_files, differences, infer_model_type,
                        read_json_file, read_run_json, read_snapshot)


def _restore_frozen_encoder(model, directory: str) -> None:
    """Put the saved frozen copy's weights into a rebuilt model's key encoder (a run saved with save_plm: the
    model was just built from the trained PLM, whose copy is not the frozen one). Its fingerprint is then
    checked by ``load`` like any other."""
    from safetensors.torch import load as load_tensors

    data = read_snapshot(directory).read(KEY_ENCODER_WEIGHTS) if model.config.key_encoder == "frozen-mean" else None
    if data is None:  # adapted keys: load() puts the adapted weights in place itself
        return
    encoder = model.key_encoder
    try:
        encoder.model.load_state_dict(load_tensors(data), strict=True)
    except (RuntimeError, ValueError) as e:
        raise SavedRunError(f"the frozen key encoder saved at {directory!r} does not fit this PLM: {e}") from None
    encoder.forget_fingerprint()
    encoder.trained_copy = True  # not what the PLM's checkpoint holds: a re-save keeps it too
    model.lifecycle.forget_keys()


def _escaped(words) -> List[List[str]]:
    """Verbalizer label words as saved (prefix already applied), escaped so OpenPrompt adds no second prefix."""
    return [["<!>" + w for w in ([ws] if isinstance(ws, str) else ws)] for ws in words]


def _load_text_pool(directory: str, run: Dict):
    from openprompt.data_utils import InputExample

    name = run["template"].get("text_pool")
    if not name:
        return None
    path = os.path.join(directory, name)
    records = read_json_file(directory, name)
    if records is None:
        raise SavedRunError(f"cannot read the text-demonstration pool {path}: {RUN_FILE} has no checksum of it")
    try:
        return [InputExample(guid=r["guid"], text_a=r["text_a"], text_b=r.get("text_b") or "", label=r["label"],
                             meta=r.get("meta") or {}, tgt_text=r.get("tgt_text")) for r in records]
    except (ValueError, KeyError, TypeError) as e:
        raise SavedRunError(f"cannot read the text-demonstration pool {path}: {e}") from None


def rebuild_run(directory: str, cls, plm_path: Optional[str] = None, model_type: Optional[str] = None,
            text_pool: Optional[Sequence] = None, key_encoder_path: Optional[str] = None):
    """(model, tokenizer, wrapper_class) rebuilt from a run folder alone, then loaded with every check.

    ``cls``: the model class to build (RetroPromptForClassification or a subclass; its ``from_pretrained``
    passes itself, so this module never imports the model's). ``key_encoder_path``: where the run's sentence
    encoder is now (its weights must be the ones the run's key store was built with).
    """
    from .template import RetroTemplate

    check_files(directory)
    run = read_run_json(directory, required=True)
    t_info, v_info, p_info = run["template"], run["verbalizer"], run["plm"]
    if t_info.get("class") not in REBUILDABLE_TEMPLATES or v_info.get("class") not in REBUILDABLE_VERBALIZERS:
        raise SavedRunError(f"from_pretrained rebuilds {'/'.join(REBUILDABLE_TEMPLATES)} with "
                            f"{'/'.join(REBUILDABLE_VERBALIZERS)}; the run at {directory!r} used "
                            f"{t_info.get('class')} with {v_info.get('class')}. Build that model as before and call "
                            "model.load(dir) (or trainer.load(dir)) instead")
    if not isinstance(t_info.get("text"), str):
        raise SavedRunError(f"the template text of the run at {directory!r} was not recorded (the template was built "
                            "before openprompt_retro.prompt was imported); build the model as before and call "
                            "model.load(dir) instead")
    if v_info.get("label_words") is None and v_info["class"] == "ManualVerbalizer":
        raise SavedRunError(f"{RUN_FILE} in {directory!r} records no label words for its ManualVerbalizer")
    demonstrations = t_info.get("demonstrations", "none")
    if demonstrations == "text" and text_pool is None:
        text_pool = _load_text_pool(directory, run)
        if text_pool is None:
            raise SavedRunError(f"the run at {directory!r} uses text demonstrations but saved no pool "
                                f"({TEXT_POOL}): pass text_pool=[...labeled InputExamples...]")
    model_type = model_type or p_info.get("model_type")
    saved_plm = os.path.join(directory, PLM_DIR)
    path = plm_path or (saved_plm if p_info.get("saved") and os.path.isdir(saved_plm) else p_info.get("name_or_path"))
    if not model_type:
        raise SavedRunError(f"{RUN_FILE} in {directory!r} records no OpenPrompt model type for its "
                            f"{run['fingerprint']['architecture']}: pass model_type='bert' / 'roberta' / ...")
    if not path:
        raise SavedRunError(f"{RUN_FILE} in {directory!r} records no PLM path: pass plm_path=...")
    if (os.path.isabs(path) or path.startswith(".")) and not os.path.isdir(path):
        raise SavedRunError(f"the PLM of the run at {directory!r} is the folder {path!r}, which does not exist here: "
                            "pass plm_path=... (a local copy), or save the run with save_plm=True")
    from openprompt.plms import load_plm

    try:
        plm, tokenizer, _, wrapper = load_plm(model_type, path)
    except Exception as e:  # noqa: BLE001 - any loader failure gets the same advice
        raise SavedRunError(f"cannot load the PLM of the run at {directory!r} ({model_type!r} from {path!r}): "
                            f"{type(e).__name__}: {e}. Pass plm_path=... (a local copy), or save the run with "
                            "save_plm=True") from None
    from .keys import MaskKeyHead

    plm_side = {"model_type": infer_model_type(plm), "architecture": type(plm).__name__,
                "key_type": MaskKeyHead(plm).kind, "key_dim": int(plm.config.hidden_size),
                "tokenizer": type(tokenizer).__name__, "vocab_size": len(tokenizer)}
    diffs = differences({k: run["fingerprint"][k] for k in plm_side}, plm_side)
    if diffs:
        raise SavedRunError(f"the PLM loaded from {path!r} is not the one the run at {directory!r} was trained on: "
                            + "; ".join(diffs))
    from openprompt.prompts import (ManualTemplate, ManualVerbalizer, MixedTemplate, SoftTemplate,
                                    SoftVerbalizer)

    text = t_info["text"]
    if t_info["class"] == "ManualTemplate":
        base = ManualTemplate(tokenizer=tokenizer, text=text)
    elif t_info["class"] == "MixedTemplate":
        base = MixedTemplate(model=plm, tokenizer=tokenizer, text=text)
    else:
        base = SoftTemplate(model=plm, tokenizer=tokenizer, text=text, num_tokens=int(t_info.get("num_tokens") or 0))
    template = RetroTemplate(base, t_info["label_words"], demonstrations=demonstrations, plm=plm,
                             text_pool=text_pool, placeholder=t_info.get("placeholder"))
    n = int(run["fingerprint"]["num_classes"])
    words = _escaped(v_info["label_words"]) if v_info.get("label_words") is not None else None
    prefix = v_info.get("prefix") if v_info.get("prefix") is not None else " "
    handler = v_info.get("multi_token_handler") or "first"
    if v_info["class"] == "ManualVerbalizer":
        post = v_info.get("post_log_softmax")
        verbalizer = ManualVerbalizer(tokenizer, num_classes=n, label_words=words, prefix=prefix,
                                      multi_token_handler=handler,
                                      post_log_softmax=True if post is None else bool(post))
    else:
        verbalizer = SoftVerbalizer(tokenizer, plm, num_classes=n, label_words=words, prefix=prefix,
                                    multi_token_handler=handler)
    try:
        config = RetroConfig.load(os.path.join(directory, CONFIG))
    except (ValueError, TypeError) as e:
        raise SavedRunError(f"corrupt {os.path.join(directory, CONFIG)}: {e}") from None
    if key_encoder_path is not None:
        if config.key_encoder != "sentence":
            raise SavedRunError(f"key_encoder_path: the run at {directory!r} has key_encoder={config.key_encoder!r}, "
                                "not a sentence encoder loaded from a path")
        config.key_encoder_path = key_encoder_path
    flags = run["model"]
    model = cls(plm, template, verbalizer, config=config, freeze_plm=bool(flags.get("freeze_plm")),
                plm_eval_mode=bool(flags.get("plm_eval_mode")))
    model.mask_only_head = bool(flags.get("mask_only_head", True))
    model.exclude_self_in_eval = bool(flags.get("exclude_self_in_eval", False))
    _restore_frozen_encoder(model, directory)
    model.load(directory)
    return model, tokenizer, wrapper


__all__ = ["rebuild_run"]
