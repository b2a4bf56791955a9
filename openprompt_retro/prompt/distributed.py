"""Multi-process training on torch.distributed (DDP; gloo on CPU, nccl on GPU).

Each rank extracts the keys of its shard of the training set at a refresh; the
keys are all-gathered so that every rank builds the same store, in the same
order, and searches it locally. Launch with ``torchrun --nproc_per_node N``.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) tensor in rank order (n_r may differ)."""
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest,) + tuple(x.shape[1:]), dtype=x.dtype)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def gather_in_order(local: np.ndarray, local_index: np.ndarray) -> np.ndarray:
    """All ranks' rows, arranged by their global index."""
    rows = all_gather_rows(torch.from_numpy(np.ascontiguousarray(local)))
    index = all_gather_rows(torch.from_numpy(np.ascontiguousarray(local_index)))
    return rows[torch.argsort(index)].numpy()


class LossModule(nn.Module):
    """``forward(batch) = model.loss(batch)``, so that DDP wraps the kNN-guided loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def wrap_ddp(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return DDP(LossModule(model), device_ids=device_ids, find_unused_parameters=True)
