"""Adapting a key encoder to the labels before it is frozen (SetFit's recipe: Tunstall et al., 2022, "Efficient
Few-Shot Learning Without Prompts").

Single texts. SetFit's cosine-similarity loss, on every pair of a batch of labelled training examples:

    L = 1/2 mean_{i<j, y_i = y_j} (cos(k_i, k_j) - 1)^2  +  1/2 mean_{i<j, y_i != y_j} cos(k_i, k_j)^2

k_i the mean-pooled key of example i. Same-class pairs are pulled to cosine 1 and other pairs pushed to 0;
both kinds weigh the same, as SetFit's oversampling makes them. SetFit feeds 16 sampled pairs per step; here a
step encodes ``batch_size`` examples once and scores all their pairs (the same forward cost, many more pairs).

Sentence pairs (a, b), relation keys. The classes are relations between the segments, so the loss is on the
segments' own cosine (SetFit's loss with the pair as its two sides):

    L = mean_i (cos(u(a_i), u(b_i)) - t_i)^2,    t_i = 1[y_i = c+]

c+ is the class whose pairs the pre-trained encoder already finds most similar (the largest mean cosine on the
training pairs); with more than two classes, or when only one class is present, the pair objective is not
defined and the encoder stays as it is (a warning says so).

Optimiser: AdamW (weight decay 0.01), linear warm-up over the first 10% of the steps then linear decay, gradients
clipped at norm 1; dropout on while adapting. Only the examples given are read: nothing else reaches the weights.
"""
from __future__ import annotations

import time
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def contrastive_pair_loss(keys: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SetFit's cosine-similarity loss over all pairs i < j of a batch (the module docstring's first formula);
    ``keys`` (B, D) need not be normalised. A batch with one kind of pair only averages that kind."""
    u = F.normalize(keys, dim=-1)
    i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=keys.device)
    cos = (u[i] * u[j]).sum(-1)
    same = labels[i] == labels[j]
    err = (cos - same.to(cos.dtype)) ** 2
    parts = [err[kind].mean() for kind in (same, ~same) if bool(kind.any())]
    if not parts:
        return keys.sum() * 0.0  # fewer than two examples: nothing to compare
    return sum(parts) / len(parts)


def segment_cosine_loss(u: torch.Tensor, v: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_i (cos(u_i, v_i) - t_i)^2: the pair objective (the module docstring's second formula)."""
    return ((F.cosine_similarity(u, v, dim=-1) - targets.to(u.dtype)) ** 2).mean()


def similar_class(encoder, examples: Sequence, labels: np.ndarray) -> Optional[int]:
    """c+: the class whose pairs ``encoder`` (not yet adapted) finds most similar, or None when the pair objective
    is undefined (not exactly two classes present)."""
    present = np.unique(labels)
    if len(present) != 2:
        return None
    u = encoder.segment_keys([e.text_a for e in examples])
    v = encoder.segment_keys([e.text_b or "" for e in examples])
    cos = (u * v).sum(-1)
    return int(max(present, key=lambda c: float(cos[labels == c].mean())))


def adapt_encoder(encoder, examples: Sequence, steps: int, lr: float, batch_size: int, seed: int,
                  progress: bool = False) -> dict:
    """Fine-tune ``encoder.model`` (a :class:`~.key_encoders.MeanPoolEncoder`'s weights) in place on labelled
    ``examples`` by the module docstring's loss, then put it back in eval mode with gradients off.

    ``seed`` fixes the batches and dropout (the global random state is left as it was). Pairs are adapted only
    when ``encoder.relation`` is set (relation keys); single texts always. Returns what was done (JSON-able).
    """
    t0 = time.time()
    labels = np.array([int(e.label) for e in examples], dtype=np.int64)
    pairs = bool(getattr(encoder, "relation", False))
    info = {"examples": len(examples), "steps": 0, "objective": "segment-cosine" if pairs else "contrastive",
            "lr": lr, "batch_size": batch_size}
    targets = None
    if pairs:
        positive = similar_class(encoder, examples, labels)
        if positive is None:
            warnings.warn(f"key adaptation of sentence pairs needs exactly two classes among the training examples, "
                          f"found {len(np.unique(labels))}: the key encoder stays pre-trained", stacklevel=3)
            info["objective"] = "none (pairs need two classes)"
            return info
        targets = torch.from_numpy((labels == positive).astype(np.float32))
        info["similar_class"] = positive
    model = encoder.model
    params = list(model.parameters())
    with torch.random.fork_rng(devices=[encoder.device.index or 0] if encoder.device.type == "cuda" else []):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        warm = max(1, int(0.1 * steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
        y = torch.from_numpy(labels)
        model.train()
        try:
            for _ in tqdm(range(steps), desc="adapting keys", disable=not progress, leave=False):
                idx = torch.randperm(len(examples), generator=gen)[:batch_size]
                batch = [examples[int(i)] for i in idx]
                if pairs:
                    u = encoder.pooled([e.text_a for e in batch])
                    v = encoder.pooled([e.text_b or "" for e in batch])
                    loss = segment_cosine_loss(u, v, targets[idx].to(u.device))
                else:
                    keys = encoder.pooled([e.text_a for e in batch], [getattr(e, "text_b", None) for e in batch])
                    loss = contrastive_pair_loss(keys, y[idx].to(keys.device))
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                info["steps"] += 1
        finally:
            model.eval()
            for p in params:
                p.requires_grad_(False)
                p.grad = None
    encoder.forget_fingerprint()
    info["seconds"] = round(time.time() - t0, 2)
    return info


__all__ = ["contrastive_pair_loss", "segment_cosine_loss", "similar_class", "adapt_encoder"]
