"""One small config for the whole method (PEFT-style)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict

LOSSES = ("ce", "knn", "focal")


@dataclass
class RetroConfig:
    """Hyper-parameters of RetroPrompt.

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
    Retrieval for training:
        loss: "ce" (plain), "knn" (CE_i min(1 + beta (-log p_kNN(y_i|x_i)), max_loss_weight)) or
            "focal" (CE_i (1 - p_kNN(y_i|x_i))^gamma).
        loss_beta, focal_gamma, max_loss_weight: the weights' strength and bound.
        knn_loss_gate: apply the kNN weights only while the store's leave-one-out kNN accuracy is above
            chance (the majority-class rate); below it the store knows nothing and the weights are noise.
        train_knn_k, train_knn_temperature: the p_kNN used for the weights.
    Store:
        metric: "ip" or "cosine"; index_factory: a FAISS factory string.
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
    loss: str = "knn"
    loss_beta: float = 1.0
    focal_gamma: float = 2.0
    max_loss_weight: float = 3.0
    knn_loss_gate: bool = True
    train_knn_k: int = 16
    train_knn_temperature: float = 1.0
    metric: str = "ip"
    index_factory: str = "Flat"

    def __post_init__(self):
        self.validate()

    def validate(self) -> "RetroConfig":
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("demo_topk", "knn_k", "train_knn_k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("knn_temperature", "train_knn_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.knn_lambda <= 1.0:
            raise ValueError(f"knn_lambda must lie in [0, 1], got {self.knn_lambda}")
        if self.loss_beta < 0 or self.focal_gamma < 0:
            raise ValueError("loss_beta and focal_gamma must be non-negative")
        if self.max_loss_weight < 1.0:
            raise ValueError(f"max_loss_weight must be at least 1, got {self.max_loss_weight}")
        if self.knn_score_scale not in ("zscore", "raw"):
            raise ValueError(f"knn_score_scale must be 'zscore' or 'raw', got {self.knn_score_scale!r}")
        if self.demo_norm not in ("none", "match"):
            raise ValueError(f"demo_norm must be 'none' or 'match', got {self.demo_norm!r}")
        if not 0.0 <= self.demo_dropout < 1.0:
            raise ValueError(f"demo_dropout must lie in [0, 1), got {self.demo_dropout}")
        if not 0.0 <= self.demo_warmup < 1.0:
            raise ValueError(f"demo_warmup must lie in [0, 1), got {self.demo_warmup}")
        if self.metric not in ("ip", "cosine"):
            raise ValueError(f"metric must be 'ip' or 'cosine', got {self.metric!r}")
        return self

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
