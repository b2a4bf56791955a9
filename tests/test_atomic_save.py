"""Saves never destroy a good run or store; loads during a re-save are one checkpoint, never a mix."""
import errno
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import openprompt_retro as R
from openprompt_retro.core import folders as folders_module, store as store_module
from openprompt_retro.core.store import KnowledgeStore
from openprompt_retro.prompt.saved_run import SavedRunError

from test_saved_run import copy_run, saved  # noqa: F401  (the trained run fixture)


def beside(d):
    """Names in the folder that holds ``d``: the run alone, no temporary folder left."""
    return sorted(p.name for p in d.parent.iterdir())


def small_store(seed=0, n=40, dim=16):
    rng = np.random.default_rng(seed)
    s = KnowledgeStore(dim, 3)
    s.add(rng.normal(size=(n, dim)), rng.integers(0, 3, n), guids=[f"g{seed}-{i}" for i in range(n)])
    return s


def raise_on_call(n, error):
    """A replacement for a write function that works n - 1 times, then raises ``error``."""
    calls = []

    def wrap(real):
        def fake(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise error
            return real(*args, **kwargs)
        return fake
    return wrap


# ------------------------------------------------------------------ kill -9 and full disk
KILLED_RESAVE = textwrap.dedent("""
    import os, sys
    import torch
    import openprompt_retro as R
    from openprompt_retro.core import folders as F, store as S

    run, where = sys.argv[1], sys.argv[2]
    tr = R.RetroTrainer.from_pretrained(run)
    with torch.no_grad():  # the new checkpoint differs from the saved one
        next(tr.model.parameters()).add_(1.0)
    tr.model.store.build(tr.model.store.keys[::-1].copy(), tr.model.store.labels[::-1].copy())
    if where == "store written":
        real = S.KnowledgeStore.save
        S.KnowledgeStore.save = lambda self, d: (real(self, d), os._exit(137))
    else:  # every file written and fsynced, not yet swapped in
        real_sync = F._fsync_tree
        F._fsync_tree = lambda root: (real_sync(root), os._exit(137))
    tr.save(run)
    sys.exit(3)  # not reached
""")


@pytest.mark.parametrize("where", ["store written", "before the swap"])
def test_kill_9_during_a_resave_leaves_the_old_run_loadable(saved, tmp_path, where):  # noqa: F811
    d = copy_run(saved, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd()] + sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILLED_RESAVE, str(d), where], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    again = R.RetroTrainer.from_pretrained(str(d))
    np.testing.assert_array_equal(again.predict_proba(saved[2]), saved[1])
    assert again.tuned == saved[3].tuned


def test_a_full_disk_during_a_resave_raises_and_leaves_the_old_run(saved, tmp_path, monkeypatch):  # noqa: F811
    d = copy_run(saved, tmp_path)
    tr = R.RetroTrainer.from_pretrained(str(d))
    with torch.no_grad():
        next(tr.model.parameters()).add_(1.0)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "save", raise_on_call(2, full)(np.save))  # keys.npy written, labels.npy fails
    with pytest.raises(OSError, match=r"saving to .*run' failed \(No space left on device\); nothing was "
                                      r"changed") as err:
        tr.save(str(d))
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert beside(d) == ["run"]
    np.testing.assert_array_equal(R.RetroTrainer.from_pretrained(str(d)).predict_proba(saved[2]), saved[1])


def test_a_full_disk_during_a_store_resave_leaves_the_old_store(tmp_path, monkeypatch):
    d = tmp_path / "store"
    old = small_store(0)
    old.save(str(d))
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "save", raise_on_call(2, full)(np.save))
    with pytest.raises(OSError, match="No space left on device"):
        small_store(1).save(str(d))
    monkeypatch.undo()
    assert beside(d) == ["store"]
    back = KnowledgeStore.load(str(d))
    np.testing.assert_array_equal(back.keys, old.keys)
    assert back.guids == old.guids


