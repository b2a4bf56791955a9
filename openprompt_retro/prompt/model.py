"""RetroPromptForClassification: PromptForClassification that owns a knowledge store.

One forward pass does all three retrievals:

1. query keys q(x): the store's own key for a training example (the store is
   refreshed every pass), otherwise a demonstration-free pass (only when the
   template has neural demonstrations; without them q(x) comes from the main pass);
2. neural demonstrations d_c from the store, own entry left out in training;
3. the main pass; its output feeds the kNN-guided loss (training) or the
   kNN mixture of :class:`KnnVerbalizer` (inference).
"""
from __future__ import annotations

import sys
import warnings
import weakref
from collections import Counter
from contextlib import contextmanager
from typing import Dict, List, Optional

import numpy as np
import torch
from openprompt import PromptForClassification
from openprompt.pipeline_base import PromptModel
from openprompt.prompt_base import Template, Verbalizer
from openprompt.prompts import ManualTemplate, MixedTemplate, SoftTemplate
from transformers.modeling_outputs import MaskedLMOutput

from ..core.config import RetroConfig
from ..core.demonstrations import neural_demonstrations
from ..core.knn import knn_label_distribution, knn_weights, mix
from ..core.loss import knn_guided_loss, knn_loss_weights
from ..core.store import KnowledgeStore, StoreError
from ..core.text import example_text
from . import distributed, loaders, patches
from .batch import (DEMO_KEY, EXAMPLE_KEY, EXCLUDE_KEY, QUERY_KEY, SEGMENT_KEY, batch_example_ids, batch_get,
                    batch_guids)
from .checks import check_top
from .keys import (MaskKeyHead, demonstrations_off, encode_last_hidden, extract_keys, hidden_at_mask, mask_keys,
                   trim_padding)
from .template import RetroTemplate
from .verbalizer import KnnVerbalizer

_FAST_TEMPLATES = (ManualTemplate, MixedTemplate, SoftTemplate)
#: state_dict() entries that carry the store: keys (n, D) float32 and labels (n,) int64
STORE_STATE_KEYS = ("retro_store.keys", "retro_store.labels")


class _WeightedBackward(torch.autograd.Function):
    """Identity forward; backward multiplies row i of the gradient by w_i.

    So for any per-example loss L = mean_i l_i(logits_i), the gradient becomes that
    of mean_i w_i * l_i: the kNN-guided loss, whatever loss function the caller uses.
    """

    @staticmethod
    def forward(ctx, logits, weights):
        ctx.save_for_backward(weights)
        return logits.clone()

    @staticmethod
    def backward(ctx, grad):
        (weights,) = ctx.saved_tensors
        return grad * weights.to(grad.dtype).unsqueeze(1), None


class _RetroPromptModel(PromptModel):
    """OpenPrompt's PromptModel that first retrieves a raw batch's neural demonstrations.

    For OpenPrompt code that calls ``model.prompt_model(batch)`` itself (e.g.
    ``ProtoVerbalizer.train_proto``).
    """

    def forward(self, batch):
        owner = self._owner[0]
        if owner.uses_neural_demos and batch_get(batch, DEMO_KEY) is None:
            batch = owner.prepare_batch(batch)
        return super().forward(batch)


