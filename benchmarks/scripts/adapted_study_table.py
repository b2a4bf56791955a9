"""The adapted-keys study table: mean dev accuracy (the choice) and mean test accuracy (shown, never used) of each
candidate default on the same 18 dev splits (SST-2, subj, trec, MRPC, RTE, QNLI x seeds 13/21/42), and the
choice written to STUDY/choice.json once every candidate is complete: the candidate run with today's code that
has the highest mean dev accuracy (ties: the first listed). The earlier frozen store's rows are shown beside them, not chosen
among them: they ran without the mixture guard and with joint pair keys, so their dev accuracies are not
comparable (dev picked lambda without the guard's check).

Candidates (rows of the same splits):
  frozen                benchmarks/adapted_study/frozen-auto: the frozen encoder's keys with today's code, on single
                        texts; on pairs the rows of adapted-auto (which keeps the pre-trained pair encoder: the
                        same keys, the same runs)
  adapted               benchmarks/adapted_study/adapted-auto (pairs: relation keys, pre-trained encoder)
  adapted + pairs       single texts as "adapted" (adapt_pairs changes nothing there); pairs from
                        benchmarks/adapted_study/adapted-auto-pairs (the pair encoder adapted too)
Shown:
  issue 20 (frozen)     single texts: benchmarks/frozen_study/demo-keyenc-classmean (the earlier choice);
                        pairs: the retro rows of benchmarks/results-frozen-heldout (joint frozen keys)

    python benchmarks/scripts/adapted_study_table.py
"""
import json
import os
from statistics import mean, pstdev

SINGLE, PAIRS, SEEDS = ("SST-2", "subj", "trec"), ("MRPC", "RTE", "QNLI"), (13, 21, 42)
STUDY = os.path.join("benchmarks", "adapted_study")
#: each candidate's --config, as adapted_study.sh gives it (a row records its tuned config: the read-out dev chose
#: and the lambda, not "auto"); the rows are checked against it
CONFIGS = {
    "frozen": {"demo_center": True, "key_encoder": "frozen-mean", "knn_readout": "auto"},
    "adapted": {"demo_center": True, "key_encoder": "adapted", "knn_readout": "auto"},
    "adapted + pairs": {"demo_center": True, "key_encoder": "adapted", "knn_readout": "auto", "adapt_pairs": True},
}


def rows(path, method="retro", tasks=SINGLE + PAIRS):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        out = [json.loads(line) for line in f if line.strip()]
    return [r for r in out if r["method"] == method and r["task"] in tasks and r["seed"] in SEEDS]


def issue20():
    return rows(os.path.join("benchmarks", "frozen_study", "demo-keyenc-classmean", "results.jsonl"), tasks=SINGLE) \
        + rows(os.path.join("benchmarks", "results-frozen-heldout", "results.jsonl"), tasks=PAIRS)


def candidates():
    adapted = rows(os.path.join(STUDY, "adapted-auto", "results.jsonl"))
    return {
        "frozen": rows(os.path.join(STUDY, "frozen-auto", "results.jsonl"), tasks=SINGLE)
        + [r for r in adapted if r["task"] in PAIRS],
        "adapted": adapted,
        "adapted + pairs": [r for r in adapted if r["task"] in SINGLE]
        + rows(os.path.join(STUDY, "adapted-auto-pairs", "results.jsonl"), tasks=PAIRS),
    }


def sorted_rows(picked):
    return sorted(picked, key=lambda r: (r["task"], r["seed"]))


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
        for name, picked in {**cands, "earlier frozen store (shown)": issue20()}.items():
            print(line(name, picked, tasks))
    complete = {n: p for n, p in cands.items() if len(p) == len(SINGLE + PAIRS) * len(SEEDS)}
    if len(complete) < len(cands):
        print(f"\nnot every candidate is complete yet ({ {n: len(p) for n, p in cands.items()} }): no choice")
        return
    dev = {n: mean(r["dev_accuracy"] for r in p) for n, p in complete.items()}
    chosen = max(dev, key=lambda n: (dev[n], -list(dev).index(n)))
    paired = {n: [100 * (a["dev_accuracy"] - b["dev_accuracy"]) for a, b in zip(sorted_rows(complete[n]),
                                                                             sorted_rows(complete["frozen"]))]
              for n in complete if n != "frozen"}
    print()
    for n, d in paired.items():
        print(f"* {n} - frozen on dev, per split: mean {mean(d):+.2f}, {sum(x > 0 for x in d)} up / "
              f"{sum(x == 0 for x in d)} tied / {sum(x < 0 for x in d)} down")
    config = CONFIGS[chosen]
    single = next(r for r in complete[chosen] if r["task"] in SINGLE)
    pick = next(r for r in complete[chosen] if r["task"] in PAIRS)
    for r, fields in ((single, ("demo_center", "key_encoder")), (pick, ("adapt_pairs",))):
        for k in fields:  # the rows ran what CONFIGS says (adapt_pairs only matters, and is only set, on pairs)
            assert r["settings"]["config"][k] == config.get(k, False), (chosen, k, r["settings"]["config"][k])
    choice = {"chosen": chosen, "method": pick["method"], "config": config,
              "mixture_grid": pick["settings"]["mixture_grid"], "dev_mean": dev}
    ce = rows(os.path.join(STUDY, "adapted-auto-ce", "results.jsonl"), method="retro-no-knn-train", tasks=SINGLE)
    knn = [r for r in complete["adapted"] if r["task"] in SINGLE]
    if len(ce) == len(knn):
        d = [100 * (a["dev_accuracy"] - b["dev_accuracy"]) for a, b in zip(sorted_rows(knn), sorted_rows(ce))]
        choice["loss_weights"] = {"pretrained copy (kNN-guided loss)": mean(r["dev_accuracy"] for r in knn),
                                  "off (cross-entropy)": mean(r["dev_accuracy"] for r in ce)}
        print(f"\nadapted keys, loss weights from the pre-trained copy (retro) against off (retro-no-knn-train), "
              f"single texts, dev: {100 * mean(r['dev_accuracy'] for r in knn):.1f} vs "
              f"{100 * mean(r['dev_accuracy'] for r in ce):.1f} ({sum(x > 0 for x in d)} up / "
              f"{sum(x == 0 for x in d)} tied / {sum(x < 0 for x in d)} down); test (shown, not used) "
              f"{100 * mean(r['test_accuracy'] for r in knn):.1f} vs {100 * mean(r['test_accuracy'] for r in ce):.1f}")
    with open(os.path.join(STUDY, "choice.json"), "w", encoding="utf-8") as f:
        json.dump(choice, f, indent=2)
    print(f"\nchosen on dev among the complete candidates: {chosen} ({100 * dev[chosen]:.1f}); written to "
          f"{STUDY}/choice.json")


if __name__ == "__main__":
    main()
