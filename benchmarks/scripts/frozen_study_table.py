"""Issue 20's variant study table: mean dev accuracy (the choice) and mean test accuracy (shown, never used)
of each variant in benchmarks/frozen_study/, beside issue 11's [MASK]-key rows on the same splits. Of the
complete variants (9 of 9 splits), the one with the highest mean dev accuracy (ties: the first listed) is
written to STUDY/choice.json: its method and the RetroConfig fields that define it (incomplete ones are
named there, not considered).

    python benchmarks/scripts/frozen_study_table.py [--study benchmarks/frozen_study] [--grid benchmarks/results]
"""
import argparse
import json
import os
from statistics import mean, pstdev

from openprompt_retro.methods import METHODS

TASKS, SEEDS = ("SST-2", "subj", "trec"), (13, 21, 42)
#: the RetroConfig fields that tell the variants apart (read from their rows' recorded config)
DEFINING = ("key_encoder", "knn_readout", "demo_retrieval", "demo_center")


def rows(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise(name, picked):
    """One table line: dev and test mean ± std over the splits found, with the count, and the mean lambda."""
    dev = [r["dev_accuracy"] for r in picked]
    test = [r["test_accuracy"] for r in picked]
    if not picked:
        return f"| {name} | 0/9 | | | |"
    preset = METHODS.get(picked[0]["method"])  # lambda is a dev choice only with kNN inference; else "-"
    lam = f"{mean(r['knn_lambda'] for r in picked):.2f}" if preset and preset.knn_inference else "-"
    return (f"| {name} | {len(picked)}/9 | {100 * mean(dev):.1f} ± {100 * pstdev(dev):.1f} | "
            f"{100 * mean(test):.1f} ± {100 * pstdev(test):.1f} | {lam} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default=os.path.join("benchmarks", "frozen_study"))
    ap.add_argument("--grid", default=os.path.join("benchmarks", "results"))
    ns = ap.parse_args()
    print("| variant | splits | dev | test | mean lambda |\n|---|---|---|---|---|")
    old = [r for r in rows(os.path.join(ns.grid, "results.jsonl")) if r["task"] in TASKS and r["seed"] in SEEDS]
    for method in ("prompt", "linear-probe", "fine-tune", "retro", "retro-no-demo"):
        print(summarise(f"issue 11 grid: {method} ([MASK] keys, top-k)" if method.startswith("retro")
                        else f"issue 11 grid: {method}", [r for r in old if r["method"] == method]))
    variants = {}
    for variant in sorted(os.listdir(ns.study)) if os.path.isdir(ns.study) else []:
        if not os.path.isdir(os.path.join(ns.study, variant)):
            continue
        picked = [r for r in rows(os.path.join(ns.study, variant, "results.jsonl"))
                  if r["task"] in TASKS and r["seed"] in SEEDS]
        variants[variant] = picked
        print(summarise(f"{variant} ({picked[0]['method']})" if picked else variant, picked))
    complete = {v: p for v, p in variants.items() if len(p) == len(TASKS) * len(SEEDS)}
    if complete:
        dev = {v: mean(r["dev_accuracy"] for r in p) for v, p in complete.items()}
        chosen = max(dev, key=lambda v: (dev[v], -list(dev).index(v)))
        first = complete[chosen][0]
        choice = {"chosen": chosen, "method": first["method"],
                  "config": {k: first["settings"]["config"][k] for k in DEFINING},
                  "mixture_grid": first["settings"]["mixture_grid"], "dev_mean": dev,
                  "incomplete": {v: len(p) for v, p in variants.items() if v not in complete}}
        with open(os.path.join(ns.study, "choice.json"), "w", encoding="utf-8") as f:
            json.dump(choice, f, indent=2)
        print(f"\nchosen on dev among the complete variants: {chosen} ({100 * dev[chosen]:.1f}); written to "
              f"{ns.study}/choice.json" + (f"; incomplete, not considered: {choice['incomplete']}"
                                           if choice["incomplete"] else ""))

if __name__ == "__main__":
    main()
