"""Training hyper-parameters of :class:`~openprompt_retro.prompt.trainer.RetroTrainer`, validated on creation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional


@dataclass
class TrainingArgs:
    """How to train (the method's own hyper-parameters live in :class:`RetroConfig`).

    epochs: epochs to train (ignored when ``max_steps`` is set).
    max_steps: optimisation steps to train (the reference protocol counts steps, not epochs).
    eval_every: steps between dev evaluations (default: one per epoch); the best evaluation is kept.
    patience: evaluations without dev improvement before stopping.
    tune_inference: choose lambda, k and T on dev after training (grid: :class:`MixtureGrid`).
    shuffle: shuffle training batches (seeded by ``seed``).
    device: where the model runs ("cpu", "cuda", "cuda:1", ...).
    """

    epochs: int = 20
    max_steps: Optional[int] = None
    eval_every: Optional[int] = None
    batch_size: int = 8
    eval_batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_length: int = 128
    seed: int = 42
    patience: int = 20
    tune_inference: bool = True
    shuffle: bool = True
    progress: bool = True
    device: str = "cpu"

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainingArgs":
        for name in ("epochs", "batch_size", "eval_batch_size", "max_seq_length", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainingArgs.{name} must be an integer >= 1, got {value!r}")
        for name in ("max_steps", "eval_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainingArgs.{name} must be None or an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainingArgs.lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError("TrainingArgs.weight_decay must be >= 0 and max_grad_norm > 0, "
                             f"got {self.weight_decay!r} and {self.max_grad_norm!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainingArgs.warmup_ratio must lie in [0, 1), got {self.warmup_ratio!r}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
