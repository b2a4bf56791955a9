"""Shared argument parsing for the examples: --model tiny-bert runs anywhere in seconds."""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout without installing

import openprompt_retro  # noqa: E402,F401  (makes openprompt importable)
from openprompt_retro.experiments.backbones import load_backbone  # noqa: E402
from openprompt_retro.experiments.sampling import stratified_subset, subset_record  # noqa: E402
from openprompt_retro.experiments.tasks import DEFAULT_DATA_ROOT, DEFAULT_MODEL, get_task, load_few_shot  # noqa: E402


def parse(description, **extra):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder / hub name, or tiny-bert, tiny-roberta")
    p.add_argument("--model-type", default="bert", choices=["bert", "roberta"])
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    p.add_argument("--task", default="SST-2")
    p.add_argument("--seed", type=int, default=42)
    for name, kw in extra.items():
        p.add_argument(f"--{name.replace('_', '-')}", **kw)
    return p.parse_args()


def setup(ns):
    """(spec, data splits, plm, tokenizer, WrapperClass)"""
    spec = get_task(ns.task)
    data = load_few_shot(ns.data_root, spec.name, 16, ns.seed)
    plm, tok, _, wrapper = load_backbone(ns.model, ns.model_type)
    return spec, data, plm, tok, wrapper


def limited(examples, limit, seed):
    """A seeded, class-stratified subset of ``limit`` examples (all without a limit): test files are often
    sorted by class, so their first N would be one class. Prints the subset's class counts."""
    labels = [e.label for e in examples]
    chosen = stratified_subset(labels, limit, seed)
    print(f"test: {len(chosen)} of {len(examples)} examples, per class "
          f"{subset_record(labels, limit, seed, chosen)['class_counts']}")
    return [examples[i] for i in chosen]
