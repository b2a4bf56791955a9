"""The report's retrieval-diagnostics and paired-difference tables, by hand."""
import os
import json

import pytest

from openprompt_retro.experiments.report import diagnostics_table, paired_table, sign_flip_p


def _row(method, seed, test, lam, plm, fixed, permuted, loo, weights):
    return {"task": "A", "method": method, "k": 16, "seed": seed, "test_accuracy": test, "knn_lambda": lam,
            "diagnostics": {"test_accuracy_by_inference": {"plm_only": plm, "fixed": fixed, "knn_only": fixed - 0.1,
                                                          "knn_plm_agreement": 0.9},
                            "demonstration_reliance": {"permuted_change": permuted, "removed_change": -0.02},
                            "evaluations": [{"store_loo_accuracy": loo[0], "loss_weight_mean": weights[0]},
                                            {"store_loo_accuracy": loo[1], "loss_weight_mean": weights[1]}]}}


def test_diagnostics_table_averages_each_method_by_hand():
    rows = [_row("retro", 1, 0.70, 0.0, 0.70, 0.72, 0.00, (0.5, 1.0), (2.0, 1.0)),
            _row("retro", 2, 0.80, 0.5, 0.76, 0.80, -0.02, (0.7, 1.0), (1.5, 1.0)),
            {"task": "A", "method": "prompt", "k": 16, "seed": 1, "test_accuracy": 0.9, "knn_lambda": 0.0}]
    table = diagnostics_table(rows)
    line = next(x for x in table.splitlines() if x.startswith("| retro |"))
    assert line == "| retro | 2 | 75.0 | 73.0 | 76.0 | 66.0 | 90.0% | 50.0% | -1.0 | -2.0 | 60.0 / 100.0 | 1.75 / 1.00 |"
    assert "| prompt |" not in table  # no store, no row
    no_infer = dict(rows[0], method="retro-no-knn-infer")
    no_infer["diagnostics"] = {k: v for k, v in rows[0]["diagnostics"].items() if k != "test_accuracy_by_inference"}
    line = next(x for x in diagnostics_table([no_infer]).splitlines() if x.startswith("| retro-no-knn-infer"))
    assert line.startswith("| retro-no-knn-infer | 1 | 70.0 | - | - | - | - | 0.0% | +0.0 |")
    assert diagnostics_table(rows[2:]) == ""


def test_sign_flip_p_value_by_hand():
    # diffs 1, 2, 3 (mean 2): of the 8 sign patterns only +++ and --- reach |mean| >= 2
    assert sign_flip_p([1, 2, 3]) == pytest.approx(2 / 8)
    assert sign_flip_p([1, -1]) == 1.0  # mean 0: every pattern is as extreme
    # sampled above n = 16: only the all-+ and all-- patterns reach the mean, about 0 of 20000 draws, and the
    # observed pattern counts once: (0 + 1) / (20000 + 1), never 0
    assert sign_flip_p([0.5] * 20) == pytest.approx(1 / 20001, abs=1e-4) and sign_flip_p([0.5] * 20) > 0
    with pytest.raises(ValueError, match="no paired differences"):
        sign_flip_p([])


def test_paired_table_uses_only_the_splits_both_methods_ran():
    def run(method, task, seed, acc):
        return {"task": task, "method": method, "k": 16, "seed": seed, "test_accuracy": acc}

    rows = [run("retro", "A", 1, 0.70), run("retro", "A", 2, 0.80), run("retro", "B", 1, 0.60),
            run("prompt", "A", 1, 0.60), run("prompt", "A", 2, 0.80), run("prompt", "B", 1, 0.55),
            run("linear-probe", "A", 1, 0.75)]  # one split only
    lines = paired_table(rows).splitlines()
    # retro - prompt: +10, 0, +5 points -> mean +5.00, std 4.08, 2 / 1 / 0; signs: only +10 +5 and -10 -5 reach
    # |sum| 15, so 4 of the 8 patterns (the 0 takes either sign)
    assert "| prompt | 3 | +5.00 | 4.08 | 2 / 1 / 0 | 0.500 |" in lines
    assert "| linear-probe | 1 | -5.00 | 0.00 | 0 / 0 / 1 | 1.000 |" in lines
    assert paired_table([r for r in rows if r["method"] != "retro"]) == ""
    # retro alone (a study folder), or no split in common: no table, not an empty one
    assert paired_table([r for r in rows if r["method"] == "retro"]) == ""
    assert paired_table([run("retro", "A", 1, 0.70), run("prompt", "B", 2, 0.60)]) == ""


