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


def _field(default, help: str):
    """A config field with its line of help (``RetroConfig.field_help()``, the docs)."""
    return dataclasses.field(default=default, metadata={"help": help})


class _Part:
    """A small config: its fields, their help, and :meth:`validate` (a ValueError naming the first bad field)."""

    def __post_init__(self):
        self.validate()

    def validate(self):
        return self

    @classmethod
    def field_help(cls) -> Dict[str, str]:
        """Field name -> its line of help."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


@dataclass
class LossConfig(_Part):
    """The kNN-guided training loss, the same fields, meaning and checks for text and CLIP:
    ``L = mean_i CE_i * w_i``, ``w_i = min(1 + beta * (-log p_kNN(y_i|x_i)), max_loss_weight)`` ("knn") or
    ``(1 - p_kNN(y_i|x_i))^gamma`` ("focal"), p_kNN read without example i's own entry."""

    loss: str = _field("knn", '"ce" (plain), "knn" (CE weighted by min(1 + beta (-log p_kNN), cap)) or "focal" '
                              '(CE (1 - p_kNN)^gamma)')
    loss_beta: float = _field(1.0, "beta: the strength of the knn weights (finite, >= 0)")
    focal_gamma: float = _field(2.0, "gamma of the focal weights (finite, >= 0)")
    max_loss_weight: Optional[float] = _field(3.0, "the cap of the knn weights (finite, >= 1), None for none")
    knn_loss_gate: bool = _field(True, "weights apply only while the store's leave-one-out accuracy beats the "
                                       "majority-class rate (below it they are noise)")
    train_knn_k: int = _field(16, "k of the p_kNN the weights read (top-k read-out)")
    train_knn_temperature: float = _field(1.0, "T of the p_kNN the weights read (top-k read-out)")

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
class DemonstrationConfig(_Part):
    """Retrieval for input: per class c, the top-m neighbours' [MASK] states, weighted by softmax of their
    z-normalised scores, averaged into d_c and injected beside the class's label word."""

    demo_topk: int = _field(8, "m: neighbours per class averaged into one demonstration (8 for 16-shot)")
    demo_center: bool = _field(False, "inject d_c - mean(store keys), so what differs between the classes stands out")
    demo_norm: str = _field("none", '"none", or "match": rescale each d_c to the mean norm of the word embeddings')
    demo_dropout: float = _field(0.0, "in training, hide each example's demonstrations with this probability")
    demo_warmup: float = _field(0.0, "hide the demonstrations in this first fraction of the training steps")
    demo_retrieval: str = _field("auto", 'which keys choose the neighbours behind d_c: "mask", "key-encoder", or '
                                         '"auto" (the key encoder\'s where there is one)')

    def validate(self):
        check_int(self, "demo_topk")
        check_choice(self, "demo_center", (True, False))
        check_choice(self, "demo_norm", ("none", "match"))
        check_float(self, "demo_dropout", 0.0, 1.0, high_open=True)
        check_float(self, "demo_warmup", 0.0, 1.0, high_open=True)
        check_choice(self, "demo_retrieval", ("mask", "key-encoder", "auto"))
        return self


