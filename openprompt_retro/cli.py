"""Command line: ``openprompt-retro`` / ``python -m openprompt_retro`` (argparse and dispatch only).

Without a command it runs ``run`` on its default: full RetroPrompt, SST-2, 16-shot, seed 42, the offline
model in ../shared/models. Each command's work lives in :mod:`openprompt_retro.experiments`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import List, Optional

from .errors import UserError
from .experiments.methods import (ALL_METHODS, BENCH_TASKS, GRID_METHODS, LOCKED_PROTOCOL, LOCKED_VARIANT, SEEDS,
                                  methods_help)
from .experiments.paths import DEFAULT_DATA_ROOT, DEFAULT_MODEL

#: command -> (module in experiments, function), imported only when the command runs
COMMANDS = {
    "run": ("runs", "run_grid"), "benchmark": ("runs", "run_grid"), "report": ("report", "run_report"),
    "speed": ("speed", "run_speed"), "store-benchmark": ("store_bench", "run_store_benchmark_cli"),
    "analyze": ("memorization", "run_memorization"), "figures": ("figures", "run_figures"),
    "plot-k": ("figures", "run_plot_k"), "big-pool": ("big_pool", "run_big_pool"),
    "protocol": ("protocol", "run_protocol"),
}


def _csv(kind):
    def parse(s: str):
        return [kind(x) for x in s.split(",") if x.strip()]
    return parse


def _number(kind, low=None, high=None, low_open=False, what=""):
    """An argparse type: a finite ``kind`` within [low, high] (``low_open``: above low); a value outside is
    argparse's one-line error naming the option."""
    def parse(s: str):
        try:
            value = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, got {s!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or (low is not None and value < low) or \
                (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{what}, got {s!r}")
        return value
    return parse


_positive_int = _number(int, 1, what="must be an integer >= 1")
_count = _number(int, 0, what="must be an integer >= 0")
_non_negative = _number(float, 0.0, what="must be a finite number >= 0")
_positive = _number(float, 0.0, low_open=True, what="must be a finite number > 0")
_fraction = _number(float, 0.0, 1.0, low_open=True, what="must be a fraction in (0, 1]")
_weight = _number(float, 0.0, 1.0, what="must lie in [0, 1]")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _json_object(s: str) -> dict:
    """A JSON object (NaN and Infinity are not JSON numbers and are refused)."""
    try:
        value = json.loads(s, parse_constant=_reject_constant)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {s!r}")
    return value


def _add_common(p: argparse.ArgumentParser, *, training: bool = True) -> None:
    """Data and model options; ``training=False`` keeps only what inference needs (``speed``)."""
    g = p.add_argument_group("data and model")
    g.add_argument("--data-root", default=DEFAULT_DATA_ROOT,
                   help="folder holding k-shot/ and pools/ (env OPENPROMPT_RETRO_DATA; default: %(default)s)")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="local folder or hub name of a masked LM, or 'tiny-bert' / 'tiny-roberta' for a random "
                        "test model (env OPENPROMPT_RETRO_MODEL; default: %(default)s)")
    g.add_argument("--model-type", default="bert", choices=["bert", "roberta"], help="OpenPrompt model family")
    g.add_argument("--shots", "--k", dest="shots", type=int, default=16,
                   help="examples per class: an LM-BFF split's K, or fewer drawn from it (--k: old spelling)")
    g.add_argument("--max-seq-length", type=int, default=128,
                   help="tokens per input (text demonstrations get 2x) (default: %(default)s)")
    g = p.add_argument_group("device")
    g.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16"],
                   help="mixed precision under torch.autocast: bf16 (CPU or GPU) or fp16 (GPU, with a gradient "
                        "scaler); weights and store keys stay float32 (default: off)")
    if not training:
        return
    g.add_argument("--hf-dataset", default=None, metavar="NAME[:CONFIG]",
                   help="train and test on a Hugging Face dataset instead of --data-root (online; needs "
                        "'datasets'), e.g. glue:sst2 with --tasks SST-2: K per class for train and K for dev are "
                        "drawn from its train split with each seed; --tasks gives template and label words")
    g.add_argument("--hf-test-split", default=None, help="default: test if labeled, else validation")
    g.add_argument("--hf-text-fields", type=_csv(str), default=(), help="text column(s) (default: guessed)")
    g.add_argument("--hf-label-field", default="label")
    g.add_argument("--hf-label-map", type=_json_object, default=None,
                   help='JSON raw label -> class index of the task, e.g. \'{"0": 1, "1": 0}\'')
    g = p.add_argument_group("training (hyper-parameters not listed are chosen on dev)")
    g.add_argument("--epochs", type=int, default=20, help="maximum epochs; the best dev epoch is kept")
    g.add_argument("--lr", type=float, default=5e-5, help="learning rate")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--patience", type=int, default=20, help="evaluations without dev gain before stopping")
    g.add_argument("--max-steps", type=int, default=None, help="train this many steps (overrides --epochs)")
    g.add_argument("--eval-every", type=int, default=None, help="steps between dev evaluations (default: an epoch)")
    g.add_argument("--mixture-grid", default="fine",
                   choices=[n + s for n in ("small", "wide", "fixed", "fine") for s in ("", "-tplm")],
                   help="lambda/k/T candidates tuned on dev: lambda in {0, .25, .5, .75}, the 220-point grid, "
                        "lambda 0.5, or (default) lambda in {0, 0.1, ..., 1} with ties to the smaller dev "
                        "log-loss; -tplm: also temperature-scale the PLM on dev")
    g.add_argument("--config", type=_json_object, default={}, metavar="JSON",
                   help='RetroConfig overrides, e.g. \'{"demo_norm": "match", "max_loss_weight": 2}\'')
    g.add_argument("--demo-topk", type=_positive_int, default=None,
                   help="m neighbours per class (default: 8 for K>=16, else 2)")
    g.add_argument("--loss-beta", type=_non_negative, default=1.0, help="beta of the kNN-guided loss")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g = p.add_argument_group("zero-shot methods (no labels are read; these are fixed, not tuned)")
    g.add_argument("--zs-fraction", type=_fraction, default=0.3, help="most confident fraction of the pool kept")
    g.add_argument("--zs-pool-size", type=_count, default=4000, help="cap on the unlabeled pool (0: all)")
    g.add_argument("--zs-lambda", type=_weight, default=0.5)
    g.add_argument("--zs-k", type=_positive_int, default=16)
    g.add_argument("--zs-temperature", type=_positive, default=1.0, help="in standard deviations of the scores")
    g.add_argument("--zs-key-encoder", choices=["mask", "frozen-mean"], default="mask",
                   help="keys of zero-shot-retro's store: the untrained model's [MASK] states read by top-k voting "
                        "(--zs-k, --zs-temperature), or the frozen encoder's mean-pooled input read by class means "
                        "at RetroConfig's class_mean_temperature (nothing to tune it on without labels)")


