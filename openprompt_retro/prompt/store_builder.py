"""Building a knowledge store from an OpenPrompt model and labeled data (in memory or streamed)."""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterable, List, Optional

import numpy as np
from tqdm.auto import tqdm

from ..core.store import KnowledgeStore
from .text import example_text
from .keys import MaskKeyHead, extract_keys


def build_store(model, dataloader, num_classes: Optional[int] = None, store: Optional[KnowledgeStore] = None,
                progress: bool = True, **store_kwargs) -> KnowledgeStore:
    """Build (or rebuild in place) a :class:`KnowledgeStore` from a labeled dataloader.

    Texts are taken from ``dataloader.raw_dataset`` (matched by guid) when available.
    """
    keys, labels, guids = extract_keys(model, dataloader, progress=progress)
    texts_by_guid = {str(e.guid): example_text(e) for e in getattr(dataloader, "raw_dataset", [])
                     if getattr(e, "guid", None) is not None}
    texts = [texts_by_guid.get(g) for g in guids]
    if store is None:
        if num_classes is None:
            num_classes = getattr(getattr(model, "verbalizer", None), "num_classes", None)
        if num_classes is None:
            raise ValueError("num_classes is needed to create a store (the model has no verbalizer)")
        built_by = MaskKeyHead(model.plm).describe()
        store = KnowledgeStore(keys.shape[1], num_classes, built_by=built_by, **store_kwargs)
    return store.build(keys, labels, guids, texts)


@contextmanager
def tokenizing_bar(shown: bool):
    """PromptDataLoader always draws a 'tokenizing' bar; hide it while progress is off."""
    import openprompt.pipeline_base as pipeline

    bar = pipeline.tqdm
    if not shown:
        pipeline.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        pipeline.tqdm = bar


def build_store_streaming(model, examples: Iterable, tokenizer, wrapper_class, num_classes: int,
                          max_seq_length: int = 128, batch_size: int = 64, chunk_size: int = 4096,
                          train_size: int = 65536, store: Optional[KnowledgeStore] = None, progress: bool = True,
                          **store_kwargs) -> KnowledgeStore:
    """Build a store from an iterable of labeled InputExamples of any length.

    Examples are tokenized ``chunk_size`` at a time and their keys added as they
    come, so only the keys (and labels / guids / texts) are ever held. An index
    that needs training (IVF, PQ) is trained on the first ``train_size`` keys.
    """
    from openprompt import PromptDataLoader

    if store is None:
        store = KnowledgeStore(int(model.plm.config.hidden_size), num_classes,
                               built_by=MaskKeyHead(model.plm).describe(), **store_kwargs)
    pending: List[tuple] = []  # keys waiting for the index to be trained
    bar = tqdm(desc="streaming store", unit="ex", disable=not progress)

    def flush():
        keys = np.concatenate([p[0] for p in pending])
        store.train(keys)
        for k, y, g, t in pending:
            store.add(k, y, g, t)
        pending.clear()

    def add_chunk(chunk):
        with tokenizing_bar(progress):
            loader = PromptDataLoader(chunk, model.template, tokenizer=tokenizer,
                                      tokenizer_wrapper_class=wrapper_class, max_seq_length=max_seq_length,
                                      batch_size=batch_size)
        keys, labels, guids = extract_keys(model, loader, progress=False)
        texts = [example_text(e) for e in chunk]
        if store.index.is_trained and not pending:
            store.add(keys, labels, guids, texts)
        else:
            pending.append((keys, labels, guids, texts))
            if sum(len(p[1]) for p in pending) >= train_size:
                flush()
        bar.update(len(chunk))

    chunk = []
    for example in examples:
        chunk.append(example)
        if len(chunk) == chunk_size:
            add_chunk(chunk)
            chunk = []
    if chunk:
        add_chunk(chunk)
    if pending:
        flush()
    bar.close()
    return store