@dataclass
class KeyConfig(_Part):
    """What the store's keys are and how they are searched. "adapted" (the default): a copy of the pre-trained
    encoder fine-tuned on the training examples by SetFit's contrastive loss, then frozen; mean-pooled raw text,
    L2-normalised. Sentence pairs: ``[cos(u, v), |u - v|, u * v]`` of the segments' keys, normalised."""

    key_encoder: str = _field("adapted", '"adapted", "frozen-mean" (the pre-trained copy, never tuned), "sentence" '
                                         '(an encoder from key_encoder_path) or "mask" (the trained [MASK] state)')
    key_encoder_path: Optional[str] = _field(None, 'the encoder of key_encoder="sentence" (a folder or hub name)')
    adapt_steps: int = _field(20, "optimizer steps of the adaptation (0: none)")
    adapt_lr: float = _field(5e-5, "AdamW learning rate of the adaptation")
    adapt_batch_size: int = _field(32, "training examples per adaptation step (every pair in a batch is used)")
    adapt_pairs: bool = _field(True, "also adapt the keys of sentence pairs (their segments' cosine fitted to the "
                                     "labels); False keeps the pre-trained encoder for pairs")
    pair_keys: str = _field("auto", 'keys of (text_a, text_b) inputs: "joint", "relation" or "auto" (relation '
                                    'when the training data are pairs)')
    metric: str = _field("ip", '"ip" or "cosine": the FAISS metric')
    index_factory: str = _field("Flat", 'a FAISS factory string ("Flat" exact; "IVF...", "HNSW...", "PQ..." for '
                                        'large stores)')

    def validate(self):
        check_choice(self, "key_encoder", KEY_ENCODERS)
        if (self.key_encoder == "sentence") != isinstance(self.key_encoder_path, str):
            raise ValueError("key_encoder_path names the sentence encoder: give it (a folder or hub name) exactly "
                             f"when key_encoder='sentence'; got key_encoder={self.key_encoder!r}, "
                             f"key_encoder_path={self.key_encoder_path!r}")
        check_int(self, "adapt_steps", low=0)
        check_float(self, "adapt_lr", 0.0, low_open=True)
        check_int(self, "adapt_batch_size", low=2)
        check_choice(self, "adapt_pairs", (True, False))
        check_choice(self, "pair_keys", PAIR_KEYS)
        if self.pair_keys == "relation" and self.key_encoder == "mask":
            raise ValueError("pair_keys='relation' builds keys from the two segments' raw texts: it needs "
                             "key_encoder='frozen-mean', 'adapted' or 'sentence', not 'mask'")
        check_choice(self, "metric", ("ip", "cosine"))
        return self


@dataclass
class ReadoutConfig(_Part):
    """How the store becomes p_kNN (core/readout.py): top-k ``sum_j softmax_j(z_j / T) 1[y_j = y]``, class means
    ``softmax_c(cos(q, mu_c) / T_cm)``, or a logistic regression fitted on the store's keys."""

    knn_readout: str = _field("auto", '"topk", "class-mean", "logistic", or "auto" (the best store-alone dev '
                                      'accuracy when inference is tuned; "logistic" until then)')
    knn_k: int = _field(16, "k of the top-k read-out")
    knn_temperature: float = _field(1.0, "T of the top-k read-out (in standard deviations with zscore)")
    knn_score_scale: str = _field("zscore", '"zscore" (each query\'s k scores standardised) or "raw" (s_j / T)')
    class_mean_temperature: float = _field(0.05, "T_cm of the class-mean read-out (cosine scale; set on dev)")
    class_mean_top_m: Optional[int] = _field(None, "class means over each class's m entries nearest the query "
                                                   "(None: all)")
    logistic_c: float = _field(1.0, "C (inverse regularisation) of the logistic read-out")
    logistic_temperature: float = _field(1.0, "T of the logistic read-out's log-probabilities (set on dev)")

    def validate(self):
        check_choice(self, "knn_readout", KNN_READOUTS)
        check_int(self, "knn_k")
        check_float(self, "knn_temperature", 0.0, low_open=True)
        check_choice(self, "knn_score_scale", ("zscore", "raw"))
        check_float(self, "class_mean_temperature", 0.0, low_open=True)
        if self.class_mean_top_m is not None:
            check_int(self, "class_mean_top_m")
        check_float(self, "logistic_c", 0.0, low_open=True)
        check_float(self, "logistic_temperature", 0.0, low_open=True)
        return self


@dataclass
class MixtureConfig(_Part):
    """Retrieval for inference: ``P = lambda p_kNN + (1 - lambda) softmax(z / T_plm)``, lambda chosen on dev,
    and the guard that keeps a store no better than chance out of it."""

    knn_lambda: float = _field(0.5, "lambda (0 turns kNN inference off); chosen on dev when inference is tuned")
    plm_temperature: float = _field(1.0, "T_plm of p_PLM in the mixture (1: unscaled; set on dev)")
    store_guard_alpha: Optional[float] = _field(0.1, "the guard (None: off): tuned, the store alone must beat dev's "
                                                     "majority rate; untuned, its leave-one-out accuracy must beat "
                                                     "chance by a one-sided binomial test at this level")
    lambda_from_dev: bool = _field(False, "set by tuning: knn_lambda was chosen on dev (and the dev guard applied)")

    def validate(self):
        check_float(self, "knn_lambda", 0.0, 1.0)
        check_float(self, "plm_temperature", 0.0, low_open=True)
        if self.store_guard_alpha is not None:
            check_float(self, "store_guard_alpha", 0.0, 1.0, low_open=True)
        check_choice(self, "lambda_from_dev", (True, False))
        return self


