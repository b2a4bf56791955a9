"""The method's configs (PEFT-style): :class:`LossConfig`, shared by text and CLIP, and :class:`RetroConfig`."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Dict, Optional

LOSSES = ("ce", "knn", "focal")
#: what builds the store's keys: the trained model's [MASK] state (refreshed), a frozen copy of the pre-trained
#: encoder (mean-pooled raw text), that copy first adapted to the training labels, or a separate sentence
#: encoder loaded from ``key_encoder_path``
KEY_ENCODERS = ("mask", "frozen-mean", "adapted", "sentence")
#: how p_kNN is read from the store: top-k voting, each class's mean key, a logistic regression on the store's
#: keys (see core/readout.py), or "auto": the one of them that scores best on dev (logistic until then)
KNN_READOUTS = ("topk", "class-mean", "logistic", "auto")
#: keys of sentence pairs: one joint input, relation features of the two segments, or "auto" (relation
#: features when the training examples have a text_b)
PAIR_KEYS = ("joint", "relation", "auto")


def check_int(config, name: str, low: int = 1) -> None:
    """``config.<name>`` must be an integer >= ``low``; a ValueError naming the field otherwise."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value!r}")


def check_float(config, name: str, low: float, high: float = math.inf, low_open: bool = False,
                high_open: bool = False) -> None:
    """``config.<name>`` must be a finite number in [low, high] (ends open where told); a ValueError naming
    the field and the value otherwise."""
    value = getattr(config, name)
    ok = (not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)
          and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not ok:
        if high == math.inf:
            where = f"{'>' if low_open else '>='} {low:g}"
        else:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number {where}, got {value!r}")


def check_choice(config, name: str, choices) -> None:
    """``config.<name>`` must be one of ``choices``."""
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


