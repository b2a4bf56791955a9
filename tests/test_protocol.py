"""The protocol command: choices made from dev accuracy alone, and each phase's runs done once."""
import json
import os

import pytest

from openprompt_retro.errors import UserError
from openprompt_retro.experiments import protocol
from openprompt_retro.experiments.protocol import choose, dev_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "text")
needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "k-shot")), reason="../shared data not present")


def row(task, method, seed, dev, test=0.5):
    return {"task": task, "method": method, "k": 16, "seed": seed, "dev_accuracy": dev, "test_accuracy": test}


def test_dev_table_averages_dev_only_and_waits_for_every_run():
    rows = [row("A", "prompt", 1, 0.5, test=0.99), row("A", "retro", 1, 0.7, test=0.0)]
    t = dev_table(rows, ["prompt", "retro"], ["A"], [1])
    assert (t["dev_mean"], t["dev_std"], t["n"]) == (pytest.approx(0.6), pytest.approx(0.1), 2)
    assert "test_accuracy" not in str(sorted(t))  # diagnostics may be added; test accuracy never is
    assert dev_table(rows, ["prompt", "retro"], ["A"], [1, 2]) is None  # seed 2 not run yet


def test_choose_takes_the_best_dev_mean_and_breaks_ties_by_order():
    tables = {"a": {"dev_mean": 0.6}, "b": {"dev_mean": 0.7}, "c": {"dev_mean": 0.7}}
    assert choose(tables, ["a", "b", "c"])[0] == "b"
    assert choose(tables, ["a", "c", "b"])[0] == "c"
    with pytest.raises(UserError, match=r"candidates \['d'\] have unfinished runs"):
        choose({**tables, "d": None}, ["a", "b", "c", "d"])


def test_protocol_tie_break_prefers_fewer_steps_then_smaller_lr():
    order = protocol.protocol_order()
    steps = [protocol.PROTOCOLS[n]["max_steps"] for n in order]
    assert steps == sorted(steps)
    assert order[0] == "lr1e-05-steps100"
    assert all(p["eval_every"] * 10 == p["max_steps"] for p in protocol.PROTOCOLS.values())


@needs_data
def test_protocol_command_chooses_on_dev_and_runs_the_grid_with_the_choice(tmp_path, monkeypatch):
    from openprompt_retro.cli import build_parser

    monkeypatch.setattr(protocol, "PROTOCOLS", {"fast": {"lr": 1e-3, "max_steps": 4, "eval_every": 2},
                                                "slow": {"lr": 1e-4, "max_steps": 2, "eval_every": 1}})
    monkeypatch.setattr(protocol, "VARIANTS", {"base": {}, "beta-2": {"loss_beta": 2.0}})
    monkeypatch.setattr(protocol, "SEARCH_TASKS", ["SST-2"])
    monkeypatch.setattr(protocol, "SEARCH_SEEDS", [13])
    monkeypatch.setattr(protocol, "GRID_METHODS", ["prompt", "linear-probe"])
    out, grid = tmp_path / "search", tmp_path / "grid"
    ns = build_parser().parse_args(["protocol", "--model", "tiny-bert", "--data-root", DATA, "--out", str(out),
                                    "--grid-out", str(grid), "--grid-tasks", "SST-2", "--grid-seeds", "13",
                                    "--workers", "2", "--no-progress", "--max-seq-length", "64"])
    choices = protocol.run_protocol(ns)

    def dev_mean(folder, methods):
        rows = [json.loads(line) for line in open(folder / "results.jsonl")]
        assert len({(r["task"], r["method"], r["seed"]) for r in rows}) == len(rows)  # each run once
        return sum(r["dev_accuracy"] for r in rows if r["method"] in methods) / len(methods)

    means = {n: dev_mean(out / "protocol" / n, ["prompt", "retro"]) for n in ("fast", "slow")}
    expected = "slow" if means["slow"] > means["fast"] else "fast"  # ties: fewer steps ("slow") comes first
    expected = "slow" if means["slow"] == means["fast"] else expected
    assert choices["protocol"]["chosen"] == expected
    vmeans = {n: dev_mean(out / "variants" / n, ["retro"]) for n in ("base", "beta-2")}
    assert choices["variant"]["chosen"] == ("beta-2" if vmeans["beta-2"] > vmeans["base"] else "base")
    saved = json.loads((out / "choices.json").read_text())
    assert saved["protocol"]["chosen"] == expected and "(chosen)" in (out / "summary.md").read_text()
    rows = [json.loads(line) for line in open(grid / "results.jsonl")]
    assert sorted(r["method"] for r in rows) == ["linear-probe", "prompt"]
    prompt_row = next(r for r in rows if r["method"] == "prompt")
    assert prompt_row["settings"]["max_steps"] == protocol.PROTOCOLS[expected]["max_steps"]
    assert prompt_row["settings"]["lr"] == protocol.PROTOCOLS[expected]["lr"]
    assert prompt_row["settings"]["loss_beta"] == (2.0 if choices["variant"]["chosen"] == "beta-2" else 1.0)


