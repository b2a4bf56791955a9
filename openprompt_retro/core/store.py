"""The open-book knowledge store: keys h(x_i), values y_i, searched with FAISS.

One entry per labeled example. Keys are float32 vectors (the ``<mask>``
representation), values are integer labels in ``[0, num_classes)``, and each
entry carries a guid and its text so that predictions can be explained.

Scores are inner products (``metric="ip"``, the default) or cosines
(``metric="cosine"``: keys and queries are L2-normalised before the inner
product). Any FAISS index-factory string is accepted (``"Flat"`` = exact
search; ``"IVF256,Flat"``, ``"HNSW32"``, ``"IVF1024,PQ32"`` for large
stores); indexes that need training are trained on the keys when built.

``k`` larger than what a query can be given is *clipped*: results have width
``min(k, len(store) - excluded)``; ``k < 1`` raises.

On disk (:meth:`KnowledgeStore.save`) a store is a folder of ``index.faiss``
(FAISS's own format), ``keys.npy`` / ``labels.npy`` (loaded with
``allow_pickle=False``) and ``store.json`` (metadata, guids, texts and a sha256
checksum of every file and of the metadata itself). :meth:`KnowledgeStore.load`
verifies the checksums before it parses anything, validates every field, and
checks on a sample of entries that the index holds exactly the codes of
``keys.npy`` - so a corrupt, truncated, edited or swapped file is a
:class:`StoreError` naming the file, never a silently different store.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Union

import faiss
import numpy as np

from ..errors import json_loads
from .folders import SaveFailed, atomic_folder, sha256_file  # noqa: F401  (SaveFailed: part of this module's API)
from .knn import knn_label_distribution

ArrayLike = Union[np.ndarray, Sequence, "torch.Tensor"]  # noqa: F821 (torch tensors are accepted, not required)

#: 2 adds checksums; format-1 stores (no checksums) still load, with a warning.
FORMAT_VERSION = 2
_READABLE_FORMATS = (1, 2)
#: largest key / query norm for metric "ip": inner products stay below 1e36, far from float32's 3.4e38
MAX_KEY_NORM = 1e18
_INDEX_FILE, _KEYS_FILE, _LABELS_FILE, _META_FILE = "index.faiss", "keys.npy", "labels.npy", "store.json"
_DATA_FILES = (_INDEX_FILE, _KEYS_FILE, _LABELS_FILE)
#: store.json fields every format has, and their JSON types
_REQUIRED_FIELDS = {"format_version": int, "dim": int, "num_classes": int, "metric": str, "index_factory": str,
                    "size": int, "guids": list, "texts": list}
#: entries whose index codes are compared with keys.npy on load (plus the first and the last)
AGREEMENT_SAMPLE = 64


class StoreError(ValueError):
    """Raised for bad input to a :class:`KnowledgeStore`; nothing is changed."""


@dataclass
class SearchResult:
    """Neighbours of each query, best first. Missing slots have id -1 and score -inf."""

    scores: np.ndarray  # (B, k) float32
    ids: np.ndarray  # (B, k) int64
    labels: np.ndarray  # (B, k) int64, -1 where id is -1


def _as_float32(x: ArrayLike, what: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()  # float(): numpy has no bfloat16 (autocast outputs)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise StoreError(f"{what} must be a (n, dim) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.unique(np.nonzero(~np.isfinite(x))[0])[:5].tolist()
        raise StoreError(f"{what} contain NaN or inf (rows {bad}...); refusing to use them")
    return np.ascontiguousarray(x)


def _integer_labels(labels: np.ndarray) -> np.ndarray:
    """The labels as int64: integers, booleans, or floats with whole values; anything else is a StoreError."""
    if labels.dtype.kind in "biu":
        return labels.astype(np.int64)
    if labels.dtype.kind != "f":
        what = "strings" if labels.dtype.kind in "US" else f"{labels.dtype.name} values"
        example = next((x for x in labels.tolist() if not isinstance(x, int)), None)
        raise StoreError(f"labels must be integer class ids, got {what} such as {example!r}"
                         " (map label names to ids 0..num_classes-1 first)")
    bad = labels[~(np.mod(labels, 1) == 0)]
    if bad.size:
        raise StoreError(f"labels must be whole numbers (integer class ids), got {bad[:5].tolist()}")
    return labels.astype(np.int64)


class KnowledgeStore:
    """Keys, labels and metadata of labeled examples, searched with FAISS.

    Args:
        dim: key dimension.
        num_classes: number of labels; values must lie in ``[0, num_classes)``.
        metric: ``"ip"`` (inner product) or ``"cosine"``.
        index_factory: a FAISS index-factory string; ``"Flat"`` is exact.
        nprobe / ef_search: search-time knobs of IVF / HNSW indexes.
        built_by: free-form description of what produced the keys (model name,
            key type ...). It is saved, and :meth:`load` can check it.
        use_gpu: ``"auto"`` searches on all GPUs when faiss-gpu is installed and
            a GPU is present; ``False`` never, ``True`` requires it.
    """

    def __init__(self, dim: int, num_classes: int, metric: str = "ip",
                 index_factory: str = "Flat", nprobe: Optional[int] = None,
                 ef_search: Optional[int] = None, built_by: Optional[Dict] = None,
                 use_gpu: Union[bool, str] = "auto"):
        if int(dim) < 1:
            raise StoreError(f"dim must be positive, got {dim}")
        if int(num_classes) < 1:
            raise StoreError(f"num_classes must be positive, got {num_classes}")
        if metric not in ("ip", "cosine"):
            raise StoreError(f"metric must be 'ip' or 'cosine', got {metric!r}")
        self._dim, self._num_classes = int(dim), int(num_classes)
        self.metric, self.index_factory = metric, index_factory
        self.nprobe, self.ef_search = nprobe, ef_search
        self.built_by = dict(built_by or {})
        n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if use_gpu is True and n_gpus == 0:
            raise StoreError("use_gpu=True, but FAISS sees no GPU (is faiss-gpu installed?)")
        self.use_gpu = bool(n_gpus) and use_gpu in (True, "auto")
        try:
            faiss.index_factory(self._dim, index_factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise StoreError(f"FAISS cannot build index {index_factory!r} for dim {dim}: {e}") from None
        self.reset()

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def __repr__(self) -> str:
        return (f"KnowledgeStore(entries={len(self)}, dim={self.dim}, num_classes={self.num_classes}, "
                f"metric={self.metric!r}, index={self.index_factory!r})")

    def reset(self) -> "KnowledgeStore":
        """Remove every entry (the index is rebuilt, untrained)."""
        self.keys = np.zeros((0, self._dim), dtype=np.float32)
        self.labels = np.zeros((0,), dtype=np.int64)
        self.guids: List[Optional[str]] = []
        self.texts: List[Optional[str]] = []
        self._guid_to_id: Dict[str, int] = {}
        self.guids_repeat = False  # entries added with guids_may_repeat reused a guid (saved, and allowed on load)
        self.index = faiss.index_factory(self._dim, self.index_factory, faiss.METRIC_INNER_PRODUCT)
        self._apply_search_knobs()
        self._gpu_index = None
        return self

    def _to_gpu(self) -> None:
        """Mirror a trained index on all GPUs (faiss-gpu) for plain searches; a no-op on CPU-only installs.

        The CPU index stays the reference (saving, per-class searches with ID selectors).
        """
        if self.use_gpu and self._gpu_index is None and self.index.is_trained:
            try:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
            except RuntimeError:  # index type without a GPU version: stay on CPU
                self._gpu_index = None

    def set_search_params(self, nprobe: Optional[int] = None, ef_search: Optional[int] = None) -> None:
        """Speed/recall knobs: IVF lists probed (``nprobe``), HNSW candidate list (``ef_search``)."""
        if nprobe is not None:
            self.nprobe = int(nprobe)
        if ef_search is not None:
            self.ef_search = int(ef_search)
        self._apply_search_knobs()
        if self._gpu_index is not None:  # re-mirror with the new knobs
            self._gpu_index = None
            self._to_gpu()

    def _apply_search_knobs(self) -> None:
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and self.nprobe is not None:
            ivf.nprobe = int(self.nprobe)
        if hasattr(self.index, "hnsw") and self.ef_search is not None:
            self.index.hnsw.efSearch = int(self.ef_search)

    def _prepare(self, x: ArrayLike, what: str) -> np.ndarray:
        x = _as_float32(x, what)
        if x.shape[1] != self._dim:
            raise StoreError(f"{what} have dimension {x.shape[1]}, but the store's keys have dimension {self._dim}")
        norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)  # float64: no overflow
        if self.metric == "cosine":
            return np.ascontiguousarray((x / np.maximum(norms, 1e-12)).astype(np.float32))
        if x.shape[0] and norms.max() > MAX_KEY_NORM:  # their inner products would overflow float32 to inf/NaN
            rows = np.nonzero(norms[:, 0] > MAX_KEY_NORM)[0]
            raise StoreError(f"{what} have norm up to {norms.max():.3g} (rows {rows[:5].tolist()}), above "
                             f"{MAX_KEY_NORM:.0e}: their inner products overflow float32; scale them down or "
                             "use metric='cosine'")
        return x

    # ------------------------------------------------------------------ writing
    def add(self, keys: ArrayLike, labels: ArrayLike, guids: Optional[Iterable] = None,
            texts: Optional[Iterable] = None, guids_may_repeat: bool = False) -> np.ndarray:
        """Add entries; returns their ids. Validates everything before changing anything.

        A guid already in the store is an error, unless ``guids_may_repeat`` (entries known by something else
        than their guid, e.g. Hugging Face splits whose ``idx`` restarts in every split): then
        :meth:`ids_of` keeps answering with the first entry of that guid."""
        keys = self._prepare(keys, "keys")
        labels = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels).reshape(-1)
        n = keys.shape[0]
        if labels.shape[0] != n:
            raise StoreError(f"got {n} keys but {labels.shape[0]} labels")
        labels = _integer_labels(labels)
        bad = (labels < 0) | (labels >= self._num_classes)
        if bad.any():
            raise StoreError(f"labels out of range [0, {self._num_classes}): {np.unique(labels[bad])[:5].tolist()}")
        guids = [None] * n if guids is None else [None if g is None else str(g) for g in guids]
        texts = [None] * n if texts is None else [None if t is None else str(t) for t in texts]
        if len(guids) != n or len(texts) != n:
            raise StoreError(f"got {n} keys but {len(guids)} guids and {len(texts)} texts")
        named = [g for g in guids if g is not None]
        clash = set(named) & self._guid_to_id.keys()
        repeats = bool(clash) or len(set(named)) != len(named)
        if repeats and not guids_may_repeat:
            dup = sorted(clash) or sorted({g for g in named if named.count(g) > 1})
            raise StoreError(f"duplicate guids in the store: {dup[:5]}")
        if n == 0:
            return np.zeros((0,), dtype=np.int64)
        if not self.index.is_trained:
            self._train(keys)
        start = len(self)
        self.index.add(keys)
        if self._gpu_index is not None:
            self._gpu_index.add(keys)
        else:  # flat indexes are never trained, so the first add mirrors them (with these keys) on the GPUs
            self._to_gpu()
        self.keys = np.concatenate([self.keys, keys]) if start else keys.copy()
        self.labels = np.concatenate([self.labels, labels])
        self.guids.extend(guids)
        self.texts.extend(texts)
        for i, g in enumerate(guids):
            if g is not None:
                self._guid_to_id.setdefault(g, start + i)
        self.guids_repeat = self.guids_repeat or repeats
        return np.arange(start, start + n, dtype=np.int64)

    def train(self, sample: ArrayLike) -> "KnowledgeStore":
        """Train the index (IVF centroids, PQ codebooks) on a sample of keys; a no-op for flat indexes."""
        if not self.index.is_trained:
            self._train(self._prepare(sample, "training keys"))
        return self

    #: keys beyond this many are subsampled (seeded) to train an index
    train_sample_size = 100_000

    def _train(self, keys: np.ndarray) -> None:
        ivf = faiss.try_extract_index_ivf(self.index)
        if keys.shape[0] > self.train_sample_size:
            pick = np.random.default_rng(0).choice(keys.shape[0], self.train_sample_size, replace=False)
            keys = keys[np.sort(pick)]
        if ivf is not None and keys.shape[0] < ivf.nlist:
            raise StoreError(f"index {self.index_factory!r} needs at least {ivf.nlist} keys to train, got {keys.shape[0]}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.index.train(keys)
        self._to_gpu()

    def build(self, keys: ArrayLike, labels: ArrayLike, guids=None, texts=None) -> "KnowledgeStore":
        """Replace the content with these entries (and train the index if needed)."""
        keys32 = self._prepare(keys, "keys")  # validate before dropping the old content
        old = (self.keys, self.labels, self.guids, self.texts, self._guid_to_id, self.index)
        self.reset()
        try:
            self.add(keys32, labels, guids, texts)
        except Exception:
            self.keys, self.labels, self.guids, self.texts, self._guid_to_id, self.index = old
            raise
        return self

    def ids_of(self, guids: Iterable) -> np.ndarray:
        """Store ids of these guids, -1 for guids not in the store."""
        return np.array([self._guid_to_id.get(str(g), -1) for g in guids], dtype=np.int64)

    # ------------------------------------------------------------------ reading
    def _check_query(self, queries: ArrayLike, k: int, exclude_ids) -> tuple:
        if len(self) == 0:
            raise StoreError("the knowledge store is empty: add entries (add/build) before searching")
        if int(k) < 1:
            raise StoreError(f"k must be at least 1, got {k}")
        q = self._prepare(queries, "queries")
        excl = self._exclusions(exclude_ids, q.shape[0])
        return q, excl

    @staticmethod
    def _exclusions(exclude_ids, batch: int) -> List[np.ndarray]:
        if exclude_ids is None:
            return [np.zeros((0,), dtype=np.int64)] * batch
        if hasattr(exclude_ids, "detach"):
            exclude_ids = exclude_ids.detach().cpu().numpy()
        if isinstance(exclude_ids, np.ndarray) and exclude_ids.ndim <= 2:
            rows = exclude_ids.reshape(batch, -1) if exclude_ids.size else [[]] * batch
        else:
            rows = list(exclude_ids)
        if len(rows) != batch:
            raise StoreError(f"exclude_ids has {len(rows)} rows for {batch} queries")
        out = []
        for r in rows:
            r = np.atleast_1d(np.asarray(r, dtype=np.int64))
            out.append(r[r >= 0])
        return out

    def _selector_params(self, members: np.ndarray):
        """FAISS search parameters restricting a search to ``members``; None where the index type cannot."""
        sel = faiss.IDSelectorBatch(members.astype(np.int64))
        if isinstance(self.index, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.index.nprobe)
        if isinstance(self.index, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=sel, efSearch=self.index.hnsw.efSearch)
        if isinstance(self.index, faiss.IndexFlat):
            return faiss.SearchParameters(sel=sel)
        return None

    def _search_excluding(self, q: np.ndarray, k: int, excl: List[np.ndarray], pool: int,
                          members: Optional[np.ndarray] = None):
        """Top-k among `pool` candidates (all entries, or `members`) minus exclusions.

        Width min(k, pool - max excluded); the search knobs (nprobe, efSearch) live on the index.
        """
        n_ex = max((len(e) for e in excl), default=0)
        width = min(int(k), max(pool - n_ex, 0))
        fetch = min(width + n_ex, pool)
        scores = np.full((q.shape[0], width), -np.inf, dtype=np.float32)
        ids = np.full((q.shape[0], width), -1, dtype=np.int64)
        if width == 0:
            return scores, ids
        if members is None:
            D, I = (self.index if self._gpu_index is None else self._gpu_index).search(q, fetch)
        else:
            params = self._selector_params(members)
            if params is not None:
                D, I = self.index.search(q, fetch, params=params)
            else:  # wrapped index types (refine, pre-transform): exact scores over the members' keys
                sims = q @ np.asarray(self.keys[members]).T
                top = np.argsort(-sims, axis=1, kind="stable")[:, :fetch]
                D, I = np.take_along_axis(sims, top, 1), members[top]
        for b in range(q.shape[0]):
            keep = I[b] >= 0
            if len(excl[b]):
                keep &= ~np.isin(I[b], excl[b])
            d, i = D[b][keep][:width], I[b][keep][:width]
            scores[b, :len(d)], ids[b, :len(i)] = d, i
        return scores, ids

    def _result(self, scores: np.ndarray, ids: np.ndarray) -> SearchResult:
        labels = np.where(ids >= 0, self.labels[np.maximum(ids, 0)], -1)
        return SearchResult(scores=scores, ids=ids, labels=labels)

    def search(self, queries: ArrayLike, k: int, exclude_ids=None) -> SearchResult:
        """The k best entries for each query.

        ``exclude_ids``: per query, store ids never to return (an int, -1 for
        none, or a list) - e.g. the query's own entry for leave-one-out.
        """
        q, excl = self._check_query(queries, k, exclude_ids)
        scores, ids = self._search_excluding(q, k, excl, len(self))
        return self._result(scores, ids)

    def knn_distribution(self, queries: ArrayLike, k: int, temperature: float = 1.0,
                         exclude_ids=None, scale: str = "raw") -> np.ndarray:
        """p_kNN(y|x) = sum_{j in kNN(x)} softmax_j(z_j / T) * 1[y_j = y], shape (B, C).

        ``scale``: ``"raw"`` (z_j = s_j) or ``"zscore"`` (scores standardised per query: scale-free);
        see :mod:`openprompt_retro.core.knn`.
        """
        if not temperature > 0:
            raise StoreError(f"temperature must be positive, got {temperature}")
        res = self.search(queries, k, exclude_ids)
        return knn_label_distribution(res.scores, res.labels, self._num_classes, temperature, scale)

    def leave_one_out_accuracy(self, k: int, temperature: float = 1.0, scale: str = "raw") -> float:
        """Accuracy of argmax p_kNN for every entry, its own entry left out: does the store separate classes?"""
        if len(self) < 2:
            raise StoreError(f"leave-one-out needs at least 2 entries, the store has {len(self)}")
        p = self.knn_distribution(np.asarray(self.keys), k, temperature, np.arange(len(self)), scale)
        return float((p.argmax(1) == self.labels).mean())

    def search_per_class(self, queries: ArrayLike, m: int, exclude_ids=None) -> SearchResult:
        """For each class c, the top-m entries of class c: arrays of shape (B, C, m)."""
        q, excl = self._check_query(queries, m, exclude_ids)
        B, C = q.shape[0], self._num_classes
        width = min(int(m), max(int(np.bincount(self.labels, minlength=C).max()), 1))
        scores = np.full((B, C, width), -np.inf, dtype=np.float32)
        ids = np.full((B, C, width), -1, dtype=np.int64)
        for c in range(C):
            members = np.nonzero(self.labels == c)[0]
            if len(members) == 0:
                continue
            excl_c = [e[np.isin(e, members)] for e in excl]
            s, i = self._search_excluding(q, width, excl_c, len(members), members=members)
            scores[:, c, :s.shape[1]], ids[:, c, :i.shape[1]] = s, i
        return self._result(scores, ids)

    # ------------------------------------------------------------------ disk
    def save(self, directory: str) -> None:
        """Write the FAISS index, the keys/labels (.npy) and metadata with checksums (JSON); no pickle.

        The files go to a new folder beside ``directory`` that replaces it only once
        complete and on disk (:func:`atomic_folder`): a failed or killed save leaves
        the old store as it was, and a store memory-mapped from ``directory`` keeps
        reading its own (old) files. A non-empty ``directory`` that is not a store is refused.
        """
        with atomic_folder(directory, markers=(_META_FILE, _INDEX_FILE)) as tmp:
            faiss.write_index(self.index, os.path.join(tmp, _INDEX_FILE))
            np.save(os.path.join(tmp, _KEYS_FILE), np.ascontiguousarray(self.keys, dtype=np.float32))
            np.save(os.path.join(tmp, _LABELS_FILE), self.labels)
            meta = {
                "format_version": FORMAT_VERSION, "dim": self._dim, "num_classes": self._num_classes,
                "metric": self.metric, "index_factory": self.index_factory, "nprobe": self.nprobe,
                "ef_search": self.ef_search, "built_by": self.built_by, "size": len(self),
                "guids": self.guids, "texts": self.texts,
                **({"guids_repeat": True} if self.guids_repeat else {}),
            }
            meta["checksums"] = {name: sha256_file(os.path.join(tmp, name)) for name in _DATA_FILES}
            meta["checksums"][_META_FILE] = _meta_checksum(meta)
            with open(os.path.join(tmp, _META_FILE), "w", encoding="utf-8") as f:
                json.dump(meta, f)

    @classmethod
    def load(cls, directory: str, expected_dim: Optional[int] = None,
             expected_built_by: Optional[Dict] = None, mmap: bool = False,
             use_gpu: Union[bool, str] = "auto", verify: bool = True,
             files: Optional[Dict[str, bytes]] = None) -> "KnowledgeStore":
        """Read a store written by :meth:`save`, checking that every part agrees.

        ``expected_dim`` / ``expected_built_by`` guard against a store saved by
        another model: each given field must match what was recorded.
        ``mmap=True`` memory-maps the keys and, for index types FAISS can map
        (IVF lists, flat codes), the index itself: for stores larger than RAM.
        ``files``: the store's files already read (file name -> bytes, e.g. as
        verified against a saved run's checksums); they are parsed instead of
        reading ``directory`` (which then only names the store in messages), and
        ``mmap`` does not apply.

        Checks, in order (each failure is a :class:`StoreError` naming the file):
        every file present; ``store.json`` parses and has every required field;
        the sha256 of each data file matches ``store.json`` (``verify=False``
        skips only this, e.g. for a huge store read often); shapes agree; labels
        lie in ``[0, num_classes)``; the index is an inner-product index; with
        ``metric="cosine"`` the keys are unit-length; on a sample of entries the
        index stores exactly the codes of ``keys.npy`` (so other keys of the same
        shape are refused even with rewritten checksums); the metadata matches
        its own checksum (a hand-edited ``num_classes`` or ``metric``).
        """
        if files is None and not os.path.isdir(directory):
            raise StoreError(f"no knowledge store at {directory!r}: folder does not exist")
        paths = {n: os.path.join(directory, n) for n in (_INDEX_FILE, _KEYS_FILE, _LABELS_FILE, _META_FILE)}
        missing = [n for n, p in paths.items() if (n not in files if files is not None else not os.path.isfile(p))]
        if missing:
            raise StoreError(f"knowledge store at {directory!r} is incomplete: missing {missing}")
        if files is None:
            with open(paths[_META_FILE], "rb") as f:
                meta = _read_meta(directory, f.read())
        else:
            meta = _read_meta(directory, files[_META_FILE])
            mmap = False
        dim, num_classes, n, metric = meta["dim"], meta["num_classes"], meta["size"], meta["metric"]
        if expected_dim is not None and dim != int(expected_dim):
            raise StoreError(f"store at {directory!r} holds keys of dimension {dim}, expected {expected_dim}")
        for key, want in (expected_built_by or {}).items():
            got = meta.get("built_by", {}).get(key)
            if got != want:
                raise StoreError(f"store at {directory!r} was built with {key}={got!r}, expected {want!r}")
        if verify and meta["format_version"] >= 2:
            for name in _DATA_FILES:  # before any parser sees the bytes
                got = sha256_file(paths[name]) if files is None else hashlib.sha256(files[name]).hexdigest()
                want = meta["checksums"][name]
                if got != want:
                    raise StoreError(f"knowledge store at {directory!r} has a corrupt {name}: checksum mismatch "
                                     f"(sha256 {got[:12]}..., {_META_FILE} records {want[:12]}...): the file was "
                                     "damaged or changed after saving")
        elif meta["format_version"] < 2:
            warnings.warn(f"knowledge store at {directory!r} was saved in format {meta['format_version']}, without "
                          "checksums: file corruption cannot be detected; save it again to add them", stacklevel=2)
        try:
            keys = np.load(_source(paths, files, _KEYS_FILE), allow_pickle=False, mmap_mode="r" if mmap else None)
            if keys.dtype != np.float32:
                raise ValueError(f"keys have dtype {keys.dtype}, expected float32")
        except Exception as e:
            raise StoreError(f"knowledge store at {directory!r} has a corrupt {_KEYS_FILE}: {e}") from None
        try:
            labels = np.load(_source(paths, files, _LABELS_FILE), allow_pickle=False)
            if not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"labels have dtype {labels.dtype}, expected integers")
            labels = labels.astype(np.int64)
        except Exception as e:
            raise StoreError(f"knowledge store at {directory!r} has a corrupt {_LABELS_FILE}: {e}") from None
        try:
            index = None
            if mmap:
                try:
                    index = faiss.read_index(paths[_INDEX_FILE], faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
                except RuntimeError:  # this index type cannot be mapped: read it
                    index = None
            if files is not None:
                index = faiss.deserialize_index(np.frombuffer(files[_INDEX_FILE], dtype=np.uint8))
            elif index is None:
                index = faiss.read_index(paths[_INDEX_FILE])
        except Exception as e:
            raise StoreError(f"knowledge store at {directory!r} has a corrupt {_INDEX_FILE}: {e}") from None
        if (keys.shape != (n, dim) or labels.shape != (n,) or index.ntotal != n or index.d != dim
                or len(meta["guids"]) != n or len(meta["texts"]) != n):
            raise StoreError(f"knowledge store at {directory!r} is inconsistent: size {n}, dim {dim}, "
                             f"keys {keys.shape}, labels {labels.shape}, index {index.ntotal}x{index.d}, "
                             f"{len(meta['guids'])} guids, {len(meta['texts'])} texts")
        if n and (labels.min() < 0 or labels.max() >= num_classes):
            bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])[:5].tolist()
            raise StoreError(f"knowledge store at {directory!r} has labels {bad} outside [0, {num_classes}) "
                             f"(num_classes={num_classes} in {_META_FILE}, labels in {_LABELS_FILE})")
        _check_index_against_keys(directory, index, keys, metric)
        guids, texts = meta["guids"], meta["texts"]
        for what, values in (("guids", guids), ("texts", texts)):
            if not all(v is None or isinstance(v, str) for v in values):
                raise StoreError(f"knowledge store at {directory!r}: {what} in {_META_FILE} must be strings or null")
        named = [g for g in guids if g is not None]
        if len(set(named)) != len(named) and meta.get("guids_repeat") is not True:
            dup = sorted({g for g in named if named.count(g) > 1})[:5]
            raise StoreError(f"knowledge store at {directory!r}: duplicate guids in {_META_FILE}: {dup}")
        if meta["format_version"] >= 2 and _meta_checksum(meta) != meta["checksums"][_META_FILE]:
            raise StoreError(f"knowledge store at {directory!r}: {_META_FILE} was edited after saving (its fields, "
                             "e.g. num_classes or metric, no longer match the checksum recorded in it)")
        try:
            store = cls(dim, num_classes, metric, meta["index_factory"], meta.get("nprobe"),
                        meta.get("ef_search"), meta.get("built_by"), use_gpu=use_gpu)
        except StoreError as e:
            raise StoreError(f"knowledge store at {directory!r} has an invalid {_META_FILE}: {e}") from None
        store.index, store.keys, store.labels = index, keys, labels
        store._apply_search_knobs()
        store._to_gpu()
        store.guids, store.texts = list(guids), list(texts)
        store._guid_to_id = {}
        for i, g in enumerate(store.guids):
            if g is not None:
                store._guid_to_id.setdefault(g, i)
        store.guids_repeat = meta.get("guids_repeat") is True
        return store


# ---------------------------------------------------------------------- disk helpers
def _meta_checksum(meta: Dict) -> str:
    """sha256 of store.json's fields (all but the store.json checksum itself), in a canonical form."""
    fields = dict(meta)
    checksums = {k: v for k, v in (fields.pop("checksums", None) or {}).items() if k != _META_FILE}
    if checksums:
        fields["checksums"] = checksums
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _source(paths: Dict[str, str], files: Optional[Dict[str, bytes]], name: str):
    """What ``np.load`` reads file ``name`` from: its bytes when given, else its path."""
    return io.BytesIO(files[name]) if files is not None else paths[name]


