"""Knowledge-store benchmark on synthetic keys: build time, memory, latency, recall@k.

Keys are drawn from a mixture of Gaussians (``centers`` clusters, unit-variance
centres, ``spread`` noise) - clustered like real sentence representations,
unlike i.i.d. Gaussian noise, which no approximate index handles well. Queries
are fresh draws from the same mixture. Recall@k is measured against exact
inner-product search on the same keys.
"""
from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from typing import Dict, List

import numpy as np

from ..core.store import KnowledgeStore

DEFAULT_INDEXES = {
    "Flat": dict(factory="Flat"),
    "IVF-Flat": dict(factory="IVF{nlist},Flat", knob="nprobe", sweep=[8, 16, 32, 64]),
    "IVF-PQ": dict(factory="IVF{nlist},PQ{m}", knob="nprobe", sweep=[16, 64]),
    "HNSW": dict(factory="HNSW32", knob="ef_search", sweep=[64, 128]),
}


def synthetic_keys(n: int, d: int, seed: int, centers: int = 1024, spread: float = 0.5,
                   chunk: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mu = np.random.default_rng(12345).normal(size=(centers, d)).astype(np.float32)  # shared by keys and queries
    out = np.empty((n, d), dtype=np.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        out[i:i + m] = mu[rng.integers(0, centers, m)] + spread * rng.normal(size=(m, d)).astype(np.float32)
    return out


def _nlist(n: int) -> int:
    """IVF lists for ``n`` keys: about 4 sqrt(n), a multiple of 16."""
    return max(16, int(4 * np.sqrt(n)) // 16 * 16)


def check_store_args(sizes: List[int], dims: List[int], indexes: List[str]) -> None:
    """The sizes, dimensions and index names every requested index can be built with, else a UserError."""
    from ..errors import UserError

    for option, values in (("--sizes", sizes), ("--dims", dims), ("--indexes", indexes)):
        if not values:
            raise UserError(f"{option}: none given (a comma-separated list)")
    unknown = [name for name in indexes if name not in DEFAULT_INDEXES]
    if unknown:
        raise UserError(f"--indexes: unknown index(es) {unknown}; choose from {list(DEFAULT_INDEXES)}")
    ivf = [name for name in indexes if name.startswith("IVF")]
    if ivf and min(sizes) < _nlist(min(sizes)):
        raise UserError(f"--sizes {min(sizes)}: {ivf[0]} trains {_nlist(min(sizes))} lists, so it needs at least "
                        f"that many keys")
    if "IVF-PQ" in indexes:
        if min(sizes) < 256:
            raise UserError(f"--sizes {min(sizes)}: IVF-PQ trains 256 centroids per sub-quantizer, so it needs at "
                            "least 256 keys")
        bad = [d for d in dims if d < 8 or d % (d // 8)]
        if bad:
            raise UserError(f"--dims {bad[0]}: IVF-PQ splits a key into d // 8 parts, so d must be at least 8 and "
                            "divisible by d // 8")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_one(keys: np.ndarray, queries: np.ndarray, truth: np.ndarray, name: str, spec: Dict, k: int) -> List[Dict]:
    """Build one index; time and score it at each setting of its search knob."""
    n, d = keys.shape
    factory = spec["factory"].format(nlist=_nlist(n), m=d // 8)
    gc.collect()
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    store = KnowledgeStore(d, 2, index_factory=factory, use_gpu=False)
    store.train(keys)
    for i in range(0, n, 100_000):
        store.index.add(keys[i:i + 100_000])  # index only: the store's own key copy is not part of this measure
    build_s = time.perf_counter() - t0
    rss = _rss_bytes() - rss0
    with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
        import faiss

        faiss.write_index(store.index, f.name)
        index_bytes = os.path.getsize(f.name)
    store.labels = np.zeros(n, dtype=np.int64)  # searching needs only the index; labels for the result type
    base = {"index": name, "factory": factory, "n": n, "d": d, "build_s": round(build_s, 2),
            "index_mb": round(index_bytes / 2**20, 1), "rss_delta_mb": round(rss / 2**20, 1), "k": k}
    rows = []
    for knob in spec.get("sweep", [None]):
        if knob is not None:
            store.set_search_params(**{spec["knob"]: knob})
        t0 = time.perf_counter()
        for q in queries[:50]:
            store.search(q[None], k)
        batch1_ms = 1000 * (time.perf_counter() - t0) / 50
        t0 = time.perf_counter()
        res = store.search(queries[:256], k)
        batch256_ms = 1000 * (time.perf_counter() - t0) / 256
        recall = float(np.mean([len(set(res.ids[i]) & set(truth[i])) / k for i in range(256)]))
        rows.append({**base, "knob": None if knob is None else f"{spec['knob']}={knob}",
                     "ms_per_query_batch1": round(batch1_ms, 3), "ms_per_query_batch256": round(batch256_ms, 4),
                     "recall_at_k": round(recall, 4)})
    return rows


def run_store_benchmark(sizes: List[int], dims: List[int], indexes: List[str], k: int = 16, seed: int = 0,
                        out: str = "benchmarks/store", hnsw_max: int = 100_000) -> List[Dict]:
    import faiss

    os.makedirs(out, exist_ok=True)
    rows = []
    for d in dims:
        for n in sizes:
            keys = synthetic_keys(n, d, seed)
            queries = synthetic_keys(256, d, seed + 1)
            exact = faiss.IndexFlatIP(d)
            exact.add(keys)
            truth = exact.search(queries, k)[1]
            del exact
            for name in indexes:
                if name == "HNSW" and n > hnsw_max:
                    continue  # graph construction at this size takes longer than this benchmark's budget
                for row in bench_one(keys, queries, truth, name, DEFAULT_INDEXES[name], k):
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    with open(os.path.join(out, "results.jsonl"), "a") as f:
                        f.write(json.dumps(row) + "\n")
            del keys
            gc.collect()
    write_store_table(os.path.join(out, "results.jsonl"), os.path.join(out, "table.md"))
    return rows


def write_store_table(results: str, path: str) -> None:
    with open(results) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    lines = ["| n | d | index | search knob | build (s) | index (MB) | ms/query, batch 1 | ms/query, batch 256 "
             "| recall@16 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['d']} | {r['factory']} | {r.get('knob') or '-'} | {r['build_s']} | "
                     f"{r['index_mb']} | {r['ms_per_query_batch1']} | {r['ms_per_query_batch256']} | "
                     f"{r['recall_at_k']} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def run_store_benchmark_cli(ns) -> None:
    """``openprompt-retro store-benchmark``: run, then print the table."""
    check_store_args(ns.sizes, ns.dims, ns.indexes)
    run_store_benchmark(ns.sizes, ns.dims, ns.indexes, k=ns.topk, seed=ns.seed, out=ns.out, hnsw_max=ns.hnsw_max)
    with open(os.path.join(ns.out, "table.md")) as f:
        print(f.read())
