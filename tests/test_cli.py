import csv
import json
import os
import re
import subprocess
import sys

import pytest

from openprompt_retro.core.config import RetroConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "text")
needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "k-shot")), reason="../shared data not present")


def run(*args, timeout=300):
    out = subprocess.run([sys.executable, "-m", "openprompt_retro", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_help_lists_commands_and_methods():
    out = run("--help").stdout
    for word in ("run", "benchmark", "report", "speed"):
        assert word in out
    out = run("run", "--help").stdout
    for method in ("prompt", "demo-text", "retro-no-knn-infer"):
        assert method in out
    flat = " ".join(out.split())  # argparse wraps lines
    assert "learning rate (default: 5e-05)" in flat
    assert "m neighbours per class (default: 8 for K>=16, else 2)" in flat  # the help's own default, once
    assert "(default: None)" not in flat
    assert not re.search(r"\(default: [^)]*\) \(default:", flat)  # never two defaults on one option


@needs_data
def test_smoke_run_writes_well_formed_outputs(tmp_path):
    out_dir = tmp_path / "smoke"
    out = run("run", "--model", "tiny-bert", "--tasks", "SST-2", "--methods", "prompt,retro", "--seeds", "42",
        "--epochs", "1", "--no-progress", "--out", str(out_dir), "--data-root", DATA)
    assert "tokenizing" not in out.stderr and "Loading weights" not in out.stderr  # --no-progress
    rows = [json.loads(line) for line in open(out_dir / "results.jsonl")]
    assert [(r["task"], r["method"], r["seed"], r["shots"]) for r in rows] == [("SST-2", "prompt", 42, 16),
                                                                           ("SST-2", "retro", 42, 16)]
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["n_test"] == 872
        assert 0.0 <= r["knn_lambda"] <= 1.0
    assert rows[0]["knn_lambda"] == 0.0  # plain prompt tuning never mixes
    diag = rows[1]["diagnostics"]  # retro: the same weights under other inference settings, reliance on dev too
    assert set(diag["test_accuracy_by_inference"]) == {"plm_only", "fixed", "knn_only", "knn_plm_agreement",
                                                      "knn_only_by_readout"}  # the default frozen store
    by_readout = diag["test_accuracy_by_inference"]["knn_only_by_readout"]
    assert set(by_readout) == {"topk", "class-mean", "logistic"}
    in_use = rows[1]["settings"]["config"]["knn_readout"]  # as dev chose it, where the read-out was "auto"
    assert by_readout[in_use] == diag["test_accuracy_by_inference"]["knn_only"]
    if rows[1]["knn_lambda"] == 0.0:
        assert diag["test_accuracy_by_inference"]["plm_only"] == rows[1]["test_accuracy"]
    assert {"permuted_change", "removed_change"} <= set(diag["demonstration_reliance_dev"])
    assert "test_accuracy_by_inference" not in rows[0].get("diagnostics", {})
    with open(out_dir / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    table = (out_dir / "table.md").read_text()
    assert table.startswith("| method | SST-2 | avg |") and "| retro |" in table and "±" in table
    png = (out_dir / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # --resume skips finished runs
    run("run", "--model", "tiny-bert", "--tasks", "SST-2", "--methods", "prompt", "--seeds", "42", "--epochs", "1",
        "--no-progress", "--out", str(out_dir), "--data-root", DATA, "--resume")
    assert len(open(out_dir / "results.jsonl").read().strip().splitlines()) == 2


@needs_data
def test_speed_reports_ratios_and_offers_only_inference_options():
    help_text = run("speed", "--help").stdout
    assert "--max-seq-length" in help_text and "--epochs" not in help_text and "--zs-k" not in help_text
    out = json.loads(run("speed", "--model", "tiny-bert", "--limit", "16", "--repeats", "1", "--data-root", DATA,
                          "--device", "cpu").stdout)
    assert out["n_test"] == 16 and out["n_train"] == 32 and out["task"] == "SST-2" and out["repeats"] == 1
    seconds = {k for k in out if k.endswith("_s")}
    assert seconds == {"tokenize_test_s", "plain_s", "knn_s", "retro_s", "knn_search_only_s", "store_refresh_s",
                       "train_forward_s", "knn_cold_s", "retro_cold_s"}  # the default store has a key encoder
    ratios = {"knn_over_plain", "retro_over_plain", "refresh_over_train_forward", "knn_cold_over_plain",
              "retro_cold_over_plain"}
    assert set(out) == seconds | ratios | {"task", "n_test", "n_train", "model", "torch_threads", "repeats", "device",
                                           "amp", "test_subset", "key_encoder"}
    assert out["key_encoder"] == RetroConfig().key_encoder  # the default store's
    assert out["device"] == "cpu" and out["test_subset"]["limit"] == 16
    for key in seconds | ratios:  # sub-millisecond timings must not round to 0 (4 significant digits)
        assert isinstance(out[key], float) and 0 < out[key] < 600, (key, out[key])
        assert len(f"{out[key]:.6e}".split("e")[0].replace(".", "").rstrip("0")) <= 4, (key, out[key])


def test_unknown_task_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "openprompt_retro", "run", "--model", "tiny-bert", "--tasks", "nope",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "unknown task 'nope'" in out.stderr


def test_report_splits_methods_by_k(tmp_path):
    from openprompt_retro.experiments.report import markdown_table

    rows = [{"task": "SST-2", "method": "retro", "k": k, "seed": s, "test_accuracy": a}
            for k, s, a in [(4, 13, 0.5), (4, 42, 0.6), (16, 13, 0.7), (16, 42, 0.9)]]
    table = markdown_table(rows)
    assert "| retro (K=4) | 55.0 ± 5.0 |" in table and "| retro (K=16) | 80.0 ± 10.0 |" in table
    single = markdown_table([r for r in rows if r["k"] == 16])
    assert "| retro | 80.0 ± 10.0 | 80.0 (std 10.0) |" in single


def test_report_keeps_only_the_chosen_seeds(tmp_path):
    path = tmp_path / "results.jsonl"
    rows = [{"task": "SST-2", "method": "prompt", "k": 16, "seed": s, "test_accuracy": a, "dev_accuracy": None}
            for s, a in [(13, 0.6), (42, 0.8), (87, 0.1)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run("report", str(path), "--seeds", "13,42")
    assert "| prompt | 70.0 ± 10.0 |" in (tmp_path / "table.md").read_text()
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 3  # every run stays listed
    out = subprocess.run([sys.executable, "-m", "openprompt_retro", "report", str(path), "--seeds", "5"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no results for seeds [5]" in out.stderr


def test_dev_selection_picks_by_dev_never_by_test():
    from openprompt_retro.experiments.report import dev_selected

    rows = [{"task": "SST-2", "k": 16, "seed": s, "method": m, "dev_accuracy": d, "test_accuracy": t}
            for s, m, d, t in [(13, "a", 0.7, 0.50), (13, "b", 0.8, 0.40),    # b wins on dev, worse on test
                               (42, "a", 0.6, 0.55), (42, "b", 0.6, 0.90),    # tie: the first listed
                               (87, "a", 0.9, 0.60)]]                         # b missing: split dropped
    picked = dev_selected(rows, ["a", "b"])
    assert [(r["seed"], r["selected"], r["test_accuracy"], r["method"]) for r in picked] == [
        (13, "b", 0.40, "dev-select(a, b)"), (42, "a", 0.55, "dev-select(a, b)")]