def test_a_failed_swap_puts_the_old_store_back(tmp_path, monkeypatch):
    """Where the system cannot exchange two folders in one step: old aside, new in, and back on failure."""
    d = tmp_path / "store"
    old = small_store(0)
    old.save(str(d))
    monkeypatch.setattr(folders_module, "_exchange", lambda a, b: False)
    small_store(1).save(str(d))  # the two-rename swap works
    np.testing.assert_array_equal(KnowledgeStore.load(str(d)).keys, small_store(1).keys)
    # the first rename (old aside) works, the second (new in) fails, the third puts the old one back
    monkeypatch.setattr(store_module.os, "rename", raise_on_call(2, OSError(errno.EXDEV, "cross-device"))(os.rename))
    with pytest.raises(OSError, match="nothing was changed"):
        old.save(str(d))
    monkeypatch.undo()
    assert beside(d) == ["store"]
    np.testing.assert_array_equal(KnowledgeStore.load(str(d)).keys, small_store(1).keys)


MMAP_RESAVE = textwrap.dedent("""
    import sys
    import numpy as np
    from openprompt_retro.core.store import KnowledgeStore

    m = KnowledgeStore.load(sys.argv[1], mmap=True)
    ids = m.search(np.asarray(m.keys[:5]), 4).ids
    m.save(sys.argv[1])  # onto the files it maps
    assert np.array_equal(m.search(np.asarray(m.keys[:5]), 4).ids, ids), "the mapped store changed"
""")


