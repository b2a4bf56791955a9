"""The run specification: every option a run reads, built once from the CLI arguments (import-free)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class RunSpec:
    """What one run of a method on a split is trained and evaluated with (the CLI's options, same names and
    defaults). The grid's own lists (tasks, methods, seeds), its folder and ``--overwrite`` are not part of it."""
    # data and model
    data_root: str = ""
    model: Optional[str] = None
    model_type: str = "bert"
    shots: int = 16
    max_seq_length: int = 128
    device: Optional[str] = None
    amp: Optional[str] = None
    hf_dataset: Optional[str] = None
    hf_test_split: Optional[str] = None
    hf_text_fields: Tuple[str, ...] = ()
    hf_label_field: str = "label"
    hf_label_map: Optional[Dict[str, int]] = None
    # training
    epochs: int = 20
    lr: float = 5e-5
    batch_size: int = 8
    patience: int = 20
    max_steps: Optional[int] = None
    eval_every: Optional[int] = None
    mixture_grid: str = "fine"
    config: Dict[str, Any] = field(default_factory=dict)
    demo_topk: Optional[int] = None
    loss_beta: float = 1.0
    no_progress: bool = False
    # zero-shot methods
    zs_fraction: float = 0.3
    zs_pool_size: int = 4000
    zs_lambda: float = 0.5
    zs_k: int = 16
    zs_temperature: float = 1.0
    zs_key_encoder: str = "mask"

    @classmethod
    def from_namespace(cls, ns) -> "RunSpec":
        """The spec of a parsed command line (an option the command does not have keeps its default)."""
        names = [f.name for f in dataclasses.fields(cls)]
        values = {name: getattr(ns, name) for name in names if getattr(ns, name, None) is not None}
        if "hf_text_fields" in values:
            values["hf_text_fields"] = tuple(values["hf_text_fields"])
        return cls(**values)

    def options(self) -> Dict[str, Any]:
        """Option name -> value (what a row's settings id is computed from)."""
        return dataclasses.asdict(self)


__all__ = ["RunSpec"]
