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

import dataclasses
import json

from contextlib import contextmanager
from typing import Dict, Optional

import numpy as np
import torch
from openprompt import PromptForClassification
from openprompt.pipeline_base import PromptModel
from openprompt.prompt_base import Template, Verbalizer
from openprompt.prompts import ManualTemplate, MixedTemplate, SoftTemplate
from transformers.modeling_outputs import MaskedLMOutput

from ..core.config import RetroConfig
from ..core.knn import Mixture
from ..core.loss import knn_guided_loss, knn_loss_weights
from ..core.store import KnowledgeStore, StoreError
from . import patches
from .batch import (DEMO_KEY, EXCLUDE_KEY, QUERY_KEY, batch_get)
from .keys import (MaskKeyHead, demonstrations_off, encode_last_hidden, hidden_at_mask)
from .prediction import Prediction, default_wrapper_class
from .retrieval import Retriever, check_batch_template, shape_demonstrations
from .store_lifecycle import ModelHost, StoreLifecycle, make_key_encoder
from .template import RetroTemplate
from .verbalizer import KnnVerbalizer

_FAST_TEMPLATES = (ManualTemplate, MixedTemplate, SoftTemplate)
#: state_dict() entries that carry the store: keys (n, D) float32 and labels (n,) int64
STORE_STATE_KEYS = ("retro_store.keys", "retro_store.labels")
#: the key store's keys (n, D_key) float32, with a key encoder other than "mask" (its labels are the store's),
#: and the fingerprint of the encoder that built them (uint8 bytes of its weights' sha256 prefix)
KEY_STORE_STATE_KEY, KEY_ENCODER_STATE_KEY = "retro_key_store.keys", "retro_key_store.encoder_sha256"
#: the RetroConfig (with the tuned lambda, k, T and read-out temperatures) as UTF-8 JSON bytes in a uint8 tensor
CONFIG_STATE_KEY = "retro_config.json"
#: the store's leave-one-out p-value against chance (float64; -1: unknown), the untuned mixture's guard
LOO_STATE_KEY = "retro_store.loo_p_value"
#: adapted keys: the adapted encoder's weights travel under this prefix (the PLM cannot give them back)
KEY_ENCODER_PREFIX = "retro_key_encoder."
#: RetroConfig fields fixed when the model is built (the key encoder is made then)
_BUILD_TIME_FIELDS = ("key_encoder", "key_encoder_path")


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