def test_a_memory_mapped_store_can_be_saved_onto_its_own_folder(tmp_path):
    d = tmp_path / "store"
    s = small_store(0, n=300)
    s.save(str(d))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd()] + sys.path)}
    # in a child process: writing into a mapped file can kill the process (SIGBUS)
    proc = subprocess.run([sys.executable, "-c", MMAP_RESAVE, str(d)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    back = KnowledgeStore.load(str(d))
    np.testing.assert_array_equal(back.keys, s.keys)
    assert back.guids == s.guids


# ------------------------------------------------------------------ loads during a re-save
def signature(model):
    """What identifies a checkpoint in each part of a run: a weight, the config, the store."""
    s = model.store
    weight = next(v for k, v in model.state_dict().items() if k.endswith("word_embeddings.weight"))
    return float(weight.double().sum()), model.config.knn_lambda, float(np.asarray(s.keys, np.float64).sum())


def test_loads_during_resaves_are_one_checkpoint_or_a_clear_error(saved, tmp_path):  # noqa: F811
    d = copy_run(saved, tmp_path)
    a = R.RetroPromptForClassification.from_pretrained(str(d))
    b = R.RetroPromptForClassification.from_pretrained(str(d))
    with torch.no_grad():
        next(b.parameters()).add_(1.0)
    b.apply_config(knn_lambda=0.123)
    b.store.build(b.store.keys * 2, b.store.labels, b.store.guids, b.store.texts)
    reader = R.RetroPromptForClassification.from_pretrained(str(d))
    expected = {signature(a), signature(b)}
    assert len({x[i] for x in expected for i in range(3)}) == 6  # the two checkpoints differ in every part

    stop, saves = threading.Event(), []

    def resave():
        while not stop.is_set():
            (a if len(saves) % 2 else b).save(str(d))
            saves.append(1)

    saver = threading.Thread(target=resave)
    saver.start()
    seen, errors = [], []
    try:
        end = time.time() + 2.5
        while time.time() < end or len(saves) < 4:
            try:
                reader.load(str(d))
                seen.append(signature(reader))
            except SavedRunError as e:
                assert re.search("its sha256 does not match the checksum in run.json|which run.json lists", str(e))
                errors.append(e)
    finally:
        stop.set()
        saver.join()
    assert seen and set(seen) <= expected, set(seen) - expected
    assert beside(d) == ["run"]


def test_a_save_never_replaces_a_folder_of_other_files(saved, tmp_path):  # noqa: F811
    d = tmp_path / "outputs"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds other files \(\['notes.txt'\]\).* save to a new or empty"):
        saved[3].save(str(d))
    with pytest.raises(FileExistsError, match="holds other files"):
        small_store().save(str(d))
    assert [p.name for p in d.iterdir()] == ["notes.txt"] and beside(d) == ["outputs"]


def test_a_saved_folder_gets_the_permissions_of_a_new_folder_or_keeps_its_own(tmp_path):
    os.makedirs(tmp_path / "plain")
    small_store().save(str(tmp_path / "store"))
    assert (tmp_path / "store").stat().st_mode == (tmp_path / "plain").stat().st_mode
    os.chmod(tmp_path / "store", 0o750)
    small_store(1).save(str(tmp_path / "store"))
    assert (tmp_path / "store").stat().st_mode & 0o777 == 0o750


def test_a_resave_keeps_the_users_own_files_in_the_run_folder(saved, tmp_path):  # noqa: F811
    """Before, a re-save replaced the whole folder: a user's notes and predictions beside the run were deleted."""
    import json

    d = copy_run(saved, tmp_path)
    (d / "notes.txt").write_text("lr 1e-2 looked best")
    (d / "predictions").mkdir()
    (d / "predictions" / "test.csv").write_text("id,label\n0,1\n")
    (d / "store" / "stray.tmp").write_text("x")  # inside the run's own folders: the run's, replaced
    tr = R.RetroTrainer.from_pretrained(str(d))
    tr.save(str(d))
    assert (d / "notes.txt").read_text() == "lr 1e-2 looked best"
    assert (d / "predictions" / "test.csv").read_text() == "id,label\n0,1\n"
    assert not (d / "store" / "stray.tmp").exists()
    listed = json.loads((d / "run.json").read_text())["checksums"]
    assert "notes.txt" not in listed and "predictions/test.csv" not in listed  # not part of the run
    np.testing.assert_array_equal(R.RetroTrainer.from_pretrained(str(d)).predict_proba(saved[2]), saved[1])
    assert beside(d) == ["run"]


def test_a_clip_predictor_resave_keeps_other_files(tmp_path):
    from openprompt_retro.clip.predictor import write_predictor

    d = tmp_path / "pred"
    write_predictor(str(d), "ZeroShotKnn", {"a": 1}, {"w": torch.zeros(2)})
    (d / "readme.md").write_text("mine")
    write_predictor(str(d), "ZeroShotKnn", {"a": 2}, {"w": torch.ones(2)})
    assert (d / "readme.md").read_text() == "mine"


@pytest.mark.parametrize("case", ["cwd", "mount", "long name", "faiss", "safetensors"])
def test_save_mistakes_and_writer_failures_are_one_savefailed_naming_the_folder(saved, tmp_path, monkeypatch,  # noqa: F811
                                                                               case):
    """Before: save('.') swapped out the working folder; a mount point failed with EBUSY after writing the whole
    run beside it; a 240-character folder name overflowed the temporary name; FAISS and safetensors failures
    surfaced as their own errors naming temporary paths."""
    tr = R.RetroTrainer.from_pretrained(str(saved[0]))
    target = tmp_path / "run"
    if case == "cwd":
        monkeypatch.chdir(tmp_path)
        target = tmp_path
    elif case == "mount":
        target.mkdir()
        real = os.path.ismount
        monkeypatch.setattr(os.path, "ismount", lambda p: os.path.realpath(p) == str(target) or real(p))
    elif case == "long name":
        target = tmp_path / ("r" * 240)
    elif case == "faiss":
        import faiss

        def broken(index, path):
            raise RuntimeError(f"Error in faiss::FileIOWriter: could not open {path} for writing: No space left")
        monkeypatch.setattr(faiss, "write_index", broken)
    else:
        import safetensors.torch

        class SafetensorError(Exception):
            pass

        def broken(model, path, *a, **k):
            raise SafetensorError(f"Error while serializing: IoError(Os {{ code: 28, kind: StorageFull }}) at {path}")

        monkeypatch.setattr(safetensors.torch, "save_model", broken)
    before = sorted(p.name for p in tmp_path.iterdir())
    if case == "long name":
        tr.save(str(target))  # saved: the temporary folder's name is cut, the run's is not
        assert (target / "run.json").is_file()
        return
    with pytest.raises(store_module.SaveFailed) as err:
        tr.save(str(target))
    message = str(err.value)
    assert ".saving-" not in message and repr(str(target)) in message
    assert {"cwd": "current folder", "mount": "mount point", "faiss": "RuntimeError: Error in faiss",
            "safetensors": "SafetensorError"}[case] in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing left behind
