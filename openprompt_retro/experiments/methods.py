"""What the benchmark runs: the methods (the presets of :mod:`openprompt_retro.methods` plus baselines and
zero-shot), tasks and seeds. Import-free, for a fast ``--help``."""
from __future__ import annotations

from typing import Dict

from ..methods import METHODS

#: the trained methods: every preset
METHOD_HELP: Dict[str, str] = {name: preset.help for name, preset in METHODS.items()}
BASELINE_METHODS: Dict[str, str] = {
    "fine-tune": "baseline: a linear head on [CLS], the whole encoder trained, the same protocol",
    "linear-probe": "baseline: logistic regression on frozen mean-pooled embeddings, C chosen on dev",
    "setfit": "baseline: the setfit package with its defaults on the same encoder (optional extra [setfit])",
}
ZERO_SHOT_METHODS: Dict[str, str] = {
    "zero-shot": "the untrained prompt model (template + label words), no labels",
    "zero-shot-retro": "zero-shot + a store of the most confident pseudo-labeled pool examples, kNN inference",
}
TRAINED_METHODS = list(METHOD_HELP)
ALL_METHODS = TRAINED_METHODS + list(BASELINE_METHODS) + list(ZERO_SHOT_METHODS)
#: the benchmark grid: every trained method and the baselines that need no extra
GRID_METHODS = TRAINED_METHODS + [m for m in BASELINE_METHODS if m != "setfit"]  # setfit: an optional extra
BENCH_TASKS = ["SST-2", "sst-5", "mr", "cr", "mpqa", "subj", "trec"]
#: what ``protocol`` chose on dev (benchmarks/protocol/search/choices.json); ``benchmark`` runs with it
LOCKED_PROTOCOL = {"lr": 5e-5, "max_steps": 200, "eval_every": 20}
LOCKED_VARIANT = {"config": {"demo_center": True}}
SEEDS = [13, 21, 42, 87, 100]


def methods_help() -> str:
    return "; ".join(f"{k}: {v}" for k, v in {**METHOD_HELP, **BASELINE_METHODS, **ZERO_SHOT_METHODS}.items())
