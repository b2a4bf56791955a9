"""The batch-key protocol: the per-example fields RetroPrompt adds to OpenPrompt batches.

=====================  ======  ==========================================================
key                    who     what
=====================  ======  ==========================================================
``retro_slot_ids``     tmpl.   per token: c + 1 at the placeholder of class c's
                               demonstration, else 0 (tensorable, from wrap_one_example)
``retro_demo_mask``    tmpl.   per token: 1 inside the demonstration segment, else 0
``retro_demo_embeds``  model   (B, C, D): the neural demonstrations d_c of each example
``retro_query_keys``   model   (B, D): each example's demonstration-free store key q(x)
``retro_exclude_ids``  model   (B,): the store id each example must not retrieve (-1: none)
``retro_example_ids``  loader  per example: its identity, (loader serial << 32) | position in
                               the loader's dataset (tensorable; see :mod:`.loaders`)
=====================  ======  ==========================================================

OpenPrompt's ``InputFeatures`` silently drops keys it does not know, so
:func:`.patches.install` declares ours.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:  # numpy is imported where it is used, not at import time
    import numpy as np

SLOT_KEY = "retro_slot_ids"
SEGMENT_KEY = "retro_demo_mask"
DEMO_KEY = "retro_demo_embeds"
QUERY_KEY = "retro_query_keys"
EXCLUDE_KEY = "retro_exclude_ids"
EXAMPLE_KEY = "retro_example_ids"
ALL_KEYS = (SLOT_KEY, SEGMENT_KEY, DEMO_KEY, QUERY_KEY, EXCLUDE_KEY, EXAMPLE_KEY)
TENSOR_KEYS = (SLOT_KEY, SEGMENT_KEY, EXAMPLE_KEY)


def batch_get(batch, key):
    """batch[key] for InputFeatures and dicts alike; None when absent."""
    try:
        return batch[key]
    except (KeyError, AttributeError):
        return None


def batch_guids(batch) -> List[Optional[str]]:
    """The guids of a batch as strings (None where an example has none)."""
    guids = batch["guid"] if "guid" in batch else None
    if guids is None:
        return [None] * batch["loss_ids"].shape[0]
    if hasattr(guids, "tolist"):
        guids = guids.tolist()
    return [None if g is None else str(g) for g in guids]


def batch_example_ids(batch) -> Optional["np.ndarray"]:
    """The example identities of a batch (int64, see :mod:`.loaders`), or None for untagged batches."""
    ids = batch_get(batch, EXAMPLE_KEY)
    if ids is None:
        return None
    import numpy as np

    return np.asarray(ids.detach().cpu() if hasattr(ids, "detach") else ids, dtype=np.int64).reshape(-1)
