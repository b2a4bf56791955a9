"""Train and evaluate one method on one split; the grid of runs behind ``run`` and ``benchmark``."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Dict, List, Optional

from ..errors import UserError
from .methods import ALL_METHODS, BASELINE_METHODS, TRAINED_METHODS, ZERO_SHOT_METHODS
from .records import PseudoLabelStore, RunRecord
from .results import ResultsFile, RunKey, auto_demo_topk, on_this_host, settings_id
from .spec import RunSpec


# ---------------------------------------------------------------------- validation (before any model loads)
def available_splits(data_root: str, task: str) -> Dict[int, List[int]]:
    """{K: [seeds]} of the LM-BFF folders ``<root>/k-shot/<task>/<K>-<seed>``."""
    folder = os.path.join(data_root, "k-shot", task)
    out: Dict[int, List[int]] = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.fullmatch(r"(\d+)-(\d+)", name)
        if m:
            out.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    return {k: sorted(v) for k, v in sorted(out.items())}


def split_k_for(shots: int, splits: Dict[int, List[int]], task: str) -> int:
    """The LM-BFF split K that ``shots`` per class are read (K = shots) or drawn (shots < K) from."""
    if not splits:
        raise UserError(f"task {task}: no k-shot splits found")
    if shots in splits:
        return shots
    larger = [k for k in splits if k > shots]
    if shots < 1 or not larger:
        raise UserError(f"--shots {shots}: task {task} has {sorted(splits)}-shot splits; use one of them or a "
                        f"smaller positive number (drawn from the {max(splits)}-shot split)")
    return min(larger)


def check_model(model: str, model_type: str = "bert") -> None:
    """A tiny test model's name, or a local folder that exists and whose config.json names the family
    ``--model-type`` loads (a mismatch would load a re-initialised model); hub names are checked on loading."""
    if model.startswith("tiny-") and not os.path.isdir(os.path.expanduser(model)):  # a local folder wins
        if model not in ("tiny-bert", "tiny-roberta"):
            raise UserError(f"--model {model}: the tiny test models are tiny-bert and tiny-roberta (and no folder "
                            f"of that name is here)")
        return
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep + "." in model
    if looks_local and not os.path.isdir(os.path.expanduser(model)):
        raise UserError(f"--model {model}: no such model folder (give a local folder or hub name with --model, "
                        "or set OPENPROMPT_RETRO_MODEL)")
    family = _model_family(os.path.expanduser(model))
    if family in ("bert", "roberta") and family != model_type:
        raise UserError(f"--model-type {model_type}: the model in {model} is a {family} model (its config.json "
                        f"says model_type {family!r}); pass --model-type {family}")


def _model_family(folder: str) -> Optional[str]:
    """``model_type`` of a local model folder's config.json, or None (no folder, no readable config)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            family = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return family if isinstance(family, str) else None


