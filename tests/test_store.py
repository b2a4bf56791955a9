import hashlib
import json
import math
import os

import numpy as np
import pytest

from openprompt_retro import KnowledgeStore, StoreError


def small_store(**kw):
    s = KnowledgeStore(dim=2, num_classes=2, **kw)
    s.add([[1, 0], [0, 1], [1, 1]], [0, 1, 1], guids=["a", "b", "c"], texts=["x", "y", "z"])
    return s


def test_knn_distribution_matches_hand_computation_with_temperature():
    s = small_store()
    q = [[2.0, 1.0]]  # scores: a=2, b=1, c=3 -> top-2 = c (label 1), a (label 0)
    for T in (1.0, 0.5, 4.0):
        w_c = math.exp(3 / T) / (math.exp(3 / T) + math.exp(2 / T))
        p = s.knn_distribution(q, k=2, temperature=T)
        np.testing.assert_allclose(p, [[1 - w_c, w_c]], rtol=1e-6)
    # k=3 brings in b (label 1, score 1)
    z = math.exp(3) + math.exp(2) + math.exp(1)
    np.testing.assert_allclose(s.knn_distribution(q, k=3), [[math.exp(2) / z, (math.exp(3) + math.exp(1)) / z]], rtol=1e-6)


def test_cosine_metric_normalises_keys_and_queries():
    s = small_store(metric="cosine")
    res = s.search([[10.0, 0.0]], k=3)
    np.testing.assert_allclose(res.scores[0], [1.0, 1 / math.sqrt(2), 0.0], atol=1e-6)
    assert res.ids[0].tolist() == [0, 2, 1]


def test_leave_one_out_is_exact_with_duplicate_keys():
    s = KnowledgeStore(dim=2, num_classes=2)
    s.add([[1, 0], [1, 0], [0, 1]], [0, 1, 1])  # entries 0 and 1 share a key
    res = s.search(s.keys, k=1, exclude_ids=[0, 1, 2])
    assert res.ids[:2, 0].tolist() == [1, 0]  # each duplicate finds its twin, never itself
    assert res.labels[:2, 0].tolist() == [1, 0]
    # entry 2 scores 0 with both duplicates: k = 2 takes both, with equal weights
    tie = s.search(s.keys[2:], k=2, exclude_ids=[2])
    assert sorted(tie.ids[0].tolist()) == [0, 1] and tie.scores[0].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(s.knn_distribution(s.keys[2:], k=2, exclude_ids=[2]), [[0.5, 0.5]])
    full = s.search(s.keys, k=10, exclude_ids=np.arange(3))
    assert full.ids.shape == (3, 2)  # clipped to len(store) - 1
    for i in range(3):
        assert i not in full.ids[i]
    # the excluded entry takes no part in the distribution either
    np.testing.assert_allclose(s.knn_distribution(s.keys[:1], k=1, exclude_ids=[0]), [[0.0, 1.0]])


def test_search_per_class_and_exclusion():
    s = KnowledgeStore(dim=2, num_classes=2)
    s.add([[1, 0], [0.9, 0.1], [0, 1], [0.2, 0.8]], [0, 0, 1, 1])
    res = s.search_per_class([[1, 0]], m=2, exclude_ids=[0])
    assert res.ids.shape == (1, 2, 2)
    assert res.ids[0, 0].tolist() == [1, -1]  # entry 0 excluded, class 0 has one left
    assert res.ids[0, 1].tolist() == [3, 2]
    assert res.labels[0, 1].tolist() == [1, 1]


def test_k_is_clipped_to_the_store():
    s = small_store()
    res = s.search([[1.0, 0.0]], k=50)
    assert res.ids.shape == (1, 3)
    assert sorted(res.ids[0].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW8"])
def test_save_load_search_identical(tmp_path, factory):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(200, 8)).astype(np.float32)
    labels = rng.integers(0, 3, size=200)
    s = KnowledgeStore(8, 3, index_factory=factory, nprobe=4, built_by={"model": "m1"})
    s.build(keys, labels, guids=[f"g{i}" for i in range(200)], texts=[f"t{i}" for i in range(200)])
    q = rng.normal(size=(5, 8)).astype(np.float32)
    before = s.search(q, 7, exclude_ids=[3, -1, 5, -1, 0])
    s.save(str(tmp_path / "store"))
    t = KnowledgeStore.load(str(tmp_path / "store"), expected_dim=8, expected_built_by={"model": "m1"})
    after = t.search(q, 7, exclude_ids=[3, -1, 5, -1, 0])
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.scores, after.scores)
    assert (len(t), t.dim, t.num_classes) == (200, 8, 3)
    assert t.texts[5] == "t5" and t.ids_of(["g7", "nope"]).tolist() == [7, -1]


