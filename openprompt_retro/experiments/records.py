"""The result record: one run's outcome, as every ``results.jsonl`` row holds it.

A row is ``RunRecord.to_row()``: the run's key (task, method, shots, seed, model, settings_id), for
zero-shot-retro its pseudo-labelled store, the accuracies, timings, the kNN mixture used on test and the
settings, then the method's own parts (a trained method's ``diagnostics``, an ablation's
``shares_training_with``). :meth:`RunRecord.from_row` reads today's rows and rows written before ``shots`` and
``settings_id`` (``k``, settings id derived from the recorded settings); fields it does not know stay in
``extra`` and are written back unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from .results import RunKey, run_key


@dataclass(frozen=True)
class PseudoLabelStore:
    """zero-shot-retro's store: the unlabelled pool it was chosen from, the entries kept, and how many of those
    pseudo-labels are right (a diagnostic; the pool's labels are read for nothing else)."""
    pool_size: int
    store_size: int
    pseudo_label_accuracy: float


#: the fields of a row every method writes, after the run's key, in row order
_COMMON = ("test_accuracy", "n_test", "dev_accuracy", "epochs_run", "train_seconds", "test_seconds", "knn_lambda",
           "knn_k", "knn_temperature", "settings")
_STORE = tuple(f.name for f in dataclasses.fields(PseudoLabelStore))


@dataclass(frozen=True)
class RunRecord:
    """One run's result. ``knn_*``: the mixture used on test (lambda 0: the PLM alone; None where a method has
    no store); ``dev_accuracy`` None where no labelled dev set is used; ``settings``: the options the run used."""
    task: str
    method: str
    shots: int
    seed: int
    model: Optional[str]
    settings_id: str
    test_accuracy: float
    n_test: Optional[int] = None
    dev_accuracy: Optional[float] = None
    epochs_run: Optional[int] = None
    train_seconds: Optional[float] = None
    test_seconds: Optional[float] = None
    knn_lambda: Optional[float] = None
    knn_k: Optional[int] = None
    knn_temperature: Optional[float] = None
    settings: Dict[str, Any] = field(default_factory=dict)
    #: trained methods: evaluations during training, dev/test accuracy by inference setting, demo reliance
    diagnostics: Optional[Dict[str, Any]] = None
    #: the method whose trained weights this run was measured on (see ``runs.SAME_TRAINING``)
    shares_training_with: Optional[str] = None
    pseudo_labels: Optional[PseudoLabelStore] = None
    #: fields of a row this version does not write (kept as read)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> RunKey:
        return RunKey(self.task, self.method, self.shots, self.seed, self.model, self.settings_id)

    def to_row(self) -> Dict[str, Any]:
        """The ``results.jsonl`` row (field order as written since rows have had these fields)."""
        row: Dict[str, Any] = dict(self.key._asdict())
        if self.pseudo_labels is not None:
            row.update(dataclasses.asdict(self.pseudo_labels))
        row.update((name, getattr(self, name)) for name in _COMMON)
        if self.diagnostics is not None:
            row["diagnostics"] = self.diagnostics
        if self.shares_training_with is not None:
            row["shares_training_with"] = self.shares_training_with
        row.update(self.extra)
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "RunRecord":
        """The record of a row, today's or one written with ``k`` and no ``settings_id``; a row without a run
        key or ``test_accuracy`` is a KeyError."""
        key = run_key(row)
        known = {*RunKey._fields, "k", *_COMMON, *_STORE, "diagnostics", "shares_training_with"}
        store = PseudoLabelStore(**{n: row[n] for n in _STORE}) if all(n in row for n in _STORE) else None
        return cls(**key._asdict(), test_accuracy=row["test_accuracy"],
                   **{name: row[name] for name in _COMMON[1:] if name in row},
                   diagnostics=row.get("diagnostics"), shares_training_with=row.get("shares_training_with"),
                   pseudo_labels=store,
                   extra={n: v for n, v in row.items() if n not in known or (n in _STORE and store is None)})


__all__ = ["RunRecord", "PseudoLabelStore"]