def test_paired_table_writes_tiny_p_values_as_below_one_in_a_thousand():
    rows = [{"task": "A", "method": m, "k": 16, "seed": s, "test_accuracy": acc}
            for s in range(20) for m, acc in (("retro", 0.70), ("prompt", 0.60))]
    line = next(x for x in paired_table(rows).splitlines() if x.startswith("| prompt |"))
    assert line == "| prompt | 20 | +10.00 | 0.00 | 20 / 0 / 0 | < 0.001 |"


def test_paired_differences_are_taken_from_the_reference_method_asked_for(tmp_path, capsys):
    from openprompt_retro.cli import main

    path = tmp_path / "results.jsonl"
    rows = [{"task": "SST-2", "method": m, "shots": 16, "seed": s, "model": "m", "settings_id": "x",
             "test_accuracy": acc + 0.01 * s, "dev_accuracy": 0.5} for m, acc in (("prompt", 0.6), ("retro-no-demo", 0.7))
            for s in (1, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["report", str(path), "--reference", "retro-no-demo"])
    out = capsys.readouterr().out
    assert "| retro-no-demo - method |" in out and "| prompt | 2 | +10.00 |" in out
    with pytest.raises(SystemExit) as e:
        main(["report", str(path), "--reference", "retro"])
    assert e.value.code == 2 and "--reference: no runs of 'retro'" in capsys.readouterr().err


def test_rows_of_one_method_with_other_settings_or_models_are_never_averaged_together(tmp_path):
    """Before, the table averaged every row of a method into one cell whatever it ran with."""
    import json
    import warnings

    from openprompt_retro.experiments.report import write_report

    def row(seed, acc, sid, model="m1"):
        return {"task": "SST-2", "method": "retro", "shots": 16, "seed": seed, "model": model, "settings_id": sid,
                "test_accuracy": acc}

    path = tmp_path / "results.jsonl"
    rows = [row(13, 0.5, "aaaaaaaaaaaa"), row(42, 0.7, "aaaaaaaaaaaa"), row(13, 0.9, "bbbbbbbbbbbb"),
            {**row(13, 0.1, "aaaaaaaaaaaa", model="other/m2"), "method": "prompt"},
            {**row(13, 0.3, "aaaaaaaaaaaa"), "method": "prompt"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="prompt ran with 2 different models or settings; retro ran with 2"):
        write_report(str(path), str(tmp_path))
    table = (tmp_path / "table.md").read_text()
    assert "| retro [settings aaaaaaaaaaaa] | 60.0 ± 10.0 |" in table
    assert "| retro [settings bbbbbbbbbbbb] | 90.0 ± 0.0 (n=1) |" in table
    assert "| prompt [model m2] | 10.0 ± 0.0 (n=1) |" in table and "| prompt [model m1] | 30.0 ± 0.0 (n=1) |" in table
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one setting per method: no warning, plain names
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
        write_report(str(path), str(tmp_path))
    assert "| retro | 60.0 ± 10.0 |" in (tmp_path / "table.md").read_text()


def _one_row_results(tmp_path):
    import json

    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"task": "SST-2", "method": "prompt", "shots": 16, "seed": 13, "model": "m",
                                "settings_id": "aaaaaaaaaaaa", "test_accuracy": 0.5}) + "\n")
    return path


def test_report_files_replace_planted_links_and_never_write_through_them(tmp_path):
    """Before, links planted at table.md, results.csv, summary.csv, accuracy.png were followed and their targets
    overwritten (an --out in a world-writable folder)."""
    from openprompt_retro.experiments.report import write_report

    path = _one_row_results(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    victims = {}
    for name in ("table.md", "results.csv", "summary.csv", "accuracy.png"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious")
        (out / name).symlink_to(victim)
        victims[name] = victim
    write_report(str(path), str(out))
    for name, victim in victims.items():
        assert victim.read_text() == "precious"
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| prompt | 50.0 ± 0.0 |" in (out / "table.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "results.csv", "summary.csv", "table.md"]


def test_report_into_a_file_or_onto_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from openprompt_retro.cli import main

    path = _one_row_results(tmp_path)
    (tmp_path / "afile").write_text("x")
    for args, message in ((["--out", str(tmp_path / "afile")], "it is a file, not a folder"),):
        with pytest.raises(SystemExit):
            main(["report", str(path), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "table.md").write_text("old table")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(SystemExit):
        main(["report", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert (tmp_path / "out" / "table.md").read_text() == "old table"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["table.md"]  # no temporary file left
