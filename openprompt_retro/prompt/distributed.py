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


def gather_device(group=None) -> torch.device:
    """Where collective buffers must live for the process group's backend: the current GPU for nccl
    (it cannot use CPU tensors), the CPU otherwise (gloo, mpi)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) tensor in rank order (n_r may differ).

    Every buffer is allocated on :func:`gather_device` (cuda for nccl); the result comes back on ``x``'s device.
    """
    device = gather_device(group)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=device), group=group)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(counts),) + tuple(x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.to(device)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(x.device)


def gather_in_order(local: np.ndarray, local_index: np.ndarray) -> np.ndarray:
    """All ranks' rows, arranged by their global index."""
    rows = all_gather_rows(torch.from_numpy(np.ascontiguousarray(local)))
    index = all_gather_rows(torch.from_numpy(np.ascontiguousarray(local_index)))
    return rows[torch.argsort(index)].cpu().numpy()


class LossModule(nn.Module):
    """``forward(batch) = model.loss(batch)``, so that DDP wraps the kNN-guided loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def wrap_ddp(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    # device_ids stays None on GPU too: with device_ids DDP re-builds the inputs to move them, and that
    # turns OpenPrompt's InputFeatures batch (a dict whose constructor takes keywords) into garbage. The
    # trainer has already put the batch on the model's device.
    return DDP(LossModule(model), device_ids=None, find_unused_parameters=True)