def _read_meta(directory: str, data: bytes) -> Dict:
    """store.json (its bytes), with every required field present and of the right type."""
    where = f"knowledge store at {directory!r}"
    try:
        meta = json_loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{where} has a corrupt {_META_FILE}: {e}") from None
    if not isinstance(meta, dict):
        raise StoreError(f"{where} has a corrupt {_META_FILE}: expected a JSON object, got {type(meta).__name__}")
    for field, kind in _REQUIRED_FIELDS.items():
        if field not in meta:
            raise StoreError(f"{where} has a corrupt {_META_FILE}: required field {field!r} is missing")
        value = meta[field]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise StoreError(f"{where} has a corrupt {_META_FILE}: field {field!r} must be a "
                             f"{'string' if kind is str else kind.__name__}, got {value!r}")
    if meta["format_version"] not in _READABLE_FORMATS:
        raise StoreError(f"{where}: store format {meta['format_version']} is not supported "
                         f"(this version reads formats {list(_READABLE_FORMATS)})")
    if meta["metric"] not in ("ip", "cosine"):
        raise StoreError(f"{where} has a corrupt {_META_FILE}: metric must be 'ip' or 'cosine', got {meta['metric']!r}")
    for field, low in (("dim", 1), ("num_classes", 1), ("size", 0)):
        if meta[field] < low:
            raise StoreError(f"{where} has a corrupt {_META_FILE}: {field} must be >= {low}, got {meta[field]}")
    if not isinstance(meta.get("built_by", {}), dict):
        raise StoreError(f"{where} has a corrupt {_META_FILE}: field 'built_by' must be an object")
    if meta["format_version"] >= 2:
        sums = meta.get("checksums")
        names = list(_DATA_FILES) + [_META_FILE]
        if not isinstance(sums, dict) or not all(isinstance(sums.get(k), str) for k in names):
            raise StoreError(f"{where} has a corrupt {_META_FILE}: field 'checksums' must hold a sha256 "
                             f"for each of {names}")
    return meta


