"""Per-batch retrieval: from a batch to what it retrieved - query keys, exclusions, demonstrations.

:class:`Retriever` is the one place that writes the model's ``retro_*`` batch keys
(``retro_query_keys``, ``retro_exclude_ids``, ``retro_demo_embeds``; see :mod:`.batch`):

1. query keys q(x): in a training forward the store's own key of each example (refreshed
   every pass), else a demonstration-free pass (only when demonstrations are shown; without
   them q(x) comes from the main pass itself); with a key encoder, its key of the example's
   raw text;
2. exclusions: each example's own entry, in a training forward (and in inference with
   ``exclude_self_in_eval``);
3. neural demonstrations d_c from the store, in their configured variant
   (:func:`shape_demonstrations`); with ``demo_retrieval`` "key-encoder" (or "auto" and a key encoder) the
   neighbours are chosen by the key encoder's keys and d_c is built from their [MASK] keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from ..core.demonstrations import neural_demonstrations
from . import loaders
from .batch import DEMO_KEY, EXCLUDE_KEY, QUERY_KEY, SEGMENT_KEY, batch_example_ids, batch_get
from .keys import trim_padding
from .template import RetroTemplate


@dataclass(frozen=True)
class Retrieved:
    """What one batch retrieved (None where nothing was): query keys (B, D), the store id each example must
    not retrieve (B,) (-1: none), neural demonstrations (B, C, D)."""

    query: Optional[torch.Tensor] = None
    exclude: Optional[torch.Tensor] = None
    demos: Optional[torch.Tensor] = None

    def write(self, batch):
        batch[QUERY_KEY], batch[EXCLUDE_KEY], batch[DEMO_KEY] = self.query, self.exclude, self.demos
        return batch


def check_batch_template(template: RetroTemplate, batch) -> None:
    """A batch made with a demonstration template must be processed by a template showing the same ones."""
    uids = batch_example_ids(batch)
    source = loaders.loader_of(int(loaders.serials(uids[0]))) if uids is not None and len(uids) else None
    theirs = getattr(source, "template", None)
    if (isinstance(theirs, RetroTemplate) and theirs.demonstrations != "none"
            and (theirs.demonstrations, theirs.label_words) != (template.demonstrations, template.label_words)):
        raise ValueError(f"this batch comes from a PromptDataLoader built with another template "
                         f"(RetroTemplate(demonstrations={theirs.demonstrations!r})) than the model's "
                         f"({type(template.base).__name__} in RetroTemplate(demonstrations="
                         f"{template.demonstrations!r}), label words {template.label_words}): its demonstration "
                         "segment would be read wrongly; build the model with the template the loaders were built with")
    segment = batch_get(batch, SEGMENT_KEY)
    if template.demonstrations == "none" and segment is not None and bool((segment == 1).any()):
        raise ValueError("this batch has a demonstration segment but the model's template has no "
                         "demonstrations: build the model with the RetroTemplate the loaders were built with")


class Retriever:
    """Per-batch retrieval for one model: it owns the store lifecycle (the stores, the key encoder, the warm-up
    counter) and knows the model only through its :class:`~.store_lifecycle.StoreHost` (``lifecycle.host``):
    the config, what the template shows, a demonstration-free [MASK] key of a batch and the shaping of d_c.

    ``retriever(batch, training, need_query)`` gives (a trimmed copy of ``batch`` with the retro_* keys
    written, what was retrieved). A model with no store (no training data) retrieves nothing and its input
    drops the demonstration segment: its forward is the plain model's.
    """

    def __init__(self, lifecycle):
        self.lifecycle = lifecycle

    @property
    def host(self):
        return self.lifecycle.host

    def __call__(self, batch, training: bool, need_query: bool) -> Tuple[object, Retrieved]:
        lifecycle, host = self.lifecycle, self.lifecycle.host
        neural = host.uses_neural_demos()
        if not lifecycle.ensure(training, neural or need_query):
            batch = trim_padding(batch, drop_segment=True)  # no store: the plain model's input
            record = Retrieved()
            return record.write(batch), record
        warm = lifecycle.note_training_forward() if training else False
        batch = trim_padding(batch)  # a copy (templates rewrite the batch they process), without all-padding columns
        own = lifecycle.own_ids(batch, training)
        # leave-one-out: an example never retrieves itself
        exclude = torch.from_numpy(own) if training or host.exclude_self_in_eval() else None
        keyed = lifecycle.key_encoder is not None
        by_keys = neural and host.config.demos_by_key_encoder
        device = batch["loss_ids"].device
        stored = training and bool((own >= 0).all())  # every example's own entry holds its query key
        key_query = None
        if keyed and (need_query or by_keys):  # the key encoder's q(x): the stored key of a training example
            rows = lifecycle.knn_store.keys[own] if stored else lifecycle.query_keys(batch)
            key_query = torch.from_numpy(np.asarray(rows, dtype=np.float32)).to(device)
        mask_query = None
        wants_mask_query = (neural and not by_keys) or (need_query and not keyed)
        if host.has_demonstrations() and wants_mask_query:
            if stored:
                mask_query = torch.from_numpy(lifecycle.store.keys[own]).to(device)  # refreshed this pass
            else:  # q(x) must be demonstration-free, like the store's keys
                with torch.no_grad():
                    mask_query = host.batch_mask_keys(batch).float()
        demos = None
        if neural:
            if by_keys:  # neighbours by the key encoder, d_c from their [MASK] states
                demos = neural_demonstrations(lifecycle.key_store, key_query, host.config.demo_topk, exclude,
                                              values=lifecycle.store.keys)
            else:
                demos = neural_demonstrations(lifecycle.store, mask_query, host.config.demo_topk, exclude)
            demos = host.shape_demonstrations(demos, training and warm).to(device)
        # without demonstrations the main pass is demonstration-free: a missing [MASK] query comes from it
        record = Retrieved(key_query if keyed else mask_query, exclude, demos)
        return record.write(batch), record


def retrieve(model, batch, training: bool, need_query: bool) -> Tuple[object, Retrieved]:
    """``model.retriever(batch, training, need_query)``: see :class:`Retriever`."""
    return model.retriever(batch, training, need_query)


def shape_demonstrations(demos: torch.Tensor, store, config, plm, permute: bool = False, hidden: bool = False,
                         dropout: Optional[torch.Generator] = None) -> torch.Tensor:
    """The configured variant of d_c (B, C, D), in this order:

    * ``config.demo_center``: d_c - mean of the store's keys;
    * ``config.demo_norm == "match"``: d_c * (mean |word embedding| / |d_c|);
    * ``permute`` (diagnostics): class c's slot gets class c-1's demonstration;
    * ``hidden`` (the warm-up): all zero;
    * ``dropout`` (a generator; training forwards): each example's whole set zeroed with probability
      ``config.demo_dropout``.
    """
    if config.demo_center:
        demos = demos - torch.from_numpy(np.asarray(store.keys).mean(0)).to(demos.dtype)
    if config.demo_norm == "match":  # |d_c| = mean |word embedding|
        target = plm.get_input_embeddings().weight.detach().norm(dim=-1).mean()
        target = target.to(device=demos.device, dtype=demos.dtype)  # d_c are built on the store's CPU side
        demos = demos * (target / demos.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    if permute:
        demos = demos.roll(1, dims=1)
    if hidden:
        return torch.zeros_like(demos)
    if dropout is not None:
        keep = torch.rand(demos.shape[0], 1, 1, generator=dropout) >= config.demo_dropout
        demos = demos * keep.to(demos.dtype)
    return demos