# ---------------------------------------------------------------- bad input
def test_empty_store_is_refused():
    s = KnowledgeStore(2, 2)
    with pytest.raises(StoreError, match="empty"):
        s.search([[1, 0]], k=1)
    with pytest.raises(StoreError, match="empty"):
        s.knn_distribution([[1, 0]], k=1)


def test_bad_k_and_temperature():
    s = small_store()
    with pytest.raises(StoreError, match="k must be at least 1"):
        s.search([[1, 0]], k=0)
    with pytest.raises(StoreError, match="temperature"):
        s.knn_distribution([[1, 0]], k=1, temperature=0)


@pytest.mark.parametrize("keys,labels,msg", [
    ([[1, 2, 3]], [0], "dimension 3"),
    ([[1, 0]], [2], "out of range"),
    ([[1, 0]], [-1], "out of range"),
    ([[np.nan, 0]], [0], "NaN or inf"),
    ([[np.inf, 0]], [0], "NaN or inf"),
    ([[1, 0], [0, 1]], [0], "2 keys but 1 labels"),
    ([[1, 0]], ["pos"], r"labels must be integer class ids, got strings such as 'pos' \(map label names to ids"),
    ([[1, 0]], ["1"], "labels must be integer class ids, got strings such as '1'"),
    ([[1, 0]], [None], "labels must be integer class ids, got object values such as None"),
    ([[1, 0], [0, 1]], [1.0, 0.5], r"labels must be whole numbers \(integer class ids\), got \[0\.5\]"),
    ([[1, 0]], [np.nan], r"labels must be whole numbers \(integer class ids\), got \[nan\]"),
])
def test_bad_entries_raise_and_lose_nothing(keys, labels, msg):
    s = small_store()
    snapshot = (s.keys.copy(), s.labels.copy(), list(s.guids), s.index.ntotal)
    with pytest.raises(StoreError, match=msg):
        s.add(keys, labels)
    with pytest.raises(StoreError, match=msg):
        s.build(keys, labels)
    assert np.array_equal(s.keys, snapshot[0]) and np.array_equal(s.labels, snapshot[1])
    assert s.guids == snapshot[2] and s.index.ntotal == snapshot[3]
    assert s.search([[1, 0]], k=1).ids[0, 0] == 0  # still usable


def test_whole_float_labels_are_class_ids():
    s = KnowledgeStore(2, 2).build([[1, 0], [0, 1]], np.array([1.0, 0.0]))
    assert s.labels.dtype == np.int64 and s.labels.tolist() == [1, 0]


def test_query_dimension_and_nan_queries():
    s = small_store()
    with pytest.raises(StoreError, match="queries have dimension 3"):
        s.search([[1, 0, 0]], k=1)
    with pytest.raises(StoreError, match="NaN or inf"):
        s.search([[np.nan, 0]], k=1)


def test_duplicate_guids_refused():
    s = small_store()
    with pytest.raises(StoreError, match="duplicate guids"):
        s.add([[1, 0]], [0], guids=["a"])


