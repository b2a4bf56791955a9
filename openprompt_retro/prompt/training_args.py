"""Training hyper-parameters of :class:`~openprompt_retro.prompt.trainer.RetroTrainer`, validated on creation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

#: --amp / TrainingArgs.amp -> the autocast dtype's name in torch
AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def default_device() -> str:
    """``"cuda"`` when torch sees a GPU (``"cuda:<LOCAL_RANK>"`` under torchrun), else ``"cpu"``."""
    import os

    import torch

    if not torch.cuda.is_available():
        return "cpu"
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and local_rank.isdigit():  # one GPU per process
        return f"cuda:{int(local_rank) % max(torch.cuda.device_count(), 1)}"
    return "cuda"


def check_device(device: str) -> str:
    """``device`` if torch can run on it here ("auto" resolves to :func:`default_device`); else ValueError."""
    import torch

    if device in (None, "", "auto"):
        return default_device()
    try:
        dev = torch.device(str(device))
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: unknown device; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type not in _DEVICE_TYPES:
        raise ValueError(f"device {device!r}: unsupported device type; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                             f"torch.cuda.is_available() is False); use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None) if dev.type != "mps" else getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise ValueError(f"device {device!r} is not available here; use 'cpu'")
    return str(device)


@dataclass
class TrainingArgs:
    """How to train (the method's own hyper-parameters live in :class:`RetroConfig`).

    epochs: epochs to train (ignored when ``max_steps`` is set).
    max_steps: optimisation steps to train (the reference protocol counts steps, not epochs).
    eval_every: steps between dev evaluations (default: one per epoch); the best evaluation is kept.
    patience: evaluations without dev improvement before stopping.
    tune_inference: choose lambda, k and T on dev after training (grid: :class:`MixtureGrid`).
    shuffle: shuffle training batches (seeded by ``seed``).
    device: where the model runs ("cpu", "cuda", "cuda:1", ...); "auto" (the default) is "cuda" when torch
        sees a GPU, else "cpu" (resolved by :meth:`validate`).
    amp: mixed precision: None (float32), "bf16" (CPU or CUDA) or "fp16" (CUDA only, with a gradient scaler).
        Forward passes and the loss run under ``torch.autocast``; weights, store keys and returned
        probabilities stay float32.
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
    device: str = "auto"
    amp: Optional[str] = None

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
        try:
            self.device = check_device(self.device)
        except ValueError as e:
            raise ValueError(f"TrainingArgs.{e}") from None
        self.amp = None if self.amp in (None, "", "none", "no") else self.amp
        if self.amp is not None:
            if self.amp not in AMP_DTYPES:
                raise ValueError(f"TrainingArgs.amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
            import torch

            kind = torch.device(self.device).type
            if self.amp == "fp16" and kind != "cuda":
                raise ValueError(f"TrainingArgs.amp 'fp16' needs a CUDA device (device is {self.device!r}); "
                                 "use 'bf16' on CPU")
            if self.amp == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
                raise ValueError("TrainingArgs.amp 'bf16': this GPU does not support bfloat16; use 'fp16'")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
