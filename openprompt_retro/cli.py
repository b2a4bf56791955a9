"""Command line: ``openprompt-retro`` / ``python -m openprompt_retro``.

    openprompt-retro run        train + evaluate methods on LM-BFF few-shot splits
    openprompt-retro benchmark  the full grid (tasks x methods x seeds), resumable
    openprompt-retro report     table (markdown/CSV) and plot from a results file
    openprompt-retro speed      inference wall time: plain vs kNN vs full RetroPrompt
    openprompt-retro store-benchmark   knowledge-store latency / recall / memory at 10k-1M keys
    openprompt-retro analyze    leave-one-out memorization, plain prompt tuning vs RetroPrompt
    openprompt-retro figures    lambda sweep on dev, neighbours of one prediction
    openprompt-retro plot-k     accuracy against K from runs with --shots
    openprompt-retro big-pool   the K-shot store against a store from a large labeled pool

Without a command it runs ``run`` on its default: full RetroPrompt, SST-2,
16-shot, seed 42, the offline model in ../shared/models.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

METHODS: Dict[str, Dict] = {
    "prompt": dict(demonstrations="none", loss="ce", knn_inference=False,
                   help="plain prompt-based fine-tuning"),
    "demo-text": dict(demonstrations="text", loss="ce", knn_inference=False,
                      help="LM-BFF: the most similar labeled example of each class as text"),
    "retro": dict(demonstrations="neural", loss="knn", knn_inference=True,
                  help="full RetroPrompt: neural demonstrations + kNN-guided loss + kNN inference"),
    "retro-no-demo": dict(demonstrations="none", loss="knn", knn_inference=True,
                          help="RetroPrompt without neural demonstrations"),
    "retro-no-knn-train": dict(demonstrations="neural", loss="ce", knn_inference=True,
                               help="RetroPrompt with plain cross-entropy"),
    "retro-no-knn-infer": dict(demonstrations="neural", loss="knn", knn_inference=False,
                               help="RetroPrompt without kNN inference (lambda = 0)"),
}
ZERO_SHOT_METHODS = {
    "zero-shot": "the untrained prompt model (template + label words), no labels",
    "zero-shot-retro": "zero-shot + a store of the most confident pseudo-labeled pool examples, kNN inference",
}
BENCH_TASKS = ["SST-2", "sst-5", "mr", "cr", "mpqa", "subj", "trec"]
SEEDS = [13, 21, 42, 87, 100]


def _csv(kind):
    def parse(s: str):
        return [kind(x) for x in s.split(",") if x.strip()]
    return parse


def _add_common(p: argparse.ArgumentParser, *, training: bool = True) -> None:
    """Data and model options; ``training=False`` keeps only what inference needs (``speed``)."""
    from .data import DEFAULT_DATA_ROOT, DEFAULT_MODEL

    g = p.add_argument_group("data and model")
    g.add_argument("--data-root", default=DEFAULT_DATA_ROOT,
                   help="folder holding k-shot/ and pools/ (env OPENPROMPT_RETRO_DATA; default: %(default)s)")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="local folder or hub name of a masked LM, or 'tiny-bert' / 'tiny-roberta' for a random "
                        "test model (env OPENPROMPT_RETRO_MODEL; default: %(default)s)")
    g.add_argument("--model-type", default="bert", choices=["bert", "roberta"], help="OpenPrompt model family")
    g.add_argument("--k", type=int, default=16, help="shots per class: the LM-BFF split K (default: 16)")
    g.add_argument("--max-seq-length", type=int, default=128,
                   help="tokens per input (text demonstrations get 2x) (default: %(default)s)")
    if not training:
        return
    g.add_argument("--hf-dataset", default=None, metavar="NAME[:CONFIG]",
                   help="train and test on a Hugging Face dataset instead of --data-root (online; needs "
                        "'datasets'), e.g. glue:sst2 with --tasks SST-2: K per class for train and K for dev are "
                        "drawn from its train split with each seed; --tasks gives template and label words")
    g.add_argument("--hf-test-split", default=None, help="default: test if labeled, else validation")
    g.add_argument("--hf-text-fields", type=_csv(str), default=(), help="text column(s) (default: guessed)")
    g.add_argument("--hf-label-field", default="label")
    g.add_argument("--hf-label-map", type=json.loads, default=None,
                   help='JSON raw label -> class index of the task, e.g. \'{"0": 1, "1": 0}\'')
    g = p.add_argument_group("training (hyper-parameters not listed are chosen on dev)")
    g.add_argument("--epochs", type=int, default=20, help="maximum epochs; the best dev epoch is kept (default: 20)")
    g.add_argument("--lr", type=float, default=5e-5, help="learning rate (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--patience", type=int, default=20,
                   help="epochs without dev gain before stopping (default: no early stop within 20 epochs; the best dev epoch is kept)")
    g.add_argument("--demo-topk", type=int, default=None, help="m neighbours per class (default: 8 for K>=16, else 2)")
    g.add_argument("--loss-beta", type=float, default=1.0, help="beta of the kNN-guided loss")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g = p.add_argument_group("zero-shot methods (no labels are read; these are fixed, not tuned)")
    g.add_argument("--zs-fraction", type=float, default=0.3, help="most confident fraction of the pool kept")
    g.add_argument("--zs-pool-size", type=int, default=4000, help="cap on the unlabeled pool (0: all)")
    g.add_argument("--zs-lambda", type=float, default=0.5)
    g.add_argument("--zs-k", type=int, default=16)
    g.add_argument("--zs-temperature", type=float, default=10.0)


def load_backbone(model: str, model_type: str):
    """(plm, tokenizer, config, WrapperClass); 'tiny-*' builds a random test model."""
    from openprompt.plms import load_plm

    if model.startswith("tiny-"):
        from .testing import make_tiny_mlm, tiny_model_dir

        kind = model.split("-", 1)[1]
        path = tiny_model_dir(model)
        if not os.path.exists(os.path.join(path, "config.json")):
            make_tiny_mlm(kind, path)
        return load_plm(kind, path)
    return load_plm(model_type, model)


def run_zero_shot(task: str, method: str, seed: int, ns) -> Dict:
    """Zero-shot prompt model, optionally with a pseudo-labeled store (no labels used anywhere)."""
    if getattr(ns, "hf_dataset", None):
        raise SystemExit(f"{method} reads its unlabeled pool from --data-root; --hf-dataset serves the trained methods")
    import numpy as np
    from openprompt.data_utils import InputExample
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    from . import RetroConfig, RetroPromptForClassification, RetroTemplate, RetroTrainer, TrainingArgs
    from .data import get_task, load_test, load_unlabeled_pool
    from .zero_shot import remove_overlap, select_confident

    spec = get_task(task)
    test = load_test(ns.data_root, spec.name, ns.k, seed)
    plm, tok, _, wrapper = load_backbone(ns.model, ns.model_type)
    template = RetroTemplate(ManualTemplate(tokenizer=tok, text=spec.template), spec.label_words, "none")
    verbalizer = ManualVerbalizer(tok, num_classes=spec.num_classes, label_words=[[w] for w in spec.label_words])
    model = RetroPromptForClassification(plm, template, verbalizer, RetroConfig(knn_lambda=0.0))
    trainer = RetroTrainer(model, tok, wrapper, TrainingArgs(max_seq_length=ns.max_seq_length,
                                                             progress=not ns.no_progress))
    t0 = time.time()
    record = {"task": spec.name, "method": method, "k": ns.k, "seed": seed, "model": ns.model}
    if method == "zero-shot-retro":
        pool = remove_overlap(load_unlabeled_pool(ns.data_root, spec.name), test)
        pool = pool[: ns.zs_pool_size] if ns.zs_pool_size else pool
        probs = trainer.predict_proba(pool)  # labels of the pool are never read
        idx, pseudo = select_confident(probs, ns.zs_fraction)
        chosen = [InputExample(guid=f"pseudo-{i}", text_a=pool[i].text_a, text_b=pool[i].text_b, label=int(y))
                  for i, y in zip(idx, pseudo)]
        model.add_to_store(trainer.loader(chosen), progress=not ns.no_progress)
        model.apply_config(knn_lambda=ns.zs_lambda, knn_k=ns.zs_k, knn_temperature=ns.zs_temperature)
        true = np.array([pool[i].label for i in idx])
        record.update({"pool_size": len(pool), "store_size": len(chosen),
                       "pseudo_label_accuracy": float((true == pseudo).mean())})  # diagnostics only
    build_s = time.time() - t0
    t0 = time.time()
    test_result = trainer.evaluate(test)
    record.update({"test_accuracy": test_result["accuracy"], "n_test": test_result["n"], "dev_accuracy": None,
                   "epochs_run": 0, "train_seconds": round(build_s, 2), "test_seconds": round(time.time() - t0, 2),
                   "knn_lambda": model.config.knn_lambda, "knn_k": model.config.knn_k,
                   "knn_temperature": model.config.knn_temperature,
                   "settings": {"fraction": ns.zs_fraction, "pool_size_cap": ns.zs_pool_size}})
    return record


def run_one(task: str, method: str, seed: int, ns) -> Dict:
    """Train one method on one split; evaluate on test. Returns a result record."""
    import torch

    from .data import load_few_shot

    if method in ZERO_SHOT_METHODS:
        return run_zero_shot(task, method, seed, ns)
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; choose from {sorted(METHODS) + sorted(ZERO_SHOT_METHODS)}")
    if getattr(ns, "hf_dataset", None):
        from .data import load_hf_few_shot

        data = load_hf_few_shot(ns.hf_dataset, task, ns.k, seed, test_split=ns.hf_test_split,
                                text_fields=ns.hf_text_fields, label_field=ns.hf_label_field,
                                label_map=ns.hf_label_map)
    else:
        data = load_few_shot(ns.data_root, task, ns.k, seed)
    shots = getattr(ns, "shots", None) or ns.k
    if shots < ns.k:  # K = 4 / 8 from the LM-BFF 16-shot split, drawn with the split's seed
        from .analysis import subsample_k

        data["train"], data["dev"] = subsample_k(data["train"], shots, seed), subsample_k(data["dev"], shots, seed)
    torch.manual_seed(seed)
    trainer, spec = _method_model(method, task, ns, data["train"], seed)
    trainer.args.tune_inference = METHODS[method]["knn_inference"]
    trainer.args.progress = not ns.no_progress
    t0 = time.time()
    history = trainer.fit(data["train"], data["dev"])
    train_s = time.time() - t0
    t0 = time.time()
    test = trainer.evaluate(data["test"])
    test_s = time.time() - t0
    best_dev = max((h["dev_accuracy"] for h in history), default=None)
    tuned = getattr(trainer, "tuned", None)
    config = trainer.model.config
    return {
        "task": spec.name, "method": method, "k": shots, "seed": seed, "model": ns.model,
        "test_accuracy": test["accuracy"], "n_test": test["n"],
        "dev_accuracy": tuned["dev_accuracy"] if tuned else best_dev,
        "epochs_run": len(history), "train_seconds": round(train_s, 2), "test_seconds": round(test_s, 2),
        "knn_lambda": config.knn_lambda, "knn_k": config.knn_k, "knn_temperature": config.knn_temperature,
        "settings": {"lr": ns.lr, "epochs": ns.epochs, "batch_size": ns.batch_size,
                     "max_seq_length": trainer.args.max_seq_length, "demo_topk": config.demo_topk,
                     "loss_beta": ns.loss_beta, "patience": ns.patience},
    }


def _done(path: str) -> set:
    """(task, method, K, seed) of the runs already in a results file."""
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {(r["task"], r["method"], r["k"], r["seed"]) for r in map(json.loads, filter(str.strip, f))}


def cmd_run(ns) -> List[Dict]:
    os.makedirs(ns.out, exist_ok=True)
    results_path = os.path.join(ns.out, "results.jsonl")
    done = _done(results_path) if ns.resume else set()
    records = []
    shots = getattr(ns, "shots", None) or ns.k
    grid = [(t, m, s) for s in ns.seeds for t in ns.tasks for m in ns.methods]
    for i, (task, method, seed) in enumerate(grid, 1):
        if (task, method, shots, seed) in done:
            continue
        print(f"[{i}/{len(grid)}] {task} {method} K={ns.k} seed={seed}", file=sys.stderr, flush=True)
        rec = run_one(task, method, seed, ns)
        records.append(rec)
        with open(results_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        dev = "-" if rec["dev_accuracy"] is None else f"{rec['dev_accuracy']:.4f}"
        print(f"    test accuracy {rec['test_accuracy']:.4f} (dev {dev}, lambda {rec['knn_lambda']}, "
              f"{rec['train_seconds']:.0f}s train, {rec['test_seconds']:.0f}s test)", file=sys.stderr, flush=True)
    from .report import write_report

    write_report(results_path, ns.out)
    print(open(os.path.join(ns.out, "table.md")).read())
    return records


def cmd_report(ns) -> None:
    from .report import write_report

    out = ns.out or os.path.dirname(ns.results) or "."
    write_report(ns.results, out, seeds=ns.seeds, dev_select=ns.dev_select)
    print(open(os.path.join(out, "table.md")).read())


def cmd_speed(ns) -> None:
    from .speed import measure_speed

    print(json.dumps(measure_speed(ns), indent=2))


def cmd_store_benchmark(ns) -> None:
    from .store_bench import run_store_benchmark

    run_store_benchmark(ns.sizes, ns.dims, ns.indexes, k=ns.topk, seed=ns.seed, out=ns.out, hnsw_max=ns.hnsw_max)
    print(open(os.path.join(ns.out, "table.md")).read())


def _method_model(method: str, task: str, ns, train_examples, seed: Optional[int] = None):
    """(trainer, spec) for a fresh backbone wired for ``method`` (no training yet)."""
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    from . import RetroConfig, RetroPromptForClassification, RetroTemplate, RetroTrainer, TrainingArgs
    from .data import get_task

    spec, m = get_task(task), METHODS[method]
    plm, tok, _, wrapper = load_backbone(ns.model, ns.model_type)
    template = RetroTemplate(ManualTemplate(tokenizer=tok, text=spec.template), spec.label_words,
                             demonstrations=m["demonstrations"], plm=plm,
                             text_pool=train_examples if m["demonstrations"] == "text" else None)
    verbalizer = ManualVerbalizer(tok, num_classes=spec.num_classes, label_words=[[w] for w in spec.label_words])
    k = len(train_examples) // spec.num_classes
    model = RetroPromptForClassification(plm, template, verbalizer, RetroConfig(
        demo_topk=ns.demo_topk or (8 if k >= 16 else 2), loss=m["loss"], loss_beta=ns.loss_beta, knn_lambda=0.0))
    seq = ns.max_seq_length * (2 if m["demonstrations"] == "text" else 1)  # room for the demonstrations' text
    args = TrainingArgs(epochs=ns.epochs, lr=ns.lr, batch_size=ns.batch_size, max_seq_length=seq,
                        seed=ns.seed if seed is None else seed, patience=ns.patience, tune_inference=False,
                        progress=False)
    return RetroTrainer(model, tok, wrapper, args), spec


def cmd_analyze(ns) -> None:
    """Leave-one-out memorization of plain prompt tuning vs RetroPrompt at small K."""
    from .analysis import leave_one_out_memorization, plot_memorization, subsample_k, summarize_memorization
    from .data import load_few_shot

    os.makedirs(ns.out, exist_ok=True)
    train = subsample_k(load_few_shot(ns.data_root, ns.task, 16, ns.seed)["train"], ns.shots, ns.seed)
    scores, summary = {}, {}
    for method in ns.methods:
        def fit_predict(train_examples, score_examples, method=method):
            import torch

            torch.manual_seed(ns.seed)
            trainer, _ = _method_model(method, ns.task, ns, train_examples)
            trainer.fit(train_examples)
            trainer.model.exclude_self_in_eval = True  # an example's own entry never answers for it
            return trainer.predict_proba(score_examples)

        print(f"{method}: {len(train) + 1} trainings", file=sys.stderr, flush=True)
        out = leave_one_out_memorization(fit_predict, train, progress=not ns.no_progress)
        scores[method] = out["scores"]
        summary[method] = {**summarize_memorization(out["scores"]), "p_in": out["p_in"].tolist(),
                           "p_out": out["p_out"].tolist(), "scores": out["scores"].tolist()}
    title = f"{ns.task}, K={ns.shots}, seed {ns.seed}: leave-one-out memorization"
    plot_memorization(scores, os.path.join(ns.out, "memorization.png"), title)
    result = {"task": ns.task, "shots": ns.shots, "seed": ns.seed, "model": ns.model, "epochs": ns.epochs,
              "lr": ns.lr, "methods": summary}
    with open(os.path.join(ns.out, "memorization.json"), "w") as f:
        json.dump(result, f, indent=2)
    for method, s in summary.items():
        print(f"{method:8s} mean {s['mean']:.4f}  median {s['median']:.4f}  std {s['std']:.4f}  "
              f"max {s['max']:.4f}  >0.1: {s['fraction_above_0.1']:.2f}")


def cmd_figures(ns) -> None:
    """Lambda sweep on dev and the neighbours of one test prediction, from one RetroPrompt run."""
    import numpy as np
    import torch

    from .analysis import plot_lambda_sweep, plot_neighbours
    from .data import load_few_shot

    os.makedirs(ns.out, exist_ok=True)
    data = load_few_shot(ns.data_root, ns.task, 16, ns.seed)
    torch.manual_seed(ns.seed)
    trainer, spec = _method_model("retro", ns.task, ns, data["train"])
    trainer.args.tune_inference = True
    trainer.fit(data["train"], data["dev"])
    tuned = trainer.tuned
    p_plm, queries, labels = trainer.collect(data["dev"])
    p_knn = trainer.model.store.knn_distribution(queries, tuned["knn_k"], tuned["knn_temperature"])
    lambdas = [round(x, 2) for x in np.linspace(0, 1, 21)]
    accs = [float(((lam * p_knn + (1 - lam) * p_plm).argmax(1) == labels).mean()) for lam in lambdas]
    plot_lambda_sweep(lambdas, accs, tuned["knn_lambda"], os.path.join(ns.out, "lambda_sweep.png"),
                      f"{spec.name} seed {ns.seed}: dev accuracy against lambda (k={tuned['knn_k']}, "
                      f"T={tuned['knn_temperature']})")
    example = data["test"][ns.example]
    why = trainer.explain(example, top=8)
    plot_neighbours(example.text_a, why, spec.label_words, os.path.join(ns.out, "neighbours.png"))
    with open(os.path.join(ns.out, "figures.json"), "w") as f:
        json.dump({"task": spec.name, "seed": ns.seed, "tuned": tuned, "lambda_sweep": dict(zip(lambdas, accs)),
                   "example": example.text_a, "gold": example.label, "explanation": why}, f, indent=2)
    print(json.dumps({"tuned": tuned, "example_prediction": why["prediction"], "gold": example.label}))


def cmd_plot_k(ns) -> None:
    from .analysis import plot_accuracy_vs_k
    from .report import read_results

    rows = [r for r in read_results(ns.results) if r["task"] == ns.task]
    plot_accuracy_vs_k(rows, ns.png, f"{ns.task}: accuracy against K")
    print(ns.png)


def cmd_big_pool(ns) -> None:
    """One RetroPrompt model, two stores: the K-shot training set vs a large labeled pool."""
    import numpy as np
    import torch
    from openprompt.data_utils import InputExample

    from .data import get_task, load_few_shot, load_pool, read_split
    from .zero_shot import remove_overlap

    os.makedirs(ns.out, exist_ok=True)
    spec = get_task(ns.task)
    data = load_few_shot(ns.data_root, spec.name, 16, ns.seed)
    torch.manual_seed(ns.seed)
    trainer, _ = _method_model("retro", spec.name, ns, data["train"])
    trainer.args.tune_inference = True
    trainer.fit(data["train"], data["dev"])
    model = trainer.model

    def measure(name):
        tuned = trainer.tune_inference(data["dev"])  # lambda, k, T for this store, on dev
        loader = trainer.loader(data["test"])
        t0 = time.perf_counter()
        acc = trainer.evaluate(loader)["accuracy"]
        seconds = time.perf_counter() - t0
        q = np.random.default_rng(0).normal(size=(256, model.store.dim)).astype(np.float32)
        t1 = time.perf_counter()
        model.store.knn_distribution(q, tuned["knn_k"], tuned["knn_temperature"])
        search_ms = 1000 * (time.perf_counter() - t1) / 256
        row = {"store": name, "entries": len(model.store), "test_accuracy": acc, "dev_accuracy": tuned["dev_accuracy"],
               "knn_lambda": tuned["knn_lambda"], "knn_k": tuned["knn_k"], "knn_temperature": tuned["knn_temperature"],
               "test_ms_per_example": round(1000 * seconds / len(data["test"]), 3),
               "search_ms_per_query_batch256": round(search_ms, 4)}
        print(json.dumps(row), flush=True)
        return row

    rows = [measure(f"{spec.name} 16-shot train")]
    if ns.pool == "sst2-full":
        pool = read_split(spec, os.path.join(ns.data_root, "sst2-full", "SST-2_train.tsv"), prefix="full-")
    else:
        pool = load_pool(ns.data_root, spec.name, "train")
    pool = remove_overlap(pool, data["test"] + data["dev"] + data["train"])[: ns.pool_size or None]
    pool = [InputExample(guid=f"pool-{i}", text_a=e.text_a, text_b=e.text_b, label=e.label) for i, e in enumerate(pool)]
    t0 = time.perf_counter()
    model.add_to_store(trainer.loader(pool), progress=not ns.no_progress)
    build_s = time.perf_counter() - t0
    rows.append({**measure(f"16-shot train + {len(pool)} pool examples ({ns.pool})"), "store_build_s": round(build_s, 1)})
    with open(os.path.join(ns.out, "big_pool.json"), "w") as f:
        json.dump({"task": spec.name, "seed": ns.seed, "model": ns.model, "rows": rows}, f, indent=2)
    lines = ["| store | entries | test acc. | dev acc. (tuning) | lambda | k | T | test ms/example | kNN search ms/query |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['store']} | {r['entries']} | {100 * r['test_accuracy']:.1f} | {100 * r['dev_accuracy']:.1f} | "
                     f"{r['knn_lambda']} | {r['knn_k']} | {r['knn_temperature']} | {r['test_ms_per_example']} | "
                     f"{r['search_ms_per_query_batch256']} |")
    with open(os.path.join(ns.out, "big_pool.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openprompt-retro",
        description="Retrieval-augmented prompt learning (RetroPrompt) on OpenPrompt. Without a command: "
                    "full RetroPrompt on SST-2 16-shot, seed 42.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    methods_help = "; ".join([f"{k}: {v['help']}" for k, v in METHODS.items()]
                             + [f"{k}: {v}" for k, v in ZERO_SHOT_METHODS.items()])

    r = sub.add_parser("run", help="train and evaluate methods on few-shot splits",
                       description=f"Methods - {methods_help}.")
    r.add_argument("--tasks", type=_csv(str), default=["SST-2"], help="comma-separated tasks (default: SST-2)")
    r.add_argument("--methods", type=_csv(str), default=["retro"], help="comma-separated methods (default: retro)")
    r.add_argument("--seeds", type=_csv(int), default=[42], help="comma-separated LM-BFF seeds (default: 42)")
    r.add_argument("--out", default=os.path.join("runs", "default"), help="output folder (results.jsonl, "
                   "results.csv, table.md, accuracy.png)")
    r.add_argument("--resume", action="store_true", help="skip runs already in OUT/results.jsonl")
    r.add_argument("--shots", type=int, default=None,
                   help="train/dev examples per class drawn from the K-shot split (e.g. 4 or 8; default: all K)")
    _add_common(r)
    r.set_defaults(func=cmd_run)

    b = sub.add_parser("benchmark", help="all 7 single-sentence tasks x all methods x 5 seeds (resumable)",
                       description=f"Methods - {methods_help}.")
    b.add_argument("--tasks", type=_csv(str), default=BENCH_TASKS)
    b.add_argument("--methods", type=_csv(str), default=list(METHODS))
    b.add_argument("--seeds", type=_csv(int), default=SEEDS)
    b.add_argument("--out", default="benchmarks/results")
    _add_common(b)
    b.set_defaults(func=cmd_run, resume=True)

    rp = sub.add_parser("report", help="table and plot from a results.jsonl")
    rp.add_argument("results", help="path to results.jsonl")
    rp.add_argument("--out", default=None, help="output folder (default: beside the results)")
    rp.add_argument("--seeds", type=_csv(int), default=None,
                    help="summarise only these seeds, e.g. the ones every run has finished (default: all)")
    rp.add_argument("--dev-select", type=_csv(str), default=None, metavar="A,B",
                    help="add a row that takes, per task and seed, whichever of these methods scored best on "
                         "dev (ties: the first listed)")
    rp.set_defaults(func=cmd_report)

    sp = sub.add_parser("speed", help="inference wall time of plain, kNN and full RetroPrompt inference")
    sp.add_argument("--task", default="SST-2")
    sp.add_argument("--seed", type=int, default=42)
    sp.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    sp.add_argument("--limit", type=int, default=None, help="use only the first N test examples")
    _add_common(sp, training=False)
    sp.set_defaults(func=cmd_speed)

    sb = sub.add_parser("store-benchmark", help="knowledge-store build time, memory, latency and recall on "
                        "synthetic keys")
    sb.add_argument("--sizes", type=_csv(int), default=[10_000, 100_000, 1_000_000])
    sb.add_argument("--dims", type=_csv(int), default=[384, 1024])
    sb.add_argument("--indexes", type=_csv(str), default=["Flat", "IVF-Flat", "IVF-PQ", "HNSW"])
    sb.add_argument("--topk", type=int, default=16)
    sb.add_argument("--seed", type=int, default=0)
    sb.add_argument("--hnsw-max", type=int, default=100_000, help="skip HNSW above this many keys")
    sb.add_argument("--out", default=os.path.join("benchmarks", "store"))
    sb.set_defaults(func=cmd_store_benchmark)

    an = sub.add_parser("analyze", help="leave-one-out memorization: plain prompt tuning vs RetroPrompt")
    an.add_argument("--task", default="SST-2")
    an.add_argument("--seed", type=int, default=42)
    an.add_argument("--shots", type=int, default=4, help="examples per class drawn from the 16-shot split")
    an.add_argument("--methods", type=_csv(str), default=["prompt", "retro"])
    an.add_argument("--out", default=os.path.join("benchmarks", "memorization"))
    _add_common(an)
    an.set_defaults(func=cmd_analyze, epochs=10)

    fg = sub.add_parser("figures", help="lambda sweep on dev + neighbours of one test prediction (one retro run)")
    fg.add_argument("--task", default="SST-2")
    fg.add_argument("--seed", type=int, default=42)
    fg.add_argument("--example", type=int, default=0, help="index of the test example to explain")
    fg.add_argument("--out", default=os.path.join("benchmarks", "figures"))
    _add_common(fg)
    fg.set_defaults(func=cmd_figures)

    bp = sub.add_parser("big-pool", help="RetroPrompt with the K-shot store vs a store from a large labeled pool")
    bp.add_argument("--task", default="SST-2")
    bp.add_argument("--seed", type=int, default=42)
    bp.add_argument("--pool", default="pool", choices=["pool", "sst2-full"],
                    help="pools/<task>/train.json, or the 67k GLUE SST-2 phrases")
    bp.add_argument("--pool-size", type=int, default=0, help="cap on pool examples (0: all)")
    bp.add_argument("--out", default=os.path.join("benchmarks", "big_pool"))
    _add_common(bp)
    bp.set_defaults(func=cmd_big_pool)

    pk = sub.add_parser("plot-k", help="accuracy against K from a results.jsonl of runs with --shots 4/8/16")
    pk.add_argument("results")
    pk.add_argument("--task", default="SST-2")
    pk.add_argument("--png", default=os.path.join("benchmarks", "figures", "accuracy_vs_k.png"))
    pk.set_defaults(func=cmd_plot_k)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run"] + argv
    ns = parser.parse_args(argv)
    if getattr(ns, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" and friends
    ns.func(ns)


if __name__ == "__main__":
    main()
