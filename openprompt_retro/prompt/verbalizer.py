"""Retrieval for inference: KnnVerbalizer mixes the store's label distribution in.

    P(y|x) = lambda * p_kNN(y|x) + (1 - lambda) * p_PLM(y|x)      (probability space)

It wraps any OpenPrompt verbalizer and always returns log-probabilities over
classes, so OpenPrompt's loss and evaluation code keep working and
``exp(output)`` rows sum to 1:

    mixing      log(lambda * p_kNN + (1 - lambda) * softmax(z / T_plm))
    not mixing  log_softmax(z / T_plm)     (lambda = 0, or a training forward: T_plm = 1)

with z the wrapped verbalizer's output (log-probabilities for ManualVerbalizer,
where log_softmax is a no-op; raw logits for SoftVerbalizer). Cross-entropy is
unchanged by it: CE(log_softmax(z), y) = CE(z, y).

When kNN inference applies (the rule): in every forward that is not a training
forward. On its own, a training forward is one in training mode with gradients
enabled (``model.train()`` and not under ``torch.no_grad()``);
``RetroPromptForClassification`` decides for its forwards (see its docstring).
"""
from __future__ import annotations

from typing import Optional

import torch
from openprompt.prompt_base import Verbalizer

from ..core.knn import Mixture, mix
from ..core.readout import readout_distribution
from ..core.store import KnowledgeStore
from . import patches
from .batch import EXCLUDE_KEY, QUERY_KEY, batch_get
from .keys import MaskKeyHead
from .wrapping import PassThroughToBase

_EPS = 1e-12


#: what ``process_outputs(..., mixing=...)`` receives from callers that do not pass one (OpenPrompt's own)
OWN_RULE = object()


