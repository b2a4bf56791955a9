"""Store keys that the trained model cannot memorise: mean-pooled embeddings of the raw input text.

    key(x) = m(x) / ||m(x)||,    m(x) = sum_t a_t h_t(x) / sum_t a_t

h_t: the encoder's last hidden states over the input's tokens, a_t: the attention mask. The input is the
example's raw text (``text_a``, with ``text_b`` as the second segment of a pair when present): no template,
no demonstrations. Keys have unit length, so inner products are cosines (a store with ``metric="cosine"``
or ``"ip"`` scores them alike).

Sentence pairs. By default (``relation = False``) a pair goes through the encoder as one input, so its key
says what the pair is about. With ``relation = True`` each segment is encoded alone, u = key(a), v = key(b),
and the key describes how they relate:

    key(a, b) = r / ||r||,    r = [cos(u, v), |u - v|, u * v]          (dimension 2 D + 1)

A store holds one kind of key: an encoder in relation mode encodes a single text as the pair (a, "").

Three encoders share this interface (``encode(examples) -> (n, D) float32``, ``describe() -> dict``):

- :class:`FrozenMeanEncoder`: a frozen copy of a PLM's base encoder, taken when it is built (before training).
- :class:`AdaptedMeanEncoder`: the same copy, first adapted to the training labels (:mod:`.key_adaptation`,
  SetFit's contrastive recipe), then frozen.
- :class:`SentenceEncoder`: any encoder ``AutoModel`` loads (a local folder or a hub name), e.g. an SBERT model.

Neither is a ``torch.nn.Module``: an encoder held as an attribute of a model is not one of its submodules, so
its weights are never in that model's ``parameters()``, optimizer, ``state_dict`` or ``.train()`` switch.
Imports torch and transformers only.
"""
from __future__ import annotations