def _add_grid(p, tasks, methods, seeds, out) -> None:
    p.add_argument("--tasks", type=_csv(str), default=tasks, help="comma-separated tasks")
    p.add_argument("--methods", type=_csv(str), default=methods, help=f"comma-separated, from {ALL_METHODS}")
    p.add_argument("--seeds", type=_csv(int), default=seeds, help="comma-separated LM-BFF seeds")
    p.add_argument("--out", default=out, help="output folder (results.jsonl, results.csv, table.md, accuracy.png)")
    p.add_argument("--overwrite", action="store_true", help="re-run runs already in OUT/results.jsonl and "
                   "replace their rows (default: skip them)")
    p.add_argument("--resume", action="store_true", help="kept for old scripts: finished runs are always skipped")
    _add_common(p)


class _Parser(argparse.ArgumentParser):
    """argparse with its mistakes in one line, ``openprompt-retro <command>: error: ...`` (exit 2), as the
    commands' own errors are; ``--help`` shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to an option's help unless its help already says what the default is, or the
    default is None (nothing to show)."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="openprompt-retro", formatter_class=_DefaultsFormatter,
        description="Retrieval-augmented prompt learning (RetroPrompt) on OpenPrompt. Without a command: "
                    "full RetroPrompt on SST-2 16-shot, seed 42.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help_text, description=None):
        c = sub.add_parser(name, help=help_text, description=description,
                           formatter_class=_DefaultsFormatter)
        c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        return c

    _add_grid(command("run", "train and evaluate methods on few-shot splits", f"Methods - {methods_help()}."),
              ["SST-2"], ["retro"], [42], os.path.join("runs", "default"))
    bench = command("benchmark", "7 tasks x every method x 5 seeds with the protocol chosen on dev (resumable)",
                    f"Methods - {methods_help()}. Defaults: the protocol and RetroPrompt variant that `protocol` "
                    f"chose on dev: {LOCKED_PROTOCOL}, {LOCKED_VARIANT}.")
    _add_grid(bench, BENCH_TASKS, GRID_METHODS, SEEDS, os.path.join("benchmarks", "results"))
    bench.set_defaults(**LOCKED_PROTOCOL, **LOCKED_VARIANT)

    rp = command("report", "table and plot from a results.jsonl")
    rp.add_argument("results", help="path to results.jsonl")
    rp.add_argument("--out", default=None, help="output folder (default: beside the results)")
    rp.add_argument("--seeds", type=_csv(int), default=None, help="summarise only these seeds (default: all)")
    rp.add_argument("--reference", default=None, metavar="METHOD",
                    help="the method the paired differences are taken from (default: retro)")
    rp.add_argument("--dev-select", type=_csv(str), default=None, metavar="A,B",
                    help="add a row that takes, per task and seed, whichever of these methods scored best on "
                         "dev (ties: the first listed)")

    sp = command("speed", "inference wall time of plain, kNN and full RetroPrompt inference")
    sp.add_argument("--task", default="SST-2")
    sp.add_argument("--seed", type=int, default=42)
    sp.add_argument("--repeats", type=_positive_int, default=3, help="timed repeats; the median is reported")
    sp.add_argument("--limit", type=_positive_int, default=None,
                    help="a seeded, class-stratified subset of N test examples (default: all)")
    _add_common(sp, training=False)

    sb = command("store-benchmark", "knowledge-store build time, memory, latency and recall on synthetic keys")
    sb.add_argument("--sizes", type=_csv(_positive_int), default=[10_000, 100_000, 1_000_000])
    sb.add_argument("--dims", type=_csv(_positive_int), default=[384, 1024])
    sb.add_argument("--indexes", type=_csv(str), default=["Flat", "IVF-Flat", "IVF-PQ", "HNSW"])
    sb.add_argument("--topk", type=_positive_int, default=16)
    sb.add_argument("--seed", type=int, default=0)
    sb.add_argument("--hnsw-max", type=_count, default=100_000, help="skip HNSW above this many keys")
    sb.add_argument("--out", default=os.path.join("benchmarks", "store"))

    for name, help_text, extra, out in [
            ("analyze", "leave-one-out memorization: plain prompt tuning vs RetroPrompt", "memorization",
             "memorization"),
            ("figures", "lambda sweep on dev + neighbours of one test prediction (one retro run)", "figures",
             "figures"),
            ("big-pool", "RetroPrompt with the K-shot store vs a store from a large labeled pool", "pool", "big_pool")]:
        c = command(name, help_text)
        c.add_argument("--task", default="SST-2")
        c.add_argument("--seed", type=int, default=42)
        c.add_argument("--out", default=os.path.join("benchmarks", out))
        if extra == "memorization":
            c.add_argument("--methods", type=_csv(str), default=["prompt", "retro"])
        elif extra == "figures":
            c.add_argument("--example", type=int, default=0, help="index of the test example to explain")
        else:
            c.add_argument("--pool", default="pool", choices=["pool", "sst2-full"],
                           help="pools/<task>/train.json, or the 67k GLUE SST-2 phrases")
            c.add_argument("--pool-size", type=_count, default=0, help="cap on pool examples (0: all)")
        _add_common(c)
        if extra == "memorization":  # K = 4 drawn from the 16-shot split, 10 epochs per retraining
            c.set_defaults(epochs=10, shots=4)

    pr = command("protocol", "choose lr/steps and the retro variant on dev, then run the grid with them",
                 "Phases: protocol (lr x steps, prompt and retro), variants (retro), grid (every method, 7 tasks "
                 "x 5 seeds). Each is resumable and decided on dev only; see experiments/protocol.py.")
    pr.add_argument("--phase", default="grid", choices=["protocol", "variants", "grid"], help="run up to this phase")
    pr.add_argument("--workers", type=int, default=1, help="parallel run processes (they share the folders)")
    pr.add_argument("--choose-only", action="store_true", help="only read finished search runs and choose")
    pr.add_argument("--out", default=os.path.join("benchmarks", "protocol", "search"), help="search runs and choices")
    pr.add_argument("--grid-out", default=os.path.join("benchmarks", "results"), help="the grid's folder")
    pr.add_argument("--grid-tasks", type=_csv(str), default=BENCH_TASKS)
    pr.add_argument("--grid-seeds", type=_csv(int), default=SEEDS)
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--patience", type=int, default=20, help="evaluations without dev gain before stopping")
    pr.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_common(pr, training=False)

    pk = command("plot-k", "accuracy against K from a results.jsonl of runs with --shots 4/8/16")
    pk.add_argument("results")
    pk.add_argument("--task", default="SST-2")
    pk.add_argument("--png", default=os.path.join("benchmarks", "figures", "accuracy_vs_k.png"))
    return p


def _with_command(argv: List[str]) -> List[str]:
    """Insert ``run`` when no command is named: the default job."""
    i = 0
    while i < len(argv) and argv[i] == "--debug":
        i += 1
    if i == len(argv) or (argv[i].startswith("-") and argv[i] not in ("-h", "--help")):
        return argv[:i] + ["run"] + argv[i:]
    return argv


def main(argv: Optional[List[str]] = None) -> None:
    ns = build_parser().parse_args(_with_command(list(sys.argv[1:] if argv is None else argv)))
    if getattr(ns, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" and friends
    module, func = COMMANDS[ns.command]
    try:
        getattr(importlib.import_module(f".experiments.{module}", __package__), func)(ns)
    except (UserError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if getattr(ns, "debug", False):
            raise
        print(f"openprompt-retro {ns.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
