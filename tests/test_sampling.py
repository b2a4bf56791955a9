"""Seeded stratified subsets for --limit / --test-limit, and the atomic tiny-model cache."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from openprompt_retro.experiments.sampling import stratified_subset, subset_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "text")


def test_a_limit_on_a_class_sorted_list_keeps_every_class_in_proportion():
    labels = np.repeat([0, 1, 2], [500, 300, 200])  # sorted by class, like mr/cr/mpqa/subj and CIFAR-10 test files
    chosen = stratified_subset(labels, 100, seed=1)
    assert len(chosen) == 100 and len(set(chosen.tolist())) == 100
    assert np.bincount(labels[chosen]).tolist() == [50, 30, 20]  # the first 100 would be class 0 only
    assert np.all(np.diff(chosen) > 0)  # kept in file order
    assert np.array_equal(chosen, stratified_subset(labels, 100, seed=1))  # seeded
    assert not np.array_equal(chosen, stratified_subset(labels, 100, seed=2))
    odd = stratified_subset(labels, 7, seed=0)  # 3.5 / 2.1 / 1.4: largest remainders
    assert np.bincount(labels[odd], minlength=3).tolist() == [4, 2, 1]
    rare = np.array([0] * 98 + [1, 2])
    assert sorted(set(rare[stratified_subset(rare, 5, seed=0)].tolist())) == [0, 1, 2]  # every class shows up
    assert np.array_equal(stratified_subset(labels, None, 0), np.arange(1000))
    assert np.array_equal(stratified_subset(labels, 5000, 0), np.arange(1000))
    with pytest.raises(ValueError, match="positive"):
        stratified_subset(labels, 0, 0)
    record = subset_record(labels, 100, 1, chosen)
    assert record == {"limit": 100, "seed": 1, "stratified": True, "n": 100, "of": 1000,
                      "class_counts": {"0": 50, "1": 30, "2": 20}}


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "k-shot", "mr")), reason="../shared data not present")
def test_speed_limit_is_stratified_and_recorded(capsys):
    """mr's test file is sorted by label: before, --limit 20 timed 20 examples of class 0."""
    from openprompt_retro.cli import main

    main(["speed", "--task", "mr", "--model", "tiny-bert", "--limit", "20", "--repeats", "1", "--data-root", DATA,
          "--seed", "13", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert out["n_test"] == 20 and out["device"] == "cpu"
    assert out["test_subset"] == {"limit": 20, "seed": 13, "stratified": True, "n": 20, "of": 2000,
                                  "class_counts": {"0": 10, "1": 10}}


def test_concurrent_first_use_of_the_tiny_model_cache(tmp_path):
    """Several processes build tiny-bert and tiny-clip into an empty cache at once: all succeed, same weights.

    (Before, 5 of 12 concurrent first users crashed with "no file named model.safetensors".)
    """
    script = (
        "import sys, hashlib, os\n"
        "from openprompt_retro.testing import ensure_tiny_model\n"
        "from safetensors.torch import load_file\n"
        "out = []\n"
        "for name in sys.argv[1:]:\n"
        "    path = ensure_tiny_model(name)\n"
        "    w = load_file(os.path.join(path, 'model.safetensors'))\n"
        "    out.append(name + '=' + hashlib.sha256(b''.join(w[k].numpy().tobytes() for k in sorted(w))).hexdigest())\n"
        "print(' '.join(out))\n")
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    orders = [["tiny-bert", "tiny-clip"], ["tiny-clip", "tiny-bert"], ["tiny-bert", "tiny-clip"]]
    procs = [subprocess.Popen([sys.executable, "-c", script, *order], env=env, cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for order in orders]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(dict(item.split("=") for item in out.split()))
    assert all(r == results[0] for r in results) and set(results[0]) == {"tiny-bert", "tiny-clip"}
    from openprompt_retro.testing import tiny_model_dir

    cache = os.path.join(str(tmp_path), f"openprompt-retro-{os.getuid()}")  # the processes' TMPDIR/<private cache>
    left = sorted(p for p in os.listdir(cache) if not p.endswith(".lock"))
    assert left == sorted(os.path.basename(tiny_model_dir(n)) for n in ("tiny-bert", "tiny-clip"))  # no temp folders


def test_ensure_tiny_model_names():
    from openprompt_retro.testing import ensure_tiny_mlm, ensure_tiny_model

    with pytest.raises(ValueError, match="unknown tiny model 'tiny-gpt'"):
        ensure_tiny_model("tiny-gpt")
    with pytest.raises(ValueError, match="tiny-bert and tiny-roberta"):
        ensure_tiny_mlm("tiny-clip")