class KnnVerbalizer(PassThroughToBase, Verbalizer):
    """Wrap ``base`` (ManualVerbalizer, SoftVerbalizer, ...) with kNN inference.

    Args:
        base: the wrapped verbalizer.
        store: the knowledge store (may be attached later: ``verbalizer.store = ...``).
        plm: the PLM, to turn mask hidden states into store keys.
        k, temperature, lam: p_kNN's neighbours and temperature, and the mixing weight.
        mix_in_training: mix p_kNN in during training forwards too (default: inference forwards only).
        scale: "zscore" (scores standardised per query, scale-free) or "raw" (see core/knn.py).

    The query key is ``batch["retro_query_keys"]`` when the caller provides it
    (RetroPromptForClassification does, from its demonstration-free pass);
    otherwise it comes from the same forward pass, at the ``<mask>``.

    Every attribute and method of ``base`` that this class does not define is
    reachable through it (``group_parameters_1/2``, ``label_words_ids``, ...);
    ``label_words`` reads and sets the base's, and the calibration / projection
    methods that OpenPrompt's ``Verbalizer`` defines act on the base.
    """

    def __init__(self, base: Verbalizer, plm: torch.nn.Module, store: Optional[KnowledgeStore] = None,
                 k: int = 16, temperature: float = 1.0, lam: float = 0.5, mix_in_training: bool = False,
                 scale: str = "zscore"):
        patches.install()
        super().__init__(tokenizer=base.tokenizer, classes=base.classes, num_classes=base.num_classes)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
        self.base = base
        self.key_head = MaskKeyHead(plm)
        self.store = store
        self.k, self.temperature, self.lam, self.scale = int(k), float(temperature), float(lam), scale
        self.mix_in_training = mix_in_training
        self._base_gathers_tuple = False  # set by gather_outputs for process_outputs

    @property
    def label_words(self):
        return self.base.label_words

    @label_words.setter
    def label_words(self, label_words):
        if label_words is not None:
            self.base.label_words = label_words

    # Verbalizer defines these, so __getattr__ would not reach the base's versions
    def register_calibrate_logits(self, logits: torch.Tensor):
        return self.base.register_calibrate_logits(logits)

    def generate_parameters(self, **kwargs):
        return self.base.generate_parameters(**kwargs)

    def project(self, logits: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.base.project(logits, **kwargs)

    def normalize(self, logits: torch.Tensor) -> torch.Tensor:
        return self.base.normalize(logits)

    def aggregate(self, label_words_logits: torch.Tensor) -> torch.Tensor:
        return self.base.aggregate(label_words_logits)

    def handle_multi_token(self, label_words_logits, mask):
        return self.base.handle_multi_token(label_words_logits, mask)

    def _own_mixing(self) -> Optional[Mixture]:
        """This verbalizer's attributes, when this forward mixes by its own rule (module docstring), else None."""
        if not (self.training and torch.is_grad_enabled()) or self.mix_in_training:
            return Mixture(lam=self.lam, k=self.k, temperature=self.temperature, scale=self.scale)
        return None

    def gather_outputs(self, outputs):
        """(what the base gathers, last hidden states): one flat tuple, so that OpenPrompt's
        ``PromptForClassification`` extracts every element at the mask (a base that gathers a
        tuple itself, like ProtoVerbalizer, has its elements spliced in)."""
        hidden = outputs.hidden_states[-1]
        logits = getattr(outputs, "logits", None)
        if logits is not None and hidden.shape[1] > logits.shape[1]:
            hidden = hidden[:, hidden.shape[1] - logits.shape[1]:]  # SoftTemplate's prefix was stripped from logits
        gathered = self.base.gather_outputs(outputs)
        self._base_gathers_tuple = isinstance(gathered, tuple)
        return (*gathered, hidden) if self._base_gathers_tuple else (gathered, hidden)

    def knn_probs(self, query_keys: torch.Tensor, exclude_ids=None, k: Optional[int] = None,
                  temperature: Optional[float] = None, scale: Optional[str] = None, readout: str = "topk",
                  top_m: Optional[int] = None, logistic_c: float = 1.0,
                  store: Optional[KnowledgeStore] = None) -> torch.Tensor:
        """p_kNN(y|x) for query keys from ``store`` (default: this verbalizer's; k, T and the score scale default
        to its own too); ``readout``: "topk", "class-mean" or "logistic" (see :class:`~openprompt_retro.core.knn.Mixture`)."""
        store = self.store if store is None else store
        if store is None:
            raise ValueError("KnnVerbalizer has no knowledge store: build one (build_store) and set .store")
        q = query_keys.detach().float().cpu()
        if hasattr(exclude_ids, "detach"):
            exclude_ids = exclude_ids.detach().cpu()
        p = readout_distribution(readout, store, q.numpy(), temperature or self.temperature, exclude_ids,
                                 k or self.k, scale or self.scale, top_m, logistic_c)
        return torch.from_numpy(p).to(query_keys.device)

    def process_outputs(self, outputs, batch, mixing=OWN_RULE, **kwargs):
        """Log-probabilities over classes; ``mixing``: a :class:`~openprompt_retro.core.knn.Mixture` to mix by, None not to mix, or (not
        given) this verbalizer's own rule and attributes."""
        *base_outputs, hidden_at_mask = outputs
        base_outputs = tuple(base_outputs) if self._base_gathers_tuple else base_outputs[0]
        plm_out = self.base.process_outputs(base_outputs, batch=batch, **kwargs)
        if mixing is OWN_RULE:
            mixing = self._own_mixing()
        if mixing is not None and mixing.plm_temperature != 1.0:
            plm_out = torch.log_softmax(plm_out, dim=-1) / mixing.plm_temperature
        if mixing is None or mixing.lam == 0.0:
            return torch.log_softmax(plm_out, dim=-1)
        query = batch_get(batch, QUERY_KEY)
        if query is None:
            query = self.key_head(hidden_at_mask)
        p_knn = self.knn_probs(query, batch_get(batch, EXCLUDE_KEY), mixing.k, mixing.temperature, mixing.scale,
                               mixing.readout, mixing.top_m, mixing.logistic_c, mixing.store).to(plm_out.dtype)
        p = mix(torch.softmax(plm_out, dim=-1), p_knn, mixing.lam)
        return torch.log(p.clamp_min(_EPS))
