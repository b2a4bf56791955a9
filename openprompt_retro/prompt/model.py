"""RetroPromptForClassification: PromptForClassification that owns a knowledge store.

One forward pass does all three retrievals:

1. query keys q(x): the store's own key for a training example (the store is
   refreshed every epoch), otherwise a demonstration-free pass (only when the
   template has neural demonstrations; without them q(x) comes from the main pass);
2. neural demonstrations d_c from the store, own entry left out in training;
3. the main pass; its output feeds the kNN-guided loss (training) or the
   kNN mixture of :class:`KnnVerbalizer` (inference).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
from openprompt import PromptForClassification
from openprompt.prompt_base import Template, Verbalizer
from openprompt.prompts import ManualTemplate, MixedTemplate, SoftTemplate
from transformers.modeling_outputs import MaskedLMOutput

from ..core.config import RetroConfig
from ..core.demonstrations import neural_demonstrations
from ..core.knn import mix
from ..core.loss import knn_guided_loss, knn_loss_weights
from ..core.store import KnowledgeStore
from ..core.text import example_text
from . import distributed
from .batch import DEMO_KEY, EXCLUDE_KEY, QUERY_KEY, batch_guids
from .keys import MaskKeyHead, encode_last_hidden, extract_keys, hidden_at_mask, mask_keys, trim_padding
from .saved_run import install_raw_text_hook
from .store_builder import build_store
from .template import RetroTemplate
from .verbalizer import KnnVerbalizer

_FAST_TEMPLATES = (ManualTemplate, MixedTemplate, SoftTemplate)
install_raw_text_hook()  # run.json records the text each template was built from


class RetroPromptForClassification(PromptForClassification):
    """Drop-in for ``PromptForClassification`` with RetroPrompt's three retrievals.

    Args:
        plm, template, verbalizer: as for ``PromptForClassification``. A plain
            template / verbalizer is wrapped: the template in a
            ``RetroTemplate(demonstrations="none")``, the verbalizer in a
            ``KnnVerbalizer``.
        config: :class:`RetroConfig`.
    """

    def __init__(self, plm, template: Template, verbalizer: Verbalizer, config: Optional[RetroConfig] = None,
                 freeze_plm: bool = False, plm_eval_mode: bool = False):
        config = (config or RetroConfig()).validate()
        if not isinstance(template, RetroTemplate):
            label_words = getattr(verbalizer, "label_words", None) or [str(c) for c in range(verbalizer.num_classes)]
            template = RetroTemplate(template, label_words, demonstrations="none")
        if not isinstance(verbalizer, KnnVerbalizer):
            verbalizer = KnnVerbalizer(verbalizer, plm)
        super().__init__(plm, template, verbalizer, freeze_plm=freeze_plm, plm_eval_mode=plm_eval_mode)
        self.config = config
        self.mask_only_head = True  # see _main_pass; False runs OpenPrompt's full-sequence head
        self.exclude_self_in_eval = False  # True: store entries never answer for themselves, in eval too
        self.knn_loss_active = True  # set per epoch by update_loss_gate()
        self.last_loss_weights: Optional[torch.Tensor] = None
        self.demo_ablation: Optional[str] = None  # diagnostics: "permute" d_c across classes
        self.key_head = MaskKeyHead(plm)
        self.store = KnowledgeStore(self._key_dim(), verbalizer.num_classes, metric=config.metric,
                                    index_factory=config.index_factory, built_by=self.key_head.describe())
        self.apply_config()

    # ---------------------------------------------------------------- config
    def _key_dim(self) -> int:
        return int(self.plm.config.hidden_size)

    @property
    def num_classes(self) -> int:
        return self.verbalizer.num_classes

    def apply_config(self, **overrides) -> RetroConfig:
        """Update config fields (e.g. the tuned lambda/k/T) and push them to the verbalizer."""
        for key, value in overrides.items():
            if not hasattr(self.config, key):
                raise ValueError(f"unknown RetroConfig field {key!r}")
            setattr(self.config, key, value)
        self.config.validate()
        v = self.verbalizer
        v.store, v.k, v.temperature, v.lam = self.store, self.config.knn_k, self.config.knn_temperature, self.config.knn_lambda
        v.scale = self.config.knn_score_scale
        return self.config

    @property
    def has_demonstrations(self) -> bool:
        return self.template.demonstrations != "none" and self.template.demonstrations_enabled

    @property
    def uses_store(self) -> bool:
        """Whether training or inference reads the store (else refreshing it is wasted work)."""
        return self.uses_neural_demos or self.config.loss != "ce" or self.config.knn_lambda > 0

    @property
    def uses_neural_demos(self) -> bool:
        return self.template.demonstrations == "neural" and self.template.demonstrations_enabled

    # ---------------------------------------------------------------- store
    @torch.no_grad()
    def refresh_store(self, dataloader, progress: bool = True) -> KnowledgeStore:
        """Recompute every key with the current encoder (one demonstration-free pass).

        Under torch.distributed each rank encodes its shard and the keys are
        all-gathered: every rank then holds the same store.
        """
        if not distributed.is_distributed():
            build_store(self, dataloader, store=self.store, progress=progress)
            return self.store
        from torch.utils.data import DataLoader
        from openprompt.data_utils import InputFeatures

        rank, world = distributed.rank_and_world()
        features = dataloader.tensor_dataset
        mine = np.arange(rank, len(features), world)
        shard = DataLoader([features[i] for i in mine], batch_size=dataloader.batch_size,
                           collate_fn=InputFeatures.collate_fct)
        keys, _, _ = extract_keys(self, shard, progress=progress and rank == 0)
        keys = distributed.gather_in_order(keys, mine)
        labels = np.array([int(f["label"]) for f in features])
        guids = [None if f["guid"] is None else str(f["guid"]) for f in features]
        texts_by_guid = {str(e.guid): example_text(e) for e in getattr(dataloader, "raw_dataset", [])}
        self.store.build(keys, labels, guids, [texts_by_guid.get(g) for g in guids])
        return self.store

    def add_to_store(self, dataloader, progress: bool = True) -> np.ndarray:
        """Add labeled examples to the store without retraining; returns their ids."""
        keys, labels, guids = extract_keys(self, dataloader, desc="adding to store", progress=progress)
        texts_by_guid = {str(e.guid): example_text(e) for e in getattr(dataloader, "raw_dataset", [])}
        return self.store.add(keys, labels, guids, [texts_by_guid.get(g) for g in guids])

    # ---------------------------------------------------------------- forward
    def _own_ids(self, batch) -> np.ndarray:
        return self.store.ids_of(batch_guids(batch)) if len(self.store) else np.full(len(batch_guids(batch)), -1)

    def prepare_batch(self, batch, need_query: Optional[bool] = None):
        """A copy of ``batch`` with query keys, exclusions and demonstrations attached.

        ``need_query`` forces (True) or skips (False) the query key; by default it
        is computed when the loss or the verbalizer will use it.
        (Templates rewrite the batch they process, so each pass gets its own shallow copy.)
        """
        batch = trim_padding(batch)  # a copy, without all-padding columns
        own = self._own_ids(batch)
        if self.training or self.exclude_self_in_eval:  # leave-one-out: an example never retrieves itself
            batch[EXCLUDE_KEY] = torch.from_numpy(own)
        else:
            batch[EXCLUDE_KEY] = None
        batch[QUERY_KEY], batch[DEMO_KEY] = None, None
        if not self.has_demonstrations:
            return batch  # the main pass is demonstration-free: it gives the query key itself
        # q(x) must be demonstration-free, like the store's keys
        if need_query is None:
            need_query = self.config.loss != "ce" if self.training else self.verbalizer.lam > 0
        if not (self.uses_neural_demos or need_query):
            return batch
        if len(self.store) == 0:
            raise ValueError("retrieval needs a built store: call refresh_store(train_loader) first")
        device = batch["loss_ids"].device
        if self.training and (own >= 0).all():
            query = torch.from_numpy(self.store.keys[own]).to(device)  # refreshed this epoch
        else:
            with torch.no_grad():
                query = mask_keys(self, batch, self.key_head).float()
        batch[QUERY_KEY] = query
        if self.uses_neural_demos:
            demos = neural_demonstrations(self.store, query, self.config.demo_topk, batch[EXCLUDE_KEY])
            batch[DEMO_KEY] = self._shape_demonstrations(demos).to(device)
        return batch

    def _shape_demonstrations(self, demos: torch.Tensor) -> torch.Tensor:
        """The configured variants of d_c (B, C, D): centred, norm-matched, permuted (diagnostic), dropped."""
        c = self.config
        if c.demo_center:
            demos = demos - torch.from_numpy(np.asarray(self.store.keys).mean(0)).to(demos.dtype)
        if c.demo_norm == "match":  # |d_c| = mean |word embedding|
            target = self.plm.get_input_embeddings().weight.detach().norm(dim=-1).mean().to(demos.dtype)
            demos = demos * (target / demos.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        if self.demo_ablation == "permute":  # each class's slot gets the next class's demonstration
            demos = demos.roll(1, dims=1)
        if self.training and c.demo_dropout > 0:  # the whole demonstration set of an example, zeroed
            keep = (torch.rand(demos.shape[0], 1, 1, generator=self._demo_generator()) >= c.demo_dropout)
            demos = demos * keep.to(demos.dtype)
        return demos

    def _demo_generator(self) -> torch.Generator:
        if getattr(self, "_demo_gen", None) is None:
            self._demo_gen = torch.Generator().manual_seed(0)
        return self._demo_gen

    def _lm_head(self):
        """The PLM's LM head (hidden -> vocabulary logits), or None if unknown."""
        for name in ("cls", "lm_head"):
            head = getattr(self.plm, name, None)
            if isinstance(head, torch.nn.Module):
                return head
        return None

    def _main_pass(self, batch):
        """(PLM outputs, batch for extract_at_mask).

        With one ``<mask>`` per row and a known template, only the encoder runs
        over the sequence and the LM head is applied at the mask alone (the
        vocabulary projection at every position is most of an MLM's cost on
        short inputs); the outputs are shaped as a length-1 sequence, so the
        verbalizer sees exactly what OpenPrompt would give it at the mask.
        """
        head, pm = self._lm_head(), self.prompt_model
        loss_ids = batch["loss_ids"]
        fast = (self.mask_only_head and head is not None and isinstance(self.template.base, _FAST_TEMPLATES)
                and bool(((loss_ids > 0).sum(1) == 1).all()))
        if not fast:
            return pm(batch), batch
        h = hidden_at_mask(encode_last_hidden(self, batch), loss_ids)
        outputs = MaskedLMOutput(logits=head(h)[:, None], hidden_states=(h[:, None],))
        return outputs, {"loss_ids": torch.ones_like(loss_ids[:, :1])}

    def forward_with_keys(self, batch):
        """(verbalizer output, query keys) for a prepared batch - one main forward pass."""
        outputs, mask_batch = self._main_pass(batch)
        outputs = self.verbalizer.gather_outputs(outputs)
        at_mask = [self.extract_at_mask(o, mask_batch) for o in outputs]
        logits = self.verbalizer.process_outputs(at_mask, batch=batch)
        query = batch[QUERY_KEY]
        if query is None:
            query = self.key_head(at_mask[1])
        return logits, query

    def forward(self, batch) -> torch.Tensor:
        """Log-probabilities over classes (kNN-mixed in eval mode when lambda > 0)."""
        logits, _ = self.forward_with_keys(self.prepare_batch(batch))
        return logits

    def loss(self, batch) -> torch.Tensor:
        """The kNN-guided training loss for a batch (config.loss / loss_beta / focal_gamma / max_loss_weight).

        The per-example weights of the last call are kept in ``last_loss_weights`` (diagnostics).
        """
        batch = self.prepare_batch(batch)
        logits, query = self.forward_with_keys(batch)
        labels = batch["label"].to(logits.device)
        c = self.config
        if c.loss == "ce" or len(self.store) == 0 or not self.knn_loss_active:
            p_gold = torch.ones(labels.shape[0], device=logits.device)
            kind = "ce"
        else:
            p_knn = self.knn_probs(query, batch[EXCLUDE_KEY], c.train_knn_k, c.train_knn_temperature)
            p_gold, kind = p_knn.gather(1, labels.unsqueeze(1)).squeeze(1), c.loss
        self.last_loss_weights = knn_loss_weights(p_gold, kind, c.loss_beta, c.focal_gamma, c.max_loss_weight)
        return knn_guided_loss(logits, labels, p_gold, kind, c.loss_beta, c.focal_gamma, c.max_loss_weight)

    def knn_probs(self, query, exclude_ids=None, k: Optional[int] = None,
                  temperature: Optional[float] = None) -> torch.Tensor:
        """p_kNN(y|x) for query keys with the config's score scale (k, T default to the inference ones)."""
        p = self.store.knn_distribution(query.detach().float().cpu(), k or self.config.knn_k,
                                        temperature or self.config.knn_temperature, exclude_ids,
                                        self.config.knn_score_scale)
        return torch.from_numpy(p).to(query.device)

    def update_loss_gate(self) -> float:
        """Leave-one-out kNN accuracy of the store; the kNN loss term is active only above chance.

        Chance is the majority-class rate of the store. Returns the accuracy.
        """
        c = self.config
        acc = self.store.leave_one_out_accuracy(c.train_knn_k, c.train_knn_temperature, c.knn_score_scale)
        chance = float(np.bincount(self.store.labels, minlength=self.num_classes).max() / len(self.store))
        self.knn_loss_active = (not c.knn_loss_gate) or acc > chance
        self.store_loo_accuracy = acc
        return acc

    @torch.no_grad()
    def plm_probs_and_queries(self, batch):
        """(p_PLM, query keys) for a batch, without the kNN mixture - used to tune lambda, k and T."""
        lam = self.verbalizer.lam
        self.verbalizer.lam = 0.0
        try:
            logits, query = self.forward_with_keys(self.prepare_batch(batch, need_query=True))
        finally:
            self.verbalizer.lam = lam
        return torch.softmax(logits, -1), query

    # ---------------------------------------------------------------- explain
    @torch.no_grad()
    def explain_batch(self, batch, top: int = 5) -> List[Dict]:
        """For each example: prediction, p_PLM, p_kNN and the neighbours behind it."""
        was = self.training
        self.eval()
        try:
            p_plm, query = self.plm_probs_and_queries(batch)
            res = self.store.search(query, min(top, len(self.store)))
            weights = res.scores / self.config.knn_temperature
            out = []
            p_knn = self.verbalizer.knn_probs(query)
            lam = self.config.knn_lambda
            p = mix(p_plm, p_knn, lam)
            for i in range(query.shape[0]):
                w = np.exp(weights[i] - weights[i].max())
                w = w / w.sum()
                out.append({
                    "prediction": int(p[i].argmax()), "probs": p[i].tolist(),
                    "p_plm": p_plm[i].tolist(), "p_knn": p_knn[i].tolist(),
                    "neighbours": [{"id": int(j), "guid": self.store.guids[j], "text": self.store.texts[j],
                                    "label": int(self.store.labels[j]), "score": float(s), "weight": float(wj)}
                                   for j, s, wj in zip(res.ids[i], res.scores[i], w) if j >= 0],
                })
            return out
        finally:
            self.train(was)

    # ---------------------------------------------------------------- disk
    def save(self, directory: str, save_plm: bool = False, model_type: Optional[str] = None,
             plm_name_or_path: Optional[str] = None) -> None:
        """Save the run: weights (safetensors), config (JSON), store, and run.json describing it.

        run.json records the fingerprint that :meth:`load` checks and what
        :meth:`from_pretrained` needs to rebuild the model from the folder alone:
        the PLM's OpenPrompt model type and name/path (inferred; override with
        ``model_type`` / ``plm_name_or_path``), template class and text, label
        words, verbalizer, demonstration mode. ``save_plm=True`` also writes the
        PLM and tokenizer to ``plm/`` (``save_pretrained``), so the folder needs
        nothing else - for tiny or local models. Text demonstrations also save
        their pool (``text_pool.json``).
        """
        from . import saved_run

        saved_run.save_run(self, directory, save_plm=save_plm, model_type=model_type, name_or_path=plm_name_or_path)

    def load(self, directory: str) -> "RetroPromptForClassification":
        """Load what :meth:`save` wrote into this (identically built) model - all or nothing.

        Everything is read and checked first: the files are there; run.json's
        fingerprint (template text, label words, classes, demonstrations, PLM
        architecture, key type and dimension, tokenizer) matches this model,
        every difference named; checksums; the config; the store (its own checks,
        its dimension and classes); weight names and shapes. Only then are the
        weights, config and store swapped in, so a failed load leaves the model
        as it was. Raises ``FileNotFoundError`` for missing parts, ``SavedRunError``
        (a ``ValueError``) or ``StoreError`` otherwise.
        """
        from . import saved_run

        loaded = saved_run.read_checked(self, directory)
        saved_run.swap_in(self, loaded)
        return self

    @classmethod
    def from_pretrained(cls, directory: str, plm_path: Optional[str] = None, model_type: Optional[str] = None,
                        text_pool=None) -> "RetroPromptForClassification":
        """Rebuild a saved run from its folder alone: PLM, tokenizer, template, verbalizer, config, store, weights.

        The PLM comes from ``plm/`` when the run was saved with ``save_plm=True``,
        else from the name/path in run.json (``plm_path`` overrides it, e.g. a
        local copy). Rebuilds ManualTemplate / MixedTemplate / SoftTemplate with
        ManualVerbalizer / SoftVerbalizer (what the factory builds is
        ManualTemplate + ManualVerbalizer); for other classes build the model as
        before and call :meth:`load`. Predictions are bit-identical to the saved model's.
        """
        from . import saved_run

        return saved_run.rebuild(directory, cls=cls, plm_path=plm_path, model_type=model_type, text_pool=text_pool)[0]