import copy
import hashlib
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class MeanPoolEncoder:
    """Mean-pooled, L2-normalised last hidden states of ``model`` (kept frozen and in eval mode).

    Args:
        model: a transformers encoder whose forward returns ``last_hidden_state``.
        tokenizer: its tokenizer.
        max_length: tokens per input (pairs are truncated longest-first).
        batch_size: inputs per forward pass (inputs of similar length go together: little padding); the keys
            do not depend on it.
        progress: show a tqdm bar while encoding.
        kind, source: what :meth:`describe` records (the encoder type and its checkpoint).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int = 128, batch_size: int = 32,
                 progress: bool = False, kind: str = "mean", source: Optional[str] = None):
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size, self.progress = max_length, batch_size, progress
        self.kind, self.source = kind, source
        self.relation = False  # sentence pairs: one joint input (False) or relation features of the segments
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
            p.grad = None
        self._fingerprint: Optional[str] = None

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def dim(self) -> int:
        """The key dimension: D, or 2 D + 1 for relation keys."""
        return 2 * self.hidden_size + 1 if self.relation else self.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "MeanPoolEncoder":
        """Move the encoder's weights to ``device`` (keys are always returned on the CPU)."""
        self.model.to(device)
        return self

    def encode(self, examples: Sequence) -> np.ndarray:
        """Keys of OpenPrompt ``InputExample``-s (their ``text_a`` / ``text_b``), shape (n, D) float32."""
        missing = [i for i, ex in enumerate(examples) if not isinstance(getattr(ex, "text_a", None), str)]
        if missing:
            raise TypeError(f"encode needs examples with a text_a string (InputExample); items {missing[:5]} "
                            "have none")
        return self.encode_texts([ex.text_a for ex in examples], [getattr(ex, "text_b", None) for ex in examples])

    def encode_texts(self, texts_a: Sequence[str], texts_b: Optional[Sequence[Optional[str]]] = None) -> np.ndarray:
        """Keys of raw texts (``texts_b[i]``, where given and not empty, is the second segment of a pair; in
        relation mode each segment is encoded alone and the key is their relation features)."""
        texts_b = list(texts_b) if texts_b is not None else [None] * len(texts_a)
        if len(texts_b) != len(texts_a):
            raise ValueError(f"texts_b has {len(texts_b)} entries for {len(texts_a)} texts_a")
        if not self.relation:
            return self._mean_keys(texts_a, texts_b)
        segments = list(dict.fromkeys([*texts_a, *[b or "" for b in texts_b]]))  # each distinct text once
        keys = dict(zip(segments, self._mean_keys(segments, [None] * len(segments))))
        u = np.stack([keys[a] for a in texts_a]) if texts_a else np.zeros((0, self.hidden_size), np.float32)
        v = np.stack([keys[b or ""] for b in texts_b]) if texts_b else np.zeros((0, self.hidden_size), np.float32)
        return relation_features(torch.from_numpy(u), torch.from_numpy(v)).numpy()

    def segment_keys(self, texts: Sequence[str]) -> np.ndarray:
        """Plain mean-pooled unit keys of single texts (n, D) float32, whatever the pair mode."""
        return self._mean_keys(list(texts), [None] * len(texts))

    @torch.inference_mode()
    def _mean_keys(self, texts_a: Sequence[str], texts_b: Sequence[Optional[str]]) -> np.ndarray:
        """Mean-pooled unit keys of (pairs of) texts through the encoder, (n, D) float32."""
        self.model.eval()
        out = np.zeros((len(texts_a), self.hidden_size), dtype=np.float32)
        encoded = [self.tokenizer(a, b or None, truncation=True, max_length=self.max_length)
                   for a, b in zip(texts_a, texts_b)]  # a pair where an input has a text_b
        order = np.argsort([len(e["input_ids"]) for e in encoded], kind="stable")  # batches of similar length
        starts = range(0, len(order), self.batch_size)
        for s in tqdm(starts, desc=f"{self.kind} keys", disable=not self.progress, leave=False):
            rows = order[s:s + self.batch_size]
            batch = self._pad([encoded[i] for i in rows])
            hidden = self.model(**batch).last_hidden_state
            out[rows] = mean_pool(hidden, batch["attention_mask"]).float().cpu().numpy()
        return out

    def pooled(self, texts_a: Sequence[str], texts_b: Optional[Sequence[Optional[str]]] = None) -> torch.Tensor:
        """Mean-pooled unit keys (B, D) with gradients, in the model's current mode (key adaptation)."""
        texts_b = list(texts_b) if texts_b is not None else [None] * len(texts_a)
        batch = self._pad([self.tokenizer(a, b or None, truncation=True, max_length=self.max_length)
                           for a, b in zip(texts_a, texts_b)])
        return mean_pool(self.model(**batch).last_hidden_state, batch["attention_mask"])

    def _pad(self, encoded: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        """Tokenized inputs right-padded into one batch on the encoder's device."""
        width = max(len(e["input_ids"]) for e in encoded)
        pad = {"input_ids": self.tokenizer.pad_token_id or 0}
        return {name: torch.tensor([list(e[name]) + [pad.get(name, 0)] * (width - len(e[name])) for e in encoded],
                                   device=self.device)
                for name in encoded[0].keys()}

    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of the names, dtypes, shapes and bytes of the weights the keys depend on
        (not a pooler's: mean pooling never reads it, and a checkpoint without one gets a random one each load)."""
        if self._fingerprint is None:
            self._fingerprint = weights_sha256(self.model.state_dict())
        return self._fingerprint

    def identity(self) -> Dict[str, object]:
        """What a saved run records of its key encoder and a model must share to load it: :meth:`describe`
        without ``source`` (the same weights may be loaded from different paths) and without the pair mode
        (``dim`` is the encoder's hidden size; the mode is the run's config, checked with its key store)."""
        out = {k: v for k, v in self.describe().items() if k not in ("source", "pairs")}
        out["dim"] = self.hidden_size
        return out

    def store_identity(self) -> Dict[str, object]:
        """What a key store built by this encoder records (``built_by``): :meth:`describe`, with the pair mode and
        the key dimension (loading checks every field but ``source``)."""
        return self.describe()

    def forget_fingerprint(self) -> None:
        """Recompute :meth:`fingerprint` at its next call (after the weights were replaced)."""
        self._fingerprint = None

    def describe(self) -> Dict[str, object]:
        """What built the keys (JSON-able), e.g. for ``KnowledgeStore(built_by=...)``: a saved store records it
        and ``KnowledgeStore.load(expected_built_by=...)`` refuses a store built by another encoder."""
        out = {"key_encoder": self.kind, "source": self.source, "architecture": type(self.model).__name__,
               "dim": self.dim, "pooling": "mean", "normalization": "l2", "max_length": self.max_length,
               "weights_sha256": self.fingerprint()}
        if self.relation:
            out["pairs"] = "relation"
        return out


def differs_from_checkpoint(base: torch.nn.Module, prefix: str, source: Optional[str]) -> Optional[bool]:
    """Whether ``base``'s weights differ from those in the local checkpoint folder ``source`` (its
    model.safetensors; keys with or without the model's ``prefix``), or None when there is none to read."""
    import os

    path = os.path.join(str(source or ""), "model.safetensors")
    if not source or not os.path.isfile(path):
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            names = set(f.keys())
            for name, t in base.state_dict().items():
                if _unused(name):
                    continue
                stored = f"{prefix}.{name}" if f"{prefix}.{name}" in names else name
                if stored not in names:
                    return None  # not this model's checkpoint layout: cannot tell
                if not torch.equal(f.get_tensor(stored).to(t.dtype), t.detach().cpu()):
                    return True
    except (SafetensorError, OSError, RuntimeError):
        return None
    return False


def weights_sha256(state: Dict[str, torch.Tensor]) -> str:
    """sha256 (first 16 hex digits) of a state dict's names, dtypes, shapes and bytes, a pooler's left out: the
    fingerprint of a key encoder's weights, wherever they are (a model, a saved file, a checkpoint)."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        if _unused(name):
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _unused(name: str) -> bool:
    """Weights mean-pooled keys never read: a [CLS] pooler."""
    return name.startswith("pooler.") or ".pooler." in name


def relation_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """r / ||r|| with r = [cos(u, v), |u - v|, u * v] for unit rows u, v (B, D) -> (B, 2 D + 1)."""
    cos = (u * v).sum(-1, keepdim=True)
    return F.normalize(torch.cat([cos, (u - v).abs(), u * v], dim=-1), dim=-1)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """m / ||m|| with m = sum_t a_t h_t / sum_t a_t: (B, L, D), (B, L) -> (B, D)."""
    a = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return F.normalize((hidden * a).sum(1) / a.sum(1).clamp(min=1.0), dim=-1)


class FrozenMeanEncoder(MeanPoolEncoder):
    """Mean-pooled keys from a frozen copy of ``plm``'s base encoder, taken when this is built.

    Build it before training: the copy keeps the pre-trained weights whatever later happens to ``plm``
    (its parameters are separate tensors, ``requires_grad=False``, in eval mode, without the PLM's forward
    hooks; see the module docstring for why no optimizer or ``state_dict`` of a model holding it sees them).

    Memory: one extra copy of the base encoder's weights on ``plm``'s device (the LM head is not copied):
    about 4 bytes per parameter in float32, e.g. ~440 MB for BERT-base / ~500 MB for RoBERTa-base,
    ~1.4 GB for RoBERTa-large; no optimizer state and no activations kept for backward.
    """

    def __init__(self, plm: torch.nn.Module, tokenizer, max_length: int = 128, batch_size: int = 32,
                 progress: bool = False):
        base = getattr(plm, "base_model", None)
        if not isinstance(base, torch.nn.Module) or not hasattr(getattr(base, "config", None), "hidden_size"):
            raise TypeError(f"FrozenMeanEncoder needs a transformers PreTrainedModel, got {type(plm).__name__}")
        frozen = copy.deepcopy(base)
        for module in frozen.modules():  # hooks on the PLM (e.g. injecting demonstrations) belong to the trained model
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        super().__init__(frozen, tokenizer, max_length, batch_size, progress, kind="frozen-mean",
                         source=getattr(plm.config, "_name_or_path", None) or type(plm).__name__)
        #: the PLM given had been trained: its weights differ from its checkpoint's (None: no local checkpoint
        #: to compare with). A run then saves this copy, which the checkpoint cannot give back.
        self.trained_copy = differs_from_checkpoint(base, getattr(plm, "base_model_prefix", ""), self.source)
        if self.trained_copy:
            warnings.warn(f"the PLM given to build this model differs from its checkpoint {self.source!r} (it was "
                          "trained already, e.g. by an earlier cell or model): the frozen key encoder is a copy of "
                          "these trained weights, not the pre-trained ones. Saved runs keep this copy; load the PLM "
                          "afresh (load_plm) for keys from the pre-trained weights", stacklevel=4)


class AdaptedMeanEncoder(FrozenMeanEncoder):
    """A frozen copy of ``plm``'s base encoder, as :class:`FrozenMeanEncoder`, that :meth:`adapt` first fine-tunes
    on labelled training examples (:mod:`.key_adaptation`): the keys then separate the classes the way the labels
    do, and stay fixed while the PLM trains (the store still cannot memorise what the model learns).

    Until :meth:`adapt` runs it encodes exactly as :class:`FrozenMeanEncoder` does.
    """

    def __init__(self, plm: torch.nn.Module, tokenizer, max_length: int = 128, batch_size: int = 32,
                 progress: bool = False):
        super().__init__(plm, tokenizer, max_length, batch_size, progress)
        self.kind = "adapted"
        self.adaptation: Optional[Dict[str, object]] = None  # what adapt() did (None: not adapted yet)

    def identity(self) -> Dict[str, object]:
        """As :meth:`MeanPoolEncoder.identity`, without the weights: a run's adapted weights travel with it (their
        checksum is checked against its key store), and a model built to load it has not been adapted yet."""
        return {k: v for k, v in super().identity().items() if k not in ("weights_sha256", "adapted", "adaptation")}

    def restore(self, state: Dict[str, torch.Tensor], adaptation: Optional[Dict[str, object]] = None) -> None:
        """Put saved adapted weights in place (strict: every name and shape must fit), frozen as after :meth:`adapt`."""
        self.model.load_state_dict(state, strict=True)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.forget_fingerprint()
        self.adaptation = dict(adaptation or {"restored": True})

    @property
    def adapted(self) -> bool:
        return self.adaptation is not None

    def adapt(self, examples: Sequence, steps: int, lr: float, batch_size: int, seed: int,
              pairs: bool = True) -> Dict[str, object]:
        """Fine-tune on labelled InputExamples (their texts and labels only), then freeze; returns what was done.
        ``pairs=False``: relation keys of sentence pairs stay pre-trained (nothing is trained)."""
        from .key_adaptation import adapt_encoder

        if not examples:
            raise ValueError("key adaptation needs labelled training examples, got none")
        if self.relation and not pairs:
            self.adaptation = {"examples": len(examples), "steps": 0, "objective": "none (pairs kept pre-trained)"}
        else:
            self.adaptation = adapt_encoder(self, list(examples), steps, lr, batch_size, seed, progress=self.progress)
        return self.adaptation

    def describe(self) -> Dict[str, object]:
        out = super().describe()
        out["adapted"] = self.adapted
        if self.adaptation is not None:
            out["adaptation"] = self.adaptation
        return out


class SentenceEncoder(MeanPoolEncoder):
    """Mean-pooled keys from an encoder loaded with ``AutoModel`` / ``AutoTokenizer.from_pretrained``:
    ``path_or_name`` is a local folder (offline) or a hub name, with safetensors weights (pickled weights are
    never loaded). ``device``: where its weights go."""

    def __init__(self, path_or_name: str, max_length: int = 128, batch_size: int = 32, progress: bool = False,
                 device="cpu"):
        import os

        from transformers import AutoModel, AutoTokenizer

        path = os.path.expanduser(str(path_or_name))
        if (os.path.isabs(path) or path.startswith(".") or path.count("/") > 1) and not os.path.isdir(path):
            raise ValueError(f"no sentence encoder folder at {path_or_name!r} (was it moved? give its new place: "
                             "RetroConfig(key_encoder_path=...), or from_pretrained(dir, key_encoder_path=...))")
        if os.path.isdir(path) and not any(n.endswith(".safetensors") for n in os.listdir(path)):
            pickled = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")))
            raise ValueError(f"cannot load a sentence encoder from {path_or_name!r}: it holds no .safetensors "
                             f"weights{f' (only {pickled[:3]}: pickled weights are never loaded)' if pickled else ''}"
                             "; save the model with safetensors (model.save_pretrained(...) does by default)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path_or_name)
            model = AutoModel.from_pretrained(path_or_name, use_safetensors=True)  # never unpickle weights
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot load a sentence encoder from {path_or_name!r}: {first}") from None
        super().__init__(model.to(device), tokenizer, max_length, batch_size, progress, kind="sentence",
                         source=str(path_or_name))


__all__: List[str] = ["MeanPoolEncoder", "FrozenMeanEncoder", "AdaptedMeanEncoder", "SentenceEncoder", "mean_pool",
                       "relation_features", "weights_sha256"]