def test_missing_and_corrupt_store_folders(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        KnowledgeStore.load(str(tmp_path / "nothing"))
    s = small_store()
    d = tmp_path / "s"
    s.save(str(d))
    os.remove(d / "index.faiss")
    with pytest.raises(StoreError, match="missing"):
        KnowledgeStore.load(str(d))
    s.save(str(d))
    (d / "store.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt store.json"):
        KnowledgeStore.load(str(d))
    s.save(str(d))
    (d / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="corrupt index.faiss"):
        KnowledgeStore.load(str(d))
    s.save(str(d))
    meta = json.loads((d / "store.json").read_text())
    meta["size"] = 5
    (d / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="inconsistent"):
        KnowledgeStore.load(str(d))


def test_store_from_another_model_is_refused(tmp_path):
    s = KnowledgeStore(2, 2, built_by={"model": "bert-base"})
    s.add([[1, 0]], [0])
    s.save(str(tmp_path))
    with pytest.raises(StoreError, match="dimension 2, expected 384"):
        KnowledgeStore.load(str(tmp_path), expected_dim=384)
    with pytest.raises(StoreError, match="model='bert-base', expected 'roberta-large'"):
        KnowledgeStore.load(str(tmp_path), expected_built_by={"model": "roberta-large"})


def test_bad_construction():
    with pytest.raises(StoreError, match="metric"):
        KnowledgeStore(2, 2, metric="l2")
    with pytest.raises(StoreError, match="FAISS cannot build"):
        KnowledgeStore(2, 2, index_factory="NotAnIndex")
    s = KnowledgeStore(4, 2, index_factory="IVF16,Flat")
    with pytest.raises(StoreError, match="needs at least 16 keys"):
        s.add(np.ones((3, 4)), [0, 1, 0])
    assert len(s) == 0


def test_corrupt_keys_file(tmp_path):
    s = small_store()
    s.save(str(tmp_path))
    (tmp_path / "keys.npy").write_bytes(b"not an array")
    with pytest.raises(StoreError, match="corrupt keys.npy"):
        KnowledgeStore.load(str(tmp_path))


def test_train_on_sample_then_stream_and_mmap_load(tmp_path):
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(600, 16)).astype(np.float32)
    labels = rng.integers(0, 4, size=600)
    s = KnowledgeStore(16, 4, index_factory="IVF8,Flat")
    s.train(keys[rng.choice(600, 200, replace=False)])
    for i in range(0, 600, 100):  # streaming: batches are added as they come
        s.add(keys[i:i + 100], labels[i:i + 100])
    assert len(s) == 600 and s.index.ntotal == 600
    s.set_search_params(nprobe=8)  # all lists: exact
    exact = np.argsort(-(keys[:5] @ keys.T), axis=1)[:, :10]
    np.testing.assert_array_equal(s.search(keys[:5], 10).ids, exact)
    s.save(str(tmp_path))
    m = KnowledgeStore.load(str(tmp_path), mmap=True)
    assert isinstance(m.keys, np.memmap)
    np.testing.assert_array_equal(m.search(keys[:5], 10).ids, exact)


def test_exclusion_of_minus_one_excludes_nothing():
    s = small_store()
    for exclude in (None, [-1], [[-1, -1]], np.array([-1])):
        res = s.search([[2.0, 1.0]], k=3, exclude_ids=exclude)
        assert res.ids.tolist() == [[2, 0, 1]], exclude  # all three entries (scores 3, 2, 1), best first


def test_ids_of_counts_from_the_first_entry_across_adds():
    s = small_store()
    assert s.add([[2, 2], [3, 0]], [1, 0], guids=["d", "e"]).tolist() == [3, 4]
    assert s.ids_of(["a", "c", "d", "e"]).tolist() == [0, 2, 3, 4]
    assert s.search([[3.0, 0.0]], k=1, exclude_ids=s.ids_of(["e"])).ids.tolist() == [[3]]  # d: 6 beats a: 3


def test_search_per_class_keeps_m_slots_for_the_largest_class():
    s = KnowledgeStore(dim=2, num_classes=3)
    s.add([[1, 0], [0, 1], [0, 2], [0, 3]], [0, 1, 1, 1])  # class 0: one entry, class 2: none
    res = s.search_per_class([[0.0, 1.0]], m=3)
    assert res.ids.shape == (1, 3, 3)
    assert res.ids[0].tolist() == [[0, -1, -1], [3, 2, 1], [-1, -1, -1]]
    assert np.isneginf(res.scores[0, 0, 1:]).all() and res.labels[0, 2].tolist() == [-1, -1, -1]


# ---------------------------------------------------------------- corruption and tampering on disk
def saved_store(path, factory="Flat", metric="ip", n=300, dim=16, classes=3):
    rng = np.random.default_rng(0)
    s = KnowledgeStore(dim, classes, metric=metric, index_factory=factory)
    s.build(rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, classes, size=n),
            guids=[f"g{i}" for i in range(n)])
    s.save(str(path))
    return s


