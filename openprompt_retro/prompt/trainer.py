"""A small trainer: fit / evaluate / predict / explain, with dev-based early stopping
and lambda, k, T chosen on the dev split."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from openprompt import PromptDataLoader
from openprompt.data_utils import InputFeatures
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from ..core.knn import (MixtureGrid, accuracy, choose_temperature, log_loss, softmax_scores, store_guard,
                        temperature_scale)
from ..core.readout import READOUT_TEMPERATURES, readout_scores
from ..core.store import StoreError
from . import distributed
from .keys import demonstrations_off
from .checks import DataError, check_labels, check_model, check_training_set, label_words_of
from .model import RetroPromptForClassification
from .training_args import AMP_DTYPES, TrainingArgs


class TrainingDiverged(DataError):
    """The training loss became inf or NaN (usually a learning rate far too high); training stopped."""


def _diverged(what: str, run: "_Run") -> TrainingDiverged:
    return TrainingDiverged(f"training diverged: {what} at step {run.step} (learning rate {run.lr:g}); lower the "
                            "learning rate (TrainingArgs.lr / --lr)")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RetroTrainer:
    """Train and use a :class:`RetroPromptForClassification` on lists of InputExamples.

    ``tokenizer`` and ``wrapper_class`` are what ``openprompt.plms.load_plm`` returns;
    ``grid`` holds the (lambda, k, T) candidates tried on dev.
    Tokenized features are made once per example list and reused across epochs.
    Labels and the training-set size are checked (:mod:`.checks`) before anything is tokenized.
    ``args.device`` / ``args.amp``: the model and each batch go to the device; forward passes and the loss
    run under ``torch.autocast`` when ``amp`` is set (fp16 with a gradient scaler); store keys and the
    returned probabilities stay float32.
    """

    def __init__(self, model: RetroPromptForClassification, tokenizer, wrapper_class,
                 args: Optional[TrainingArgs] = None, grid: Optional[MixtureGrid] = None):
        self.model, self.tokenizer, self.wrapper_class = model, tokenizer, wrapper_class
        self.args = (args or TrainingArgs()).validate()
        self.grid = grid or MixtureGrid.fine()  # lambda in {0, 0.1, ..., 1}, ties to the smaller dev log-loss
        device = torch.device(self.args.device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # nccl collectives and DDP use the current device
        self.model.to(device)
        self.model.set_tokenization(wrapper_class, self.args.max_seq_length, tokenizer)
        self.history: List[Dict] = []
        self.tuned: Optional[Dict] = None  # what tune_inference chose on dev

    # ---------------------------------------------------------------- data
    def loader(self, examples, batch_size: Optional[int] = None, shuffle: bool = False, split: str = "data",
               require_labels: bool = False) -> PromptDataLoader:
        """Tokenized examples (:meth:`RetroPromptForClassification.loader`): labels and texts checked first."""
        return self.model.loader(examples, batch_size or self.args.eval_batch_size, shuffle, split, require_labels,
                                 progress=self.args.progress)

    def _to_device(self, batch):
        return batch.to(self.args.device) if hasattr(batch, "to") else batch

    def _autocast(self):
        """``torch.autocast`` for ``args.amp`` on ``args.device`` (a no-op without amp)."""
        if not self.args.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.args.device).type,
                              dtype=getattr(torch, AMP_DTYPES[self.args.amp]))

    # ---------------------------------------------------------------- training
    def fit(self, train, dev=None) -> List[Dict]:
        """Train with the kNN-guided loss, evaluating on dev every ``eval_every`` steps (default: each epoch).

        The store is refreshed at every epoch's end and before each evaluation; the best evaluation's
        weights and store are kept. Each phase draws from its own random stream: training batches and
        dropout from the training stream, refreshes and evaluations from none (they run under a forked RNG),
        so adding an evaluation or a refresh changes nothing else. One record per evaluation goes to
        ``history``, with the diagnostics of the kNN loss (weights' mean and max, the store's
        leave-one-out accuracy, whether the kNN term was active).
        """
        set_seed(self.args.seed)
        train, dev = list(train), (list(dev) if dev else None)
        check_model(self.model)
        words, n_classes = label_words_of(self.model), self.model.num_classes
        labels = check_labels(train, n_classes, "train", True, words)
        if dev:
            check_labels(dev, n_classes, "dev", True, words)
        check_training_set(labels, n_classes, self.model.uses_store, words)
        run = self._start_run(train, dev)
        self.model.plan_training(run.total_steps)  # demo_warmup counts the model's training forwards
        self._refresh(run)
        bar = tqdm(total=run.total_steps, desc="steps", disable=not self.args.progress or run.rank > 0)
        epoch = 0
        while run.step < run.total_steps and not run.stopped:
            self._train_epoch(run, epoch, bar)
            epoch += 1
        bar.close()
        if run.best_state is not None:
            self._restore(run.best_state)
        if run.dev_loader is not None and self.args.tune_inference:
            with isolated_rng(self.args.device):
                self.tune_inference(run.dev_loader)
        return self.history

    def _start_run(self, train, dev) -> "_Run":
        """Loaders, the step model (DDP-wrapped under torch.distributed), optimizer and schedule."""
        a, model = self.args, self.model
        store_loader = self.loader(train, split="train", require_labels=True)
        rank, world = distributed.rank_and_world()
        gen = torch.Generator().manual_seed(a.seed)  # the training batches' own stream
        if world > 1:  # DDP: each rank takes batch_size / world examples of every global batch
            if a.batch_size % world:
                raise ValueError(f"batch_size {a.batch_size} must be divisible by the world size {world}")
            sampler = DistributedSampler(store_loader.tensor_dataset, world, rank, shuffle=a.shuffle, seed=a.seed)
            train_loader = DataLoader(store_loader.tensor_dataset, batch_size=a.batch_size // world,
                                      sampler=sampler, collate_fn=InputFeatures.collate_fct, generator=gen)
            step_model = distributed.wrap_ddp(model)
        else:
            sampler = None
            train_loader = DataLoader(store_loader.tensor_dataset, batch_size=a.batch_size,
                                      sampler=RandomSampler(store_loader.tensor_dataset, generator=gen)
                                      if a.shuffle else None, collate_fn=InputFeatures.collate_fct, generator=gen)
            step_model = distributed.LossModule(model)
        dev_loader = self.loader(dev, split="dev", require_labels=True) if dev else None
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
        total = a.max_steps or a.epochs * len(train_loader)
        scheduler = linear_schedule(optimizer, total, a.warmup_ratio)
        needs_store = model.uses_store or (a.tune_inference and dev_loader is not None)
        scaler = torch.amp.GradScaler("cuda") if a.amp == "fp16" else None  # TrainingArgs: fp16 only on CUDA
        return _Run(store_loader, train_loader, dev_loader, sampler, step_model, params, optimizer, scheduler,
                    needs_store, rank, total_steps=total, eval_every=a.eval_every or len(train_loader),
                    scaler=scaler)

    def _train_epoch(self, run: "_Run", epoch: int, bar=None) -> None:
        """One pass over the training batches (or what is left of the step budget), evaluating on schedule."""
        if run.sampler is not None:
            run.sampler.set_epoch(epoch)
        self.model.train()
        for batch in run.train_loader:
            run.lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses
            run.losses.append(self._train_step(run, batch))
            run.step += 1
            if bar is not None:
                bar.update(1)
            last = run.step >= run.total_steps
            if run.step % run.eval_every == 0 or last:
                self._checkpoint(run, epoch, bar)
                self.model.train()
            if last or run.stopped:
                return
        self._refresh(run)  # the encoder moved: new keys for the next epoch
        self.model.train()

    def _train_step(self, run: "_Run", batch) -> float:
        with self._autocast():
            loss = run.step_model(self._to_device(batch))
        if not torch.isfinite(loss.detach()).all():
            raise _diverged(f"the loss is {loss.item()}", run)
        run.optimizer.zero_grad()
        if run.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(run.params, self.args.max_grad_norm)
            run.optimizer.step()
        else:  # fp16: scaled loss, unscaled gradients clipped, steps with inf/NaN gradients skipped
            run.scaler.scale(loss).backward()
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.params, self.args.max_grad_norm)
            run.scaler.step(run.optimizer)
            run.scaler.update()
        run.scheduler.step()
        w = self.model.last_loss_weights
        if w is not None:
            run.weights.append(w.detach().float().cpu())
        return loss.item()

    def _refresh(self, run: "_Run") -> None:
        """Recompute the store's keys (isolated RNG) and the kNN loss gate; once per training step."""
        if not run.needs_store or run.refreshed_at == run.step:
            return
        try:
            with isolated_rng(self.args.device), self._autocast():
                self.model.refresh_store(run.store_loader, progress=False)  # also recomputes the kNN loss gate
        except StoreError:  # the keys of the step-0 build were fine: training made them inf/NaN
            if run.step == 0:
                raise
            raise _diverged("the store keys are no longer finite", run) from None
        run.refreshed_at = run.step

    def _checkpoint(self, run: "_Run", epoch: int, bar=None) -> None:
        """Refresh, evaluate on dev, record the diagnostics, keep the best state (ties: the earlier one)."""
        self._refresh(run)
        weights = torch.cat(run.weights) if run.weights else torch.ones(1)
        record = {"epoch": epoch, "step": run.step, "loss": float(np.mean(run.losses)), "lr": run.lr,
                  "seconds": time.time() - run.t0, "loss_weight_mean": float(weights.mean()),
                  "loss_weight_max": float(weights.max()),
                  "knn_loss_active": bool(self.model.knn_loss_active),
                  "store_loo_accuracy": getattr(self.model, "store_loo_accuracy", None)}
        run.losses, run.weights, run.t0 = [], [], time.time()
        if run.dev_loader is not None:
            with isolated_rng(self.args.device):
                record["dev_accuracy"] = self.evaluate(run.dev_loader)["accuracy"]
            if record["dev_accuracy"] > run.best:
                run.best, run.bad_evals = record["dev_accuracy"], 0
                run.best_state = self._snapshot()
            else:
                run.bad_evals += 1
            run.stopped = run.bad_evals >= self.args.patience
        self.history.append(record)
        if bar is not None:
            bar.set_postfix(progress_postfix(record))

    def _snapshot(self):
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        s = self.model.store
        return state, (s.keys.copy(), s.labels.copy(), list(s.guids), list(s.texts))

    def _restore(self, snap) -> None:
        state, (keys, labels, guids, texts) = snap
        self.model.load_state_dict(state)
        self.model.store.build(keys, labels, guids, texts)

    # ---------------------------------------------------------------- inference
    def _as_loader(self, data, split: str = "data", require_labels: bool = False):
        if isinstance(data, PromptDataLoader):
            if require_labels:
                self._check_loader_labels(data, split)
            return data
        return self.loader(data, split=split, require_labels=require_labels)

    def _check_loader_labels(self, loader: PromptDataLoader, split: str) -> None:
        """Labels of an already tokenized loader: its raw examples when it kept them, else its features."""
        raw = getattr(loader, "raw_dataset", None)
        if raw is not None and len(raw) == len(loader.tensor_dataset):
            check_labels(raw, self.model.num_classes, split, True, label_words_of(self.model))
        else:
            check_labels([{"label": f["label"]} for f in loader.tensor_dataset], self.model.num_classes, split, True,
                         label_words_of(self.model))

    def predict_proba(self, data) -> np.ndarray:
        """P(y|x) for each example (kNN-mixed with the current lambda), float32: the model's
        :meth:`~RetroPromptForClassification.predict_proba` under ``args.amp``."""
        with self._autocast():
            return self.model.predict_proba(self._as_loader(data), progress=self.args.progress)

    def predict(self, data) -> np.ndarray:
        return self.predict_proba(data).argmax(-1)

    def evaluate(self, data, split: str = "eval") -> Dict[str, float]:
        """Accuracy on labeled ``data``; a label outside the model's classes is an error naming ``split``."""
        loader = self._as_loader(data, split, require_labels=True)
        probs = self.predict_proba(loader)
        labels = np.array([int(f["label"]) for f in loader.tensor_dataset])
        return {"accuracy": accuracy(probs, labels), "n": int(len(labels))}

    def demonstration_reliance(self, data, known_accuracy: Optional[float] = None) -> Dict[str, float]:
        """How much predictions read the neural demonstrations: accuracy as is, with each example's d_c
        permuted across classes (class c's slot gets class c-1's demonstration), and with none.

        ``known_accuracy``: the accuracy on ``data`` as is, when already measured (not evaluated again)."""
        loader = self._as_loader(data)
        out = {"accuracy": self.evaluate(loader)["accuracy"] if known_accuracy is None else known_accuracy}
        self.model.demo_ablation = "permute"
        try:
            out["permuted"] = self.evaluate(loader)["accuracy"]
        finally:
            self.model.demo_ablation = None
        with demonstrations_off(self.model.template):
            out["removed"] = self.evaluate(loader)["accuracy"]
        out["permuted_change"] = out["permuted"] - out["accuracy"]
        out["removed_change"] = out["removed"] - out["accuracy"]
        return out

    @torch.no_grad()
    def collect(self, data) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p_PLM, query keys, labels) for every example - one pass."""
        self.model.eval()
        loader = self._as_loader(data, "dev", require_labels=True)
        p, q = [], []
        for b in tqdm(loader, desc="collect", leave=False, disable=not self.args.progress):
            with self._autocast():
                pp, qq = self.model.plm_probs_and_queries(self._to_device(b))
            p.append(pp.float().cpu().numpy())
            q.append(qq.float().cpu().numpy())
        labels = np.array([int(f["label"]) for f in loader.tensor_dataset])
        return np.concatenate(p), np.concatenate(q), labels

    def tune_inference(self, dev) -> Dict[str, float]:
        """Choose the mixture on the dev split (never on test), in three steps:

        1. the read-out (``knn_readout="auto"``: the one of top-k, class-mean and logistic with the best
           store-alone dev accuracy, ties to the smaller dev log-loss) and its temperature (class-mean and
           logistic: by the dev log-loss of the store alone);
        2. lambda, k and T (and T_plm where the grid has candidates) by dev accuracy of the mixture, ties broken
           as the grid says (:class:`~openprompt_retro.core.knn.MixtureGrid`);
        3. the guard (on unless ``store_guard_alpha`` is None): a store that does no better than the dev
           majority-class rate (:func:`~openprompt_retro.core.knn.store_guard`) gets lambda = 0, the reason in
           ``tuned["store_guard"]``.
        """
        model = self.model
        p_plm, queries, labels = self.collect(dev)
        c = model.config
        readouts = {}
        for readout in (("topk", "class-mean", "logistic") if c.knn_readout == "auto" else (c.readout,)):
            if readout == "topk":
                t = c.knn_temperature
                p = model.lifecycle.knn_distribution(queries, None, c.knn_k, t, "topk", c.knn_score_scale)
            else:
                scores = readout_scores(readout, model.knn_store, queries, None, c.class_mean_top_m, c.logistic_c)
                t = choose_temperature(scores, labels, READOUT_TEMPERATURES[readout]).temperature
                p = softmax_scores(scores, t)
            readouts[readout] = {"accuracy": accuracy(p, labels), "log_loss": log_loss(p, labels), "temperature": t}
        chosen = max(readouts, key=lambda r: (readouts[r]["accuracy"], -round(readouts[r]["log_loss"], 12)))
        fields = {"knn_readout": chosen} if c.knn_readout == "auto" else {}
        if chosen == "class-mean":
            fields["class_mean_temperature"] = readouts[chosen]["temperature"]
        elif chosen == "logistic":
            fields["logistic_temperature"] = readouts[chosen]["temperature"]
        model.apply_config(**fields)
        if chosen == "topk":
            best = self.grid.select(p_plm, labels, lambda k, t: model.knn_distribution(queries, k, t))
        else:  # the read-out's own T, as chosen
            best = self.grid.select(p_plm, labels, lambda k, t: model.knn_distribution(queries, k))
        guard = store_guard(model.knn_distribution(queries, best.k, best.temperature if chosen == "topk" else None),
                            labels, enabled=c.store_guard_alpha is not None)
        lam = best.lam if guard["passes"] else 0.0
        model.apply_config(knn_lambda=lam, knn_k=best.k, knn_temperature=best.temperature,
                           plm_temperature=best.plm_temperature, lambda_from_dev=True)
        dev_acc = best.accuracy if guard["passes"] else accuracy(temperature_scale(p_plm, best.plm_temperature), labels)
        self.tuned = {"dev_accuracy": dev_acc, "knn_lambda": lam, "knn_k": best.k,
                      "knn_temperature": best.temperature, "dev_accuracy_plm_only": accuracy(p_plm, labels),
                      "plm_temperature": best.plm_temperature,
                      "class_mean_temperature": model.config.class_mean_temperature,
                      "knn_readout": chosen, "readout_dev": readouts, "store_guard": guard}
        return self.tuned

    # ---------------------------------------------------------------- open book
    def explain(self, example, top: int = 5) -> Dict:
        """The prediction for one InputExample and the neighbours behind it (text, label, weight)."""
        with self._autocast():
            return self.model.explain(example, top)

    def add_examples(self, examples) -> np.ndarray:
        """Add labeled examples to the store now; later predictions use them (no retraining)."""
        with self._autocast():
            return self.model.add_examples(examples, self.args.eval_batch_size, progress=self.args.progress)

    # ---------------------------------------------------------------- disk
    def save(self, directory: str, save_plm: bool = False) -> None:
        """The model's run folder (see :meth:`RetroPromptForClassification.save`) plus training_args.json
        and trainer.json (the lambda/k/T grid, the tuned values and the history), swapped in as one folder."""
        from .saved_run import TRAINER_FILE, TRAINING_ARGS

        state = {"grid": {k: list(v) for k, v in dataclasses.asdict(self.grid).items()},
                 "tuned": getattr(self, "tuned", None), "history": self.history}
        self.model.save(directory, save_plm=save_plm, extra_json={TRAINING_ARGS: self.args.to_dict(), TRAINER_FILE: state})

    def load(self, directory: str) -> "RetroTrainer":
        """Load a saved run into this trainer's (identically built) model.

        See :meth:`RetroPromptForClassification.load`: all or nothing, every difference named."""
        self.model.load(directory)
        return self

    @classmethod
    def from_pretrained(cls, directory: str, plm_path: Optional[str] = None, model_type: Optional[str] = None,
                        text_pool=None, key_encoder_path: Optional[str] = None, **training_args) -> "RetroTrainer":
        """A trainer rebuilt from a folder that :meth:`save` wrote, with nothing else needed.

        The model comes from :meth:`RetroPromptForClassification.from_pretrained`
        (``plm_path`` / ``model_type`` / ``text_pool`` go there); the training
        args from training_args.json, with ``training_args`` overriding fields
        (e.g. ``device="cpu"``); the grid, tuned values and history from trainer.json.
        """
        from . import rebuild, saved_run

        with saved_run.pinned(directory):  # model and trainer files from one checkpoint
            model, tokenizer, wrapper = rebuild.rebuild_run(directory, cls=RetroPromptForClassification,
                                                          plm_path=plm_path, model_type=model_type,
                                                          text_pool=text_pool, key_encoder_path=key_encoder_path)
            args, grid, state = _read_trainer_files(directory, training_args)
        trainer = cls(model, tokenizer, wrapper, args, grid)
        if state.get("tuned") is not None:
            trainer.tuned = state["tuned"]
        trainer.history = list(state.get("history") or [])
        return trainer


def _read_trainer_files(directory: str, overrides: Dict) -> Tuple[TrainingArgs, MixtureGrid, Dict]:
    """TrainingArgs (training_args.json + overrides), MixtureGrid and the rest of trainer.json (as checked
    against run.json); defaults if absent."""
    import warnings

    from .saved_run import TRAINER_FILE, TRAINING_ARGS, SavedRunError, read_json_file

    def read(name):
        value = read_json_file(directory, name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise SavedRunError(f"corrupt {os.path.join(directory, name)}: expected a JSON object")
        return value

    saved = read(TRAINING_ARGS)
    known = {f.name for f in dataclasses.fields(TrainingArgs)}
    unknown = sorted(set(saved) - known)
    if unknown:
        warnings.warn(f"{os.path.join(directory, TRAINING_ARGS)}: ignoring fields this version does not know: "
                      f"{unknown}", stacklevel=3)
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError(f"unknown TrainingArgs fields: {bad}")
    try:
        args = TrainingArgs(**{**{k: v for k, v in saved.items() if k in known}, **overrides})
    except (TypeError, ValueError) as e:
        raise SavedRunError(f"invalid {os.path.join(directory, TRAINING_ARGS)}: {e}") from None
    state = read(TRAINER_FILE)
    try:
        grid = MixtureGrid(**{k: tuple(v) for k, v in (state.get("grid") or {}).items()})
    except (TypeError, ValueError) as e:
        raise SavedRunError(f"invalid grid in {os.path.join(directory, TRAINER_FILE)}: {e}") from None
    return args, grid, state


def progress_postfix(record: Dict) -> Dict[str, str]:
    """An evaluation record's numbers for the progress bar, each to 4 significant digits (a learning rate of
    5e-05 shows as 5e-05, not as 0)."""
    return {k: f"{v:.4g}" for k, v in record.items() if isinstance(v, float)}


def linear_schedule(optimizer, total_steps: int, warmup_ratio: float = 0.0):
    """Linear warm-up to the full rate, then linear decay to 0, with W = int(warmup_ratio * total_steps):

        factor(s) = (s + 1) / W                 for s < W
        factor(s) = (S - s) / (S - W)           for s >= W     (S = total_steps)
    """
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextmanager
def isolated_rng(device: str = "cpu"):
    """Run a phase (refresh, evaluation, tuning) without touching the global random streams it may draw from."""
    devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        yield


@dataclass
class _Run:
    """What one :meth:`RetroTrainer.fit` call carries from step to step."""

    store_loader: Any
    train_loader: Any
    dev_loader: Any
    sampler: Any
    step_model: Any
    params: List[torch.Tensor]
    optimizer: Any
    scheduler: Any
    needs_store: bool
    rank: int
    total_steps: int = 0
    eval_every: int = 1
    step: int = 0
    refreshed_at: int = -1
    losses: List[float] = field(default_factory=list)
    weights: List[torch.Tensor] = field(default_factory=list)
    t0: float = field(default_factory=time.time)
    scaler: Any = None  # torch.amp.GradScaler for fp16
    best: float = -1.0
    best_state: Any = None
    bad_evals: int = 0
    stopped: bool = False
    lr: float = 0.0  # the learning rate of the last step
