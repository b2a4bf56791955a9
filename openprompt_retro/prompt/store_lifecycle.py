"""The knowledge store's lifecycle: one object owns the store and everything that says when it is rebuilt.

:class:`StoreLifecycle` holds

* the store and the training data it is built from (a weak reference to its loader, the loader serials
  whose examples are that data, the pass count at the last build, and whether training forwards ran
  since: ``stale``);
* which entry holds which example (by loader and position, and by the InputExample object);
* the loaders given to :meth:`add` since the last build (re-added at every rebuild);
* the kNN loss gate, recomputed after every build (:meth:`update_gate`);
* the demonstration warm-up's counter (:meth:`plan_training`, :meth:`warming_up`);
* with ``RetroConfig.key_encoder`` other than "mask": the key encoder and the *key store* it builds, entry i
  holding the same example as entry i of the [MASK] store. Its keys never change, so each text is encoded
  once (a cache by text); kNN inference and the kNN loss read it (:attr:`knn_store`). The [MASK] store is
  then kept only for neural demonstrations.
* with ``key_encoder="adapted"``: at the first build from training data, the key encoder is adapted to that
  data's labels (its examples only), then frozen. Keys adapted on the store's own labels would make the loss
  weights and the gate dishonest (every entry already looks easy), so those read the *loss store*: the same
  entries keyed by the encoder as it was before adapting (:attr:`loss_store`).
* the keys of sentence pairs (``RetroConfig.pair_keys``): "auto" is settled at the first build, by whether
  the examples have a ``text_b``.

Rebuilt: at the first training forward of every pass over the training loader, before the first
inference forward after training forwards, and before ``state_dict()`` / ``save`` when stale.

The lifecycle never sees the model that owns it: it knows it through a :class:`StoreHost` (the config, the
number of classes, the key size and device, what the template shows, and a function that computes [MASK] keys).
"""
from __future__ import annotations

import sys
import warnings
import weakref
from collections import Counter
from typing import Dict, Optional

import numpy as np

from ..core.knn import binomial_tail
from ..core.readout import readout_distribution
from ..core.store import KnowledgeStore
from .text import example_text
from . import distributed, loaders
from .batch import EXAMPLE_KEY, batch_example_ids, batch_get, batch_guids
from .keys import MaskKeyHead, extract_keys, mask_keys


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


def make_key_encoder(config, plm, tokenizer):
    """The key encoder ``config.key_encoder`` names (None for "mask"): a frozen copy of ``plm``'s encoder taken
    now, or the sentence encoder at ``config.key_encoder_path``."""
    from .key_encoders import AdaptedMeanEncoder, FrozenMeanEncoder, SentenceEncoder

    if config.key_encoder == "frozen-mean":
        return FrozenMeanEncoder(plm, tokenizer)
    if config.key_encoder == "adapted":
        return AdaptedMeanEncoder(plm, tokenizer)
    if config.key_encoder == "sentence":
        return SentenceEncoder(config.key_encoder_path)
    return None


def _feature_rows(dataloader):
    """(labels, guids, example ids) of a PromptDataLoader's examples in dataset order, read without the model."""
    features = getattr(dataloader, "tensor_dataset", None)
    if features is None:
        raise ValueError("a key encoder other than 'mask' builds its store from a PromptDataLoader (its examples' "
                         f"texts), got {type(dataloader).__name__}")
    if len(features) == 0:
        raise ValueError("the dataloader is empty: no examples to build a store from")
    if any(f["label"] is None for f in features):
        raise ValueError("building a store needs labeled examples: an example has no label")
    labels = np.array([int(f["label"]) for f in features], dtype=np.int64)
    guids = [None if f["guid"] is None else str(f["guid"]) for f in features]
    uids = np.array([-1 if batch_get(f, EXAMPLE_KEY) is None else int(batch_get(f, EXAMPLE_KEY))
                     for f in features], dtype=np.int64)
    return labels, guids, uids