def edit_meta(d, rewrite_checksums=False, **changes):
    """Edit store.json; with ``rewrite_checksums`` also recompute every checksum, as a thorough tamperer would."""
    meta = json.loads((d / "store.json").read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    if rewrite_checksums:  # the documented format: sha256 of each file, then of the canonical JSON of the rest
        meta["checksums"] = {n: hashlib.sha256((d / n).read_bytes()).hexdigest()
                             for n in ("index.faiss", "keys.npy", "labels.npy")}
        canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        meta["checksums"]["store.json"] = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    (d / "store.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("name", ["index.faiss", "keys.npy", "labels.npy"])
def test_one_flipped_byte_in_any_file_is_refused(tmp_path, name):
    saved_store(tmp_path)
    data = bytearray((tmp_path / name).read_bytes())
    data[len(data) - 37] ^= 0x01  # inside the vectors / labels, past every header
    (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"corrupt {name}: checksum mismatch"):
        KnowledgeStore.load(str(tmp_path))


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW8", "IVF4,PQ4x4", "SQ8"])
@pytest.mark.parametrize("how", ["other keys", "rows permuted"])
def test_keys_that_do_not_match_the_index_are_refused_even_with_rewritten_checksums(tmp_path, factory, how):
    s = saved_store(tmp_path, factory)
    KnowledgeStore.load(str(tmp_path))  # the untouched store loads
    rng = np.random.default_rng(7)
    other = rng.normal(size=s.keys.shape).astype(np.float32) if how == "other keys" else s.keys[::-1].copy()
    np.save(tmp_path / "keys.npy", other)
    edit_meta(tmp_path, rewrite_checksums=True)
    with pytest.raises(StoreError, match="index.faiss and keys.npy disagree"):
        KnowledgeStore.load(str(tmp_path))
    with pytest.raises(StoreError, match="disagree"):  # skipping the checksums does not skip this
        KnowledgeStore.load(str(tmp_path), verify=False)


def test_an_l2_index_is_refused(tmp_path):
    import faiss

    s = saved_store(tmp_path)
    l2 = faiss.IndexFlatL2(s.dim)
    l2.add(s.keys)
    faiss.write_index(l2, str(tmp_path / "index.faiss"))
    edit_meta(tmp_path, rewrite_checksums=True)
    with pytest.raises(StoreError, match="not an inner-product index"):
        KnowledgeStore.load(str(tmp_path))


@pytest.mark.parametrize("field", ["metric", "dim", "num_classes", "size", "index_factory", "guids", "texts",
                                   "format_version"])
def test_a_missing_required_field_is_a_store_error_naming_it(tmp_path, field):
    saved_store(tmp_path)
    edit_meta(tmp_path, **{field: None})
    with pytest.raises(StoreError, match=f"corrupt store.json: required field '{field}' is missing"):
        KnowledgeStore.load(str(tmp_path))


@pytest.mark.parametrize("changes,msg", [
    (dict(metric="cosine"), "metric is 'cosine' in store.json but the keys in keys.npy are not unit-length"),
    (dict(metric="l2"), "metric must be 'ip' or 'cosine', got 'l2'"),
    (dict(num_classes=2), r"labels \[2\] outside \[0, 2\)"),
    (dict(num_classes=4), "store.json was edited after saving"),
    (dict(num_classes="3"), "field 'num_classes' must be a int"),
    (dict(metric=None, rewrite_checksums=True), "required field 'metric' is missing"),
    (dict(checksums=None), "field 'checksums' must hold a sha256"),
    (dict(guids=[1] * 300, rewrite_checksums=True), "guids in store.json must be strings"),
    (dict(guids=["same"] * 300, rewrite_checksums=True), "duplicate guids"),
])
def test_edited_metadata_is_checked_against_the_data(tmp_path, changes, msg):
    saved_store(tmp_path)
    edit_meta(tmp_path, **changes)
    with pytest.raises(StoreError, match=msg):
        KnowledgeStore.load(str(tmp_path))


def test_cosine_store_round_trips_and_format_1_stores_still_load(tmp_path):
    s = saved_store(tmp_path, metric="cosine")
    t = KnowledgeStore.load(str(tmp_path))
    q = np.random.default_rng(3).normal(size=(4, 16))
    np.testing.assert_array_equal(s.search(q, 5).ids, t.search(q, 5).ids)
    meta = json.loads((tmp_path / "store.json").read_text())
    meta["format_version"] = 1  # what the previous version wrote: no checksums
    meta.pop("checksums")
    (tmp_path / "store.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="without checksums"):
        old = KnowledgeStore.load(str(tmp_path))
    np.testing.assert_array_equal(old.search(q, 5).ids, t.search(q, 5).ids)
    np.save(tmp_path / "keys.npy", np.ascontiguousarray(s.keys[::-1]))
    with pytest.raises(StoreError, match="disagree"), pytest.warns(UserWarning):  # still checked against the index
        KnowledgeStore.load(str(tmp_path))