def test_retro_diagnostics_are_averaged_beside_the_choice():
    rows = [dict(row("A", "retro", s, dev), knn_lambda=lam,
                 diagnostics={"dev_accuracy_plm_only": plm, "demonstration_reliance_dev": {"permuted_change": pc,
                                                                                          "removed_change": -0.1}})
            for s, dev, lam, plm, pc in [(1, 0.6, 0.0, 0.6, 0.0), (2, 0.8, 0.5, 0.7, -0.2)]]
    t = dev_table(rows, ["retro"], ["A"], [1, 2])
    assert t["dev_plm_only"] == pytest.approx(0.65) and t["dev_permuted_change"] == pytest.approx(-0.1)
    assert t["dev_removed_change"] == pytest.approx(-0.1) and t["lambda_positive"] == 0.5
    assert "test_permuted_change" not in t  # no test reliance recorded: nothing averaged


def test_benchmark_runs_with_what_the_committed_search_chose():
    """The benchmark command's defaults are the protocol and variant in benchmarks/protocol/search/choices.json."""
    from openprompt_retro.cli import build_parser
    from openprompt_retro.experiments.methods import GRID_METHODS, LOCKED_PROTOCOL, LOCKED_VARIANT

    with open(os.path.join(ROOT, "benchmarks", "protocol", "search", "choices.json")) as f:
        choices = json.load(f)
    assert choices["protocol"]["settings"] == LOCKED_PROTOCOL
    assert choices["variant"]["settings"] == LOCKED_VARIANT
    ns = build_parser().parse_args(["benchmark"])
    assert (ns.lr, ns.max_steps, ns.eval_every) == (5e-5, 200, 20) and ns.config == {"demo_center": True}
    assert ns.methods == GRID_METHODS and len(ns.tasks) * len(ns.seeds) * len(ns.methods) == 280


def test_benchmark_and_retroconfig_defaults_are_what_the_adapted_study_chose():
    """The dev-only study of keys (benchmarks/adapted_study/choice.json) fixed the store's defaults: a ``benchmark``
    run with no options is the same run (same settings id) as one given the chosen candidate's options, and
    RetroConfig() - the drop-in path's default - holds the same choice."""
    from openprompt_retro.cli import build_parser
    from openprompt_retro.core.config import RetroConfig
    from openprompt_retro.experiments.results import settings_id
    from openprompt_retro.experiments.spec import RunSpec

    with open(os.path.join(ROOT, "benchmarks", "adapted_study", "choice.json")) as f:
        choice = json.load(f)
    parse = build_parser().parse_args
    default = RunSpec.from_namespace(parse(["benchmark"]))
    chosen = RunSpec.from_namespace(parse(["benchmark", "--config", json.dumps(choice["config"]),
                                           "--mixture-grid", choice["mixture_grid"]]))
    assert settings_id(choice["method"], 16, default.options()) == settings_id(choice["method"], 16, chosen.options())
    assert default.mixture_grid == choice["mixture_grid"]
    defaults = RetroConfig()
    for field, value in choice["config"].items():
        if field != "demo_center":  # the benchmark's protocol (checked above), not the drop-in default
            assert getattr(defaults, field) == value, field
