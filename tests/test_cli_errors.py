"""A CLI that answers mistakes in one line: exit 2, no traceback; --debug shows the traceback."""
import os
import subprocess
import sys

import pytest
import torch

from openprompt_retro.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "text")
needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "k-shot")), reason="../shared data not present")


def one_line_error(capsys, argv):
    """Run the CLI in-process; it must exit 2 with exactly one stderr line and no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("[")]  # "[1/1] ..." progress lines
    assert e.value.code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    command = argv[0] if argv[0] != "--debug" else argv[1]
    assert lines[0].startswith(f"openprompt-retro {command}: error: "), lines[0]
    return lines[0]


@needs_data
@pytest.mark.parametrize("args, message", [
    (["--tasks", "nope"], "unknown task 'nope'; known tasks: "),
    (["--methods", "prompt,nope"], "unknown method(s) ['nope']; choose from "),
    (["--seeds", "7"], "task SST-2: no 16-shot split for seed(s) [7]; seeds available: [13, 21, 42, 87, 100]"),
    (["--shots", "0"], "--shots 0: task SST-2 has [16]-shot splits; use one of them or a smaller positive number"),
    (["--shots", "32"], "--shots 32: task SST-2 has [16]-shot splits"),
    (["--shots", "-1"], "--shots -1: task SST-2 has [16]-shot splits"),
    (["--k", "32"], "--shots 32: task SST-2"),  # --k: the old spelling of --shots
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),  # before: a ValueError traceback
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--device", "gpu"], "--device 'gpu': unknown device; use 'cpu', 'cuda', 'cuda:N' or 'auto'"),
    (["--device", "cpu", "--amp", "fp16"], "--amp 'fp16' needs a CUDA device (device is 'cpu'); use 'bf16' on CPU"),
    # before: each of these was a traceback, or ran with a silently changed value
    (["--max-steps", "0"], "--max-steps must be None or an integer >= 1, got 0"),
    (["--eval-every", "0"], "--eval-every must be None or an integer >= 1, got 0"),
    (["--loss-beta", "-1"], "argument --loss-beta: must be a finite number >= 0, got '-1'"),
    (["--lr", "inf"], "--lr must be a finite positive number, got inf"),
    (["--lr", "nan"], "--lr must be a finite positive number, got nan"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--config", '{"knn_k": 0}'], "--config: knn_k must be at least 1, got 0"),
    (["--config", '{"max_loss_weight": NaN}'], "argument --config: not a JSON object: NaN is not a number JSON allows"),
    (["--config", '{"max_loss_weight": Infinity}'], "argument --config: not a JSON object: Infinity is not a number"),
    (["--config", "[1]"], "argument --config: not a JSON object: '[1]'"),
    (["--config", '{"loss_beta": -1}'], "--config: loss_beta"),
    (["--config", '{"no_such_field": 1}'], "--config: "),
    (["--demo-topk", "0"], "argument --demo-topk: must be an integer >= 1, got '0'"),  # before: ran with 8
    (["--zs-fraction", "0"], "argument --zs-fraction: must be a fraction in (0, 1], got '0'"),
    (["--zs-fraction", "2"], "argument --zs-fraction: must be a fraction in (0, 1], got '2'"),
    (["--zs-k", "0"], "argument --zs-k: must be an integer >= 1, got '0'"),
    (["--zs-pool-size", "-1"], "argument --zs-pool-size: must be an integer >= 0, got '-1'"),
    (["--methods", ""], "--methods: none given (a comma-separated list)"),
    (["--tasks", ","], "--tasks: none given (a comma-separated list)"),
])
def test_run_mistakes_are_one_line(capsys, tmp_path, args, message):
    line = one_line_error(capsys, ["run", "--model", "tiny-bert", "--data-root", DATA, "--out", str(tmp_path), *args])
    assert message in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine")
def test_cuda_without_a_gpu_is_one_line(capsys, tmp_path):
    line = one_line_error(capsys, ["run", "--model", "tiny-bert", "--data-root", DATA, "--out", str(tmp_path),
                                   "--device", "cuda"])
    assert "--device 'cuda': CUDA is not available here" in line and "use 'cpu'" in line


@needs_data
def test_missing_paths_are_one_line(capsys, tmp_path):
    run = ["run", "--model", "tiny-bert", "--data-root", DATA, "--out", str(tmp_path / "out")]
    line = one_line_error(capsys, run + ["--data-root", str(tmp_path / "no-data")])
    assert f"--data-root {tmp_path / 'no-data'}: no such folder (set --data-root or OPENPROMPT_RETRO_DATA)" in line
    line = one_line_error(capsys, run + ["--model", str(tmp_path / "no-model")])  # before: hub "Repo id" error
    assert f"--model {tmp_path / 'no-model'}: no such model folder" in line and "OPENPROMPT_RETRO_MODEL" in line
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = one_line_error(capsys, run + ["--out", str(blocker / "out")])
    assert f"--out {blocker / 'out'}: cannot write there" in line


@needs_data
def test_a_model_the_hub_cannot_give_is_one_line(capsys, tmp_path, monkeypatch):
    import openprompt.plms

    def offline(model_type, name):  # what transformers raises for an unknown name without a network
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files for {name}.\nCheck ...")

    monkeypatch.setattr(openprompt.plms, "load_plm", offline)
    line = one_line_error(capsys, ["run", "--model", "no-such-model-xyz", "--data-root", DATA, "--out", str(tmp_path),
                                   "--methods", "prompt", "--epochs", "1", "--no-progress"])
    assert ("--model no-such-model-xyz: not a local model folder, and loading it from the Hugging Face hub failed: "
            "We couldn't connect") in line


@needs_data
@pytest.mark.parametrize("command", ["speed", "analyze", "figures", "big-pool"])
def test_one_split_commands_give_one_line_errors(capsys, tmp_path, command):
    out = [] if command == "speed" else ["--out", str(tmp_path)]
    base = [command, "--model", "tiny-bert", *out]
    assert "no such folder" in one_line_error(capsys, base + ["--data-root", str(tmp_path / "none")])
    assert "unknown task 'nope'" in one_line_error(capsys, base + ["--data-root", DATA, "--task", "nope"])
    assert "no 16-shot split for seed 7" in one_line_error(capsys, base + ["--data-root", DATA, "--seed", "7"])
    assert "--shots 32: task SST-2" in one_line_error(capsys, base + ["--data-root", DATA, "--shots", "32"])
    if command != "speed":
        assert "--epochs must be" in one_line_error(capsys, base + ["--data-root", DATA, "--epochs", "0"])


def test_report_of_a_missing_or_empty_file_is_one_line(capsys, tmp_path):
    assert f"no results file at '{tmp_path / 'none.jsonl'}'" in one_line_error(
        capsys, ["report", str(tmp_path / "none.jsonl")])
    empty = tmp_path / "results.jsonl"
    empty.write_text("")
    assert "holds no results" in one_line_error(capsys, ["report", str(empty)])  # before: a traceback
    assert "no results file" in one_line_error(capsys, ["plot-k", str(tmp_path / "none.jsonl")])


def test_debug_shows_the_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "openprompt_retro", "run", "--tasks", "nope", "--debug", "--model",
                          "tiny-bert", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" in out.stderr and "UserError: unknown task 'nope'" in out.stderr
    with pytest.raises(Exception, match="unknown task 'nope'") as e:  # --debug before the command, in-process
        main(["--debug", "run", "--tasks", "nope", "--model", "tiny-bert", "--out", str(tmp_path)])
    assert type(e.value).__name__ == "UserError"
    out = subprocess.run([sys.executable, "-m", "openprompt_retro", "run", "--tasks", "nope", "--model", "tiny-bert",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]


def test_defaults_resolve_from_any_folder(tmp_path, monkeypatch):
    from openprompt_retro.experiments import paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    monkeypatch.delenv(paths.MODEL_ENV, raising=False)
    if not os.path.isdir(os.path.join(ROOT, "..", "shared")):
        pytest.skip("../shared not present")
    assert os.path.isdir(os.path.join(paths.default_data_root(), "k-shot"))
    assert os.path.isdir(paths.default_model())


def test_a_model_type_the_model_folder_does_not_have_is_one_line(capsys, tmp_path):
    """Before: --model-type roberta on a BERT folder trained a re-initialised model and exited 0."""
    model = tmp_path / "a-bert"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    line = one_line_error(capsys, ["run", "--model", str(model), "--model-type", "roberta", "--data-root", DATA,
                                   "--out", str(tmp_path / "out")])
    assert line.endswith(f"--model-type roberta: the model in {model} is a bert model (its config.json says "
                         "model_type 'bert'); pass --model-type bert")


@pytest.mark.parametrize("argv, message", [
    (["speed", "--limit", "0"], "argument --limit: must be an integer >= 1, got '0'"),
    (["speed", "--repeats", "0"], "argument --repeats: must be an integer >= 1, got '0'"),
    (["big-pool", "--pool-size", "-1"], "argument --pool-size: must be an integer >= 0, got '-1'"),  # dropped one
    (["store-benchmark", "--sizes", "0"], "argument --sizes: must be an integer >= 1, got '0'"),
    (["store-benchmark", "--dims", "-8"], "argument --dims: must be an integer >= 1, got '-8'"),
    (["store-benchmark", "--topk", "0"], "argument --topk: must be an integer >= 1, got '0'"),
    (["store-benchmark", "--sizes", ""], "--sizes: none given (a comma-separated list)"),
    (["store-benchmark", "--indexes", "Flat,nope"], "--indexes: unknown index(es) ['nope']; choose from "),
    (["store-benchmark", "--sizes", "10", "--indexes", "IVF-Flat"],
     "--sizes 10: IVF-Flat trains 16 lists, so it needs at least that many keys"),
    (["store-benchmark", "--sizes", "100", "--indexes", "IVF-PQ"],
     "--sizes 100: IVF-PQ trains 256 centroids per sub-quantizer, so it needs at least 256 keys"),
    (["store-benchmark", "--sizes", "1000", "--dims", "17", "--indexes", "IVF-PQ"],
     "--dims 17: IVF-PQ splits a key into d // 8 parts, so d must be at least 8 and divisible by d // 8"),
])
def test_bad_counts_of_other_commands_are_one_line(capsys, tmp_path, argv, message):
    """Before: tracebacks (or, for --pool-size -1, a pool one example short)."""
    out = [] if argv[0] == "speed" else ["--out", str(tmp_path)]
    line = one_line_error(capsys, [argv[0], *out, *argv[1:]])
    assert message in line, line


@needs_data
def test_cli_length_the_model_cannot_read_and_a_local_tiny_folder(tmp_path, capsys, monkeypatch, tiny_dirs):
    """Before: --max-seq-length beyond the model's positions crashed in training; --model tiny-x was refused as
    'not a tiny model' although a local folder of that name was meant."""
    line = one_line_error(capsys, ["run", "--model", "tiny-bert", "--tasks", "SST-2", "--methods", "prompt",
                                   "--max-seq-length", "1000", "--epochs", "1", "--no-progress", "--data-root", DATA,
                                   "--out", str(tmp_path / "a")])
    assert "max_seq_length 1000 is above what BertForMaskedLM can read: 256 positions" in line
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dirs["bert"], tmp_path / "tiny-mine")
    main(["run", "--model", "tiny-mine", "--tasks", "SST-2", "--methods", "linear-probe", "--no-progress",
          "--data-root", DATA, "--out", str(tmp_path / "b")])
    assert (tmp_path / "b" / "results.jsonl").is_file()
    capsys.readouterr()
    line = one_line_error(capsys, ["run", "--model", "tiny-nope", "--tasks", "SST-2", "--data-root", DATA,
                                   "--out", str(tmp_path / "c")])
    assert "the tiny test models are tiny-bert and tiny-roberta (and no folder of that name is here)" in line


def test_runs_claimed_elsewhere_are_named_briefly(tmp_path, monkeypatch, capsys):
    """Before, every run claimed by another host was listed in one line (hundreds in a full grid)."""
    from openprompt_retro.experiments import runs
    from openprompt_retro.experiments.results import ResultsFile

    monkeypatch.setattr(runs, "check_grid", lambda ns: None)
    monkeypatch.setattr(ResultsFile, "claim", lambda self, key, take_over=False: "1@elsewhere")
    line = one_line_error(capsys, ["run", "--model", "tiny-bert", "--tasks", "SST-2,mr", "--methods",
                                   "prompt,retro,linear-probe", "--seeds", "13,21", "--out", str(tmp_path)])
    assert line.count("claimed by 1@elsewhere") == 5 and "12 run(s) not done" in line and "and 7 more" in line