def _stored_and_fresh_codes(index, keys: np.ndarray, ids: np.ndarray):
    """(codes the index stores for entries ``ids``, codes it gives ``keys[ids]`` now), or None if it cannot tell.

    Covers flat-code indexes (Flat, PQ, SQ), HNSW over them and IVF (Flat, PQ, SQ): the
    stored IVF code is prefixed with its list number, as ``sa_encode`` gives it.
    """
    index = faiss.downcast_index(index)
    x = np.ascontiguousarray(keys[ids], dtype=np.float32)
    if isinstance(index, faiss.IndexHNSW):
        return _stored_and_fresh_codes(index.storage, keys, ids)
    fast_scan = tuple(getattr(faiss, n) for n in ("IndexPQFastScan", "IndexIVFPQFastScan") if hasattr(faiss, n))
    if isinstance(index, fast_scan):  # packed codes: no per-entry layout to compare
        return None
    if isinstance(index, faiss.IndexFlatCodes):
        n, size = index.ntotal, index.code_size
        codes = faiss.rev_swig_ptr(index.codes.data(), n * size).reshape(n, size)
        return codes[ids], index.sa_encode(x)
    if isinstance(index, faiss.IndexIVF):
        ccs, size, inv = index.coarse_code_size(), index.code_size, index.invlists
        stored = np.zeros((len(ids), ccs + size), dtype=np.uint8)
        row_of = {int(i): r for r, i in enumerate(ids)}  # an id in no list keeps all-zero codes: a mismatch
        found = 0
        for lst in range(index.nlist):
            if found == len(ids):
                break
            m = inv.list_size(lst)
            if not m:
                continue
            list_ids = faiss.rev_swig_ptr(inv.get_ids(lst), m)
            hits = np.nonzero(np.isin(list_ids, ids))[0]
            if len(hits):
                codes = faiss.rev_swig_ptr(inv.get_codes(lst), m * size).reshape(m, size)
                prefix = np.frombuffer(int(lst).to_bytes(ccs, "little"), dtype=np.uint8)
                for h in hits:
                    r = row_of[int(list_ids[h])]
                    stored[r, :ccs], stored[r, ccs:] = prefix, codes[h]
                    found += 1
        return stored, index.sa_encode(x)
    return None