def _callers_level() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package and torch."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("openprompt_retro", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def _weak(obj):
    """A weak reference to ``obj`` (a strong one where it cannot be weakly referenced), called to dereference."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def _example_at(uid: int):
    """The InputExample behind an example identity (its live loader's raw dataset), or None."""
    loader = loaders.loader_of(int(loaders.serials(uid)))
    raw = getattr(loader, "raw_dataset", None)
    position = int(loaders.positions(uid))
    return raw[position] if raw is not None and position < len(raw) else None


def _verbalizer_words(verbalizer) -> Optional[List[str]]:
    """The first label word of each class (else the class names), or None if the verbalizer has neither."""
    try:
        words = verbalizer.label_words
    except (RuntimeError, AttributeError):
        words = None
    if words:
        return [w if isinstance(w, str) else w[0] for w in words]
    classes = getattr(verbalizer, "classes", None)
    if classes and all(isinstance(c, str) for c in classes):
        return list(classes)
    return None


class RetroPromptForClassification(PromptForClassification):
    """Drop-in for ``PromptForClassification`` with RetroPrompt's three retrievals.

    Args:
        plm, template, verbalizer, freeze_plm, plm_eval_mode: as for
            ``PromptForClassification``, in the same positions. A plain template is
            wrapped in ``RetroTemplate(demonstrations="none")``, a plain verbalizer
            in ``KnnVerbalizer``. A ``RetroTemplate`` without label words takes
            the verbalizer's (one per class; their counts must agree).
        config: :class:`RetroConfig` (keyword only).

    The knowledge store looks after itself:

    * it is built from the training data: the loader given to :meth:`attach`
      (or :meth:`refresh_store`), else the ``PromptDataLoader`` that the first
      training batch came from (a warning names it);
    * it is rebuilt with the current encoder at the first training forward of
      every pass over that loader (each ``iter(loader)``), and before the first
      inference forward that follows training forwards;
    * it travels in ``state_dict()`` (keys and labels, as tensors).

    Training or inference forward - the rule. A forward is a *training forward*
    when the model is in training mode, gradients are enabled, and the batch
    comes from the training data (the store's loader; a batch without example
    identities counts as training data). Every other forward is an *inference
    forward*: after ``eval()``, under ``torch.no_grad()``, or on a batch from
    any other loader (a dev/test loader evaluated without ``eval()``).

    * training forward: the example's own entry is never retrieved, its stored
      key is its query, no kNN mixture. With ``config.loss != "ce"`` the
      backward pass weights example i by w_i = 1 + beta * (-log p_kNN(y_i|x_i))
      (``"focal"``: (1 - p_kNN(y_i|x_i)) ** gamma), so ``loss_func(model(batch),
      labels).backward()`` gives the kNN-guided loss's gradient (the value of
      ``loss_func`` stays the plain loss; :meth:`loss` returns the weighted one).
    * inference forward: nothing is left out, the query key comes from a
      demonstration-free pass, and P = lambda p_kNN + (1 - lambda) p_PLM when
      lambda > 0.
    """

    def __init__(self, plm, template: Template, verbalizer: Verbalizer, freeze_plm: bool = False,
                 plm_eval_mode: bool = False, *, config: Optional[RetroConfig] = None):
        for name, value in (("freeze_plm", freeze_plm), ("plm_eval_mode", plm_eval_mode)):
            if isinstance(value, RetroConfig):
                raise TypeError(f"a RetroConfig was given as {name}: config is keyword-only, "
                                "RetroPromptForClassification(plm, template, verbalizer, config=RetroConfig(...))")
        if config is not None and not isinstance(config, RetroConfig):
            raise TypeError(f"config must be a RetroConfig, got {type(config).__name__}")
        config = (config or RetroConfig()).validate()
        patches.install()
        if getattr(verbalizer, "num_classes", None) is None:
            raise ValueError("the verbalizer does not know its number of classes: "
                             "give it num_classes=... or classes=...")
        if not isinstance(template, RetroTemplate):
            template = RetroTemplate(template, demonstrations="none")
        self._fill_template(template, verbalizer, plm)
        if not isinstance(verbalizer, KnnVerbalizer):
            verbalizer = KnnVerbalizer(verbalizer, plm)
        super().__init__(plm, template, verbalizer, freeze_plm=freeze_plm, plm_eval_mode=plm_eval_mode)
        self.prompt_model.__class__ = _RetroPromptModel
        self.prompt_model._owner = [self]
        self.config = config
        self.mask_only_head = True  # see _main_pass; False runs OpenPrompt's full-sequence head
        self.exclude_self_in_eval = False  # True: an entry never answers for the example it holds, in eval too
        self.knn_loss_active = True  # recomputed after every store build by update_loss_gate()
        self.store_loo_accuracy: Optional[float] = None  # the store's leave-one-out kNN accuracy (the gate's input)
        self.last_loss_weights: Optional[torch.Tensor] = None
        self.demo_ablation: Optional[str] = None  # diagnostics: "permute" d_c across classes
        self.total_training_steps: Optional[int] = None  # demo_warmup's denominator: see plan_training()
        self.training_forwards = 0  # training forwards since plan_training(): demo_warmup's counter
        self._demo_gen = torch.Generator().manual_seed(0)  # demo_dropout's draws
        self._store_in_state_dict = True  # False inside store_outside_state_dict()
        self._example_entries: Dict[int, tuple] = {}  # id(InputExample) -> (store id, example)
        self.key_head = MaskKeyHead(plm)
        self.store = KnowledgeStore(self._key_dim(), verbalizer.num_classes, metric=config.metric,
                                    index_factory=config.index_factory, built_by=self.key_head.describe())
        self._source_ref = None  # weak reference to the training data the store is built from
        self._source_serials: set = set()  # serials of the loaders whose examples are that training data
        self._source_passes: Optional[int] = None  # passes over the source at the last build (None: rebuild)
        self._added: list = []  # weak references to the loaders given to add_to_store since (re-added on rebuilds)
        self._entry_of_uid: Dict[int, int] = {}  # example identity -> store id
        self._stale = False  # training forwards ran since the last build
        self.apply_config()

    @staticmethod
    def _fill_template(template: RetroTemplate, verbalizer, plm) -> None:
        """Give the template the verbalizer's label words (if it has none) and the PLM; check the class counts."""
        n = int(verbalizer.num_classes)
        if template.label_words is None:
            words = _verbalizer_words(verbalizer)
            if words is not None:
                template.set_label_words(words)
            elif template.demonstrations != "none":
                raise ValueError(f"RetroTemplate(demonstrations={template.demonstrations!r}) shows a label word per "
                                 "class, and the verbalizer has none (e.g. SoftVerbalizer without label_words): "
                                 "pass label_words=[...] to RetroTemplate")
        if template.label_words is not None and template.num_classes != n:
            raise ValueError(f"RetroTemplate has {template.num_classes} label words {template.label_words} but the "
                             f"verbalizer has {n} classes: give one label word per class")
        if template._plm[0] is None:
            template.set_plm(plm)

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
    @property
    def _source(self):
        """The training data the store is built from, while it is alive (else None)."""
        return self._source_ref() if self._source_ref is not None else None

    def attach(self, dataloader, progress: bool = False) -> KnowledgeStore:
        """Make ``dataloader``'s examples the training data and build the store from them now.

        From then on the store is rebuilt by itself: at the first training forward
        of each pass over ``dataloader`` and before inference that follows training.
        Only needed when the model should not pick the loader of its first training
        batch, or when that loader was built before ``openprompt_retro`` was imported.
        The model holds the loader weakly: it is the training loop's to keep.
        """
        return self.refresh_store(dataloader, progress=progress)

    def refresh_store(self, dataloader=None, progress: bool = True) -> KnowledgeStore:
        """Recompute every key with the current encoder (one demonstration-free pass).

        ``dataloader`` (a ``PromptDataLoader`` or any iterable of its batches)
        becomes the training data, and the store holds exactly its examples;
        without it, the attached training data (and what :meth:`add_to_store`
        added since) is encoded again. Under torch.distributed each rank encodes
        its shard and the keys are all-gathered: every rank then holds the same store.
        """
        if dataloader is None:
            if self._source is None:
                raise ValueError("no training data attached: call refresh_store(train_loader) or attach(train_loader)")
            self._rebuild(self._source, progress, list(self._added))
        else:
            self._rebuild(dataloader, progress, [])
        return self.store

    def add_to_store(self, dataloader, progress: bool = True) -> np.ndarray:
        """Add labeled examples to the store without retraining; returns their ids.

        While ``dataloader`` is alive (a reference is kept by the caller), its examples are
        encoded again whenever the store is rebuilt automatically; ``refresh_store(loader)``
        starts over from ``loader`` alone.
        """
        if self._stale and self._source is not None:  # old keys must come from the encoder of the new ones
            self._rebuild(self._source, progress=False, added=list(self._added))
        ids = self._add(dataloader, progress)
        self._added.append(_weak(dataloader))
        return ids

    def _encode(self, dataloader, progress: bool):
        """(keys, labels, guids, texts, example ids) of every example of ``dataloader``, in dataset order."""
        raw = getattr(dataloader, "raw_dataset", None)
        if raw is not None:
            counts = Counter(str(e.guid) for e in raw if getattr(e, "guid", None) is not None)
            dup = sorted(g for g, c in counts.items() if c > 1)
            if dup:
                raise ValueError(f"the training data has {len(dup)} duplicate guids, e.g. {dup[:5]}: each example "
                                 "needs its own guid (or none at all)")
        if hasattr(dataloader, "tensor_dataset") and loaders.serial_of(dataloader) is None:
            loaders.tag_loader(dataloader)  # built before openprompt_retro was imported
        if distributed.is_distributed():
            keys, labels, guids, uids = self._encode_distributed(dataloader, progress)
        else:
            keys, labels, guids, uids = extract_keys(self, loaders.in_order(dataloader), progress=progress,
                                                     example_ids=True)
        serial = loaders.serial_of(dataloader)
        by_guid = {str(e.guid): example_text(e) for e in (raw if raw is not None else [])
                   if getattr(e, "guid", None) is not None}
        texts = []
        for g, u in zip(guids, uids):
            if raw is not None and serial is not None and u >= 0 and int(loaders.serials(u)) == serial:
                texts.append(example_text(raw[int(loaders.positions(u))]))
            else:
                texts.append(by_guid.get(g) if g is not None else None)
        return keys, labels, guids, texts, uids

    def _encode_distributed(self, dataloader, progress: bool):
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
        uids = np.array([-1 if batch_get(f, EXAMPLE_KEY) is None else int(batch_get(f, EXAMPLE_KEY))
                         for f in features], dtype=np.int64)
        return keys, labels, guids, uids

    def _rebuild(self, dataloader, progress: bool, added: list) -> None:
        """Build the store from ``dataloader`` (then re-add ``added``) and recompute the kNN loss gate."""
        keys, labels, guids, texts, uids = self._encode(dataloader, progress)
        self.store.build(keys, labels, guids, texts)
        self._entry_of_uid, self._example_entries = {}, {}
        self._note_entries(uids, np.arange(len(uids)))
        serial = loaders.serial_of(dataloader)
        self._source_ref, self._added = _weak(dataloader), []
        self._source_serials = set(loaders.serials(uids[uids >= 0]).tolist()) | ({serial} if serial else set())
        self._source_passes = loaders.passes(dataloader)
        self._stale = False
        for ref in added:
            extra = ref()
            if extra is None:
                warnings.warn("examples added with add_to_store are no longer in the store: their data loader was "
                              "garbage-collected before the store was rebuilt; keep a reference to it")
                continue
            self._add(extra, progress=False)
            self._added.append(ref)
        if len(self.store) >= 2:
            self.update_loss_gate()

    def _add(self, dataloader, progress: bool) -> np.ndarray:
        keys, labels, guids, texts, uids = self._encode(dataloader, progress)
        ids = self.store.add(keys, labels, guids, texts)
        self._note_entries(uids, ids)
        return ids

    def _note_entries(self, uids: np.ndarray, ids) -> None:
        """Remember which store entry holds which example: by identity, and by the InputExample itself."""
        for u, i in zip(uids, ids):
            if u < 0:
                continue
            self._entry_of_uid[int(u)] = int(i)
            example = _example_at(int(u))
            if example is not None:
                self._example_entries[id(example)] = (int(i), example)

    # ---------------------------------------------------------------- state_dict
    def sync_store(self) -> KnowledgeStore:
        """The store the model would use now: rebuilt first when training forwards ran since the last build."""
        if self._stale and self._source is not None:
            self._rebuild(self._source, progress=False, added=list(self._added))
        return self.store

    @contextmanager
    def store_outside_state_dict(self):
        """``state_dict()`` without the store's tensors (:meth:`save` writes the store in its own folder)."""
        before, self._store_in_state_dict = self._store_in_state_dict, False
        try:
            yield self
        finally:
            self._store_in_state_dict = before

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The store's keys and labels travel as two tensors (guids and texts stay with :meth:`save`);
        a store left stale by training is rebuilt first, so a checkpoint predicts as the model does now."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self._store_in_state_dict:
            return
        self.sync_store()
        keys_name, labels_name = STORE_STATE_KEYS
        destination[prefix + keys_name] = torch.from_numpy(np.array(self.store.keys, dtype=np.float32))
        destination[prefix + labels_name] = torch.from_numpy(np.array(self.store.labels, dtype=np.int64))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Rebuild the store from a state_dict's keys and labels (a state_dict without them leaves it as is)."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        names = [prefix + n for n in STORE_STATE_KEYS]
        unexpected_keys[:] = [k for k in unexpected_keys if k not in names]
        if not all(n in state_dict for n in names):
            return
        keys, labels = (state_dict[n].detach().cpu() for n in names)
        try:
            self.store.build(keys.float().numpy(), labels.long().numpy())
        except StoreError as e:
            error_msgs.append(f"{names[0]} / {names[1]}: {e}")
            return
        # the entries' example identities are unknown: the next training forward rebuilds from the source
        self._entry_of_uid, self._example_entries, self._source_passes, self._stale = {}, {}, None, False

    def _attach_from_batch(self, batch_serials: set) -> None:
        """Take the loader of a training batch as the training data (the store is built when first needed)."""
        loader = loaders.loader_of(next(iter(batch_serials))) if len(batch_serials) == 1 else None
        if loader is None:
            raise ValueError("cannot tell which data loader this training batch came from, so the knowledge store "
                             "cannot be built: call model.attach(train_loader) before training")
        warnings.warn(f"RetroPromptForClassification: building the knowledge store from the PromptDataLoader of the "
                      f"first training batch ({len(loader.tensor_dataset)} examples); call model.attach(train_loader) "
                      "to choose the training data yourself", stacklevel=_callers_level())
        self._source_ref, self._added = _weak(loader), []
        self._source_serials = {loaders.serial_of(loader)}
        self._source_passes = None

    def is_training_forward(self, batch) -> bool:
        """Whether a forward on ``batch`` now is a training forward (the rule in the class docstring)."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        uids = batch_example_ids(batch)
        if uids is None or not (uids >= 0).any():  # no identities: trust the mode
            if self._source is None and len(self.store) == 0 and self.uses_store:
                raise ValueError("cannot tell which data loader this training batch came from (its examples carry no "
                                 "identities: the loader was built before any openprompt_retro class was "
                                 "constructed), so the knowledge store cannot be built: call "
                                 "model.attach(train_loader) before training")
            return True
        batch_serials = set(loaders.serials(uids[uids >= 0]).tolist())
        if self._source is None:
            if self.uses_store:
                self._attach_from_batch(batch_serials)
            return True
        if batch_serials <= self._source_serials:
            return True
        # a training loader built again from the same dataset object replaces the old one
        raw = getattr(self._source, "raw_dataset", None)
        other = loaders.loader_of(next(iter(batch_serials))) if len(batch_serials) == 1 else None
        if raw is not None and other is not None and getattr(other, "raw_dataset", None) is raw:
            self._source_ref, self._source_serials, self._source_passes = _weak(other), batch_serials, None
            return True
        return False

    def _ensure_store(self, training: bool, needed: bool) -> bool:
        """Build or rebuild the store when this forward reads it (see the class docstring); whether there is one.

        Rebuilt: when it is empty or its entries are unknown; in a training forward, when a
        new pass over the source has begun and training forwards ran since the last build;
        in an inference forward, when training forwards ran since the last build. A model with
        no store and no training data (zero-shot, calibration) has none: its forwards are plain.
        """
        if not needed:
            return True
        source = self._source
        if source is not None:
            passes = loaders.passes(source)
            rebuild = len(self.store) == 0 or self._source_passes is None
            if training:
                rebuild = rebuild or (passes != self._source_passes and self._stale)
            else:
                rebuild = rebuild or self._stale
            if rebuild:
                self._rebuild(source, progress=False, added=list(self._added))
            if training:
                self._source_passes = passes
        if len(self.store) == 0 and training:
            raise ValueError("retrieval needs a knowledge store and none is built: train on a PromptDataLoader (the "
                             "store is built from it) or call model.attach(train_loader) / refresh_store(train_loader)")
        return len(self.store) > 0

    # ---------------------------------------------------------------- forward
    def _own_ids(self, batch, training: bool) -> np.ndarray:
        """Each example's store id (-1: none), by example identity: its loader and position, or (in an
        inference forward) the InputExample object the entry was encoded from. Guids serve only for a
        training batch without identities."""
        guids = batch_guids(batch)
        if len(self.store) == 0:
            return np.full(len(guids), -1, dtype=np.int64)
        uids = batch_example_ids(batch)
        if uids is None:
            return self.store.ids_of(guids) if training else np.full(len(guids), -1, dtype=np.int64)
        if training and self._entry_of_uid:
            return np.array([self._entry_of_uid.get(int(u), -1) for u in uids], dtype=np.int64)
        return np.array([self._entry_of_uid.get(int(u), self._entry_of_example(int(u))) for u in uids],
                        dtype=np.int64)

    def _entry_of_example(self, uid: int) -> int:
        """The store id of the InputExample behind ``uid`` (the same object as an encoded one), else -1."""
        example = _example_at(uid)
        entry, held = self._example_entries.get(id(example), (-1, None))
        return entry if example is not None and held is example else -1

    def _check_batch_template(self, batch) -> None:
        """A batch made with a demonstration template must be processed by that template."""
        uids = batch_example_ids(batch)
        source = loaders.loader_of(int(loaders.serials(uids[0]))) if uids is not None and len(uids) else None
        theirs, ours = getattr(source, "template", None), self.template
        if (isinstance(theirs, RetroTemplate) and theirs.demonstrations != "none"
                and (theirs.demonstrations, theirs.label_words) != (ours.demonstrations, ours.label_words)):
            raise ValueError(f"this batch comes from a PromptDataLoader built with another template "
                             f"(RetroTemplate(demonstrations={theirs.demonstrations!r})) than the model's "
                             f"({type(ours.base).__name__} in RetroTemplate(demonstrations={ours.demonstrations!r}), "
                             f"label words {ours.label_words}): its demonstration segment would be read wrongly; "
                             "build the model with the template the loaders were built with")
        segment = batch_get(batch, SEGMENT_KEY)
        if self.template.demonstrations == "none" and segment is not None and bool((segment == 1).any()):
            raise ValueError("this batch has a demonstration segment but the model's template has no "
                             "demonstrations: build the model with the RetroTemplate the loaders were built with")

    def prepare_batch(self, batch, need_query: Optional[bool] = None, training: Optional[bool] = None):
        """A copy of ``batch`` with query keys, exclusions and demonstrations attached.

        ``training`` says whether this is a training forward (default: :meth:`is_training_forward`).
        ``need_query`` forces (True) or skips (False) the query key; by default it
        is computed when the loss or the verbalizer will use it.
        (Templates rewrite the batch they process, so each pass gets its own shallow copy.)
        """
        self._check_batch_template(batch)
        if training is None:
            training = self.is_training_forward(batch)
        if need_query is None:
            need_query = self.config.loss != "ce" if training else self.config.knn_lambda > 0
        if not self._ensure_store(training, self.uses_neural_demos or need_query):
            batch = trim_padding(batch, drop_segment=True)  # no store: the plain model's input
            batch[EXCLUDE_KEY], batch[QUERY_KEY], batch[DEMO_KEY] = None, None, None
            return batch
        if training:
            self._stale = True
            warm = self._warming_up()
            self.training_forwards += 1
        batch = trim_padding(batch)  # a copy, without all-padding columns
        own = self._own_ids(batch, training)
        if training or self.exclude_self_in_eval:  # leave-one-out: an example never retrieves itself
            batch[EXCLUDE_KEY] = torch.from_numpy(own)
        else:
            batch[EXCLUDE_KEY] = None
        batch[QUERY_KEY], batch[DEMO_KEY] = None, None
        if not self.has_demonstrations:
            return batch  # the main pass is demonstration-free: it gives the query key itself
        # q(x) must be demonstration-free, like the store's keys
        if not (self.uses_neural_demos or need_query):
            return batch
        device = batch["loss_ids"].device
        if training and (own >= 0).all():
            query = torch.from_numpy(self.store.keys[own]).to(device)  # refreshed this pass
        else:
            with torch.no_grad():
                query = mask_keys(self, batch, self.key_head).float()
        batch[QUERY_KEY] = query
        if self.uses_neural_demos:
            demos = neural_demonstrations(self.store, query, self.config.demo_topk, batch[EXCLUDE_KEY])
            batch[DEMO_KEY] = self._shape_demonstrations(demos, training and warm).to(device)
        return batch

    def plan_training(self, total_steps: int) -> None:
        """Say how many training forwards (steps) the training run makes; restarts the warm-up count.

        ``RetroConfig.demo_warmup`` hides the demonstrations in the first
        ``demo_warmup * total_steps`` training forwards of the model (one per step in a
        loop that calls the model once per batch). RetroTrainer calls this in ``fit``; a
        hand-written loop calls ``model.plan_training(epochs * len(train_loader))`` first.
        """
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        self.total_training_steps, self.training_forwards = int(total_steps), 0

    def _warming_up(self) -> bool:
        """Whether this training forward falls in the demonstration warm-up (see :meth:`plan_training`)."""
        warmup = self.config.demo_warmup
        if warmup == 0 or not self.uses_neural_demos:
            return False
        if self.total_training_steps is None:
            raise ValueError(f"RetroConfig.demo_warmup={warmup} hides the demonstrations in the first {warmup:.0%} "
                             "of the training steps, and the model does not know how many there are: call "
                             "model.plan_training(total_steps) before training (e.g. epochs * len(train_loader))")
        return self.training_forwards < warmup * self.total_training_steps

    def _shape_demonstrations(self, demos: torch.Tensor, hidden: bool = False) -> torch.Tensor:
        """The configured variants of d_c (B, C, D): centred, norm-matched, permuted (diagnostic), dropped;
        all zero when ``hidden`` (the warm-up)."""
        c = self.config
        if c.demo_center:
            demos = demos - torch.from_numpy(np.asarray(self.store.keys).mean(0)).to(demos.dtype)
        if c.demo_norm == "match":  # |d_c| = mean |word embedding|
            target = self.plm.get_input_embeddings().weight.detach().norm(dim=-1).mean()
            target = target.to(device=demos.device, dtype=demos.dtype)  # d_c are built on the store's CPU side
            demos = demos * (target / demos.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        if self.demo_ablation == "permute":  # each class's slot gets the next class's demonstration
            demos = demos.roll(1, dims=1)
        if hidden:  # warm start: no demonstrations yet
            return torch.zeros_like(demos)
        if self.training and c.demo_dropout > 0:  # the whole demonstration set of an example, zeroed
            keep = (torch.rand(demos.shape[0], 1, 1, generator=self._demo_gen) >= c.demo_dropout)
            demos = demos * keep.to(demos.dtype)
        return demos

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
        if self.uses_neural_demos and len(self.store) == 0:  # no store, no d_c: the plain model's input
            with demonstrations_off(self.template):
                return self._encoded(batch)
        return self._encoded(batch)

    def _encoded(self, batch):
        head, pm = self._lm_head(), self.prompt_model
        loss_ids = batch["loss_ids"]
        fast = (self.mask_only_head and head is not None and isinstance(self.template.base, _FAST_TEMPLATES)
                and bool(((loss_ids > 0).sum(1) == 1).all()))
        if not fast:
            return pm(batch), batch
        h = hidden_at_mask(encode_last_hidden(self, batch), loss_ids)
        outputs = MaskedLMOutput(logits=head(h)[:, None], hidden_states=(h[:, None],))
        return outputs, {"loss_ids": torch.ones_like(loss_ids[:, :1])}

    def _at_mask(self, outputs, mask_batch):
        if isinstance(outputs, (tuple, list)):  # e.g. ProtoVerbalizer's (hidden states, logits)
            return tuple(self._at_mask(o, mask_batch) for o in outputs)
        return self.extract_at_mask(outputs, mask_batch)

    def forward_with_keys(self, batch, mix: Optional[bool] = None):
        """(verbalizer output, query keys) for a prepared batch - one main forward pass.

        ``mix``: whether the verbalizer mixes p_kNN in (None: its own rule).
        """
        outputs, mask_batch = self._main_pass(batch)
        outputs = self.verbalizer.gather_outputs(outputs)
        at_mask = [self._at_mask(o, mask_batch) for o in outputs]
        self.verbalizer.mixing = mix
        try:
            logits = self.verbalizer.process_outputs(at_mask, batch=batch)
        finally:
            self.verbalizer.mixing = None
        query = batch[QUERY_KEY]
        if query is None:
            query = self.key_head(at_mask[-1])  # KnnVerbalizer gathers the hidden states last
        return logits, query

    def _knn_gold(self, batch, query, labels) -> torch.Tensor:
        """p_kNN(y_i | x_i) with each example's own entry left out (1 where the label is missing)."""
        p_knn = self.knn_probs(query, batch[EXCLUDE_KEY], self.config.train_knn_k, self.config.train_knn_temperature)
        p = p_knn.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
        return torch.where(labels >= 0, p, torch.ones_like(p))

    def forward(self, batch) -> torch.Tensor:
        """Log-probabilities over classes: kNN-mixed in an inference forward when lambda > 0.

        In a training forward with ``config.loss != "ce"``, backward weights each
        example by its kNN-guided loss weight (see the class docstring).
        """
        training = self.is_training_forward(batch)
        batch = self.prepare_batch(batch, training=training)
        logits, query = self.forward_with_keys(batch, mix=not training and len(self.store) > 0)
        labels = batch_get(batch, "label")
        c = self.config
        if (training and c.loss != "ce" and self.knn_loss_active and logits.requires_grad
                and torch.is_tensor(labels) and len(self.store)):
            labels = labels.to(logits.device).long()
            w = knn_loss_weights(self._knn_gold(batch, query, labels), c.loss, c.loss_beta, c.focal_gamma,
                                 c.max_loss_weight)
            self.last_loss_weights = w
            logits = _WeightedBackward.apply(logits, w.to(logits.device))
        return logits

    def forward_without_verbalize(self, batch) -> torch.Tensor:
        """What the wrapped verbalizer gathers, at the ``<mask>`` (OpenPrompt's ``calibrate`` uses it)."""
        batch = self.prepare_batch(batch, need_query=False)
        outputs, mask_batch = self._main_pass(batch)
        return self._at_mask(self.verbalizer.base.gather_outputs(outputs), mask_batch)

    def loss(self, batch) -> torch.Tensor:
        """The kNN-guided training loss for a batch (config.loss / loss_beta / focal_gamma / max_loss_weight).

        The per-example weights of the last call are kept in ``last_loss_weights`` (diagnostics).
        """
        batch = self.prepare_batch(batch)
        logits, query = self.forward_with_keys(batch, mix=False)
        labels = batch["label"].to(logits.device)
        c = self.config
        if c.loss != "ce" and len(self.store) == 0:
            raise ValueError(f"the kNN-guided loss (config.loss={c.loss!r}) needs p_kNN from the knowledge store, "
                             "but the store is empty: train on a PromptDataLoader (the store is built from it) or "
                             "call model.attach(train_loader) / refresh_store(train_loader) first, or set "
                             "config.loss='ce'")
        if c.loss == "ce" or not self.knn_loss_active:
            p_gold = torch.ones(labels.shape[0], device=logits.device)
            kind = "ce"
        else:
            p_gold, kind = self._knn_gold(batch, query, labels), c.loss
        self.last_loss_weights = knn_loss_weights(p_gold, kind, c.loss_beta, c.focal_gamma, c.max_loss_weight)
        return knn_guided_loss(logits, labels, p_gold, kind, c.loss_beta, c.focal_gamma, c.max_loss_weight)

    def knn_probs(self, query, exclude_ids=None, k: Optional[int] = None,
                  temperature: Optional[float] = None) -> torch.Tensor:
        """p_kNN(y|x) for query keys with the config's score scale (k, T default to the inference ones)."""
        return self.verbalizer.knn_probs(query, exclude_ids, k or self.config.knn_k,
                                         temperature or self.config.knn_temperature)

    def knn_distribution(self, queries, k: Optional[int] = None, temperature: Optional[float] = None,
                         exclude_ids=None) -> np.ndarray:
        """p_kNN(y|x) for numpy query keys with the config's score scale: the distribution inference mixes in,
        so lambda is tuned on dev against exactly what the model will use."""
        return self.store.knn_distribution(np.asarray(queries, dtype=np.float32), k or self.config.knn_k,
                                           temperature or self.config.knn_temperature, exclude_ids,
                                           self.config.knn_score_scale)

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
            logits, query = self.forward_with_keys(self.prepare_batch(batch, need_query=True), mix=False)
        finally:
            self.verbalizer.lam = lam
        return torch.softmax(logits, -1), query

    # ---------------------------------------------------------------- explain
    @torch.no_grad()
    def explain_batch(self, batch, top: int = 5) -> List[Dict]:
        """For each example: prediction, p_PLM, p_kNN and the neighbours behind p_kNN.

        The k = ``config.knn_k`` nearest entries carry the weights of p_kNN,
        w_j = softmax_j(z_j / T) over those k, z the scores on ``config.knn_score_scale``
        (:func:`~openprompt_retro.core.knn.knn_weights`, the function behind p_kNN);
        the ``top`` best of them are listed with these weights (not renormalised over
        the listed ones, so they sum to at most 1).
        """
        check_top(top)
        was = self.training
        self.eval()
        try:
            p_plm, query = self.plm_probs_and_queries(batch)
            exclude = self._own_ids(batch, training=False) if self.exclude_self_in_eval else None
            k, t, scale = self.config.knn_k, self.config.knn_temperature, self.config.knn_score_scale
            res = self.store.search(query.float().cpu(), k, exclude)
            weights = knn_weights(res.scores, t, res.labels >= 0, scale)
            p_knn = torch.from_numpy(knn_label_distribution(res.scores, res.labels, self.num_classes, t,
                                                            scale)).to(p_plm)
            p = mix(p_plm, p_knn, self.config.knn_lambda)
            out = []
            for i in range(query.shape[0]):
                out.append({
                    "prediction": int(p[i].argmax()), "probs": p[i].tolist(),
                    "p_plm": p_plm[i].tolist(), "p_knn": p_knn[i].tolist(),
                    "neighbours": [{"id": int(j), "guid": self.store.guids[j], "text": self.store.texts[j],
                                    "label": int(self.store.labels[j]), "score": float(s), "weight": float(wj)}
                                   for j, s, wj in list(zip(res.ids[i], res.scores[i], weights[i]))[:top] if j >= 0],
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

        self.sync_store()
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
