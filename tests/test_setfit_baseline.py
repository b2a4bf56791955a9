"""The SetFit baseline (``--methods setfit``): the real setfit package on the run's encoder and split, its defaults
named in the row, training time recorded; without the optional extra, a one-line error before anything runs."""
import json
import os

import pytest

from openprompt_retro.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "text")
needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "k-shot")), reason="../shared data not present")


@needs_data
def test_setfit_runs_with_its_defaults_and_records_them(tmp_path):
    pytest.importorskip("setfit")
    out = tmp_path / "sf"
    main(["run", "--model", "tiny-bert", "--tasks", "MRPC", "--seeds", "13", "--methods", "setfit", "--no-progress",
          "--data-root", DATA, "--out", str(out)])
    (row,) = [json.loads(line) for line in open(out / "results.jsonl")]
    assert (row["task"], row["method"], row["seed"], row["n_test"]) == ("MRPC", "setfit", 13, 408)
    assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["dev_accuracy"] <= 1.0
    assert row["train_seconds"] > 0 and row["knn_lambda"] is None
    s = row["settings"]
    assert s["defaults"]["sampling_strategy"] == "oversampling" and s["defaults"]["loss"] == "CosineSimilarityLoss"
    assert s["defaults"]["seed"] == 13 and s["head"] == "LogisticRegression" and s["pair_join"] == "[SEP]"
    assert s["dev"] == "reported, not used"
    assert not list(tmp_path.glob("**/checkpoints"))  # SetFit's files went to a temporary folder


@needs_data
def test_without_the_extra_setfit_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    from openprompt_retro.experiments import setfit_baseline

    monkeypatch.setattr(setfit_baseline, "setfit_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(["run", "--model", "tiny-bert", "--tasks", "SST-2", "--methods", "prompt,setfit", "--data-root", DATA,
              "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[setfit]"' in err[0]
    assert not (tmp_path / "x" / "results.jsonl").exists()