class RetroPromptForClassification(Prediction, PromptForClassification):
    """Drop-in for ``PromptForClassification`` with RetroPrompt's three retrievals.

    Args:
        plm, template, verbalizer, freeze_plm, plm_eval_mode: as for
            ``PromptForClassification``, in the same positions. A plain template is
            wrapped in ``RetroTemplate(demonstrations="none")``, a plain verbalizer
            in ``KnnVerbalizer``. A ``RetroTemplate`` without label words takes
            the verbalizer's (one per class; their counts must agree).
        config: :class:`RetroConfig` (keyword only).
        wrapper_class, max_seq_length: how :meth:`predict_proba` / :meth:`explain` / :meth:`add_examples`
            tokenize InputExamples (keyword only; the wrapper class defaults to OpenPrompt's for the PLM).

    The knowledge store looks after itself:

    * it is built from the training data: the loader given to :meth:`attach`
      (or :meth:`refresh_store`), else the ``PromptDataLoader`` that the first
      training batch came from (a warning names it);
    * it is rebuilt with the current encoder at the first training forward of
      every pass over that loader (each ``iter(loader)``), and before the first
      inference forward that follows training forwards;
    * it travels in ``state_dict()`` (keys and labels, as tensors).

    With ``config.key_encoder`` other than "mask" a second store, keyed by that encoder (a frozen copy of
    the pre-trained encoder taken here, or a sentence encoder), holds the same entries: kNN inference and
    the kNN-guided loss read it (:attr:`knn_store`), its keys never change, and the [MASK] store is kept
    only for neural demonstrations (see :mod:`.store_lifecycle`).

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
                 plm_eval_mode: bool = False, *, config: Optional[RetroConfig] = None, wrapper_class=None,
                 max_seq_length: int = 128):
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
        key_encoder = make_key_encoder(config, plm, verbalizer.tokenizer)  # frozen copy of the weights given
        if key_encoder is not None and template.demonstrations == "text":
            # LM-BFF's demonstrations chosen by the key encoder, set before take_from tokenizes the loaders
            # that wait for the label words
            template.set_text_encoder(key_encoder)
        template.take_from(verbalizer, plm)
        if not isinstance(verbalizer, KnnVerbalizer):
            verbalizer = KnnVerbalizer(verbalizer, plm)
        super().__init__(plm, template, verbalizer, freeze_plm=freeze_plm, plm_eval_mode=plm_eval_mode)
        self.prompt_model.__class__ = _RetroPromptModel
        self.prompt_model._owner = [self]
        self.config = config
        self.mask_only_head = True  # see _main_pass; False runs OpenPrompt's full-sequence head
        self.exclude_self_in_eval = False  # True: an entry never answers for the example it holds, in eval too
        self.last_loss_weights: Optional[torch.Tensor] = None
        self.demo_ablation: Optional[str] = None  # diagnostics: "permute" d_c across classes
        self._demo_gen = torch.Generator().manual_seed(0)  # demo_dropout's draws
        self._store_in_state_dict = True  # False inside store_outside_state_dict()
        self.key_head = MaskKeyHead(plm)
        self.lifecycle = StoreLifecycle(ModelHost(self), self.key_head, key_encoder)  # the store and when it is rebuilt
        self.retriever = Retriever(self.lifecycle)  # what each batch retrieves
        self.wrapper_class = wrapper_class or default_wrapper_class(plm)  # how predict() tokenizes examples
        self.max_seq_length = int(max_seq_length)
        self.example_tokenizer = None  # None: the template's
        self.apply_config()

    # ---------------------------------------------------------------- config
    def _key_dim(self) -> int:
        return int(self.plm.config.hidden_size)

    @property
    def num_classes(self) -> int:
        return self.verbalizer.num_classes

    def apply_config(self, **overrides) -> RetroConfig:
        """Update config fields (e.g. the tuned lambda/k/T). The config is the one place they live: the model's
        forwards hand them to the verbalizer per call (:meth:`mixing`). A ``knn_lambda`` given without
        ``lambda_from_dev=True`` counts as set by hand (see :attr:`effective_lambda`)."""
        for key in overrides:
            if not hasattr(self.config, key):
                raise ValueError(f"unknown RetroConfig field {key!r}")
            if key in _BUILD_TIME_FIELDS and overrides[key] != getattr(self.config, key):
                raise ValueError(f"{key} is fixed when the model is built (the key encoder is made then): build "
                                 f"a new model with RetroConfig({key}={overrides[key]!r})")
        if "knn_lambda" in overrides and "lambda_from_dev" not in overrides:
            overrides["lambda_from_dev"] = False  # a lambda set by hand: the leave-one-out guard applies
        dataclasses.replace(self.config, **overrides).validate()  # a rejected value never reaches the model
        for key, value in overrides.items():
            setattr(self.config, key, value)
        self.config.validate()
        return self.config

    def mixing(self) -> Mixture:
        """How an inference forward mixes p_kNN in: the config's settings (the read-out's own temperature) and the
        store to read, handed to the verbalizer with every call."""
        c = self.config
        return Mixture(lam=self.effective_lambda, k=c.knn_k, temperature=c.readout_temperature(),
                       plm_temperature=c.plm_temperature, scale=c.knn_score_scale, readout=c.readout,
                       top_m=c.class_mean_top_m, logistic_c=c.logistic_c, store=self.knn_store)

    @property
    def effective_lambda(self) -> float:
        """The lambda inference mixes with: ``config.knn_lambda``, or 0 while the guard holds the store back. A
        lambda chosen on dev passed the dev guard already; any other (the default, one set by hand) needs the
        store's leave-one-out accuracy to beat chance (``store_guard_alpha``; not yet known: no guard)."""
        c, p = self.config, self.lifecycle.loo_p_value
        if c.lambda_from_dev or c.store_guard_alpha is None or p is None or p < c.store_guard_alpha:
            return c.knn_lambda
        return 0.0

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

    # ---------------------------------------------------------------- store (see store_lifecycle.py)
    # The model's public face of its store, as CLIP's models have it; everything else is asked of
    # ``self.lifecycle`` (the store's bookkeeping) or ``self.retriever`` (what a batch retrieves).
    @property
    def store(self) -> KnowledgeStore:
        return self.lifecycle.store

    @store.setter
    def store(self, store: KnowledgeStore) -> None:
        self.lifecycle.store = store

    @property
    def knn_store(self) -> KnowledgeStore:
        """The store kNN inference and the kNN loss read: the key encoder's, or the [MASK] store."""
        return self.lifecycle.knn_store

    @property
    def key_encoder(self):
        """The encoder of the store's keys (None: the [MASK] keys of the model being trained)."""
        return self.lifecycle.key_encoder

    @property
    def knn_loss_active(self) -> bool:
        """Whether the kNN weights apply (the gate, recomputed after every store build)."""
        return self.lifecycle.knn_loss_active

    @knn_loss_active.setter
    def knn_loss_active(self, value: bool) -> None:
        self.lifecycle.knn_loss_active = bool(value)

    @property
    def store_loo_accuracy(self) -> Optional[float]:
        """The store's leave-one-out kNN accuracy (the gate's and the guard's input; None before a build)."""
        return self.lifecycle.store_loo_accuracy

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
        """Recompute every key with the current encoder (see :meth:`.StoreLifecycle.refresh`)."""
        return self.lifecycle.refresh(dataloader, progress)

    def add_to_store(self, dataloader, progress: bool = True) -> np.ndarray:
        """Add labeled examples to the store without retraining; returns their ids (:meth:`.StoreLifecycle.add`)."""
        return self.lifecycle.add(dataloader, progress)

    def plan_training(self, total_steps: int) -> None:
        """Say how many training steps follow (demo_warmup's denominator; :meth:`.StoreLifecycle.plan_training`)."""
        self.lifecycle.plan_training(total_steps)

    def is_training_forward(self, batch) -> bool:
        """Whether a forward on ``batch`` now is a training forward (the rule in the class docstring)."""
        return self.training and torch.is_grad_enabled() and self.lifecycle.is_training_batch(batch)

    # ---------------------------------------------------------------- state_dict
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
        self.lifecycle.sync()
        keys_name, labels_name = STORE_STATE_KEYS
        destination[prefix + CONFIG_STATE_KEY] = torch.tensor(list(json.dumps(self.config.to_dict()).encode("utf-8")),
                                                              dtype=torch.uint8)
        destination[prefix + keys_name] = torch.from_numpy(np.array(self.store.keys, dtype=np.float32))
        p = self.lifecycle.loo_p_value
        destination[prefix + LOO_STATE_KEY] = torch.tensor(-1.0 if p is None else p, dtype=torch.float64)
        destination[prefix + labels_name] = torch.from_numpy(np.array(self.knn_store.labels, dtype=np.int64))
        if self.lifecycle.key_store is not None:
            destination[prefix + KEY_STORE_STATE_KEY] = torch.from_numpy(
                np.array(self.lifecycle.key_store.keys, dtype=np.float32))
            destination[prefix + KEY_ENCODER_STATE_KEY] = torch.tensor(
                list(bytes.fromhex(self.key_encoder.fingerprint())), dtype=torch.uint8)
        if getattr(self.key_encoder, "adapted", False):
            for name, t in self.key_encoder.model.state_dict().items():
                destination[prefix + KEY_ENCODER_PREFIX + name] = t if keep_vars else t.detach()

    def _restore_adapted_encoder(self, state_dict, prefix, key_keys, error_msgs) -> bool:
        """Put a state_dict's adapted key-encoder weights (and the pair mode its key store implies) in place;
        False (with the reason in ``error_msgs``) when they do not fit this model."""
        from .key_encoders import weights_sha256

        start = prefix + KEY_ENCODER_PREFIX
        state = {k[len(start):]: v for k, v in state_dict.items() if k.startswith(start)}
        encoder = self.key_encoder
        if state and getattr(encoder, "kind", None) != "adapted":
            error_msgs.append(f"{start}*: the state_dict holds an adapted key encoder, this model's key_encoder is "
                              f"{self.config.key_encoder!r}")
            return False
        if key_keys is not None and encoder is not None and key_keys.shape[1] != encoder.dim:
            relation = key_keys.shape[1] == 2 * encoder.hidden_size + 1
            if not relation and key_keys.shape[1] != encoder.hidden_size:
                error_msgs.append(f"{prefix + KEY_STORE_STATE_KEY}: keys of dimension {key_keys.shape[1]}, this "
                                  f"model's key encoder gives {encoder.hidden_size} (or {2 * encoder.hidden_size + 1} "
                                  "for sentence-pair relation keys)")
                return False
            encoder.relation = relation
            self.config.pair_keys = "relation" if relation else "joint"
            self.lifecycle._replace_key_store()
            self.lifecycle.forget_keys()
        if not state:
            return True
        own = encoder.model.state_dict()
        wrong = sorted(set(own) ^ set(state)) + sorted(k for k in set(own) & set(state)
                                                        if own[k].shape != state[k].shape)
        if wrong:
            error_msgs.append(f"{start}*: {len(wrong)} weights do not fit this model's key encoder, e.g. {wrong[:3]}")
            return False
        if not encoder.adapted or weights_sha256(state) != encoder.fingerprint():
            encoder.restore({k: v.detach().cpu() for k, v in state.items()})
            self.lifecycle.forget_keys()
        return True

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Rebuild the store from a state_dict's keys and labels (a state_dict without them leaves it as is)."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        names = [prefix + n for n in STORE_STATE_KEYS]
        key_name, sha_name = prefix + KEY_STORE_STATE_KEY, prefix + KEY_ENCODER_STATE_KEY
        config_name, loo_name = prefix + CONFIG_STATE_KEY, prefix + LOO_STATE_KEY
        unexpected_keys[:] = [k for k in unexpected_keys if k not in names + [key_name, sha_name, config_name, loo_name]
                              and not k.startswith(prefix + KEY_ENCODER_PREFIX)]
        if config_name in state_dict and not self._load_config_state(state_dict[config_name], config_name, error_msgs):
            return
        if not all(n in state_dict for n in names):
            return
        keys, labels = (state_dict[n].detach().cpu() for n in names)
        keyed = self.lifecycle.key_store is not None
        if keyed != (key_name in state_dict):
            error_msgs.append(f"{key_name}: this model's key_encoder is {self.config.key_encoder!r}, and the "
                              f"state_dict {'lacks' if keyed else 'has'} the key store a key encoder builds")
            return
        key_keys = state_dict[key_name].detach().cpu().float().numpy() if keyed else None
        if not self._restore_adapted_encoder(state_dict, prefix, key_keys, error_msgs):
            return
        if keyed and sha_name in state_dict:
            saved = bytes(state_dict[sha_name].detach().cpu().to(torch.uint8).tolist()).hex()
            if saved != self.key_encoder.fingerprint():
                error_msgs.append(f"{key_name}: the key store was built by a key encoder with weights {saved}, this "
                                  f"model's has {self.key_encoder.fingerprint()} (its frozen copy was taken from "
                                  "other weights, e.g. a PLM already trained): build the model from the "
                                  "pre-trained PLM the checkpoint's model was built from")
                return
        try:
            self.lifecycle.load_keys(keys.float().numpy(), labels.long().numpy(), key_keys)
        except StoreError as e:
            error_msgs.append(f"{names[0]} / {names[1]}: {e}")
            return
        if loo_name in state_dict:
            p = float(state_dict[loo_name])
            self.lifecycle.loo_p_value = p if 0.0 <= p <= 1.0 else None

    def _load_config_state(self, tensor, name: str, error_msgs) -> bool:
        """Take a state_dict's RetroConfig (the tuned inference settings with it); its build-time fields must
        be this model's. False, with the reason in ``error_msgs``, when it cannot be read or does not fit."""
        try:
            saved = RetroConfig.from_dict(json.loads(bytes(tensor.detach().cpu().to(torch.uint8).tolist())
                                                     .decode("utf-8")))
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            error_msgs.append(f"{name}: not a RetroConfig ({e})")
            return False
        differ = [f for f in _BUILD_TIME_FIELDS if getattr(saved, f) != getattr(self.config, f)]
        if differ:
            error_msgs.append(f"{name}: the checkpoint's model was built with "
                              + ", ".join(f"{f}={getattr(saved, f)!r}" for f in differ) + ", this one with "
                              + ", ".join(f"{f}={getattr(self.config, f)!r}" for f in differ))
            return False
        self.apply_config(**{k: v for k, v in saved.to_dict().items() if k not in _BUILD_TIME_FIELDS})
        return True

    # ---------------------------------------------------------------- forward
    def prepare_batch(self, batch, need_query: Optional[bool] = None, training: Optional[bool] = None):
        """A copy of ``batch`` with query keys, exclusions and demonstrations attached (:class:`.retrieval.Retriever`).

        ``training`` says whether this is a training forward (default: :meth:`is_training_forward`).
        ``need_query`` forces (True) or skips (False) the query key; by default it
        is computed when the loss or the verbalizer will use it.
        """
        check_batch_template(self.template, batch)
        if training is None:
            training = self.is_training_forward(batch)
        if need_query is None:
            need_query = self.config.loss != "ce" if training else self.config.knn_lambda > 0
        return self.retriever(batch, training, need_query)[0]

    def _shape_demonstrations(self, demos: torch.Tensor, hidden: bool = False) -> torch.Tensor:
        """The configured variants of d_c (:func:`.retrieval.shape_demonstrations`); all zero when ``hidden``."""
        dropout = self._demo_gen if self.training and self.config.demo_dropout > 0 else None
        return shape_demonstrations(demos, self.store, self.config, self.plm, permute=self.demo_ablation == "permute",
                                    hidden=hidden, dropout=dropout)

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

        ``mix``: whether the verbalizer mixes p_kNN in, by the config's :class:`~openprompt_retro.core.knn.Mixture` (None: its own rule).
        """
        outputs, mask_batch = self._main_pass(batch)
        outputs = self.verbalizer.gather_outputs(outputs)
        at_mask = [self._at_mask(o, mask_batch) for o in outputs]
        if mix is None:
            logits = self.verbalizer.process_outputs(at_mask, batch=batch)
        else:
            logits = self.verbalizer.process_outputs(at_mask, batch=batch, mixing=self.mixing() if mix else None)
        query = batch[QUERY_KEY]
        if query is None:
            query = self.key_head(at_mask[-1])  # KnnVerbalizer gathers the hidden states last
        return logits, query

    def _knn_gold(self, batch, query, labels) -> torch.Tensor:
        """p_kNN(y_i | x_i) with each example's own entry left out (1 where the label is missing). With adapted
        keys it is read from the loss store (the entries' keys before adapting) at each example's own entry;
        an example without one there gets 1."""
        c, lifecycle = self.config, self.lifecycle
        if lifecycle.loss_store is lifecycle.knn_store:
            p_knn = self.knn_probs(query, batch[EXCLUDE_KEY], c.train_knn_k, c.readout_temperature(training=True))
        else:
            store = lifecycle.loss_store
            own = batch[EXCLUDE_KEY]
            own = np.full(labels.shape[0], -1) if own is None else own.detach().cpu().numpy().astype(np.int64)
            known = (own >= 0) & (own < len(store))
            p_knn = torch.ones(labels.shape[0], self.num_classes, device=labels.device)
            if known.any():
                p = lifecycle.knn_distribution(store.keys[own[known]], own[known], c.train_knn_k,
                                               c.readout_temperature(training=True), c.readout, c.knn_score_scale,
                                               c.class_mean_top_m, store=store)
                p_knn[torch.from_numpy(known).to(labels.device)] = torch.from_numpy(p).to(p_knn)
        p = p_knn.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
        return torch.where(labels >= 0, p, torch.ones_like(p))

    def training_loss_weights(self):
        """(w, p) for every training entry, as a training forward weighs it: p_i = p_kNN(y_i|x_i) read from the
        loss store without entry i, and w_i its kNN-guided loss weight (capped at ``max_loss_weight``; 1 while
        the gate is off). Both (n,) tensors, in store order."""
        c, lifecycle = self.config, self.lifecycle
        store = lifecycle.loss_store
        p = lifecycle.knn_distribution(store.keys, np.arange(len(store)), c.train_knn_k,
                                       c.readout_temperature(training=True), c.readout, c.knn_score_scale,
                                       c.class_mean_top_m, store=store)
        gold = torch.from_numpy(p[np.arange(len(store)), store.labels])
        kind = c.loss if self.knn_loss_active else "ce"
        return knn_loss_weights(gold, kind, c.loss_beta, c.focal_gamma, c.max_loss_weight), gold

    def forward(self, batch) -> torch.Tensor:
        """Log-probabilities over classes: kNN-mixed in an inference forward when lambda > 0.

        In a training forward with ``config.loss != "ce"``, backward weights each
        example by its kNN-guided loss weight (see the class docstring).
        """
        training = self.is_training_forward(batch)
        batch = self.prepare_batch(batch, training=training)
        logits, query = self.forward_with_keys(batch, mix=not training and len(self.knn_store) > 0)
        labels = batch_get(batch, "label")
        c = self.config
        if (training and c.loss != "ce" and self.knn_loss_active and logits.requires_grad
                and torch.is_tensor(labels) and len(self.knn_store)):
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
        if c.loss != "ce" and len(self.knn_store) == 0:
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

    # ---------------------------------------------------------------- disk
    def save(self, directory: str, save_plm: bool = False, model_type: Optional[str] = None,
             plm_name_or_path: Optional[str] = None, extra_json: Optional[Dict] = None) -> None:
        """Save the run: weights (safetensors), config (JSON), store, and run.json describing it.

        run.json records the fingerprint that :meth:`load` checks and what
        :meth:`from_pretrained` needs to rebuild the model from the folder alone:
        the PLM's OpenPrompt model type and name/path (inferred; override with
        ``model_type`` / ``plm_name_or_path``), template class and text, label
        words, verbalizer, demonstration mode. ``save_plm=True`` also writes the
        PLM and tokenizer to ``plm/`` (``save_pretrained``), so the folder needs
        nothing else - for tiny or local models. Text demonstrations also save
        their pool (``text_pool.json``). ``extra_json`` ({file name: JSON-able value}) adds files to the
        same folder, which is written beside the old one and swapped in as a whole.
        """
        from . import saved_run

        self.lifecycle.sync()
        saved_run.save_run(self, directory, save_plm=save_plm, model_type=model_type, name_or_path=plm_name_or_path,
                           extra_json=extra_json)

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
                        text_pool=None, key_encoder_path: Optional[str] = None) -> "RetroPromptForClassification":
        """Rebuild a saved run from its folder alone: PLM, tokenizer, template, verbalizer, config, store, weights.

        The PLM comes from ``plm/`` when the run was saved with ``save_plm=True``,
        else from the name/path in run.json (``plm_path`` overrides it, e.g. a
        local copy). Rebuilds ManualTemplate / MixedTemplate / SoftTemplate with
        ManualVerbalizer / SoftVerbalizer (what the factory builds is
        ManualTemplate + ManualVerbalizer); for other classes build the model as
        before and call :meth:`load`. Predictions are bit-identical to the saved model's.
        ``key_encoder_path``: where a run's sentence encoder (``key_encoder="sentence"``) is now, when it moved.
        """
        from . import rebuild, saved_run

        with saved_run.pinned(directory):  # every file from one checkpoint, even while it is being re-saved
            model, tokenizer, wrapper = rebuild.rebuild_run(directory, cls=cls, plm_path=plm_path,
                                                          model_type=model_type, text_pool=text_pool,
                                                          key_encoder_path=key_encoder_path)
            model.set_tokenization(wrapper, saved_run.saved_max_seq_length(directory), tokenizer)
        return model