def _check_index_against_keys(directory: str, index, keys: np.ndarray, metric: str) -> None:
    """The index must be an inner-product index holding exactly the codes of ``keys`` (checked on a sample)."""
    where = f"knowledge store at {directory!r}"
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise StoreError(f"{where}: {_INDEX_FILE} is not an inner-product index (FAISS metric {index.metric_type}); "
                         "stores search by inner product ('ip', or 'cosine' on unit-length keys)")
    n = keys.shape[0]
    if n == 0:
        return
    ids = np.unique(np.concatenate([[0, n - 1], np.random.default_rng(0).choice(n, min(n, AGREEMENT_SAMPLE),
                                                                                 replace=False)])).astype(np.int64)
    if metric == "cosine":
        norms = np.linalg.norm(np.asarray(keys[ids], dtype=np.float64), axis=1)
        if not np.allclose(norms, 1.0, atol=1e-3):
            raise StoreError(f"{where}: metric is 'cosine' in {_META_FILE} but the keys in {_KEYS_FILE} are not "
                             f"unit-length (norms {np.round(norms[:3], 4).tolist()}...): the metric or the keys "
                             "were changed")
    try:
        codes = _stored_and_fresh_codes(index, keys, ids)
    except RuntimeError as e:
        raise StoreError(f"{where}: {_INDEX_FILE} cannot encode the keys of {_KEYS_FILE}: {e}") from None
    if codes is None:
        warnings.warn(f"{where}: index type {type(index).__name__} cannot be compared with {_KEYS_FILE}; "
                      "only the checksums vouch that they belong together", stacklevel=3)
        return
    stored, fresh = codes
    differ = ids[~np.all(stored == fresh, axis=1)]
    if len(differ):
        raise StoreError(f"{where}: {_INDEX_FILE} and {_KEYS_FILE} disagree: the index does not hold the keys of "
                         f"entries {differ[:5].tolist()} ({len(differ)} of {len(ids)} checked); one of the files was "
                         "replaced or changed")
