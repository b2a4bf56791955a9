"""results.jsonl: one row per run, shared safely between processes, nothing lost."""
import json
import os
import subprocess
import sys

import pytest

from openprompt_retro.cli import main
from openprompt_retro.experiments.results import ResultsFile, RunKey, read_rows, run_key
from openprompt_retro.experiments.spec import RunSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "text")
needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "k-shot")), reason="../shared data not present")
TINY_RUN = ["--model", "tiny-bert", "--tasks", "SST-2", "--methods", "prompt", "--epochs", "1", "--no-progress"]


def rows_of(folder):
    with open(os.path.join(folder, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


def row(seed=13, acc=0.5, method="prompt"):
    """A row as a ``run`` with today's defaults writes it (its settings id is that of the default options)."""
    from openprompt_retro.experiments.results import settings_id

    return {"task": "SST-2", "method": method, "shots": 16, "seed": seed, "test_accuracy": acc, "dev_accuracy": None,
            "settings_id": settings_id(method, 16, RunSpec().options())}


@needs_data
def test_defaults_from_another_folder_then_rerun_skips_and_overwrite_replaces(tmp_path, capsys):
    """From a folder outside the checkout, with no env vars, the data default is found; --device is recorded."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENPROMPT_RETRO_")}
    env["PYTHONPATH"] = ROOT  # this checkout's package; the data and model defaults are not given
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "openprompt_retro", "run", *TINY_RUN, "--device", "cpu",
                           "--out", str(out)], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (first,) = rows_of(out)
    assert (first["task"], first["method"], first["shots"], first["seed"]) == ("SST-2", "prompt", 16, 42)
    assert first["settings"]["device"] == "cpu" and first["settings"]["amp"] is None
    # the same run again: skipped, no duplicate row (before: a second row for the same run)
    main(["run", *TINY_RUN, "--data-root", DATA, "--out", str(out)])
    assert "already in" in capsys.readouterr().err and rows_of(out) == [first]
    # --overwrite re-runs it and replaces its row
    marked = {**first, "marker": "old"}
    (out / "results.jsonl").write_text(json.dumps(marked) + "\n")
    main(["run", *TINY_RUN, "--data-root", DATA, "--out", str(out), "--overwrite"])
    (replaced,) = rows_of(out)
    assert "marker" not in replaced and replaced["test_accuracy"] == first["test_accuracy"]


@needs_data
def test_two_processes_on_one_folder_do_each_run_once(tmp_path):
    out = tmp_path / "shared-out"
    cmd = [sys.executable, "-m", "openprompt_retro", "run", *TINY_RUN, "--seeds", "13,21", "--data-root", DATA,
           "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        errs.append(err)
    keys = [(r["task"], r["method"], r["shots"], r["seed"]) for r in rows_of(out)]
    assert sorted(keys) == [("SST-2", "prompt", 16, s) for s in (13, 21)]
    assert sum(e.count("test accuracy") for e in errs) == 2  # each run trained once, by one of the two
    assert not os.listdir(out / ".claims")  # every claim released


def test_a_run_finished_by_another_process_before_our_claim_is_not_redone(tmp_path, monkeypatch):
    """The window between 'not done yet' and taking the claim: the other process wrote and released meanwhile."""
    from argparse import Namespace

    from openprompt_retro.experiments import runs

    results = ResultsFile(str(tmp_path))
    claim = ResultsFile.claim

    def claim_after_the_other_process_finished(self, key, take_over_remote=False):
        if not read_rows(self.path):
            self.write(row(seed=key.seed))  # the other process: wrote its row, then released its claim
        return claim(self, key, take_over_remote)

    monkeypatch.setattr(ResultsFile, "claim", claim_after_the_other_process_finished)
    monkeypatch.setattr(runs, "check_grid", lambda ns: None)
    monkeypatch.setattr(runs, "run_one", lambda *a: pytest.fail("re-ran a finished run"))
    ns = Namespace(tasks=["SST-2"], methods=["prompt"], seeds=[13], shots=16, out=str(tmp_path), overwrite=False)
    runs.run_grid(ns)
    assert len(read_rows(results.path)) == 1


@needs_data
def test_the_no_knn_infer_ablation_is_measured_on_retros_weights_as_if_trained_alone(tmp_path, capsys):
    """retro and retro-no-knn-infer train identically: in one grid the ablation reuses retro's training, and its
    row is the row a separate training gives (lambda reset to 0 although retro's mixture uses 0.5)."""
    tiny = ["--model", "tiny-bert", "--tasks", "SST-2", "--epochs", "1", "--no-progress", "--data-root", DATA,
            "--mixture-grid", "fixed", "--config", '{"store_guard_alpha": null}']  # the random model's store is at chance
    main(["run", *tiny, "--methods", "retro,retro-no-knn-infer", "--out", str(tmp_path / "paired")])
    err = capsys.readouterr().err
    main(["run", *tiny, "--methods", "retro-no-knn-infer", "--out", str(tmp_path / "alone")])
    retro, paired = rows_of(tmp_path / "paired")
    (alone,) = rows_of(tmp_path / "alone")
    assert (retro["method"], paired["method"]) == ("retro", "retro-no-knn-infer")
    assert retro["knn_lambda"] == 0.5 and paired["knn_lambda"] == alone["knn_lambda"] == 0.0
    assert paired["shares_training_with"] == "retro" and "shares_training_with" not in alone
    assert err.count("retro-no-knn-infer K=16") == 0  # it never started a training of its own
    assert paired["train_seconds"] == retro["train_seconds"]
    def timeless(value):  # measured durations differ between two runs of the same thing
        if isinstance(value, dict):
            return {k: timeless(v) for k, v in value.items() if k != "seconds"}
        return value

    for field in ("test_accuracy", "dev_accuracy", "n_test", "epochs_run", "knn_k", "knn_temperature", "settings",
                  "diagnostics"):
        assert timeless(paired[field]) == timeless(alone[field]), field


def test_the_ablation_waits_for_its_partner_trained_by_another_process(tmp_path, monkeypatch):
    """Another process on this host trains retro (and so measures retro-no-knn-infer): this one defers, waits,
    and redoes neither."""
    import socket
    from argparse import Namespace

    from openprompt_retro.experiments import runs

    results = ResultsFile(str(tmp_path))
    other = f"1@{socket.gethostname()}"
    polls = []

    def held_by_the_other_process(self, key, take_over_remote=False):
        polls.append(key)
        if len(polls) < 3:
            return other
        if not read_rows(self.path):  # the other process finishes: both rows written, claims released
            self.write(row(method="retro"))
            self.write(row(method="retro-no-knn-infer"))
        return None

    monkeypatch.setattr(ResultsFile, "holder", held_by_the_other_process)
    monkeypatch.setattr(ResultsFile, "claim", lambda self, key, take_over_remote=False:
                        other if key.method == "retro" else None)
    monkeypatch.setattr(runs, "check_grid", lambda ns: None)
    monkeypatch.setattr(runs.time, "sleep", lambda s: None)
    monkeypatch.setattr(runs, "run_one", lambda *a: pytest.fail("trained a run the other process did"))
    monkeypatch.setattr(runs, "run_trained", lambda *a, **k: pytest.fail("trained a run the other process did"))
    ns = Namespace(tasks=["SST-2"], methods=["retro", "retro-no-knn-infer"], seeds=[13], shots=16,
                   out=str(tmp_path), overwrite=False)
    runs.run_grid(ns)
    assert sorted(r["method"] for r in read_rows(results.path)) == ["retro", "retro-no-knn-infer"]


@needs_data
def test_the_result_is_printed_before_a_failed_write(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "results.jsonl").mkdir(parents=True)  # passes the folder check; the write itself fails
    with pytest.raises(SystemExit) as e:
        main(["run", *TINY_RUN, "--data-root", DATA, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "test accuracy " in err  # the accuracy is on stderr ...
    saved = json.loads(err.split("    result: ", 1)[1].splitlines()[0])  # ... and the whole row, to recover it
    assert saved["method"] == "prompt" and 0.0 <= saved["test_accuracy"] <= 1.0
    assert f"error: cannot write {out / 'results.jsonl'}" in err and "the result above was not saved" in err
    assert [p.name for p in out.iterdir() if ".tmp." in p.name] == []  # no temporary file left behind


def test_a_partial_last_line_is_skipped_with_a_warning_naming_file_and_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(row(13)) + "\n" + '{"task": "SST-2", "meth')  # a writer died mid-line
    with pytest.warns(UserWarning, match=rf"{path}, line 2: skipped a malformed row"):
        assert [k[:4] for k in ResultsFile(str(tmp_path)).done()] == [("SST-2", "prompt", 16, 13)]
    with pytest.warns(UserWarning, match="line 2"):
        ResultsFile(str(tmp_path)).write(row(21))
    assert [r["seed"] for r in rows_of(tmp_path)] == [13, 21]  # rewritten whole, without the partial line
    with pytest.raises(FileExistsError, match="already holds run"):
        ResultsFile(str(tmp_path)).write(row(21))


def test_report_deduplicates_rows_with_a_warning(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [row(13, 0.5), row(42, 0.7), row(13, 0.9)]))
    with pytest.warns(UserWarning, match=r"1 duplicate row\(s\) for the same run, kept the last of each: "
                                         r"\[\('SST-2', 'prompt', 16, 13, None, '\w+'\)\]"):
        main(["report", str(path)])
    assert "| prompt | 80.0 ± 10.0 |" in (tmp_path / "table.md").read_text()  # seeds 13 (0.9) and 42 (0.7)


def test_a_claim_file_holds_its_holder_from_the_moment_it_appears(tmp_path, monkeypatch):
    """Another process reading the claim mid-creation must not see it empty (it would take an empty claim for a
    dead one and run the same run twice)."""
    from openprompt_retro.experiments import results as results_module

    results, seen = ResultsFile(str(tmp_path)), []
    link = os.link

    def link_then_look(src, dst):
        link(src, dst)
        with open(dst) as f:
            seen.append(f.read())  # what a reader sees as soon as the claim exists

    monkeypatch.setattr(results_module.os, "link", link_then_look)
    key = RunKey("SST-2", "prompt", 16, 13, "tiny-bert", "0123456789ab")
    assert results.claim(key) is None
    assert seen and seen[0] == results_module.this_process()
    assert seen[0].startswith(f"{os.getpid()}@{__import__('socket').gethostname()}/")
    assert results.claim(key) == seen[0]  # held: a second claim names the holder
    (name,) = os.listdir(tmp_path / ".claims")  # no temporary file left
    assert name.startswith("SST-2__prompt__16__13__")
    results.release(key)
    assert results.holder(key) is None


def test_a_dead_process_claim_is_taken_over_under_the_folder_lock(tmp_path, monkeypatch):
    """A claim left by a process that died is taken over; the check-remove-relink happens under the results lock,
    so a second process that also found it dead waits, then sees the new live holder instead of running too."""
    import fcntl
    import socket

    from openprompt_retro.experiments import results as results_module

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_holder = f"{gone.stdout.strip()}@{socket.gethostname()}"  # that process has exited
    results, key = ResultsFile(str(tmp_path)), RunKey("SST-2", "prompt", 16, 13, "tiny-bert", "0123456789ab")
    os.makedirs(results.claims)
    with open(results._claim_path(key), "w") as f:
        f.write(dead_holder)
    assert results.holder(key) is None  # a dead holder holds nothing

    lock_was_held, remove = [], results_module._remove

    def remove_while_probing_the_lock(path):
        if path == results._claim_path(key):
            with open(results.path + ".lock", "a") as probe:  # another process trying to take the lock now
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(probe, fcntl.LOCK_UN)
                    lock_was_held.append(False)
                except BlockingIOError:
                    lock_was_held.append(True)
        remove(path)

    monkeypatch.setattr(results_module, "_remove", remove_while_probing_the_lock)
    assert results.claim(key) is None
    assert lock_was_held == [True]
    me = results_module.this_process()
    assert results.holder(key) == me
    assert results.claim(key) == me  # now held by a live process: not taken over again


def test_a_claim_naming_this_pid_but_not_taken_by_it_is_stale(tmp_path):
    """A restarted container gives the new process the old one's pid and host name: the claim the old one left
    names this process, which never took it, so it holds nothing (before, `run` waited for itself forever)."""
    import socket

    results, key = ResultsFile(str(tmp_path)), RunKey("SST-2", "prompt", 16, 13, "tiny-bert", "0123456789ab")
    os.makedirs(results.claims)
    for left in (f"{os.getpid()}@{socket.gethostname()}", f"{os.getpid()}@{socket.gethostname()}/1"):
        with open(results._claim_path(key), "w") as f:
            f.write(left)
        assert results.holder(key) is None
        assert results.claim(key) is None  # taken over at once
        assert ResultsFile(str(tmp_path)).holder(key) is None  # the same pid in another object: still this process
        assert results.holder(key) is not None  # this object took it: held
        results.release(key)


def test_a_pid_reused_by_another_process_holds_nothing(tmp_path):
    import socket
    import time

    from openprompt_retro.experiments import results as results_module

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for _ in range(50):
            if results_module._process_start(sleeper.pid):
                break
            time.sleep(0.05)
        start = results_module._process_start(sleeper.pid)
        results, key = ResultsFile(str(tmp_path)), RunKey("SST-2", "prompt", 16, 13, "tiny-bert", "0123456789ab")
        os.makedirs(results.claims)
        live = f"{sleeper.pid}@{socket.gethostname()}/{start}"
        with open(results._claim_path(key), "w") as f:
            f.write(live)
        assert results.holder(key) == live and results.claim(key) == live  # alive, the same process: held
        with open(results._claim_path(key), "w") as f:
            f.write(f"{sleeper.pid}@{socket.gethostname()}/{int(start) + 1}")  # that pid, another start time
        assert results.holder(key) is None and results.claim(key) is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_grid_does_not_wait_for_a_claim_this_pid_left_before(tmp_path, monkeypatch):
    import socket

    from openprompt_retro.experiments import runs

    calls = []
    monkeypatch.setattr(runs, "run_one", fake_run_one(calls))
    monkeypatch.setattr(runs, "check_grid", lambda ns: None)
    ns = grid_ns("--out", str(tmp_path), "--overwrite")
    key = runs._key("SST-2", "prompt", 13, runs.RunSpec.from_namespace(ns))
    results = ResultsFile(str(tmp_path))
    os.makedirs(results.claims)
    with open(results._claim_path(key), "w") as f:
        f.write(f"{os.getpid()}@{socket.gethostname()}")
    monkeypatch.setattr(runs, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(runs, "_wait_while_held", lambda *a: pytest.fail("waited for its own stale claim"))
    runs.run_grid(ns)
    assert len(calls) == 1


# ---------------------------------------------------------------------- what makes a run a run
#: a row as written before rows had ``shots`` and ``settings_id`` (benchmark/results, retro, seed 13)
LEGACY_RETRO = {"task": "SST-2", "method": "retro", "k": 16, "seed": 13, "model": "../shared/models/minilm-l6-mlm",
                "test_accuracy": 0.8, "dev_accuracy": 0.8, "knn_lambda": 0.5, "knn_k": 16, "knn_temperature": 1.0,
                "settings": {"lr": 5e-05, "epochs": 20, "batch_size": 8, "max_seq_length": 128, "demo_topk": 8,
                             "loss_beta": 1.0, "patience": 20, "max_steps": 200, "eval_every": 20,
                             "mixture_grid": "small", "device": "cuda", "amp": None,
                             "config": {"demo_topk": 8, "demo_center": True, "demo_norm": "none", "knn_k": 16,
                                        "knn_lambda": 0.5, "loss": "knn", "loss_beta": 1.0,
                                        "max_loss_weight": 3.0}}}


def grid_ns(*args):
    from openprompt_retro.cli import build_parser

    return build_parser().parse_args(["run", "--tasks", "SST-2", "--methods", "prompt", "--seeds", "13", *args])


def fake_run_one(calls):
    """run_one without a model: a record of the run's identity and a fixed accuracy."""
    from openprompt_retro.experiments import runs
    from openprompt_retro.experiments.records import RunRecord

    def run_one(task, method, seed, run_spec):
        calls.append((task, method, seed))
        return RunRecord(**runs._identity(task, method, seed, run_spec), test_accuracy=0.5, dev_accuracy=None,
                         knn_lambda=0.0, train_seconds=0.0, test_seconds=0.0)
    return run_one


def test_old_benchmark_rows_key_as_the_benchmark_that_wrote_them():
    """A row without shots/settings_id is read with shots = k and its settings id derived from its settings:
    the same key as ``benchmark`` gives the run now, so the grid still skips it."""
    from openprompt_retro.cli import build_parser
    from openprompt_retro.experiments import runs
    from openprompt_retro.experiments.results import run_key
    from openprompt_retro.experiments.spec import RunSpec

    def spec(*args):
        return RunSpec.from_namespace(build_parser().parse_args(["benchmark", "--model",
                                                                 "../shared/models/minilm-l6-mlm", *args]))

    issue11 = ["--mixture-grid", "small", "--config",  # and fields that came later, at the values it ran with
               '{"demo_center": true, "key_encoder": "mask", "knn_readout": "topk", "demo_retrieval": "auto", '
               '"pair_keys": "joint", "store_guard_alpha": null, "adapt_pairs": false}']
    bench = spec(*issue11)  # the benchmark as it ran then: [MASK] keys, top-k, the small lambda grid
    assert run_key(LEGACY_RETRO) == runs._key("SST-2", "retro", 13, bench)
    demo_text = {**LEGACY_RETRO, "method": "demo-text", "settings": {**LEGACY_RETRO["settings"], "max_seq_length": 256}}
    assert run_key(demo_text) == runs._key("SST-2", "demo-text", 13, bench)  # recorded with 2x the length
    for other in (["--model", "tiny-bert"], ["--lr", "1e-5"], ["--demo-topk", "4"], ["--loss-beta", "2"],
                  ["--shots", "8"], ["--mixture-grid", "fine"]):
        changed = spec(*issue11, *other)
        assert runs._key("SST-2", "retro", 13, changed) != run_key(LEGACY_RETRO), other
    for config in ('{"demo_center": false, "key_encoder": "mask", "knn_readout": "topk"}',
                   '{"demo_center": true}'):  # today's defaults: the frozen-encoder store
        assert runs._key("SST-2", "retro", 13, spec("--mixture-grid", "small", "--config", config)) != \
            run_key(LEGACY_RETRO), config
    assert runs._key("SST-2", "retro", 13, spec()) != run_key(LEGACY_RETRO)  # benchmark's defaults today
    device_only = spec(*issue11, "--device", "cpu", "--demo-topk", "8")
    assert runs._key("SST-2", "retro", 13, device_only) == run_key(LEGACY_RETRO)  # same settings, same run


def test_a_changed_config_default_gives_new_runs_a_new_id_and_keeps_old_rows_ids(monkeypatch):
    """Settings ids are relative to a fixed baseline: when a RetroConfig default changes, a run made with the
    new default is another run than the rows made before, and those rows keep their ids."""
    import dataclasses

    from openprompt_retro.core import config as config_module
    from openprompt_retro.experiments.results import run_key, settings_id

    base = config_module.RetroConfig

    @dataclasses.dataclass
    class MaskDefaults(base):  # the defaults when LEGACY_RETRO was written
        key_encoder: str = "mask"
        knn_readout: str = "topk"
        demo_retrieval: str = "mask"

    @dataclasses.dataclass
    class FrozenDefaults(base):
        key_encoder: str = "frozen-mean"
        knn_readout: str = "class-mean"
        demo_retrieval: str = "auto"

    frozen = {"key_encoder": "frozen-mean", "knn_readout": "class-mean", "demo_retrieval": "key-encoder"}
    monkeypatch.setattr(config_module, "RetroConfig", MaskDefaults)
    old_row_key, old_default = run_key(LEGACY_RETRO), settings_id("retro", 16, {"config": {}})
    explicit_frozen = settings_id("retro", 16, {"config": frozen})
    assert explicit_frozen != old_default

    monkeypatch.setattr(config_module, "RetroConfig", FrozenDefaults)
    assert run_key(LEGACY_RETRO) == old_row_key  # recorded before the fields existed: it ran with [MASK] keys
    assert settings_id("retro", 16, {"config": {}}) == explicit_frozen  # "auto" keys as what it does
    assert settings_id("retro", 16, {"config": {"key_encoder": "mask", "knn_readout": "topk"}}) == old_default


def test_another_models_row_is_not_reused(tmp_path, monkeypatch, capsys):
    """Before: the key was (task, method, k, seed), so tiny-roberta's run was 'already in, skipped'."""
    from openprompt_retro.experiments import runs

    calls = []
    monkeypatch.setattr(runs, "check_grid", lambda ns: None)
    monkeypatch.setattr(runs, "run_one", fake_run_one(calls))
    runs.run_grid(grid_ns("--model", "tiny-bert", "--out", str(tmp_path)))
    runs.run_grid(grid_ns("--model", "tiny-roberta", "--out", str(tmp_path)))
    runs.run_grid(grid_ns("--model", "tiny-roberta", "--lr", "1e-4", "--out", str(tmp_path)))
    runs.run_grid(grid_ns("--model", "tiny-roberta", "--lr", "1e-4", "--out", str(tmp_path)))  # done: skipped
    assert len(calls) == 3 and capsys.readouterr().err.count("already in") == 1
    rows = read_rows(str(tmp_path / "results.jsonl"))
    assert [(r["model"], r["shots"]) for r in rows] == [("tiny-bert", 16), ("tiny-roberta", 16), ("tiny-roberta", 16)]
    assert len({r["settings_id"] for r in rows}) == 2 and "k" not in rows[0]


# ---------------------------------------------------------------------- claims that outlive their process
def test_a_run_claimed_by_a_process_killed_later_is_taken_over_at_the_end(tmp_path, monkeypatch):
    """Before: 'being run by ..., skipped', and the grid ended with rc 0 and that run missing."""
    import socket

    from openprompt_retro.experiments import runs

    calls = []
    monkeypatch.setattr(runs, "check_grid", lambda ns: None)
    monkeypatch.setattr(runs, "run_one", fake_run_one(calls))
    ns = grid_ns("--model", "tiny-bert", "--seeds", "13,21", "--out", str(tmp_path))
    results = ResultsFile(str(tmp_path))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.makedirs(results.claims)
    with open(results._claim_path(runs._key("SST-2", "prompt", 13, RunSpec.from_namespace(ns))), "w") as f:
        f.write(f"{other.pid}@{socket.gethostname()}")  # a live sibling holds seed 13

    def killed_while_we_wait(seconds):
        other.kill()
        other.wait()

    monkeypatch.setattr(runs.time, "sleep", killed_while_we_wait)
    runs.run_grid(ns)
    assert calls == [("SST-2", "prompt", 21), ("SST-2", "prompt", 13)]  # 21 first, then 13 once its holder died
    assert sorted(r["seed"] for r in read_rows(results.path)) == [13, 21]


def claimed(folder, content, ns):
    from openprompt_retro.experiments import runs

    results = ResultsFile(str(folder))
    os.makedirs(results.claims, exist_ok=True)
    with open(results._claim_path(runs._key("SST-2", "prompt", 13, RunSpec.from_namespace(ns))), "w") as f:
        f.write(content)


def test_a_claim_from_another_host_is_named_and_fails_the_grid_unless_overwrite(tmp_path, monkeypatch, capsys):
    """Before: skipped forever with rc 0, even with --overwrite."""
    from openprompt_retro.experiments import runs

    calls = []
    monkeypatch.setattr(runs, "check_grid", lambda ns: None)
    monkeypatch.setattr(runs, "run_one", fake_run_one(calls))
    argv = ["--tasks", "SST-2", "--methods", "prompt", "--seeds", "13,21", "--model", "tiny-bert", "--out",
            str(tmp_path)]
    claimed(tmp_path, "4242@some-other-host", grid_ns(*argv))
    with pytest.raises(SystemExit) as e:
        main(["run", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and calls == [("SST-2", "prompt", 21)]
    assert ("error: 1 run(s) not done: SST-2 prompt seed 13 (claimed by 4242@some-other-host). Run again when they "
            "are finished, or with --overwrite") in err
    main(["run", *argv, "--overwrite"])  # takes the other host's claim over (and re-runs seed 21)
    assert calls[1:] == [("SST-2", "prompt", 13), ("SST-2", "prompt", 21)]
    assert sorted(r["seed"] for r in rows_of(tmp_path)) == [13, 21]


@pytest.mark.parametrize("content", ["", "garbage\x00", "abc@host"])
def test_a_corrupt_claim_is_taken_over(tmp_path, monkeypatch, content):
    from openprompt_retro.experiments import runs

    calls = []
    monkeypatch.setattr(runs, "check_grid", lambda ns: None)
    monkeypatch.setattr(runs, "run_one", fake_run_one(calls))
    ns = grid_ns("--model", "tiny-bert", "--out", str(tmp_path))
    claimed(tmp_path, content, ns)
    runs.run_grid(ns)
    assert calls == [("SST-2", "prompt", 13)]


# ---------------------------------------------------------------------- a folder that cannot take claims or rows
def cli_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.fixture
def no_training(monkeypatch):
    from openprompt_retro.experiments import runs

    calls = []
    monkeypatch.setattr(runs, "check_grid", lambda ns: None)
    monkeypatch.setattr(runs, "run_one", fake_run_one(calls))
    return calls


def test_claims_being_a_file_or_the_lock_a_folder_is_one_line(tmp_path, capsys, no_training):
    argv = ["run", "--model", "tiny-bert", "--methods", "prompt", "--seeds", "13", "--out", str(tmp_path)]
    (tmp_path / ".claims").write_text("")
    line = cli_error(capsys, argv)  # before: FileExistsError traceback
    assert line == f"openprompt-retro run: error: {tmp_path / '.claims'} is not a folder; remove it (it holds the " \
                   "claims of running runs)"
    (tmp_path / ".claims").unlink()
    (tmp_path / "results.jsonl.lock").mkdir()
    line = cli_error(capsys, argv)  # before: IsADirectoryError traceback
    assert line == (f"openprompt-retro run: error: cannot open the results lock {tmp_path / 'results.jsonl.lock'} "
                    "(Is a directory)")
    assert no_training == []  # found before any run started


def failing_writes(monkeypatch, err, when):
    """Every file opened for writing from results.py raises ``err`` once ``when()`` is true."""
    import builtins

    from openprompt_retro.experiments import results as results_module

    def open_(path, mode="r", *a, **k):
        if when() and any(c in mode for c in "wa+"):
            raise OSError(err, os.strerror(err), path)
        return builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(results_module, "open", open_, raising=False)


def test_a_full_disk_at_claim_time_is_one_line_and_loses_no_row(tmp_path, capsys, monkeypatch, no_training):
    import errno

    argv = ["run", "--model", "tiny-bert", "--methods", "prompt", "--seeds", "13,21", "--out", str(tmp_path)]
    failing_writes(monkeypatch, errno.ENOSPC, (tmp_path / "results.jsonl").exists)  # full once the first row is in
    line = cli_error(capsys, argv)
    assert line.startswith("openprompt-retro run: error: cannot claim run ('SST-2', 'prompt', 16, 21, 'tiny-bert', ")
    assert line.endswith(f"under {tmp_path / '.claims'} (No space left on device)")
    assert [r["seed"] for r in rows_of(tmp_path)] == [13]
    assert [p for p in os.listdir(tmp_path / ".claims")] == []  # no temporary claim left


def test_an_output_folder_turning_read_only_mid_run_is_one_line_and_loses_no_row(tmp_path, capsys, monkeypatch):
    import errno

    from openprompt_retro.experiments import runs

    calls = []
    monkeypatch.setattr(runs, "check_grid", lambda ns: None)
    monkeypatch.setattr(runs, "run_one", fake_run_one(calls))
    failing_writes(monkeypatch, errno.EROFS, lambda: len(calls) == 2)  # read-only while the second run trains
    line = cli_error(capsys, ["run", "--model", "tiny-bert", "--methods", "prompt", "--seeds", "13,21,42", "--out",
                              str(tmp_path)])
    assert line.startswith(f"openprompt-retro run: error: cannot write {tmp_path / 'results.jsonl'} (")
    assert "Read-only file system" in line and line.endswith("the result above was not saved")
    assert [r["seed"] for r in rows_of(tmp_path)] == [13] and len(calls) == 2


# ---------------------------------------------------------------------- lines that are not rows
def test_a_non_utf8_byte_skips_that_line_only(tmp_path, capsys, no_training):
    """Before: UnicodeDecodeError from every command that read the folder."""
    path = tmp_path / "results.jsonl"
    lines = [json.dumps(row(13, 0.5)).encode(), b'{"task": "SST-2\xff"}', json.dumps(row(42, 0.7)).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.warns(UserWarning, match=rf"{path}, line 2: skipped a malformed row \(UnicodeDecodeError"):
        assert [r["seed"] for r in read_rows(str(path))] == [13, 42]
    with pytest.warns(UserWarning, match="line 2"):
        main(["report", str(path)])
    assert "| prompt | 60.0 ± 10.0 |" in (tmp_path / "table.md").read_text()
    with pytest.warns(UserWarning, match="line 2"):
        main(["run", "--model", "tiny-bert", "--methods", "prompt", "--seeds", "21", "--out", str(tmp_path)])
    assert no_training == [("SST-2", "prompt", 21)]


def test_report_skips_a_row_without_test_accuracy_with_a_warning(tmp_path):
    """Before: KeyError traceback."""
    path = tmp_path / "results.jsonl"
    broken = {k: v for k, v in row(21).items() if k != "test_accuracy"}
    path.write_text("".join(json.dumps(r) + "\n" for r in [row(13, 0.5), broken, row(42, 0.7)]))
    with pytest.warns(UserWarning, match=rf"{path}: skipped run \('SST-2', 'prompt', 16, 21\), which has no "
                                         "test_accuracy"):
        main(["report", str(path)])
    assert "| prompt | 60.0 ± 10.0 |" in (tmp_path / "table.md").read_text()


def test_a_run_on_other_data_is_another_run(tmp_path):
    """--data-root is part of the run's key (before, a run on other data was 'already in results.jsonl')."""
    from openprompt_retro.experiments import runs
    from openprompt_retro.experiments.paths import shared_data_root

    def key(*args):
        return runs._key("SST-2", "prompt", 13, runs.RunSpec.from_namespace(grid_ns(*args)))

    shared = shared_data_root()
    copy = tmp_path / "data"
    copy.mkdir()
    assert key("--data-root", shared) == key("--data-root", os.path.relpath(shared)) == key()  # the same folder
    assert key("--data-root", str(copy)) != key("--data-root", shared)
    assert key("--data-root", str(copy)) == key("--data-root", str(copy) + os.sep)
    assert run_key(row()).settings_id == key("--data-root", shared).settings_id  # rows written before keep theirs


def test_a_deeply_nested_line_is_a_skipped_row_not_a_crash(tmp_path):
    """Before, one hostile line (json nested 100k deep) raised RecursionError in every command on the folder."""
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(row(13, 0.5)) + "\n" + "[" * 100000 + "]" * 100000 + "\n")
    with pytest.warns(UserWarning, match="line 2: skipped a malformed row .*nested too deeply"):
        rows = read_rows(str(path))
    assert len(rows) == 1


def test_a_deeply_nested_run_json_is_a_one_line_error(tmp_path):
    from openprompt_retro.prompt.saved_run import SavedRunError, read_run_json

    (tmp_path / "run.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(SavedRunError, match="corrupt run.json .*nested too deeply"):
        read_run_json(str(tmp_path), required=True)