class StoreHost:
    """What the lifecycle knows of the model that owns it, and nothing more (any object with these members
    will do; :class:`ModelHost` is a RetroPromptForClassification's).

    ``config``: the owner's RetroConfig (one object: its fields change in place); ``num_classes``, ``key_size``
    (the [MASK] keys' dimension); ``device()``: where the owner's weights are; ``demonstrations()``: what its
    template shows ("neural", "text" or "none"); ``uses_store()`` / ``uses_neural_demos()``: whether training or
    inference reads the store / neural demonstrations are shown; ``mask_keys(loader, progress, example_ids)``:
    the owner's [MASK] keys of a loader's examples (as :func:`~openprompt_retro.prompt.keys.extract_keys`)."""

    config: object
    num_classes: int
    key_size: int

    def device(self):
        raise NotImplementedError

    def demonstrations(self) -> str:
        raise NotImplementedError

    def uses_store(self) -> bool:
        raise NotImplementedError

    def uses_neural_demos(self) -> bool:
        raise NotImplementedError

    def mask_keys(self, loader, progress: bool = True, example_ids: bool = False) -> tuple:
        raise NotImplementedError

    # what per-batch retrieval (:class:`~.retrieval.Retriever`) asks besides
    def has_demonstrations(self) -> bool:
        """Whether the template shows demonstrations now (not switched off for a key pass)."""
        raise NotImplementedError

    def exclude_self_in_eval(self) -> bool:
        """Whether an entry never answers for the example it holds in inference too."""
        raise NotImplementedError

    def batch_mask_keys(self, batch):
        """The demonstration-free [MASK] keys (B, D) of one batch."""
        raise NotImplementedError

    def shape_demonstrations(self, demos, hidden: bool):
        """The configured variant of the neural demonstrations d_c (B, C, D); all zero when ``hidden``."""
        raise NotImplementedError


class ModelHost(StoreHost):
    """The host view of a RetroPromptForClassification (copied with it: ``copy.deepcopy`` of the model gives
    the copy's lifecycle a view of the copy)."""

    def __init__(self, model):
        self._model = model

    @property
    def config(self):
        return self._model.config

    @property
    def num_classes(self) -> int:
        return self._model.num_classes

    @property
    def key_size(self) -> int:
        return int(self._model.plm.config.hidden_size)

    def device(self):
        return next(self._model.plm.parameters()).device

    def demonstrations(self) -> str:
        return self._model.template.demonstrations

    def uses_store(self) -> bool:
        return self._model.uses_store

    def uses_neural_demos(self) -> bool:
        return self._model.uses_neural_demos

    def mask_keys(self, loader, progress: bool = True, example_ids: bool = False) -> tuple:
        return extract_keys(self._model, loader, progress=progress, example_ids=example_ids)

    def has_demonstrations(self) -> bool:
        return self._model.has_demonstrations

    def exclude_self_in_eval(self) -> bool:
        return bool(self._model.exclude_self_in_eval)

    def batch_mask_keys(self, batch):
        return mask_keys(self._model, batch, self._model.key_head)

    def shape_demonstrations(self, demos, hidden: bool):
        return self._model._shape_demonstrations(demos, hidden)


