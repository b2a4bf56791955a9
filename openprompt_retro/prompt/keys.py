"""Keys of the knowledge store: the representation of the ``<mask>`` position.

For BERT / RoBERTa-style masked LMs the key is the output of the LM head's
transform at the mask, ``LayerNorm(gelu(W h + b))`` - the vector that the head
then decodes against the vocabulary. Other architectures fall back to the last
hidden state at the mask.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .batch import SEGMENT_KEY, batch_example_ids, batch_guids


class MaskKeyHead:
    """Maps last hidden states to store keys. Holds a *reference* to the PLM (not a submodule).

    ``kind`` is ``"bert-transform"``, ``"roberta-transform"`` or ``"hidden"``.
    """

    def __init__(self, plm: torch.nn.Module):
        self._plm = [plm]  # a list, so nn.Module owners do not register the PLM twice
        if hasattr(plm, "cls") and hasattr(getattr(plm.cls, "predictions", None), "transform"):
            self.kind = "bert-transform"
        elif hasattr(plm, "lm_head") and all(hasattr(plm.lm_head, a) for a in ("dense", "layer_norm")):
            self.kind = "roberta-transform"
        else:
            self.kind = "hidden"

    @property
    def plm(self) -> torch.nn.Module:
        return self._plm[0]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.kind == "bert-transform":
            return self.plm.cls.predictions.transform(hidden)
        if self.kind == "roberta-transform":
            head = self.plm.lm_head
            return head.layer_norm(F.gelu(head.dense(hidden)))
        return hidden

    def describe(self) -> Dict[str, object]:
        cfg = getattr(self.plm, "config", None)
        return {
            "key_type": self.kind,
            "model": getattr(cfg, "_name_or_path", None) or type(self.plm).__name__,
            "architecture": type(self.plm).__name__,
        }


def hidden_at_mask(hidden: torch.Tensor, loss_ids: torch.Tensor) -> torch.Tensor:
    """The hidden state at the (first) ``<mask>`` of each row: (B, L, D) -> (B, D)."""
    hidden = hidden[:, hidden.shape[1] - loss_ids.shape[1]:]  # drop a SoftTemplate's prepended soft tokens
    is_mask = loss_ids > 0
    has_mask = is_mask.any(dim=1)
    if not bool(has_mask.all()):
        rows = torch.nonzero(~has_mask).flatten()[:5].tolist()
        raise ValueError(f"no <mask> position in rows {rows} of the batch: the template must contain a "
                         "{\"mask\"} that survives truncation")
    first = is_mask.int().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


@contextmanager
def demonstrations_off(template):
    """Run the template without its demonstration segment (if it has one)."""
    if hasattr(template, "demonstrations_enabled"):
        before = template.demonstrations_enabled
        template.demonstrations_enabled = False
        try:
            yield
        finally:
            template.demonstrations_enabled = before
    else:
        yield


def trim_padding(batch, drop_segment: bool = False):
    """A shallow copy of ``batch`` without the padding columns that no row uses.

    OpenPrompt pads every example to ``max_seq_length``; attention never looks
    at padding, so dropping the all-padding tail changes no output and saves
    most of the compute on short inputs. ``drop_segment`` also drops the columns
    that only hold (hidden) demonstration segments.
    """
    batch = copy.copy(batch)
    am = batch["attention_mask"]
    full = am.shape[1]
    lengths = (am.flip(1).cumsum(1) > 0).sum(1)  # last attended position + 1
    segment = batch[SEGMENT_KEY] if drop_segment and SEGMENT_KEY in batch else None
    if segment is not None:
        in_seg = segment == 1
        starts = torch.where(in_seg.any(1), in_seg.int().argmax(1), torch.full_like(lengths, full))
        lengths = torch.minimum(lengths, starts)
    used = int(lengths.max())
    if used < full:
        for key in list(batch.keys()):
            value = batch[key]
            if torch.is_tensor(value) and value.dim() >= 2 and value.shape[1] == full:
                batch[key] = value[:, :used]
    return batch


def encode_last_hidden(model, batch) -> torch.Tensor:
    """Last hidden states of the PLM's encoder for a (processed-by-template) batch.

    Only the encoder runs: the LM head's vocabulary projection, most of an
    MLM's cost on short inputs, is not needed for keys.
    """
    pm = model.prompt_model
    batch = pm.template.process_batch(batch)
    inputs = {k: batch[k] for k in batch if k in pm.forward_keys}
    encoder = getattr(pm.plm, "base_model", None)
    if encoder is not None and encoder is not pm.plm:
        return encoder(**inputs).last_hidden_state
    return pm.plm(**inputs, output_hidden_states=True).hidden_states[-1]


def mask_keys(model, batch, key_head: Optional[MaskKeyHead] = None) -> torch.Tensor:
    """Store keys for one batch, from a demonstration-free pass of an OpenPrompt model.

    ``model`` is a ``PromptForClassification`` (or subclass). Gradients flow
    unless the caller disables them.
    """
    key_head = key_head or MaskKeyHead(model.plm)
    with demonstrations_off(model.template):
        trimmed = trim_padding(batch, drop_segment=True)  # a copy: templates rewrite the batch they process
        loss_ids = trimmed["loss_ids"]
        hidden = encode_last_hidden(model, trimmed)
    return key_head(hidden_at_mask(hidden, loss_ids))


@torch.no_grad()
def extract_keys(model, dataloader, desc: str = "store keys", progress: bool = True, example_ids: bool = False
                 ) -> Tuple[np.ndarray, ...]:
    """Keys, labels and guids for every example of an OpenPrompt ``PromptDataLoader``.

    With ``example_ids=True`` also the examples' identities (see :mod:`.loaders`; -1 where a
    batch carries none). The model is put in eval mode for the pass and restored afterwards.
    """
    key_head = MaskKeyHead(model.plm)
    was_training = model.training
    model.eval()
    keys, labels, guids, uids = [], [], [], []
    device = next(model.parameters()).device
    try:
        for batch in tqdm(dataloader, desc=desc, disable=not progress, leave=False):
            batch = batch.to(device) if hasattr(batch, "to") else batch
            keys.append(mask_keys(model, batch, key_head).float().cpu().numpy())
            if "label" not in batch or batch["label"] is None:
                raise ValueError("building a store needs labeled examples: the batch has no 'label'")
            labels.append(batch["label"].cpu().numpy())
            guids.extend(batch_guids(batch))
            ids = batch_example_ids(batch)
            uids.append(np.full(len(keys[-1]), -1, dtype=np.int64) if ids is None else ids)
    finally:
        model.train(was_training)
    if not keys:
        raise ValueError("the dataloader is empty: no examples to build a store from")
    if example_ids:
        return np.concatenate(keys), np.concatenate(labels), guids, np.concatenate(uids)
    return np.concatenate(keys), np.concatenate(labels), guids
