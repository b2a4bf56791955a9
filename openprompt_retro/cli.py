"""Command line: ``openprompt-retro`` / ``python -m openprompt_retro``.

    openprompt-retro run        train + evaluate methods on LM-BFF few-shot splits
    openprompt-retro benchmark  the full grid (tasks x methods x seeds), resumable
    openprompt-retro report     table (markdown/CSV) and plot from a results file
    openprompt-retro speed      inference wall time: plain vs kNN vs full RetroPrompt

Without a command it runs ``run`` on its default: full RetroPrompt, SST-2,
16-shot, seed 42, the offline model in ../shared/models.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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
BENCH_TASKS = ["SST-2", "sst-5", "mr", "cr", "mpqa", "subj", "trec"]
SEEDS = [13, 21, 42, 87, 100]


def _csv(kind):
    def parse(s: str):
        return [kind(x) for x in s.split(",") if x.strip()]
    return parse


def _add_common(p: argparse.ArgumentParser) -> None:
    from .data import DEFAULT_DATA_ROOT, DEFAULT_MODEL

    g = p.add_argument_group("data and model")
    g.add_argument("--data-root", default=DEFAULT_DATA_ROOT,
                   help="folder holding k-shot/ and pools/ (env OPENPROMPT_RETRO_DATA; default: %(default)s)")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="local folder or hub name of a masked LM, or 'tiny-bert' / 'tiny-roberta' for a random "
                        "test model (env OPENPROMPT_RETRO_MODEL; default: %(default)s)")
    g.add_argument("--model-type", default="bert", choices=["bert", "roberta"], help="OpenPrompt model family")
    g = p.add_argument_group("training (hyper-parameters not listed are chosen on dev)")
    g.add_argument("--k", type=int, default=16, help="shots per class: the LM-BFF split K (default: 16)")
    g.add_argument("--epochs", type=int, default=20, help="maximum epochs; the best dev epoch is kept (default: 20)")
    g.add_argument("--lr", type=float, default=5e-5, help="learning rate (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-seq-length", type=int, default=128,
                   help="tokens per input (text demonstrations get 2x) (default: %(default)s)")
    g.add_argument("--patience", type=int, default=6, help="epochs without dev gain before stopping")
    g.add_argument("--demo-topk", type=int, default=None, help="m neighbours per class (default: 8 for K>=16, else 2)")
    g.add_argument("--loss-beta", type=float, default=1.0, help="beta of the kNN-guided loss")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def load_backbone(model: str, model_type: str):
    """(plm, tokenizer, config, WrapperClass); 'tiny-*' builds a random test model."""
    from openprompt.plms import load_plm

    if model.startswith("tiny-"):
        from .testing import make_tiny_mlm

        kind = model.split("-", 1)[1]
        path = os.path.join(tempfile.gettempdir(), f"openprompt-retro-{model}")
        if not os.path.exists(os.path.join(path, "config.json")):
            make_tiny_mlm(kind, path)
        return load_plm(kind, path)
    return load_plm(model_type, model)


def run_one(task: str, method: str, seed: int, ns) -> Dict:
    """Train one method on one split; evaluate on test. Returns a result record."""
    import torch

    from . import RetroConfig, RetroPromptForClassification, RetroTemplate, RetroTrainer, TrainingArgs
    from .data import get_task, load_few_shot
    from openprompt.prompts import ManualTemplate, ManualVerbalizer

    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    spec, m = get_task(task), METHODS[method]
    data = load_few_shot(ns.data_root, spec.name, ns.k, seed)
    torch.manual_seed(seed)
    plm, tok, _, wrapper = load_backbone(ns.model, ns.model_type)
    template = RetroTemplate(ManualTemplate(tokenizer=tok, text=spec.template), spec.label_words,
                             demonstrations=m["demonstrations"], plm=plm,
                             text_pool=data["train"] if m["demonstrations"] == "text" else None)
    verbalizer = ManualVerbalizer(tok, num_classes=spec.num_classes, label_words=[[w] for w in spec.label_words])
    config = RetroConfig(demo_topk=ns.demo_topk or (8 if ns.k >= 16 else 2), loss=m["loss"],
                         loss_beta=ns.loss_beta, knn_lambda=0.0)
    model = RetroPromptForClassification(plm, template, verbalizer, config)
    seq = ns.max_seq_length * (2 if m["demonstrations"] == "text" else 1)
    args = TrainingArgs(epochs=ns.epochs, lr=ns.lr, batch_size=ns.batch_size, max_seq_length=seq, seed=seed,
                        patience=ns.patience, tune_inference=m["knn_inference"], progress=not ns.no_progress)
    trainer = RetroTrainer(model, tok, wrapper, args)
    t0 = time.time()
    history = trainer.fit(data["train"], data["dev"])
    train_s = time.time() - t0
    t0 = time.time()
    test = trainer.evaluate(data["test"])
    test_s = time.time() - t0
    best_dev = max((h["dev_accuracy"] for h in history), default=None)
    tuned = getattr(trainer, "tuned", None)
    return {
        "task": spec.name, "method": method, "k": ns.k, "seed": seed, "model": ns.model,
        "test_accuracy": test["accuracy"], "n_test": test["n"],
        "dev_accuracy": tuned["dev_accuracy"] if tuned else best_dev,
        "epochs_run": len(history), "train_seconds": round(train_s, 2), "test_seconds": round(test_s, 2),
        "knn_lambda": model.config.knn_lambda, "knn_k": model.config.knn_k,
        "knn_temperature": model.config.knn_temperature,
        "settings": {"lr": ns.lr, "epochs": ns.epochs, "batch_size": ns.batch_size, "max_seq_length": seq,
                     "demo_topk": config.demo_topk, "loss_beta": ns.loss_beta, "patience": ns.patience},
    }


def _done(path: str) -> set:
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {(r["task"], r["method"], r["k"], r["seed"]) for r in map(json.loads, filter(str.strip, f))}


def cmd_run(ns) -> List[Dict]:
    os.makedirs(ns.out, exist_ok=True)
    results_path = os.path.join(ns.out, "results.jsonl")
    done = _done(results_path) if ns.resume else set()
    records = []
    grid = [(t, m, s) for s in ns.seeds for t in ns.tasks for m in ns.methods]
    for i, (task, method, seed) in enumerate(grid, 1):
        if (task, method, ns.k, seed) in done:
            continue
        print(f"[{i}/{len(grid)}] {task} {method} K={ns.k} seed={seed}", file=sys.stderr, flush=True)
        rec = run_one(task, method, seed, ns)
        records.append(rec)
        with open(results_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"    test accuracy {rec['test_accuracy']:.4f} (dev {rec['dev_accuracy']:.4f}, "
              f"lambda {rec['knn_lambda']}, {rec['train_seconds']:.0f}s train, {rec['test_seconds']:.0f}s test)",
              file=sys.stderr, flush=True)
    from .report import write_report

    write_report(results_path, ns.out)
    print(open(os.path.join(ns.out, "table.md")).read())
    return records


def cmd_report(ns) -> None:
    from .report import write_report

    write_report(ns.results, ns.out or os.path.dirname(ns.results) or ".")
    print(open(os.path.join(ns.out or os.path.dirname(ns.results) or ".", "table.md")).read())


def cmd_speed(ns) -> None:
    from .speed import measure_speed

    print(json.dumps(measure_speed(ns), indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openprompt-retro",
        description="Retrieval-augmented prompt learning (RetroPrompt) on OpenPrompt. Without a command: "
                    "full RetroPrompt on SST-2 16-shot, seed 42.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    methods_help = "; ".join(f"{k}: {v['help']}" for k, v in METHODS.items())

    r = sub.add_parser("run", help="train and evaluate methods on few-shot splits",
                       description=f"Methods - {methods_help}.")
    r.add_argument("--tasks", type=_csv(str), default=["SST-2"], help="comma-separated tasks (default: SST-2)")
    r.add_argument("--methods", type=_csv(str), default=["retro"], help="comma-separated methods (default: retro)")
    r.add_argument("--seeds", type=_csv(int), default=[42], help="comma-separated LM-BFF seeds (default: 42)")
    r.add_argument("--out", default=os.path.join("runs", "default"), help="output folder (results.jsonl, "
                   "results.csv, table.md, accuracy.png)")
    r.add_argument("--resume", action="store_true", help="skip runs already in OUT/results.jsonl")
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
    rp.set_defaults(func=cmd_report)

    sp = sub.add_parser("speed", help="inference wall time of plain, kNN and full RetroPrompt inference")
    sp.add_argument("--task", default="SST-2")
    sp.add_argument("--seed", type=int, default=42)
    sp.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    sp.add_argument("--limit", type=int, default=None, help="use only the first N test examples")
    _add_common(sp)
    sp.set_defaults(func=cmd_speed)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run"] + argv
    ns = parser.parse_args(argv)
    ns.func(ns)


if __name__ == "__main__":
    main()