class StoreLifecycle:
    """The store of one RetroPromptForClassification (known through its :class:`StoreHost`) and when it is
    (re)built."""

    def __init__(self, host: StoreHost, key_head: MaskKeyHead, key_encoder):
        c = host.config
        self.host = host
        self.store = KnowledgeStore(host.key_size, host.num_classes, metric=c.metric,
                                    index_factory=c.index_factory, built_by=key_head.describe())
        self.key_encoder = key_encoder  # make_key_encoder's, for config.key_encoder (None: "mask")
        self.key_store: Optional[KnowledgeStore] = None  # built by the key encoder (None for key_encoder="mask")
        if self.key_encoder is not None:
            if c.pair_keys == "relation":
                self.key_encoder.relation = True
            self.key_store = self._new_key_store()
        self._key_cache: Dict[tuple, np.ndarray] = {}  # (text_a, text_b) -> the key encoder's key
        #: adapted keys: (text_a, text_b) -> the key before adapting, and the store of those keys (loss, gate)
        self._pretrained_cache: Dict[tuple, np.ndarray] = {}
        self._loss_store: Optional[KnowledgeStore] = None
        self._encoded_loaders: set = set()  # serials of the loaders whose examples are all in the key cache
        self._source_ref = None  # weak reference to the training data the store is built from
        self._source_serials: set = set()  # serials of the loaders whose examples are that training data
        self._source_passes: Optional[int] = None  # passes over the source at the last build (None: rebuild)
        self._added: list = []  # weak references to the loaders given to add() since (re-added on rebuilds)
        self._entry_of_uid: Dict[int, int] = {}  # example identity -> store id
        self._example_entries: Dict[int, tuple] = {}  # id(InputExample) -> (store id, example)
        self.stale = False  # training forwards ran since the last build
        self.knn_loss_active = True  # recomputed after every build by update_gate()
        self.store_loo_accuracy: Optional[float] = None  # the store's leave-one-out kNN accuracy (the gate's input)
        self.loo_p_value: Optional[float] = None  # P(that accuracy or more | chance): the untuned mixture's guard
        self.total_training_steps: Optional[int] = None  # demo_warmup's denominator: see plan_training()
        self.training_forwards = 0  # training forwards since plan_training(): demo_warmup's counter

    @property
    def knn_store(self) -> KnowledgeStore:
        """The store that kNN inference and the kNN-guided loss read: the key store, else the [MASK] store."""
        return self.key_store if self.key_store is not None else self.store

    @property
    def loss_store(self) -> KnowledgeStore:
        """The store that the kNN-guided loss weights and the loss gate read: for adapted keys the same entries
        keyed by the encoder before adapting (honest: no entry's key saw its own label), else :attr:`knn_store`."""
        return self._loss_store if self._loss_store is not None else self.knn_store

    @property
    def adapts_keys(self) -> bool:
        """Whether the key encoder is adapted to the training labels (``key_encoder="adapted"``)."""
        return getattr(self.key_encoder, "kind", None) == "adapted"

    def _new_key_store(self) -> KnowledgeStore:
        c = self.host.config
        return KnowledgeStore(self.key_encoder.dim, self.host.num_classes, metric="ip",
                              index_factory=c.index_factory, built_by=self.key_encoder.store_identity())

    def _replace_key_store(self) -> None:
        """An empty key store of the key encoder's current dimension."""
        self.key_store = self._new_key_store()

    def settle_pair_keys(self, examples) -> None:
        """Settle ``pair_keys="auto"`` by whether ``examples`` have a text_b (relation features for pairs);
        the config then names the choice. A no-op once settled, or without a key encoder."""
        c = self.host.config
        if self.key_encoder is None or c.pair_keys != "auto":
            return
        relation = any(getattr(e, "text_b", None) for e in examples)
        c.pair_keys = "relation" if relation else "joint"
        if relation != self.key_encoder.relation:
            if len(self.key_store):
                raise ValueError("the key store already holds single-text keys: pair keys cannot be settled now")
            self.key_encoder.relation = relation
            self._replace_key_store()
            self.forget_keys()

    def adapt_keys(self, examples) -> None:
        """Adapt the key encoder to labelled training ``examples`` (once; ``key_encoder="adapted"`` only), first
        keeping their keys as they were before adapting (the loss store's). Reads nothing but ``examples``."""
        if not self.adapts_keys or self.key_encoder.adapted:
            return
        c = self.host.config
        examples = list(examples)
        if any(getattr(e, "label", None) is None for e in examples):
            raise ValueError("key adaptation needs labelled training examples: an example has no label")
        self.encode_examples(examples)  # the pre-trained keys, for the loss store
        self._pretrained_cache = dict(self._key_cache)
        import torch

        with torch.random.fork_rng():  # the adaptation's seed comes from the caller's random state, untouched
            seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
        device = self.host.device()
        if self.key_encoder.device != device:
            self.key_encoder.to(device)
        self.key_encoder.adapt(examples, c.adapt_steps, c.adapt_lr, c.adapt_batch_size, seed, pairs=c.adapt_pairs)
        self.forget_keys()
        self._replace_key_store()

    def _build_loss_store(self, labels: np.ndarray, texts_of: list, guids=None, texts=None) -> None:
        """The loss store of adapted keys: entry i keyed by example i's pre-adaptation key (None where unknown),
        with the key store's labels, guids and texts (so its entries can be shown)."""
        if not self.adapts_keys or not self.key_encoder.adapted:
            self._loss_store = None
            return
        missing = [t for t in texts_of if t not in self._pretrained_cache]
        if missing:  # e.g. training data changed after the adaptation: no honest weights for them
            if not getattr(self, "_warned_loss_store", False):
                warnings.warn(f"{len(missing)} store entries were not among the examples the key encoder was adapted "
                              "on: the kNN-guided loss weights read the adapted keys for them", stacklevel=_callers_level())
                self._warned_loss_store = True
            self._loss_store = None
            return
        store = KnowledgeStore(self.key_encoder.hidden_size if not self.key_encoder.relation else self.key_encoder.dim,
                               self.host.num_classes, metric="ip", built_by={"key_encoder": "pre-adaptation"})
        store.build(np.stack([self._pretrained_cache[t] for t in texts_of]), labels, guids, texts)
        self._loss_store = store

    @property
    def needs_mask_store(self) -> bool:
        """Whether [MASK] keys are built: they are the kNN keys, or the values of neural demonstrations."""
        return self.key_encoder is None or self.host.demonstrations() == "neural"

    def encode_examples(self, examples) -> np.ndarray:
        """The key encoder's keys of InputExamples, (n, D) float32; each distinct text is encoded once."""
        pairs = [(e.text_a, getattr(e, "text_b", None) or None) for e in examples]
        todo = list(dict.fromkeys(p for p in pairs if p not in self._key_cache))
        if todo:
            device = self.host.device()
            if self.key_encoder.device != device:
                self.key_encoder.to(device)
            keys = self.key_encoder.encode_texts([a for a, _ in todo], [b for _, b in todo])
            self._key_cache.update(zip(todo, keys))
        if not pairs:
            return np.zeros((0, self.key_encoder.dim), dtype=np.float32)
        return np.stack([self._key_cache[p] for p in pairs])

    def forget_keys(self) -> None:
        """Drop the cached key-encoder keys (after the encoder's weights were replaced)."""
        self._key_cache = {}
        self._encoded_loaders = set()

    def keys_of_ids(self, uids, fix: str) -> np.ndarray:
        """The key encoder's keys of the examples behind example identities (None or -1: unknown), (n, D)
        float32; an example that cannot be traced back to its InputExample is a ValueError ending in ``fix``."""
        examples = [] if uids is None else [_example_at(int(u)) if u >= 0 else None for u in uids]
        if uids is None or any(e is None for e in examples):
            raise ValueError(f"key_encoder={self.host.config.key_encoder!r} reads each example's raw text, and "
                             f"these examples cannot be traced back to theirs: {fix}")
        for serial in {int(s) for s in loaders.serials(np.asarray(uids))} - self._encoded_loaders:
            # the first batch of a loader encodes its whole dataset: one pass sorted by length, little padding
            raw = getattr(loaders.loader_of(serial), "raw_dataset", None)
            if raw is not None:
                self.encode_examples(raw)
                self._encoded_loaders.add(serial)
        return self.encode_examples(examples)

    def query_keys(self, batch) -> np.ndarray:
        """The key encoder's keys of a batch's examples (read through their identities), (B, D) float32."""
        return self.keys_of_ids(batch_example_ids(batch), "build the PromptDataLoader after constructing the "
                                                          "model, and keep it alive while it is used")

    def knn_distribution(self, queries, exclude_ids, k: int, temperature: float, readout: str, scale: str,
                         top_m: Optional[int] = None, store: Optional[KnowledgeStore] = None) -> np.ndarray:
        """p_kNN(y|x) (B, C) float32 from ``store`` (default :attr:`knn_store`) by ``readout``
        (:func:`~openprompt_retro.core.readout.readout_distribution`): "topk" (k nearest, T in the ``scale``'s
        units), "class-mean" (each class's mean key, T on the cosine scale) or "logistic"."""
        return readout_distribution(readout, self.knn_store if store is None else store, queries, temperature,
                                    exclude_ids, k, scale, top_m, self.host.config.logistic_c)

    @property
    def source(self):
        """The training data the store is built from, while it is alive (else None)."""
        return self._source_ref() if self._source_ref is not None else None


    def refresh(self, dataloader=None, progress: bool = True) -> KnowledgeStore:
        """Recompute every key with the current encoder (one demonstration-free pass).

        ``dataloader`` (a ``PromptDataLoader`` or any iterable of its batches)
        becomes the training data, and the store holds exactly its examples;
        without it, the attached training data (and what :meth:`add_to_store`
        added since) is encoded again. Under torch.distributed each rank encodes
        its shard and the keys are all-gathered: every rank then holds the same store.
        """
        if dataloader is None:
            if self.source is None:
                raise ValueError("no training data attached: call refresh_store(train_loader) or attach(train_loader)")
            self._rebuild(self.source, progress, list(self._added))
        else:
            self._rebuild(dataloader, progress, [])
        return self.store


    def add(self, dataloader, progress: bool = True) -> np.ndarray:
        """Add labeled examples to the store without retraining; returns their ids.

        While ``dataloader`` is alive (a reference is kept by the caller), its examples are
        encoded again whenever the store is rebuilt automatically; ``refresh_store(loader)``
        starts over from ``loader`` alone.
        """
        if self.stale and self.source is not None:  # old keys must come from the encoder of the new ones
            self._rebuild(self.source, progress=False, added=list(self._added))
        ids = self._add(dataloader, progress)
        self._added.append(_weak(dataloader))
        return ids


    def _encode(self, dataloader, progress: bool):
        """(mask keys or None, key-encoder keys or None, labels, guids, texts, example ids) of every example of
        ``dataloader``, in dataset order."""
        raw = getattr(dataloader, "raw_dataset", None)
        if raw is not None:
            counts = Counter(str(e.guid) for e in raw if getattr(e, "guid", None) is not None)
            dup = sorted(g for g, c in counts.items() if c > 1)
            if dup:
                raise ValueError(f"the training data has {len(dup)} duplicate guids, e.g. {dup[:5]}: each example "
                                 "needs its own guid (or none at all)")
        if hasattr(dataloader, "tensor_dataset") and loaders.serial_of(dataloader) is None:
            loaders.tag_loader(dataloader)  # built before openprompt_retro was imported
        if self.key_encoder is not None and raw is not None:
            self.settle_pair_keys(raw)
        if not self.needs_mask_store:
            keys, (labels, guids, uids) = None, _feature_rows(dataloader)
        elif distributed.is_distributed():
            keys, labels, guids, uids = self._encode_distributed(dataloader, progress)
        else:
            keys, labels, guids, uids = self.host.mask_keys(loaders.in_order(dataloader), progress=progress,
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
        key_keys = None
        if self.key_encoder is not None:
            key_keys = self.keys_of_ids(uids, "build the store from a PromptDataLoader made after constructing "
                                              "the model")
        return keys, key_keys, labels, guids, texts, uids


    def _encode_distributed(self, dataloader, progress: bool):
        from torch.utils.data import DataLoader
        from openprompt.data_utils import InputFeatures

        rank, world = distributed.rank_and_world()
        features = dataloader.tensor_dataset
        mine = np.arange(rank, len(features), world)
        shard = DataLoader([features[i] for i in mine], batch_size=dataloader.batch_size,
                           collate_fn=InputFeatures.collate_fct)
        keys, _, _ = self.host.mask_keys(shard, progress=progress and rank == 0)
        keys = distributed.gather_in_order(keys, mine)
        labels = np.array([int(f["label"]) for f in features])
        guids = [None if f["guid"] is None else str(f["guid"]) for f in features]
        uids = np.array([-1 if batch_get(f, EXAMPLE_KEY) is None else int(batch_get(f, EXAMPLE_KEY))
                         for f in features], dtype=np.int64)
        return keys, labels, guids, uids


    def _rebuild(self, dataloader, progress: bool, added: list) -> None:
        """Build the store from ``dataloader`` (then re-add ``added``) and recompute the kNN loss gate; adapted
        keys are adapted first, on ``dataloader``'s examples (the training data)."""
        if self.adapts_keys and not self.key_encoder.adapted:
            raw = getattr(dataloader, "raw_dataset", None)
            if raw is None:
                raise ValueError("key_encoder='adapted' adapts the keys on the training examples' texts and labels: "
                                 "build the store from a PromptDataLoader (it keeps its examples)")
            self.settle_pair_keys(raw)
            self.adapt_keys(raw)
        keys, key_keys, labels, guids, texts, uids = self._encode(dataloader, progress)
        if keys is not None:
            self.store.build(keys, labels, guids, texts)
        if key_keys is not None:
            self.key_store.built_by = self.key_encoder.store_identity()
            self.key_store.build(key_keys, labels, guids, texts)
            if self.adapts_keys:
                examples = [_example_at(int(u)) if u >= 0 else None for u in uids]
                self._build_loss_store(labels, [None if e is None else (e.text_a, getattr(e, "text_b", None) or None)
                                                for e in examples], guids, texts)
        self._entry_of_uid, self._example_entries = {}, {}
        self._note_entries(uids, np.arange(len(uids)))
        serial = loaders.serial_of(dataloader)
        self._source_ref, self._added = _weak(dataloader), []
        self._source_serials = set(loaders.serials(uids[uids >= 0]).tolist()) | ({serial} if serial else set())
        self._source_passes = loaders.passes(dataloader)
        self.stale = False
        for ref in added:
            extra = ref()
            if extra is None:
                warnings.warn("examples added with add_to_store are no longer in the store: their data loader was "
                              "garbage-collected before the store was rebuilt; keep a reference to it")
                continue
            self._add(extra, progress=False)
            self._added.append(ref)
        if len(self.knn_store) >= 2:
            self.update_gate()


    def _add(self, dataloader, progress: bool) -> np.ndarray:
        """Add a loader's examples; they are known by identity (loader and position), so their guids may repeat
        the training data's (Hugging Face ``idx`` restarts in every split)."""
        keys, key_keys, labels, guids, texts, uids = self._encode(dataloader, progress)
        ids = None
        if keys is not None:
            ids = self.store.add(keys, labels, guids, texts, guids_may_repeat=True)
        if key_keys is not None:
            ids = self.key_store.add(key_keys, labels, guids, texts, guids_may_repeat=True)
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


    def sync(self) -> KnowledgeStore:
        """The store the model would use now: rebuilt first when training forwards ran since the last build."""
        if self.stale and self.source is not None:
            self._rebuild(self.source, progress=False, added=list(self._added))
        return self.store


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


    def is_training_batch(self, batch) -> bool:
        """Whether ``batch`` is training data (the model decides the mode; see its class docstring)."""
        uids = batch_example_ids(batch)
        if uids is None or not (uids >= 0).any():  # no identities: trust the mode
            if self.source is None and len(self.knn_store) == 0 and self.host.uses_store():
                raise ValueError("cannot tell which data loader this training batch came from (its examples carry no "
                                 "identities: the loader was built before any openprompt_retro class was "
                                 "constructed), so the knowledge store cannot be built: call "
                                 "model.attach(train_loader) before training")
            return True
        batch_serials = set(loaders.serials(uids[uids >= 0]).tolist())
        if self.source is None:
            if self.host.uses_store():
                self._attach_from_batch(batch_serials)
            return True
        if batch_serials <= self._source_serials:
            return True
        # a training loader built again from the same dataset object replaces the old one
        raw = getattr(self.source, "raw_dataset", None)
        other = loaders.loader_of(next(iter(batch_serials))) if len(batch_serials) == 1 else None
        if raw is not None and other is not None and getattr(other, "raw_dataset", None) is raw:
            self._source_ref, self._source_serials, self._source_passes = _weak(other), batch_serials, None
            return True
        return False


    def ensure(self, training: bool, needed: bool) -> bool:
        """Build or rebuild the store when this forward reads it (see the class docstring); whether there is one.

        Rebuilt: when it is empty or its entries are unknown; in a training forward, when a
        new pass over the source has begun and training forwards ran since the last build;
        in an inference forward, when training forwards ran since the last build. A model with
        no store and no training data (zero-shot, calibration) has none: its forwards are plain.
        """
        if not needed:
            return True
        source = self.source
        if source is not None:
            passes = loaders.passes(source)
            rebuild = len(self.knn_store) == 0 or self._source_passes is None
            if training:
                rebuild = rebuild or (passes != self._source_passes and self.stale)
            else:
                rebuild = rebuild or self.stale
            if rebuild:
                self._rebuild(source, progress=False, added=list(self._added))
            if training:
                self._source_passes = passes
        if len(self.knn_store) == 0 and training:
            raise ValueError("retrieval needs a knowledge store and none is built: train on a PromptDataLoader (the "
                             "store is built from it) or call model.attach(train_loader) / refresh_store(train_loader)")
        return len(self.knn_store) > 0


    def own_ids(self, batch, training: bool) -> np.ndarray:
        """Each example's store id (-1: none), by example identity: its loader and position, or (in an
        inference forward) the InputExample object the entry was encoded from. Guids serve only for a
        training batch without identities."""
        guids = batch_guids(batch)
        if len(self.knn_store) == 0:
            return np.full(len(guids), -1, dtype=np.int64)
        uids = batch_example_ids(batch)
        if uids is None:
            return self.knn_store.ids_of(guids) if training else np.full(len(guids), -1, dtype=np.int64)
        if training and self._entry_of_uid:
            return np.array([self._entry_of_uid.get(int(u), -1) for u in uids], dtype=np.int64)
        return np.array([self._entry_of_uid.get(int(u), self._entry_of_example(int(u))) for u in uids],
                        dtype=np.int64)


    def _entry_of_example(self, uid: int) -> int:
        """The store id of the InputExample behind ``uid`` (the same object as an encoded one), else -1."""
        example = _example_at(uid)
        entry, held = self._example_entries.get(id(example), (-1, None))
        return entry if example is not None and held is example else -1


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


    def note_training_forward(self) -> bool:
        """Count a training forward (the store is stale from now on); whether it falls in the demonstration
        warm-up (see :meth:`warming_up`)."""
        self.stale = True
        warm = self.warming_up()
        self.training_forwards += 1
        return warm

    def warming_up(self) -> bool:
        """Whether this training forward falls in the demonstration warm-up (see :meth:`plan_training`)."""
        warmup = self.host.config.demo_warmup
        if warmup == 0 or not self.host.uses_neural_demos():
            return False
        if self.total_training_steps is None:
            raise ValueError(f"RetroConfig.demo_warmup={warmup} hides the demonstrations in the first {warmup:.0%} "
                             "of the training steps, and the model does not know how many there are: call "
                             "model.plan_training(total_steps) before training (e.g. epochs * len(train_loader))")
        return self.training_forwards < warmup * self.total_training_steps


    def update_gate(self) -> float:
        """Leave-one-out accuracy of :attr:`loss_store` by the configured read-out (each entry read without
        itself); the kNN loss term is active only above chance.

        Chance is the majority-class rate of the store. Returns the accuracy.
        """
        c, store = self.host.config, self.loss_store
        p = self.knn_distribution(store.keys, np.arange(len(store)), c.train_knn_k, c.readout_temperature(training=True),
                                  c.readout, c.knn_score_scale, c.class_mean_top_m, store=store)
        acc = float((p.argmax(-1) == store.labels).mean())
        chance = float(np.bincount(store.labels, minlength=self.host.num_classes).max() / len(store))
        self.knn_loss_active = (not c.knn_loss_gate) or acc > chance
        self.store_loo_accuracy = acc
        correct = int(round(acc * len(store)))
        self.loo_p_value = binomial_tail(correct, len(store), chance)
        return acc

    def load_keys(self, keys: np.ndarray, labels: np.ndarray, key_keys: Optional[np.ndarray] = None) -> None:
        """Rebuild the store (and the key store from ``key_keys``) from keys and labels alone (a state_dict's):
        entries' identities are unknown, so the next training forward rebuilds from the source."""
        if self.needs_mask_store:
            self.store.build(keys, labels)
        if key_keys is not None:
            self.key_store.build(key_keys, labels)
        self._entry_of_uid, self._example_entries, self._source_passes, self.stale = {}, {}, None, False