#: RetroConfig's parts, by the name ``RetroConfig.compose`` and ``RetroConfig.part`` know them
PARTS = {"loss": LossConfig, "demonstrations": DemonstrationConfig, "keys": KeyConfig, "readout": ReadoutConfig,
         "mixture": MixtureConfig}


@dataclass
class RetroConfig(MixtureConfig, ReadoutConfig, KeyConfig, DemonstrationConfig, LossConfig):
    """Hyper-parameters of RetroPrompt, composed of five small configs, each with its own fields and checks:
    :class:`LossConfig` (the kNN-guided loss), :class:`DemonstrationConfig` (neural demonstrations),
    :class:`KeyConfig` (the store's keys and search), :class:`ReadoutConfig` (p_kNN from the store) and
    :class:`MixtureConfig` (lambda and the guard). Its fields are theirs, flat: ``RetroConfig(knn_lambda=0.3)``,
    the flat JSON of saved runs and ``--config`` all read the same names; ``RetroConfig.compose(keys=KeyConfig(
    key_encoder="frozen-mean"), mixture=MixtureConfig(knn_lambda=0.3))`` builds one from parts, and
    ``config.part("keys")`` gives one part back. ``RetroConfig.field_help()``: every field's line of help.

    The defaults are what a dev-only study chose (benchmarks/README.md): adapted keys (pairs too), the read-out
    chosen on dev.
    """

    def validate(self) -> "RetroConfig":
        """Each part's checks, then those that span parts; raises a ValueError naming the first bad field."""
        for part in PARTS.values():
            part.validate(self)
        if self.demo_retrieval == "key-encoder" and self.key_encoder == "mask":
            raise ValueError("demo_retrieval='key-encoder' chooses the demonstrations' neighbours by the key "
                             "encoder's keys: it needs key_encoder='frozen-mean', 'adapted' or 'sentence', not 'mask'")
        return self

    @classmethod
    def compose(cls, **parts_and_fields) -> "RetroConfig":
        """A RetroConfig from parts (``loss=``, ``demonstrations=``, ``keys=``, ``readout=``, ``mixture=``: instances
        of :data:`PARTS`) and single fields; a field given twice is an error."""
        values: Dict[str, Any] = {}
        for name, value in parts_and_fields.items():
            if name in PARTS and not isinstance(value, PARTS[name]):
                raise ValueError(f"{name} must be a {PARTS[name].__name__}, got {type(value).__name__}")
            given = dataclasses.asdict(value) if name in PARTS else {name: value}
            twice = sorted(set(given) & set(values))
            if twice:
                raise ValueError(f"RetroConfig.compose: {twice} given twice")
            values.update(given)
        return cls.from_dict(values)

    def part(self, name: str):
        """The part ``name`` of this config (a copy: a :data:`PARTS` instance with this config's values)."""
        if name not in PARTS:
            raise ValueError(f"unknown part {name!r}: one of {sorted(PARTS)}")
        cls = PARTS[name]
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

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


def settings_markdown() -> str:
    """docs/settings.md: every RetroConfig field, part by part, with its default and its line of help."""
    lines = ["# Settings", "", "`RetroConfig`'s fields, part by part (`RetroConfig.compose(keys=KeyConfig(...))` builds one "
             "from parts; every name also works flat: `RetroConfig(knn_lambda=0.3)`, `--config '{\"knn_lambda\": 0.3}'`).",
             "Written by `openprompt_retro.core.config.settings_markdown()`; a test keeps it in step with the code."]
    for name, cls in PARTS.items():
        lines += ["", f"## {name}: `{cls.__name__}`", "", " ".join(line.strip() for line in (cls.__doc__ or "").split("\n")).strip(), "",
                  "| field | default | what it is |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            help_text = f.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | `{f.default!r}` | {help_text} |")
    return "\n".join(lines) + "\n"

