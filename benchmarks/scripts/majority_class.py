"""The majority-class baseline of each task's test set: the accuracy of always answering the test set's most
frequent label (it reads the test labels, so it is a floor to compare with, not a method).

    python benchmarks/scripts/majority_class.py [--tasks CoLA,MRPC,RTE,QNLI] [--seeds 13,21,42,87,100] [--data-root ...]
"""
import argparse
from collections import Counter

from openprompt_retro.experiments.paths import DEFAULT_DATA_ROOT
from openprompt_retro.experiments.tasks import load_test


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="CoLA,MRPC,RTE,QNLI")
    ap.add_argument("--seeds", default="13,21,42,87,100")
    ap.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    ns = ap.parse_args()
    tasks, seeds = ns.tasks.split(","), [int(s) for s in ns.seeds.split(",")]
    print("| task | test examples | majority label | majority class (%) | same test set for every seed |")
    print("|---|---|---|---|---|")
    accs = []
    for task in tasks:
        per_seed = [[e.label for e in load_test(ns.data_root, task, seed=s)] for s in seeds]
        label, count = Counter(per_seed[0]).most_common(1)[0]
        accs.append(100 * count / len(per_seed[0]))
        print(f"| {task} | {len(per_seed[0])} | {label} | {accs[-1]:.1f} | "
              f"{'yes' if all(p == per_seed[0] for p in per_seed) else 'no'} |")
    print(f"| avg | | | {sum(accs) / len(accs):.1f} | |")


if __name__ == "__main__":
    main()
