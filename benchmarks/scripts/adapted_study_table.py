"""The adapted-keys study table: mean dev accuracy (the choice) and mean test accuracy (shown, never used) of each
candidate default on the same 18 dev splits (SST-2, subj, trec, MRPC, RTE, QNLI x seeds 13/21/42), and the
choice written to STUDY/choice.json: the complete candidate with the highest mean dev accuracy (ties: the first
listed, today's default first).

Candidates (rows of the same splits):
  frozen (today)        single texts: benchmarks/frozen_study/demo-keyenc-classmean (issue 20's choice);
                        pairs: the retro rows of benchmarks/results-frozen-heldout (joint frozen keys)
  adapted               benchmarks/adapted_study/adapted-auto (pairs: relation keys, pre-trained encoder)
  adapted + pairs       single texts as "adapted" (adapt_pairs changes nothing there); pairs from
                        benchmarks/adapted_study/adapted-auto-pairs (the pair encoder adapted too)

    python benchmarks/scripts/adapted_study_table.py
"""
import json
import os
from statistics import mean, pstdev

SINGLE, PAIRS, SEEDS = ("SST-2", "subj", "trec"), ("MRPC", "RTE", "QNLI"), (13, 21, 42)
STUDY = os.path.join("benchmarks", "adapted_study")
#: the RetroConfig fields that define a candidate (read from its rows' recorded config)
DEFINING = ("key_encoder", "knn_readout", "demo_retrieval", "demo_center", "adapt_pairs", "adapt_steps", "adapt_lr",
            "store_guard_alpha")


def rows(path, method="retro", tasks=SINGLE + PAIRS):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        out = [json.loads(line) for line in f if line.strip()]
    return [r for r in out if r["method"] == method and r["task"] in tasks and r["seed"] in SEEDS]


def candidates():
    adapted = rows(os.path.join(STUDY, "adapted-auto", "results.jsonl"))
    return {
        "frozen (today)": rows(os.path.join("benchmarks", "frozen_study", "demo-keyenc-classmean", "results.jsonl"),
                               tasks=SINGLE)
        + rows(os.path.join("benchmarks", "results-frozen-heldout", "results.jsonl"), tasks=PAIRS),
        "adapted": adapted,
        "adapted + pairs": [r for r in adapted if r["task"] in SINGLE]
        + rows(os.path.join(STUDY, "adapted-auto-pairs", "results.jsonl"), tasks=PAIRS),
    }


def line(name, picked, tasks):
    sel = [r for r in picked if r["task"] in tasks]
    if not sel:
        return f"| {name} | 0/{len(tasks) * len(SEEDS)} | | | |"
    dev, test = [r["dev_accuracy"] for r in sel], [r["test_accuracy"] for r in sel]
    return (f"| {name} | {len(sel)}/{len(tasks) * len(SEEDS)} | {100 * mean(dev):.1f} ± {100 * pstdev(dev):.1f} | "
            f"{100 * mean(test):.1f} ± {100 * pstdev(test):.1f} | {mean(r['knn_lambda'] for r in sel):.2f} |")


def main():
    cands = candidates()
    for title, tasks in (("single texts (SST-2, subj, trec)", SINGLE), ("sentence pairs (MRPC, RTE, QNLI)", PAIRS),
                         ("all 18 splits", SINGLE + PAIRS)):
        print(f"\n{title}\n\n| candidate | splits | dev | test (shown, not used) | mean lambda |\n|---|---|---|---|---|")
        for name, picked in cands.items():
            print(line(name, picked, tasks))
    complete = {n: p for n, p in cands.items() if len(p) == len(SINGLE + PAIRS) * len(SEEDS)}
    if not complete:
        print("\nno candidate is complete yet")
        return
    dev = {n: mean(r["dev_accuracy"] for r in p) for n, p in complete.items()}
    chosen = max(dev, key=lambda n: (dev[n], -list(dev).index(n)))
    pick = next(r for r in complete[chosen] if r["task"] in PAIRS)  # a pair row shows every defining field
    config = {k: pick["settings"]["config"].get(k) for k in DEFINING}
    choice = {"chosen": chosen, "method": pick["method"], "config": config,
              "mixture_grid": pick["settings"]["mixture_grid"], "dev_mean": dev,
              "incomplete": {n: len(p) for n, p in cands.items() if n not in complete}}
    with open(os.path.join(STUDY, "choice.json"), "w", encoding="utf-8") as f:
        json.dump(choice, f, indent=2)
    print(f"\nchosen on dev among the complete candidates: {chosen} ({100 * dev[chosen]:.1f}); written to "
          f"{STUDY}/choice.json")


if __name__ == "__main__":
    main()
