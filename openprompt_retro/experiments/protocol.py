"""``protocol``: choose the training protocol and the RetroPrompt variant on dev, then run the grid with them.

Three phases, each resumable (its runs are rows of a results.jsonl) and each decided on dev only:

1. **protocol** - every (lr, steps) of :data:`PROTOCOLS` trains ``prompt`` and ``retro`` on the search
   splits (:data:`SEARCH_TASKS` x :data:`SEARCH_SEEDS`). The protocol with the highest mean dev accuracy over
   both methods and all splits is locked (ties: fewer steps, then the smaller lr). Dev is evaluated every
   tenth of training; the interval is not searched, since on one training trajectory a denser evaluation
   can only raise the best dev score (that is selection, not a better model).
2. **variants** - ``retro`` under the locked protocol with each of :data:`VARIANTS` (neural-demonstration
   shapes, a warm start, the loss's beta); the highest mean dev accuracy is kept (ties: the earlier one).
3. **grid** - every method of the benchmark, 7 tasks x 5 seeds, with the locked protocol and variant.

Runs of a phase are spread over ``--workers`` processes that share the phase's folders (each run is
claimed, so none is done twice). Choices and their tables go to OUT/choices.json and OUT/summary.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from statistics import mean, pstdev
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import UserError
from .methods import GRID_METHODS
from .results import dedupe, read_rows, row_shots

SEARCH_TASKS = ["SST-2", "subj", "trec"]
SEARCH_SEEDS = [13, 21, 42]
SEARCH_METHODS = ["prompt", "retro"]
#: name -> training options; eval_every is a tenth of the steps
PROTOCOLS: Dict[str, Dict] = {
    f"lr{lr:g}-steps{steps}": {"lr": lr, "max_steps": steps, "eval_every": steps // 10}
    for steps in (100, 200) for lr in (1e-5, 2e-5, 5e-5)}
#: name -> RetroConfig overrides and loss beta for ``retro`` (``base``: the defaults)
VARIANTS: Dict[str, Dict] = {
    "base": {},
    "demo-norm-match": {"config": {"demo_norm": "match"}},
    "demo-center": {"config": {"demo_center": True}},
    "demo-dropout-0.3": {"config": {"demo_dropout": 0.3}},
    "demo-warmup-0.3": {"config": {"demo_warmup": 0.3}},
    "beta-0.5": {"loss_beta": 0.5},
    "beta-2": {"loss_beta": 2.0},
}


# ---------------------------------------------------------------------- choices (pure functions of the rows)
def dev_table(rows: Sequence[Dict], methods: Sequence[str], tasks: Sequence[str], seeds: Sequence[int],
              k: int = 16) -> Optional[Dict]:
    """Mean and std of dev accuracy over every (task, seed, method) asked for; None while one is missing."""
    by_key = {(r["task"], r["method"], row_shots(r), int(r["seed"])): r for r in dedupe(list(rows))}
    values = []
    for t in tasks:
        for s in seeds:
            for m in methods:
                r = by_key.get((t, m, k, s))
                if r is None or r.get("dev_accuracy") is None:
                    return None
                values.append(float(r["dev_accuracy"]))
    table = {"dev_mean": mean(values), "dev_std": pstdev(values), "n": len(values)}
    table.update(_diagnostic_means([by_key[(t, m, k, s)] for t in tasks for s in seeds for m in methods
                                    if m not in ("prompt", "demo-text")]))
    return table


def _diagnostic_means(rows: Sequence[Dict]) -> Dict:
    """Means of the retro diagnostics (reported beside the choice, never used to make it)."""
    out: Dict = {}
    diags = [r.get("diagnostics") or {} for r in rows]

    def avg(name, values):
        values = [v for v in values if v is not None]
        if values:
            out[name] = mean(values)

    avg("dev_plm_only", [d.get("dev_accuracy_plm_only") for d in diags])
    for split, key in (("dev", "demonstration_reliance_dev"), ("test", "demonstration_reliance")):
        avg(f"{split}_permuted_change", [(d.get(key) or {}).get("permuted_change") for d in diags])
        avg(f"{split}_removed_change", [(d.get(key) or {}).get("removed_change") for d in diags])
    avg("lambda_positive", [float(r.get("knn_lambda", 0) > 0) for r in rows])
    return out


def choose(tables: Dict[str, Optional[Dict]], order: Sequence[str]) -> Tuple[str, Dict]:
    """The candidate with the highest mean dev accuracy; ties go to the earliest in ``order``."""
    missing = [name for name in order if tables.get(name) is None]
    if missing:
        raise UserError(f"cannot choose yet: candidates {missing} have unfinished runs")
    best = max(order, key=lambda name: (tables[name]["dev_mean"], -list(order).index(name)))
    return best, tables[best]


def protocol_order() -> List[str]:
    """Tie-break order: fewer steps first, then the smaller learning rate."""
    return sorted(PROTOCOLS, key=lambda n: (PROTOCOLS[n]["max_steps"], PROTOCOLS[n]["lr"]))


# ---------------------------------------------------------------------- running
def _passthrough(ns) -> List[str]:
    """The data, model and device options every run of every phase shares."""
    args = ["--data-root", ns.data_root, "--model", ns.model, "--model-type", ns.model_type,
            "--shots", str(ns.shots), "--max-seq-length", str(ns.max_seq_length),
            "--batch-size", str(ns.batch_size), "--patience", str(ns.patience)]
    if ns.device:
        args += ["--device", ns.device]
    if ns.amp:
        args += ["--amp", ns.amp]
    if ns.no_progress:
        args.append("--no-progress")
    return args


def _protocol_args(p: Dict) -> List[str]:
    return ["--lr", f"{p['lr']:g}", "--max-steps", str(p["max_steps"]), "--eval-every", str(p["eval_every"])]


def _variant_args(v: Dict) -> List[str]:
    args = []
    if v.get("config"):
        args += ["--config", json.dumps(v["config"])]
    if "loss_beta" in v:
        args += ["--loss-beta", str(v["loss_beta"])]
    return args


def run_parallel(commands: Sequence[List[str]], workers: int, log_dir: str) -> None:
    """Each worker runs every command (``run`` sub-commands sharing result folders) starting at its own
    offset; claims make every run happen once, so idle workers help with what is left."""
    os.makedirs(log_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    failures: List[str] = []

    def worker(i: int) -> None:
        with open(os.path.join(log_dir, f"worker{i}.log"), "a") as log:
            for j in range(len(commands)):
                cmd = commands[(i + j) % len(commands)]
                full = [sys.executable, "-m", "openprompt_retro", "run", *cmd]
                log.write("$ " + " ".join(full) + "\n")
                log.flush()
                rc = subprocess.call(full, stdout=log, stderr=subprocess.STDOUT, env=env)
                if rc != 0:
                    failures.append(f"worker {i}: exit {rc}: {' '.join(cmd)}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise UserError(f"{len(failures)} run command(s) failed (logs in {log_dir}): {failures[0]}")


def _rows(folder: str) -> List[Dict]:
    return read_rows(os.path.join(folder, "results.jsonl"))


def _search(ns, phase: str, candidate_args: Dict[str, List[str]], methods: Sequence[str],
            order: Sequence[str]) -> Tuple[str, Dict]:
    """Run ``methods`` on the search splits once per candidate (OUT/<phase>/<candidate>), then choose on dev."""
    folder = os.path.join(ns.out, phase)
    commands = [["--tasks", ",".join(SEARCH_TASKS), "--seeds", ",".join(map(str, SEARCH_SEEDS)),
                 "--methods", ",".join(methods), "--out", os.path.join(folder, name), *args, *_passthrough(ns)]
                for name, args in candidate_args.items()]
    if not ns.choose_only:
        run_parallel(commands, ns.workers, os.path.join(ns.out, "logs"))
    tables = {name: dev_table(_rows(os.path.join(folder, name)), methods, SEARCH_TASKS, SEARCH_SEEDS, ns.shots)
              for name in candidate_args}
    name, _ = choose(tables, order)
    return name, tables


def phase_protocol(ns) -> Tuple[str, Dict]:
    return _search(ns, "protocol", {name: _protocol_args(p) for name, p in PROTOCOLS.items()}, SEARCH_METHODS,
                   protocol_order())


def phase_variants(ns, protocol: Dict) -> Tuple[str, Dict]:
    return _search(ns, "variants", {name: [*_protocol_args(protocol), *_variant_args(v)]
                                    for name, v in VARIANTS.items()}, ["retro"], list(VARIANTS))


def phase_grid(ns, protocol: Dict, variant: Dict) -> None:
    command = ["--tasks", ",".join(ns.grid_tasks), "--seeds", ",".join(map(str, ns.grid_seeds)),
               "--methods", ",".join(GRID_METHODS), "--out", ns.grid_out, *_protocol_args(protocol),
               *_variant_args(variant), *_passthrough(ns)]
    run_parallel([command], ns.workers, os.path.join(ns.out, "logs"))


def _summary(choices: Dict) -> str:
    lines = ["# Protocol and variant chosen on dev", "",
             f"Search splits: {', '.join(SEARCH_TASKS)} x seeds {', '.join(map(str, SEARCH_SEEDS))} (16-shot); "
             "dev accuracy in %, mean ± std over the runs.", ""]
    for phase, label in (("protocol", "protocol (prompt and retro)"), ("variant", "retro variant")):
        if phase not in choices:
            continue
        lines += [f"## {label}", "", "| candidate | dev mean | dev std | runs | retro dev, PLM alone | "
                  "d_c permuted: dev / test | d_c removed: dev / test | lambda > 0 |", "|---|---|---|---|---|---|---|---|"]
        for name, t in choices[phase]["tables"].items():
            mark = " **(chosen)**" if name == choices[phase]["chosen"] else ""
            if not t:
                lines.append(f"| {name} | - | - | unfinished | | | | |")
                continue

            def pct(key, signed=False):
                return "-" if key not in t else (f"{100 * t[key]:+.1f}" if signed else f"{100 * t[key]:.1f}")
            lines.append(f"| {name}{mark} | {100 * t['dev_mean']:.1f} | {100 * t['dev_std']:.1f} | {t['n']} | "
                         f"{pct('dev_plm_only')} | {pct('dev_permuted_change', True)} / "
                         f"{pct('test_permuted_change', True)} | {pct('dev_removed_change', True)} / "
                         f"{pct('test_removed_change', True)} | {pct('lambda_positive')}% |")
        lines += ["", "Diagnostics are retro means (changes in accuracy points); they are reported, not used to "
                  "choose. Test accuracy is never read by the choice.", ""]
    return "\n".join(lines)


def run_protocol(ns) -> Dict:
    """The ``protocol`` command: the phases up to ``ns.phase`` (``protocol``, ``variants`` or ``grid``)."""
    from .runs import check_model, check_out

    check_model(ns.model, ns.model_type)
    check_out(ns.out)
    choices: Dict = {}
    name, tables = phase_protocol(ns)
    choices["protocol"] = {"chosen": name, "settings": PROTOCOLS[name], "tables": tables}
    if ns.phase in ("variants", "grid"):
        vname, vtables = phase_variants(ns, PROTOCOLS[name])
        choices["variant"] = {"chosen": vname, "settings": VARIANTS[vname], "tables": vtables}
    with open(os.path.join(ns.out, "choices.json"), "w") as f:
        json.dump(choices, f, indent=2)
    with open(os.path.join(ns.out, "summary.md"), "w") as f:
        f.write(_summary(choices))
    print(_summary(choices))
    if ns.phase == "grid":
        phase_grid(ns, PROTOCOLS[name], VARIANTS[choices["variant"]["chosen"]])
    return choices


__all__ = ["run_protocol", "dev_table", "choose", "PROTOCOLS", "VARIANTS", "SEARCH_TASKS", "SEARCH_SEEDS"]
