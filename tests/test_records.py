"""RunRecord: the one result record every results.jsonl row is written from and read back into."""
import json
import os

import numpy as np
import pytest

from openprompt_retro.cli import main
from openprompt_retro.experiments.records import PseudoLabelStore, RunRecord
from openprompt_retro.experiments.results import run_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "text")
needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "k-shot")), reason="../shared data not present")

#: a row as written before rows had ``shots`` and ``settings_id`` (benchmarks/results, prompt, seed 13)
LEGACY_PROMPT = {"task": "SST-2", "method": "prompt", "k": 16, "seed": 13, "model": "../shared/models/minilm-l6-mlm",
                 "test_accuracy": 0.62, "n_test": 872, "dev_accuracy": 0.65625, "epochs_run": 10,
                 "train_seconds": 174.57, "test_seconds": 17.52, "knn_lambda": 0.0, "knn_k": 16,
                 "knn_temperature": 1.0,
                 "settings": {"lr": 5e-05, "epochs": 20, "batch_size": 8, "max_seq_length": 128, "demo_topk": 8,
                              "loss_beta": 1.0, "patience": 20, "max_steps": 200, "eval_every": 20,
                              "mixture_grid": "small", "device": "cpu", "amp": None,
                              "config": {"demo_topk": 8, "loss": "ce", "knn_lambda": 0.0}},
                 "diagnostics": {"evaluations": [{"step": 20, "dev_accuracy": 0.59375}]}}


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    """{method: row} of one real tiny-model grid: trained methods (retro-no-knn-infer on retro's training), both
    baselines and both zero-shot methods."""
    out = tmp_path_factory.mktemp("records")
    main(["run", "--model", "tiny-bert", "--tasks", "SST-2", "--seeds", "13", "--no-progress", "--data-root", DATA,
          "--max-steps", "2", "--eval-every", "2", "--mixture-grid", "fixed", "--zs-pool-size", "64",
          "--methods", "prompt,retro,retro-no-knn-infer,fine-tune,linear-probe,zero-shot,zero-shot-retro",
          "--out", str(out)])
    with open(out / "results.jsonl", encoding="utf-8") as f:
        return {row["method"]: row for row in map(json.loads, f)}


@needs_data
@pytest.mark.parametrize("method", ["prompt", "retro", "retro-no-knn-infer", "fine-tune", "linear-probe",
                                    "zero-shot", "zero-shot-retro"])
def test_a_written_row_reads_back_into_the_record_that_writes_it_again(tiny_rows, method):
    """row -> record -> row gives the same row: same fields, same order, same values."""
    row = tiny_rows[method]
    again = RunRecord.from_row(row).to_row()
    assert again == row and list(again) == list(row)


@needs_data
def test_each_kind_of_run_fills_its_own_parts(tiny_rows):
    """Trained runs carry diagnostics, the ablation names the training it shares, zero-shot-retro its store;
    nothing ends up in ``extra`` (every field a run writes is a field of the record)."""
    records = {m: RunRecord.from_row(r) for m, r in tiny_rows.items()}
    assert all(r.extra == {} for r in records.values())
    assert "evaluations" in records["retro"].diagnostics and records["linear-probe"].diagnostics is None
    assert records["retro-no-knn-infer"].shares_training_with == "retro"
    assert records["retro"].shares_training_with is None
    store = records["zero-shot-retro"].pseudo_labels
    assert isinstance(store, PseudoLabelStore) and store.pool_size == 64 and 0 < store.store_size <= 64
    assert records["zero-shot"].pseudo_labels is None and "pool_size" not in tiny_rows["zero-shot"]
    for method, record in records.items():
        assert record.key == run_key(tiny_rows[method])


def test_an_old_row_reads_with_shots_and_its_derived_settings_id():
    """``k`` is read as ``shots``; the settings id is the one the run's recorded settings give (its run key)."""
    record = RunRecord.from_row(LEGACY_PROMPT)
    assert (record.shots, record.seed, record.test_accuracy, record.knn_k) == (16, 13, 0.62, 16)
    assert record.key == run_key(LEGACY_PROMPT) and len(record.settings_id) == 12
    assert record.extra == {} and record.diagnostics == LEGACY_PROMPT["diagnostics"]
    row = record.to_row()
    assert "k" not in row and row["shots"] == 16 and row["settings_id"] == record.settings_id
    assert RunRecord.from_row(row) == record  # rewritten in today's form, it reads as the same record


def test_fields_this_version_does_not_know_are_kept():
    """A row with a field no run writes today keeps it, after the known ones."""
    row = {**LEGACY_PROMPT, "note": "rerun on cpu"}
    assert RunRecord.from_row(row).extra == {"note": "rerun on cpu"}
    assert list(RunRecord.from_row(row).to_row())[-1] == "note"


def test_a_row_without_a_test_accuracy_is_not_a_record():
    with pytest.raises(KeyError):
        RunRecord.from_row({k: v for k, v in LEGACY_PROMPT.items() if k != "test_accuracy"})


@needs_data
def test_zero_shot_retro_reads_the_store_its_key_encoder_names(tmp_path):
    """--zs-key-encoder frozen-mean: the same pseudo-labels, keyed by the frozen encoder and read by class means
    (no top-k search); the default keeps the [MASK] store and the settings id rows had before the option."""
    from store_spy import spy_store

    rows, calls = {}, {}
    for keys in ("mask", "frozen-mean"):
        out = tmp_path / keys
        with spy_store() as calls[keys]:
            main(["run", "--model", "tiny-bert", "--tasks", "SST-2", "--seeds", "13", "--no-progress",
                  "--data-root", DATA, "--zs-pool-size", "48", "--methods", "zero-shot-retro",
                  "--zs-key-encoder", keys, "--out", str(out)])
        with open(out / "results.jsonl", encoding="utf-8") as f:
            (rows[keys],) = map(json.loads, f)
    mask, frozen = rows["mask"], rows["frozen-mean"]
    store = RunRecord.from_row(frozen).pseudo_labels
    assert RunRecord.from_row(mask).pseudo_labels == store  # the same zero-shot model chose the same entries
    store_size = store.store_size
    assert {c.kind for c in calls["mask"]} == {"search"}
    assert {c.kind for c in calls["frozen-mean"]} == {"class_mean"}
    for call in calls["frozen-mean"]:
        assert call.store_keys.shape[0] == store_size
        np.testing.assert_allclose(np.linalg.norm(call.store_keys, axis=1), 1.0, rtol=1e-5)  # cosine keys
    assert frozen["settings"]["key_encoder"] == "frozen-mean" and frozen["settings"]["knn_readout"] == "class-mean"
    assert frozen["settings_id"] != mask["settings_id"]
    # a row written before the option (no key encoder in its settings, no settings id) keys as the default
    old = {k: v for k, v in mask.items() if k != "settings_id"}
    old["settings"] = {k: v for k, v in mask["settings"].items()
                       if k not in ("key_encoder", "knn_readout", "class_mean_temperature")}
    assert run_key(old) == run_key(mask)