@dataclass
class LossConfig:
    """The kNN-guided training loss: the same fields, meaning and checks for text and CLIP.

        loss: "ce" (plain), "knn" (CE_i min(1 + beta (-log p_kNN(y_i|x_i)), max_loss_weight)) or
            "focal" (CE_i (1 - p_kNN(y_i|x_i))^gamma).
        loss_beta, focal_gamma: the weights' strength (finite, >= 0).
        max_loss_weight: the bound of the "knn" weights (finite, >= 1), or None for no bound.
        knn_loss_gate: apply the kNN weights only while the store's leave-one-out kNN accuracy is above
            chance (the majority-class rate); below it the store knows nothing and the weights are noise.
        train_knn_k, train_knn_temperature: the p_kNN used for the weights (each example's own entry left out).
    """

    loss: str = "knn"
    loss_beta: float = 1.0
    focal_gamma: float = 2.0
    max_loss_weight: Optional[float] = 3.0
    knn_loss_gate: bool = True
    train_knn_k: int = 16
    train_knn_temperature: float = 1.0

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise a ValueError naming the first bad field; returns self."""
        check_choice(self, "loss", LOSSES)
        check_float(self, "loss_beta", 0.0)
        check_float(self, "focal_gamma", 0.0)
        if self.max_loss_weight is not None:
            check_float(self, "max_loss_weight", 1.0)
        check_choice(self, "knn_loss_gate", (True, False))
        check_int(self, "train_knn_k")
        check_float(self, "train_knn_temperature", 0.0, low_open=True)
        return self


@dataclass
class RetroConfig(LossConfig):
    """Hyper-parameters of RetroPrompt: the loss fields of :class:`LossConfig` and these.

    Retrieval for input (neural demonstrations):
        demo_topk: m, neighbours per class averaged into one demonstration
            (8 for 16-shot, 2 for 4-shot in the paper's code).
        demo_center: inject d_c - mean(store keys): what differs between the classes' demonstrations
            stands out instead of the component every key shares.
        demo_norm: "none", or "match": rescale each d_c to the mean norm of the PLM's word embeddings.
        demo_dropout: in training, each example's demonstrations are all hidden with this probability.
        demo_warmup: a warm start: demonstrations are hidden in the first ``demo_warmup`` fraction of the
            training steps, so the prompt is learned first and d_c added to a model that already works.
    Scores (shared by inference, the loss and ``explain``):
        knn_score_scale: "zscore" (default: each query's k scores standardised, so p_kNN is a real
            distribution whatever the key norm; T is in standard deviations) or "raw" (s_j / T).
    Retrieval for inference:
        knn_k, knn_temperature: p_kNN(y|x) = sum_{j<=k} softmax_j(z_j / T) 1[y_j = y].
        knn_lambda: P = lambda p_kNN + (1 - lambda) p_PLM; 0 turns kNN inference off.
    Store:
        metric: "ip" or "cosine"; index_factory: a FAISS factory string.
    Keys and read-out (kNN inference and the kNN-guided loss read the same store):
        key_encoder: "mask" (the trained model's [MASK] state, refreshed every pass), "frozen-mean" (a frozen
            copy of the pre-trained encoder taken when the model is built: mean-pooled raw input text,
            L2-normalised; computed once, never refreshed), "adapted" (that copy, first fine-tuned on the
            training examples by SetFit's contrastive loss, then frozen: see prompt/key_adaptation.py) or
            "sentence" (an encoder loaded from ``key_encoder_path``, used the same way).
        adapt_steps, adapt_lr, adapt_batch_size: the adaptation of key_encoder="adapted" (optimizer steps,
            AdamW learning rate, training examples per step); it reads the training examples only.
        adapt_pairs: also adapt relation keys of sentence pairs (their segments' cosine fitted to the labels);
            False keeps the pre-trained encoder for pairs (single texts are adapted either way).
        pair_keys: keys of two-segment inputs (text_a, text_b): "joint" (the pair as one input), "relation"
            ([cos(u, v), |u - v|, u * v] of the segments' keys u, v, normalised) or "auto" (relation features
            when the training data are pairs). Single-segment inputs are unchanged.
        knn_readout: "topk" (p_kNN from the k nearest entries), "class-mean" (softmax_c(cos(q, mu_c) / T_cm)
            over each class's mean key; ``class_mean_top_m``: only the class's m entries nearest to q),
            "logistic" (a logistic regression fitted on the store's keys, C = ``logistic_c``, its log-probabilities
            scaled by 1 / ``logistic_temperature``) or "auto" (the one of the three with the best store-alone
            accuracy on dev, chosen when inference is tuned; "logistic" until then).
        class_mean_temperature: T_cm, on the cosine scale (chosen on dev by log-loss when inference is tuned).
        logistic_temperature: T of the logistic read-out (1: its own probabilities; chosen on dev by log-loss).
        store_guard_alpha: the guard on the mixture (None: off). When inference is tuned on dev, kNN inference
            is switched off (lambda = 0) if the store alone scores no better than the dev set's majority-class
            rate. Without tuning (a hand loop, a lambda set by hand: no dev evidence at all) the store must beat
            chance by a one-sided binomial test at this level on its leave-one-out accuracy over the training
            entries.
        lambda_from_dev: set by tuning: knn_lambda was chosen on dev (and the dev guard applied).
        demo_retrieval: which keys choose the neighbours behind d_c: "mask" (the [MASK] keys), "key-encoder"
            (the frozen / sentence keys; d_c is still built from the neighbours' [MASK] states) or "auto" (the
            key encoder's where there is one, else the [MASK] keys).
        plm_temperature: T_plm, p_PLM = softmax(z / T_plm) in the mixture (1: unscaled; set on dev).
    """

    demo_topk: int = 8
    demo_center: bool = False
    demo_norm: str = "none"
    demo_dropout: float = 0.0
    demo_warmup: float = 0.0
    knn_score_scale: str = "zscore"
    knn_k: int = 16
    knn_temperature: float = 1.0
    knn_lambda: float = 0.5
    metric: str = "ip"
    index_factory: str = "Flat"
    key_encoder: str = "adapted"
    key_encoder_path: Optional[str] = None
    knn_readout: str = "auto"
    class_mean_temperature: float = 0.05
    class_mean_top_m: Optional[int] = None
    demo_retrieval: str = "auto"
    plm_temperature: float = 1.0
    adapt_steps: int = 20
    adapt_lr: float = 5e-5
    adapt_batch_size: int = 32
    adapt_pairs: bool = True
    pair_keys: str = "auto"
    logistic_c: float = 1.0
    logistic_temperature: float = 1.0
    store_guard_alpha: Optional[float] = 0.1
    lambda_from_dev: bool = False

    def validate(self) -> "RetroConfig":
        super().validate()
        check_int(self, "demo_topk")
        check_choice(self, "demo_center", (True, False))
        check_choice(self, "demo_norm", ("none", "match"))
        check_float(self, "demo_dropout", 0.0, 1.0, high_open=True)
        check_float(self, "demo_warmup", 0.0, 1.0, high_open=True)
        check_choice(self, "knn_score_scale", ("zscore", "raw"))
        check_int(self, "knn_k")
        check_float(self, "knn_temperature", 0.0, low_open=True)
        check_float(self, "knn_lambda", 0.0, 1.0)
        check_choice(self, "metric", ("ip", "cosine"))
        check_choice(self, "key_encoder", KEY_ENCODERS)
        if (self.key_encoder == "sentence") != isinstance(self.key_encoder_path, str):
            raise ValueError("key_encoder_path names the sentence encoder: give it (a folder or hub name) exactly "
                             f"when key_encoder='sentence'; got key_encoder={self.key_encoder!r}, "
                             f"key_encoder_path={self.key_encoder_path!r}")
        check_choice(self, "knn_readout", KNN_READOUTS)
        check_float(self, "class_mean_temperature", 0.0, low_open=True)
        if self.class_mean_top_m is not None:
            check_int(self, "class_mean_top_m")
        check_choice(self, "demo_retrieval", ("mask", "key-encoder", "auto"))
        if self.demo_retrieval == "key-encoder" and self.key_encoder == "mask":
            raise ValueError("demo_retrieval='key-encoder' chooses the demonstrations' neighbours by the key "
                             "encoder's keys: it needs key_encoder='frozen-mean', 'adapted' or 'sentence', not 'mask'")
        check_float(self, "plm_temperature", 0.0, low_open=True)
        check_int(self, "adapt_steps", low=0)
        check_float(self, "adapt_lr", 0.0, low_open=True)
        check_int(self, "adapt_batch_size", low=2)
        check_choice(self, "adapt_pairs", (True, False))
        check_choice(self, "pair_keys", PAIR_KEYS)
        if self.pair_keys == "relation" and self.key_encoder == "mask":
            raise ValueError("pair_keys='relation' builds keys from the two segments' raw texts: it needs "
                             "key_encoder='frozen-mean', 'adapted' or 'sentence', not 'mask'")
        check_float(self, "logistic_c", 0.0, low_open=True)
        check_float(self, "logistic_temperature", 0.0, low_open=True)
        if self.store_guard_alpha is not None:
            check_float(self, "store_guard_alpha", 0.0, 1.0, low_open=True)
        check_choice(self, "lambda_from_dev", (True, False))
        return self

    @property
    def readout(self) -> str:
        """The read-out in use: ``knn_readout``, with "auto" (before dev chose one) read as "logistic"."""
        return "logistic" if self.knn_readout == "auto" else self.knn_readout

    def readout_temperature(self, training: bool = False, readout: Optional[str] = None) -> float:
        """The temperature of ``readout`` (default: :attr:`readout`): ``class_mean_temperature`` for class means,
        ``logistic_temperature`` for the logistic read-out, else ``train_knn_temperature`` (the loss's p_kNN) or
        ``knn_temperature`` (inference)."""
        readout = readout or self.readout
        if readout == "class-mean":
            return self.class_mean_temperature
        if readout == "logistic":
            return self.logistic_temperature
        return self.train_knn_temperature if training else self.knn_temperature

    @property
    def demos_by_key_encoder(self) -> bool:
        """Whether the key encoder's keys choose the demonstrations' neighbours (``demo_retrieval``)."""
        return self.demo_retrieval == "key-encoder" or (self.demo_retrieval == "auto" and self.key_encoder != "mask")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RetroConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RetroConfig fields: {unknown}")
        return cls(**d)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "RetroConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))
