"""One RetroPrompt model, two stores: the K-shot training set vs a large labeled pool (``big-pool``), each beside
a linear probe trained on the same labelled examples."""
from __future__ import annotations

import json
import os
import time


def run_big_pool(ns) -> None:
    """One RetroPrompt model, two stores: the K-shot training set vs a large labeled pool."""
    import numpy as np
    import torch
    from openprompt.data_utils import InputExample

    from .backbones import load_backbone
    from .baselines import linear_probe
    from .zero_shot import remove_overlap
    from .runs import check_single, load_split, method_trainer
    from .spec import RunSpec
    from .tasks import get_task, load_pool, read_split

    check_single(ns)
    os.makedirs(ns.out, exist_ok=True)
    spec = get_task(ns.task)
    run_spec = RunSpec.from_namespace(ns)
    data = load_split(spec.name, ns.seed, run_spec)
    torch.manual_seed(ns.seed)
    trainer, _ = method_trainer("retro", spec.name, run_spec, data["train"], ns.seed)
    trainer.args.tune_inference = True
    trainer.fit(data["train"], data["dev"])
    model = trainer.model
    probe_plm, probe_tok, _, _ = load_backbone(run_spec.model, run_spec.model_type)  # pre-trained, as the baseline

    def measure(name, labelled):
        """The store's row; ``labelled``: the examples in the store, on which the probe is trained."""
        tuned = trainer.tune_inference(data["dev"])  # lambda, k, T for this store, on dev
        loader = trainer.loader(data["test"])
        t0 = time.perf_counter()
        acc = trainer.evaluate(loader)["accuracy"]
        seconds = time.perf_counter() - t0
        q = np.random.default_rng(0).normal(size=(256, model.knn_store.dim)).astype(np.float32)
        t1 = time.perf_counter()
        model.knn_distribution(q)  # the tuned k and T (config)
        search_ms = 1000 * (time.perf_counter() - t1) / 256
        row = {"store": name, "entries": len(model.knn_store), "test_accuracy": acc, "dev_accuracy": tuned["dev_accuracy"],
               "knn_lambda": tuned["knn_lambda"], "knn_readout": model.config.knn_readout,
               "knn_k": tuned["knn_k"], "knn_temperature": tuned["knn_temperature"],
               "class_mean_temperature": tuned["class_mean_temperature"],
               "test_ms_per_example": round(1000 * seconds / len(data["test"]), 3),
               "search_ms_per_query_batch256": round(search_ms, 4)}
        probe = linear_probe(probe_plm, probe_tok, labelled, data["dev"], data["test"], run_spec.max_seq_length, seed=ns.seed)
        row.update(linear_probe_test_accuracy=probe["test_accuracy"], linear_probe_C=probe["C"])
        print(json.dumps(row), flush=True)
        return row

    rows = [measure(f"{spec.name} 16-shot train", data["train"])]
    if ns.pool == "sst2-full":
        pool = read_split(spec, os.path.join(ns.data_root, "sst2-full", "SST-2_train.tsv"), prefix="full-")
    else:
        pool = load_pool(ns.data_root, spec.name, "train")
    pool = remove_overlap(pool, data["test"] + data["dev"] + data["train"])[: ns.pool_size or None]
    pool = [InputExample(guid=f"pool-{i}", text_a=e.text_a, text_b=e.text_b, label=e.label) for i, e in enumerate(pool)]
    t0 = time.perf_counter()
    model.add_to_store(trainer.loader(pool), progress=not ns.no_progress)
    build_s = time.perf_counter() - t0
    rows.append({**measure(f"16-shot train + {len(pool)} pool examples ({ns.pool})", data["train"] + pool),
                 "store_build_s": round(build_s, 1)})
    with open(os.path.join(ns.out, "big_pool.json"), "w") as f:
        json.dump({"task": spec.name, "seed": ns.seed, "model": ns.model, "rows": rows}, f, indent=2)
    lines = ["| store | entries | test acc. | linear probe on the same examples | dev acc. (tuning) | lambda "
             "| read-out (tuned on dev) | test ms/example | kNN search ms/query |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        readout = (f"class means, T {r['class_mean_temperature']}" if r["knn_readout"] == "class-mean"
                   else f"top-{r['knn_k']}, T {r['knn_temperature']}")
        lines.append(f"| {r['store']} | {r['entries']} | {100 * r['test_accuracy']:.1f} | "
                     f"{100 * r['linear_probe_test_accuracy']:.1f} | {100 * r['dev_accuracy']:.1f} | "
                     f"{r['knn_lambda']} | {readout} | {r['test_ms_per_example']} | "
                     f"{r['search_ms_per_query_batch256']} |")
    with open(os.path.join(ns.out, "big_pool.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