def check_out(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out {folder}: cannot write there ({e.strerror or e})") from None


#: TrainingArgs fields that are CLI options of the same name
_TRAINING_OPTIONS = ("epochs", "lr", "batch_size", "max_seq_length", "patience", "max_steps", "eval_every", "device",
                     "amp")


def check_training(ns) -> None:
    """The training options as :class:`TrainingArgs` validates them, reported under their option names;
    ``--device`` is resolved here (unset: cuda when available, else cpu), so results record the real one."""
    from ..prompt.training_args import TrainingArgs

    fields = {name: getattr(ns, name) for name in _TRAINING_OPTIONS if getattr(ns, name, None) is not None}
    if "lr" in fields and not math.isfinite(fields["lr"]):
        raise UserError(f"--lr must be a finite positive number, got {fields['lr']}")
    try:
        args = TrainingArgs(**fields)
    except ValueError as e:
        option = re.sub(r"TrainingArgs\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))
        raise UserError(option) from None
    if hasattr(ns, "device"):
        ns.device = args.device
    if hasattr(ns, "config"):
        retro_config(ns, ns.shots)


def retro_config(run_spec, shots: int):
    """The RetroConfig of ``--config``, ``--demo-topk`` and ``--loss-beta`` (kNN inference off: the method's
    preset and the dev tuning set it); a bad field is a :class:`UserError` naming ``--config``."""
    from ..core.config import RetroConfig

    fields = {"demo_topk": run_spec.demo_topk if run_spec.demo_topk is not None else auto_demo_topk(shots),
              "loss_beta": run_spec.loss_beta, "knn_lambda": 0.0, **run_spec.config}
    try:
        return RetroConfig(**fields).validate()
    except (TypeError, ValueError) as e:
        raise UserError(f"--config: {e}") from None


def _task_spec(task: str):
    from .tasks import get_task

    try:
        return get_task(task)
    except ValueError as e:
        raise UserError(str(e)) from None


def _check_methods(methods) -> None:
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {unknown}; choose from {ALL_METHODS}")


def check_single(ns, fixed_k: Optional[int] = None) -> None:
    """The mistakes of a one-split command (speed, analyze, figures, big-pool), found before any model loads.

    ``fixed_k``: the command reads that K-shot split and draws ``--shots`` from it (``analyze``).
    """
    spec = _task_spec(ns.task)
    if hasattr(ns, "methods"):
        _check_methods(ns.methods)
    if not os.path.isdir(ns.data_root):
        raise UserError(f"--data-root {ns.data_root}: no such folder (set --data-root or OPENPROMPT_RETRO_DATA)")
    splits = available_splits(ns.data_root, spec.name)
    if fixed_k is not None:
        splits = {fixed_k: splits.get(fixed_k, [])} if splits.get(fixed_k) else {}
    k = split_k_for(ns.shots, splits, spec.name)
    if ns.seed not in splits[k]:
        raise UserError(f"task {spec.name}: no {k}-shot split for seed {ns.seed}; seeds available: {splits[k]}")
    check_model(ns.model, ns.model_type)
    check_training(ns)
    if getattr(ns, "out", None):
        check_out(ns.out)


def check_grid(ns) -> None:
    """Every user mistake of a ``run``/``benchmark`` command, found before any training starts."""
    for option in ("tasks", "methods", "seeds"):
        if not getattr(ns, option):
            raise UserError(f"--{option}: none given (a comma-separated list)")
    _check_methods(ns.methods)
    if "setfit" in ns.methods:
        from .setfit_baseline import SETFIT_MISSING, setfit_available

        if not setfit_available():
            raise UserError(f"--methods setfit: {SETFIT_MISSING}")
    for task in ns.tasks:
        spec = _task_spec(task)
        if getattr(ns, "hf_dataset", None):
            continue
        if not os.path.isdir(ns.data_root):
            raise UserError(f"--data-root {ns.data_root}: no such folder (set --data-root or OPENPROMPT_RETRO_DATA)")
        if spec.fmt == "topic":
            continue
        splits = available_splits(ns.data_root, spec.name)
        k = split_k_for(ns.shots, splits, spec.name)
        missing = [s for s in ns.seeds if s not in splits[k]]
        if missing:
            raise UserError(f"task {spec.name}: no {k}-shot split for seed(s) {missing}; seeds available: {splits[k]}")
    check_model(ns.model, ns.model_type)
    check_training(ns)
    check_out(ns.out)


# ---------------------------------------------------------------------- one run
def method_trainer(method: str, task: str, run_spec: RunSpec, train_examples, seed: int):
    """(trainer, spec) for a fresh backbone wired for ``method`` (no training yet)."""
    from ..core.knn import MixtureGrid
    from ..methods import method_preset
    from ..prompt.factory import build_trainer
    from .backbones import load_backbone
    from .tasks import get_task

    spec, preset = get_task(task), method_preset(method)
    plm, tok, _, wrapper = load_backbone(run_spec.model, run_spec.model_type)
    config = retro_config(run_spec, len(train_examples) // spec.num_classes)
    seq = run_spec.max_seq_length * (2 if preset.demonstrations == "text" else 1)  # room for the demonstrations
    args = training_args(run_spec, seed, seq)
    trainer = build_trainer(plm, tok, wrapper, spec.template, spec.label_words, config=config, args=args,
                            text_pool=train_examples if preset.demonstrations == "text" else None, method=method,
                            grid=MixtureGrid.named(run_spec.mixture_grid))
    return trainer, spec


def training_args(run_spec: RunSpec, seed: int, max_seq_length: int, **overrides):
    """The run's TrainingArgs from the CLI options (the same protocol for every trained method)."""
    from ..prompt.training_args import TrainingArgs

    fields = dict(epochs=run_spec.epochs, lr=run_spec.lr, batch_size=run_spec.batch_size,
                  max_seq_length=max_seq_length, seed=seed, patience=run_spec.patience, progress=False,
                  max_steps=run_spec.max_steps, eval_every=run_spec.eval_every, device=run_spec.device or "auto",
                  amp=run_spec.amp)
    return TrainingArgs(**{**fields, **overrides})


def load_split(task: str, seed: int, run_spec: RunSpec) -> Dict:
    """train/dev/test with ``run_spec.shots`` examples per class (drawn from a larger split when smaller)."""
    from .sampling import subsample_k
    from .tasks import get_task, load_few_shot

    if run_spec.hf_dataset:
        from .tasks import load_hf_few_shot

        try:
            return load_hf_few_shot(run_spec.hf_dataset, task, run_spec.shots, seed, test_split=run_spec.hf_test_split,
                                    text_fields=run_spec.hf_text_fields, label_field=run_spec.hf_label_field,
                                    label_map=run_spec.hf_label_map)
        except ValueError as e:  # a split, column or label the dataset does not have
            raise UserError(f"--hf-dataset {run_spec.hf_dataset}: {e}") from None
    spec = get_task(task)
    k = split_k_for(run_spec.shots, available_splits(run_spec.data_root, spec.name), spec.name)
    data = load_few_shot(run_spec.data_root, spec.name, k, seed)
    if run_spec.shots < k:  # e.g. K = 4 / 8 from the LM-BFF 16-shot split, drawn with the split's seed
        data["train"], data["dev"] = (subsample_k(data[s], run_spec.shots, seed) for s in ("train", "dev"))
    return data


#: an ablation that trains exactly like another method and differs only at inference: in a grid holding both,
#: it is measured on the other method's trained weights (one training, a paired comparison)
SAME_TRAINING = {"retro-no-knn-infer": "retro"}


def run_one(task: str, method: str, seed: int, run_spec: RunSpec) -> RunRecord:
    """Train one method on one split; evaluate on test. Returns its result record."""
    if method in ZERO_SHOT_METHODS:
        return run_zero_shot(task, method, seed, run_spec)
    if method in BASELINE_METHODS:
        return run_baseline(task, method, seed, run_spec)
    return run_trained(task, method, seed, run_spec)[0]


def run_trained(task: str, method: str, seed: int, run_spec: RunSpec, also: Optional[str] = None) -> List[RunRecord]:
    """Train ``method`` on one split and evaluate it on test: its record, then, with ``also`` (a method whose
    SAME_TRAINING is ``method``), that method's record measured on the same weights without kNN inference.

    retro and retro-no-knn-infer train identically (the kNN-guided loss and its store; choosing lambda, k and T
    runs after training under its own RNG), so retro-no-knn-infer is retro's weights with lambda = 0 and the
    k and T it starts with. Its record marks ``shares_training_with``; its train_seconds are that training's.
    """
    import torch

    if also is not None and SAME_TRAINING.get(also) != method:
        raise ValueError(f"{also!r} does not train like {method!r}")
    data = load_split(task, seed, run_spec)
    torch.manual_seed(seed)
    try:
        trainer, spec = method_trainer(method, task, run_spec, data["train"], seed)
    except ValueError as e:  # e.g. a max length the model cannot read
        raise UserError(f"{task} {method} seed {seed}: {e}") from None
    trainer.args.progress = not run_spec.no_progress
    config = trainer.model.config
    untuned = {name: getattr(config, name) for name in ("knn_lambda", "knn_k", "knn_temperature", "knn_readout",
                                                        "class_mean_temperature", "logistic_temperature",
                                                        "plm_temperature", "lambda_from_dev")}
    t0 = time.time()
    try:
        history = trainer.fit(data["train"], data["dev"])
    except ValueError as e:  # e.g. a loss that is no longer finite (a learning rate far too large)
        raise UserError(f"{task} {method} seed {seed}: training failed: {e}") from None
    train_s = time.time() - t0
    t0 = time.time()
    test_loader = trainer.loader(data["test"], split="test", require_labels=True)  # tokenized once
    load_s = time.time() - t0
    honest = _honest_store_accuracy(trainer, data["train"], spec, seed, run_spec)
    records = [_trained_record(trainer, spec, data, test_loader, history, method, seed, run_spec, train_s, load_s,
                               honest)]
    if also is not None:
        trainer.model.apply_config(**untuned)  # lambda = 0: the PLM alone
        trainer.tuned = None
        honest = _honest_store_accuracy(trainer, data["train"], spec, seed, run_spec)  # by the untuned read-out
        rec = _trained_record(trainer, spec, data, test_loader, history, also, seed, run_spec, train_s, load_s,
                              honest)
        records.append(dataclasses.replace(rec, shares_training_with=method))
    return records


def _honest_store_accuracy(trainer, train, spec, seed: int, run_spec: RunSpec) -> Optional[Dict]:
    """The store's accuracy on training examples whose keys never saw their labels (a diagnostic, timed apart
    from training): held-out folds for adapted keys, the loss store's leave-one-out for frozen ones."""
    model = trainer.model
    if model.key_encoder is None or not model.uses_store:
        return None
    if model.config.key_encoder != "adapted":
        return {"accuracy": model.store_loo_accuracy, "kind": "leave-one-out"}
    from .backbones import load_backbone
    from .store_diagnostics import held_out_fold_accuracy

    plm, tok, _, _ = load_backbone(run_spec.model, run_spec.model_type)  # the pre-trained weights, not the trained
    out = held_out_fold_accuracy(plm, tok, train, model.config, spec.num_classes, seed)
    return {**out, "kind": "held-out folds"}


def _trained_record(trainer, spec, data, test_loader, history, method: str, seed: int, run_spec, train_s: float,
                    load_s: float, honest: Optional[Dict] = None) -> RunRecord:
    """Evaluate the trained model on test (and its retrieval diagnostics); the run's result record.
    test_seconds: tokenizing the test split (``load_s``) and one evaluation pass."""
    t0 = time.time()
    test = trainer.evaluate(test_loader, split="test")
    test_s = load_s + time.time() - t0
    best_dev = max((h["dev_accuracy"] for h in history), default=None)
    tuned = getattr(trainer, "tuned", None)
    config = trainer.model.config
    diagnostics = {"evaluations": [{k: h.get(k) for k in ("step", "dev_accuracy", "loss", "loss_weight_mean",
                                                           "loss_weight_max", "store_loo_accuracy", "knn_loss_active")}
                                   for h in history]}
    if tuned:
        diagnostics["dev_accuracy_plm_only"] = tuned["dev_accuracy_plm_only"]
        for name in ("readout_dev", "store_guard"):
            if name in tuned:
                diagnostics[name] = tuned[name]
        diagnostics["test_accuracy_by_inference"] = inference_settings_on(trainer, test_loader)
    adaptation = getattr(trainer.model.key_encoder, "adaptation", None)
    if adaptation is not None:
        diagnostics["key_adaptation"] = adaptation
    if honest is not None:
        diagnostics["honest_store_accuracy"] = honest
    if trainer.model.uses_neural_demos:
        diagnostics["demonstration_reliance"] = trainer.demonstration_reliance(test_loader,
                                                                               known_accuracy=test["accuracy"])
        diagnostics["demonstration_reliance_dev"] = trainer.demonstration_reliance(data["dev"])
    return RunRecord(
        **_identity(spec.name, method, seed, run_spec),
        test_accuracy=test["accuracy"], n_test=test["n"], dev_accuracy=tuned["dev_accuracy"] if tuned else best_dev,
        epochs_run=len(history), train_seconds=round(train_s, 2), test_seconds=round(test_s, 2),
        knn_lambda=config.knn_lambda, knn_k=config.knn_k, knn_temperature=config.knn_temperature,
        settings={"lr": run_spec.lr, "epochs": run_spec.epochs, "batch_size": run_spec.batch_size,
                  "max_seq_length": trainer.args.max_seq_length, "demo_topk": config.demo_topk,
                  "loss_beta": run_spec.loss_beta, "patience": run_spec.patience,
                  "max_steps": trainer.args.max_steps, "eval_every": trainer.args.eval_every,
                  "mixture_grid": run_spec.mixture_grid,
                  "device": trainer.args.device, "amp": trainer.args.amp, "config": config.to_dict()},
        diagnostics=diagnostics)


def inference_settings_on(trainer, loader) -> Dict[str, float]:
    """Test accuracy of the same trained weights with the PLM alone (lambda = 0), the fixed mixture (lambda 0.5,
    k 16, T 1) and the store alone (lambda 1), and how often the store's and the PLM's predictions agree: the
    effect of tuning inference on dev, and whether p_kNN can add anything to p_PLM."""
    from ..core.knn import MixtureGrid, accuracy, mix

    p_plm, queries, labels = trainer.collect(loader)  # one pass; P = lambda p_kNN + (1 - lambda) p_PLM
    fixed = MixtureGrid.fixed()
    topk = trainer.model.config.readout == "topk"  # the score read-outs keep their dev-chosen T
    p_knn = trainer.model.knn_distribution(queries, fixed.ks[0], fixed.temperatures[0] if topk else None)
    out = {"plm_only": accuracy(p_plm, labels), "fixed": accuracy(mix(p_plm, p_knn, fixed.lambdas[0]), labels),
           "knn_only": accuracy(p_knn, labels),
           "knn_plm_agreement": float((p_knn.argmax(-1) == p_plm.argmax(-1)).mean())}
    model = trainer.model
    if model.key_encoder is not None:  # the store alone by each read-out, on the same keys (argmax: T plays no part)
        c = model.config
        out["knn_only_by_readout"] = {
            readout: accuracy(model.lifecycle.knn_distribution(queries, None, 16, c.readout_temperature(readout=readout),
                                                               readout, c.knn_score_scale, c.class_mean_top_m), labels)
            for readout in ("topk", "class-mean", "logistic")}
    return out


def run_baseline(task: str, method: str, seed: int, run_spec: RunSpec) -> RunRecord:
    """fine-tune, linear-probe or setfit on the same split and backbone as the prompt methods."""
    import torch

    if method == "setfit":
        return run_setfit_baseline(task, seed, run_spec)
    from .backbones import load_backbone
    from .baselines import fine_tune, linear_probe
    from .tasks import get_task

    spec = get_task(task)
    data = load_split(task, seed, run_spec)
    torch.manual_seed(seed)
    plm, tok, _, _ = load_backbone(run_spec.model, run_spec.model_type)
    t0 = time.time()
    if method == "linear-probe":
        out = linear_probe(plm, tok, data["train"], data["dev"], data["test"], run_spec.max_seq_length, seed=seed)
        train_s, test_s, settings = round(time.time() - t0, 2), 0.0, {"C": out["C"]}
    else:
        args = training_args(run_spec, seed, run_spec.max_seq_length, amp=None)  # fine_tune runs in float32
        out = fine_tune(plm, tok, data["train"], data["dev"], data["test"], spec.num_classes, args)
        train_s, test_s = out["train_seconds"], out["test_seconds"]
        settings = {"lr": run_spec.lr, "epochs": run_spec.epochs, "batch_size": run_spec.batch_size,
                    "patience": run_spec.patience, "max_seq_length": run_spec.max_seq_length,
                    "max_steps": args.max_steps, "eval_every": args.eval_every, "device": args.device}
    return RunRecord(**_identity(spec.name, method, seed, run_spec),
                     test_accuracy=out["test_accuracy"], n_test=out["n_test"], dev_accuracy=out["dev_accuracy"],
                     epochs_run=None, train_seconds=train_s, test_seconds=test_s,
                     knn_lambda=0.0, knn_k=None, knn_temperature=None, settings=settings)


def run_setfit_baseline(task: str, seed: int, run_spec: RunSpec) -> RunRecord:
    """The setfit package with its defaults on the run's encoder folder and split (``setfit_baseline.py``)."""
    import torch

    from .setfit_baseline import run_setfit
    from .tasks import get_task

    spec = get_task(task)
    data = load_split(task, seed, run_spec)
    torch.manual_seed(seed)
    model = run_spec.model
    if model.startswith("tiny-"):
        from ..testing import ensure_tiny_mlm

        model = ensure_tiny_mlm(model)
    out = run_setfit(model, data["train"], data["dev"], data["test"], seed, progress=not run_spec.no_progress)
    return RunRecord(**_identity(spec.name, "setfit", seed, run_spec), test_accuracy=out["test_accuracy"],
                     n_test=out["n_test"], dev_accuracy=out["dev_accuracy"], epochs_run=None,
                     train_seconds=out["train_seconds"], test_seconds=out["test_seconds"], knn_lambda=None,
                     knn_k=None, knn_temperature=None, settings=out["settings"])


def run_zero_shot(task: str, method: str, seed: int, run_spec: RunSpec) -> RunRecord:
    """Zero-shot prompt model, optionally with a pseudo-labeled store (no labels used anywhere)."""
    if run_spec.hf_dataset:
        raise UserError(f"{method} reads its unlabeled pool from --data-root; --hf-dataset serves the trained methods")
    import numpy as np
    from openprompt.data_utils import InputExample

    from ..core.config import RetroConfig
    from .zero_shot import remove_overlap, select_confident
    from ..prompt.factory import build_trainer
    from ..prompt.training_args import TrainingArgs
    from .backbones import load_backbone
    from .tasks import get_task, load_test, load_unlabeled_pool

    spec = get_task(task)
    test = load_test(run_spec.data_root, spec.name, 16, seed)
    plm, tok, _, wrapper = load_backbone(run_spec.model, run_spec.model_type)
    # the store's keys come from --zs-key-encoder, not --config (zero-shot rows' settings ids carry no
    # RetroConfig): "mask", as measured in benchmarks/README.md (zero-shot), is the untrained model's [MASK]
    # states read by top-k voting; "frozen-mean" reads the frozen encoder's keys by class means
    keys = run_spec.zs_key_encoder if method == "zero-shot-retro" else "mask"
    config = RetroConfig(knn_lambda=0.0, key_encoder=keys, knn_readout="topk" if keys == "mask" else "class-mean")
    trainer = build_trainer(plm, tok, wrapper, spec.template, spec.label_words, "none", config,
                            args=TrainingArgs(max_seq_length=run_spec.max_seq_length, progress=not run_spec.no_progress,
                                              device=run_spec.device or "auto",
                                              amp=run_spec.amp))
    model = trainer.model
    t0 = time.time()
    store = None
    if method == "zero-shot-retro":
        pool = remove_overlap(load_unlabeled_pool(run_spec.data_root, spec.name), test)
        pool = pool[: run_spec.zs_pool_size] if run_spec.zs_pool_size else pool
        probs = trainer.predict_proba(pool)  # labels of the pool are never read
        idx, pseudo = select_confident(probs, run_spec.zs_fraction)
        chosen = [InputExample(guid=f"pseudo-{i}", text_a=pool[i].text_a, text_b=pool[i].text_b, label=int(y))
                  for i, y in zip(idx, pseudo)]
        model.add_to_store(trainer.loader(chosen), progress=not run_spec.no_progress)
        model.apply_config(knn_lambda=run_spec.zs_lambda, knn_k=run_spec.zs_k, knn_temperature=run_spec.zs_temperature)
        true = np.array([pool[i].label for i in idx])
        store = PseudoLabelStore(pool_size=len(pool), store_size=len(chosen),
                                 pseudo_label_accuracy=float((true == pseudo).mean()))  # diagnostics only
    build_s = time.time() - t0
    t0 = time.time()
    test_result = trainer.evaluate(test, split="test")
    return RunRecord(**_identity(spec.name, method, seed, run_spec), pseudo_labels=store,
                     test_accuracy=test_result["accuracy"], n_test=test_result["n"], dev_accuracy=None,
                     epochs_run=0, train_seconds=round(build_s, 2), test_seconds=round(time.time() - t0, 2),
                     knn_lambda=model.config.knn_lambda, knn_k=model.config.knn_k,
                     knn_temperature=model.config.knn_temperature,
                     settings={"fraction": run_spec.zs_fraction, "pool_size_cap": run_spec.zs_pool_size,
                               "device": trainer.args.device, "amp": trainer.args.amp,
                               **({"key_encoder": config.key_encoder, "knn_readout": config.knn_readout,
                                   "class_mean_temperature": config.class_mean_temperature}
                                  if method == "zero-shot-retro" else {})})


# ---------------------------------------------------------------------- the grid
#: seconds between looks at a run another process on this host is doing
POLL_SECONDS = 5


def run_grid(ns) -> List[Dict]:
    """Every (task, method, seed) of ``ns`` not yet in OUT/results.jsonl (all of them with ``ns.overwrite``).

    Each run's result is printed, then written; processes sharing OUT split the runs between them: a run is
    claimed before it starts and checked again once claimed, so a run finished meanwhile is not redone. A run
    another process on this host holds is looked at again at the end: waited for while that process lives,
    taken over if it died. A method whose SAME_TRAINING partner is in the grid too is measured on the partner's
    trained weights (no second training). Runs still not done at the end (held from another host, whose process
    cannot be checked from here, unless ``--overwrite``) are named in a :class:`UserError`.
    """
    check_grid(ns)
    run_spec = RunSpec.from_namespace(ns)
    results = ResultsFile(ns.out)
    results.check()
    records, written = [], set()
    grid = [(t, m, s) for s in ns.seeds for t in ns.tasks for m in ns.methods]
    paired = {m: p for m, p in SAME_TRAINING.items() if m in ns.methods and p in ns.methods}
    partner_of = {p: m for m, p in paired.items()}
    queue, deferred, missing = [(i, *run) for i, run in enumerate(grid, 1)], set(), []
    take_over = bool(getattr(ns, "overwrite", False))

    def finished(k) -> bool:  # written by this process, or (unless overwriting) found in results.jsonl
        return k in written or (not ns.overwrite and k in results.done())

    while queue:
        i, task, method, seed = queue.pop(0)
        name = f"[{i}/{len(grid)}] {task} {method} K={ns.shots} seed={seed}"
        key = _key(task, method, seed, run_spec)
        if finished(key):
            if key not in written:
                print(f"{name}: already in {results.path}, skipped (--overwrite re-runs it)", file=sys.stderr,
                      flush=True)
            continue
        waits_for = [_key(task, paired[method], seed, run_spec)] if method in paired else []
        holder = next(filter(None, (results.holder(k, take_over) for k in waits_for)), None) \
            or results.claim(key, take_over)
        if holder is not None:
            if on_this_host(holder) and key not in deferred:  # look again once the rest is done
                print(f"{name}: being run by {holder}; looked at again at the end", file=sys.stderr, flush=True)
                queue.append((i, task, method, seed))
                deferred.add(key)
            elif on_this_host(holder):  # nothing else left to do: wait for that process, then look again
                _wait_while_held(results, [key, *waits_for], take_over)
                queue.insert(0, (i, task, method, seed))
            else:
                print(f"{name}: claimed by {holder} (another host), not done", file=sys.stderr, flush=True)
                missing.append(f"{task} {method} seed {seed} (claimed by {holder})")
            continue
        try:
            if finished(key):  # finished by another process before our claim
                continue
            print(name, file=sys.stderr, flush=True)
            _run_claimed(task, method, seed, run_spec, take_over, results, partner_of.get(method), records, written,
                         finished)
        finally:
            results.release(key)
    if results.done():  # nothing to report when every run was held elsewhere
        _write_report(results, ns.out)
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"{len(missing)} run(s) not done: {shown}. Run again when they are finished, "
                        "or with --overwrite to take over claims from other hosts")
    return records


def _wait_while_held(results: ResultsFile, keys, take_over: bool) -> None:
    """Sleep while a live process on this host holds one of ``keys``."""
    while any(on_this_host(results.holder(k, take_over) or "") for k in keys):
        time.sleep(POLL_SECONDS)


def _run_claimed(task: str, method: str, seed: int, run_spec: RunSpec, overwrite: bool, results: ResultsFile,
                 also: Optional[str], records, written, finished) -> None:
    """Run a claimed run (and ``also``, its SAME_TRAINING partner, on the same weights when that one is free)."""
    if also is not None:
        also_key = _key(task, also, seed, run_spec)
        if finished(also_key) or results.claim(also_key, overwrite) is not None:
            also = None
    try:
        recs = [run_one(task, method, seed, run_spec)] if also is None else \
            run_trained(task, method, seed, run_spec, also=also)
        for rec in recs:
            _print_and_write(rec, results, overwrite, records, written)
    finally:
        if also is not None:
            results.release(also_key)


def _write_report(results: ResultsFile, out: str) -> None:
    from .report import write_report

    with results.locked():  # processes sharing OUT do not write the report files over each other
        write_report(results.path, out)
        with open(os.path.join(out, "table.md")) as f:
            print(f.read())


def _key(task: str, method: str, seed: int, run_spec: RunSpec) -> RunKey:
    return RunKey(_task_spec(task).name, method, run_spec.shots, seed, run_spec.model,
                  settings_id(method, run_spec.shots, run_spec.options()))


def _identity(task: str, method: str, seed: int, run_spec: RunSpec) -> Dict:
    """The fields of a result record that make its run a run (see :class:`RunKey`)."""
    return _key(task, method, seed, run_spec)._asdict()


def _print_and_write(rec: RunRecord, results: ResultsFile, overwrite: bool, records: List[Dict],
                     written: set) -> None:
    """Print the run's result and add its row to ``results`` (and to ``records``)."""
    dev = "-" if rec.dev_accuracy is None else f"{rec.dev_accuracy:.4f}"
    shared = f" (on {rec.shares_training_with}'s training)" if rec.shares_training_with is not None else ""
    print(f"    {rec.method}{shared}: test accuracy {rec.test_accuracy:.4f} (dev {dev}, lambda "
          f"{rec.knn_lambda}, {rec.train_seconds:.0f}s train, {rec.test_seconds:.0f}s test)",
          file=sys.stderr, flush=True)
    row = rec.to_row()
    records.append(row)
    try:
        results.write(row, overwrite=overwrite)
    except (OSError, UserError) as e:  # the result is not lost: print the row that could not be written
        print(f"    result: {json.dumps(row)}", file=sys.stderr, flush=True)
        reason = e.strerror or e if isinstance(e, OSError) else e
        raise UserError(f"cannot write {results.path} ({reason}); the result above was not saved") from None
    written.add(rec.key)


__all__ = ["run_one", "run_trained", "run_zero_shot", "run_grid", "method_trainer", "load_split", "check_grid",
           "TRAINED_METHODS"]
