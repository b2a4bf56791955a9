"""``results.jsonl``: one row per run (``RunRecord.to_row()``, see ``records.py``), shared safely between processes.

- a run is identified by :class:`RunKey`: task, method, shots, seed, model and ``settings_id`` (a hash of the
  options that change its result); a finished run is skipped unless ``overwrite``;
- processes working on one folder claim runs (an exclusive file per run under ``.claims/``), so none is
  done twice; a claim whose process has died, or an unreadable claim, is taken over;
- rows are written under a file lock, by rewriting the whole file to a temporary file and renaming it, so a
  crash never leaves a partial line; a line that is not a row (partial, not JSON, not UTF-8) is skipped with
  a warning naming file and line.

Rows written before ``shots`` and ``settings_id`` existed say ``k`` and carry no ``settings_id``: they are
read with ``shots`` = ``k`` and the settings id derived from their recorded ``settings``.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import warnings
from contextlib import contextmanager
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional

from ..errors import UserError
from .methods import BASELINE_METHODS, ZERO_SHOT_METHODS


class RunKey(NamedTuple):
    """What makes a run a run: two rows with the same key are the same run."""
    task: str
    method: str
    shots: int
    seed: int
    model: Optional[str]
    settings_id: str


# ---------------------------------------------------------------------- the settings that change a result
#: option -> its ``run`` default, for every method: where the data comes from
_DATA_OPTIONS = {"hf_dataset": None, "hf_test_split": None, "hf_text_fields": [], "hf_label_field": "label",
                 "hf_label_map": None}
#: per method, the options that change its result and the values settings ids are relative to: ``run``'s
#: defaults when rows first had ids (``demo_topk`` None: 8 for shots >= 16, else 2; ``config``: RetroConfig
#: fields set by ``--config``, see :data:`_ID_BASELINE`). ``mixture_grid`` is "fine" in ``run`` today: its
#: runs key as "fine", the rows before as "small".
_PROTOCOL = {"lr": 5e-5, "epochs": 20, "batch_size": 8, "max_seq_length": 128, "patience": 20, "max_steps": None,
             "eval_every": None}
_RESULT_OPTIONS: Dict[str, Dict] = {
    "trained": {**_PROTOCOL, "loss_beta": 1.0, "demo_topk": None, "mixture_grid": "small", "amp": None,
                "config": {}},
    "fine-tune": dict(_PROTOCOL),
    "linear-probe": {"max_seq_length": 128},
    "setfit": {},
    "zero-shot": {"max_seq_length": 128, "amp": None},
    "zero-shot-retro": {"max_seq_length": 128, "amp": None, "zs_fraction": 0.3, "zs_pool_size": 4000,
                        "zs_lambda": 0.5, "zs_k": 16, "zs_temperature": 1.0, "zs_key_encoder": "mask"},
}
#: RetroConfig fields a run's settings do not choose: the method's preset (loss) or tuned on dev (lambda, k, T)
_NOT_CHOSEN = ("loss", "knn_lambda", "knn_k", "knn_temperature")


def _kind(method: str) -> str:
    return method if method in BASELINE_METHODS or method in ZERO_SHOT_METHODS else "trained"


def auto_demo_topk(shots: int) -> int:
    """m neighbours per class when ``--demo-topk`` is not given."""
    return 8 if shots >= 16 else 2


#: the RetroConfig defaults that settings ids are relative to: those of the rows written before
#: ``key_encoder`` and the fields after it existed. A run keys by what it ran with, so a change of a default
#: gives new runs a new id while older rows keep theirs.
_ID_BASELINE = {"key_encoder": "mask", "key_encoder_path": None, "knn_readout": "topk",
                "class_mean_temperature": 0.05, "class_mean_top_m": None, "demo_retrieval": "mask",
                "plm_temperature": 1.0, "adapt_steps": 20, "adapt_lr": 5e-5, "adapt_batch_size": 32,
                "adapt_pairs": False, "pair_keys": "joint", "logistic_c": 1.0, "logistic_temperature": 1.0,
                "store_guard_alpha": None}


def _config_overrides(config: Mapping, legacy: bool = False) -> Dict:
    """The RetroConfig fields a run ran with that differ from the id baseline (today's defaults, except
    :data:`_ID_BASELINE`), less those a run does not choose. ``config``: the ``--config`` overrides of a run
    (the other fields had today's defaults), or with ``legacy`` the full config recorded by a row written
    before the baseline's fields existed (they had the baseline's values)."""
    from ..core.config import RetroConfig

    baseline = {**RetroConfig().to_dict(), **_ID_BASELINE}
    ran = {**(baseline if legacy else RetroConfig().to_dict()), **config}
    if ran.get("demo_retrieval") == "auto":  # keyed by what it does
        ran["demo_retrieval"] = "mask" if ran.get("key_encoder") == "mask" else "key-encoder"
    return {k: v for k, v in ran.items()
            if k not in _NOT_CHOSEN and k not in ("demo_topk", "loss_beta") and baseline.get(k, object()) != v}


def result_options(method: str, shots: int, options: Mapping, legacy: bool = False) -> Dict:
    """The options of ``options`` (CLI option name -> value) that change ``method``'s result, as recorded in a
    row's settings id: ``--config``'s demo_topk and loss_beta override ``--demo-topk`` and ``--loss-beta``."""
    wanted = {**_RESULT_OPTIONS[_kind(method)], **_DATA_OPTIONS}
    out = {name: options.get(name, default) for name, default in wanted.items()}
    if "config" in wanted:
        config = dict(options.get("config") or {})
        out["demo_topk"] = config.get("demo_topk", options.get("demo_topk")) or auto_demo_topk(shots)
        out["loss_beta"] = config.get("loss_beta", out["loss_beta"])
        out["config"] = _config_overrides(config, legacy)
    return out


def _legacy_options(row: Mapping) -> Dict:
    """The options of a row written without a settings id, read from its recorded ``settings`` (an option it
    did not record had its default; its ``config`` is the full RetroConfig it ran with)."""
    method, s = row["method"], dict(row.get("settings") or {})
    kind = _kind(method)
    if kind == "zero-shot-retro":
        s.update(zs_fraction=s.get("fraction", 0.3), zs_pool_size=s.get("pool_size_cap", 4000),
                 zs_lambda=row.get("knn_lambda", 0.5), zs_k=row.get("knn_k", 16),
                 zs_temperature=row.get("knn_temperature", 1.0), zs_key_encoder=s.get("key_encoder", "mask"))
    if kind == "trained" and method == "demo-text" and "max_seq_length" in s:
        s["max_seq_length"] = s["max_seq_length"] // 2  # recorded with the room for text demonstrations
    return s


def _canonical(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def settings_id(method: str, shots: int, options: Mapping, legacy: bool = False) -> str:
    """A stable hash of the options that change ``method``'s result and differ from their ``run`` default
    (so a row written before an option existed keys as that option's default); ``legacy``: ``options`` are
    a row's recorded settings (:func:`_legacy_options`)."""
    defaults = {**_RESULT_OPTIONS[_kind(method)], **_DATA_OPTIONS}
    chosen = result_options(method, shots, options, legacy)
    if "demo_topk" in chosen and chosen["demo_topk"] == auto_demo_topk(shots):
        chosen["demo_topk"] = None
    changed = {k: v for k, v in _canonical(chosen).items() if v != _canonical(defaults[k])}
    return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:12]


def row_shots(row: Mapping) -> int:
    """Examples per class of a row (``k`` in rows written before ``shots``)."""
    return int(row["shots"] if "shots" in row else row["k"])


def run_key(row: Mapping) -> RunKey:
    sid = row.get("settings_id") or settings_id(row["method"], row_shots(row), _legacy_options(row), legacy=True)
    return RunKey(row["task"], row["method"], row_shots(row), int(row["seed"]), row.get("model"), str(sid))


def _upgraded(row: Dict) -> Dict:
    """An old row as a current one: ``k`` read as ``shots``."""
    if "shots" not in row and "k" in row:
        row = {("shots" if name == "k" else name): value for name, value in row.items()}
    return row


def read_rows(path: str) -> List[Dict]:
    """Every well-formed row; a line that is not a row (not UTF-8, not JSON, no run key) is skipped with a
    warning naming file and line."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = _upgraded(json.loads(raw.decode("utf-8")))
                run_key(row)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                warnings.warn(f"{path}, line {n}: skipped a malformed row ({type(e).__name__}: {e})", stacklevel=2)
                continue
            rows.append(row)
    return rows


def dedupe(rows: List[Dict], where: str = "results") -> List[Dict]:
    """One row per run: the last one written wins, with a warning naming the duplicates."""
    last: Dict[RunKey, Dict] = {}
    dups = []
    for r in rows:
        key = run_key(r)
        if key in last:
            dups.append(key)
        last[key] = r
    if dups:
        warnings.warn(f"{where}: {len(dups)} duplicate row(s) for the same run, kept the last of each: "
                      f"{[tuple(k) for k in sorted(set(dups))[:5]]}", stacklevel=2)
    return list(last.values())


class ResultsFile:
    """The results of one output folder. A filesystem error (a file where the claims folder should be, a folder
    where the lock should be, a full disk, a folder that turned read-only) is a :class:`UserError` naming the
    path; rows already written stay as they were."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, "results.jsonl")
        self.claims = os.path.join(folder, ".claims")

    def check(self) -> None:
        """Fail now, with a :class:`UserError`, if runs cannot be claimed or rows locked in this folder."""
        if os.path.exists(self.claims) and not os.path.isdir(self.claims):
            raise UserError(f"{self.claims} is not a folder; remove it (it holds the claims of running runs)")
        with self.locked():
            pass

    def done(self) -> set:
        return {run_key(r) for r in read_rows(self.path)}

    @contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock on this folder's results (a file lock: across processes)."""
        try:
            lock = open(self.path + ".lock", "a")
        except OSError as e:
            raise UserError(f"cannot open the results lock {self.path}.lock ({e.strerror or e})") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def write(self, row: Dict, overwrite: bool = False) -> None:
        """Add ``row`` (replacing the run's old row when ``overwrite``), atomically."""
        with self.locked():
            rows = read_rows(self.path)
            key = run_key(row)
            if not overwrite and any(run_key(r) == key for r in rows):
                raise FileExistsError(f"{self.path} already holds run {tuple(key)}; pass overwrite=True to "
                                      "replace it")
            rows = [r for r in rows if run_key(r) != key] + [row]
            tmp = f"{self.path}.tmp.{os.getpid()}"
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                _remove(tmp)
                raise

    # ------------------------------------------------------------------ claims
    def _claim_path(self, key: RunKey) -> str:
        which = hashlib.sha256(json.dumps([key.model, key.settings_id]).encode()).hexdigest()[:12]
        name = "__".join(str(x) for x in (key.task, key.method, key.shots, key.seed, which))
        return os.path.join(self.claims, name.replace(os.sep, "_"))

    def claim(self, key: RunKey, take_over_remote: bool = False) -> Optional[str]:
        """Take the run for this process; returns None on success, else who holds it ("pid@host").

        A claim of a dead process on this host, or one whose content is not a holder, is taken over; with
        ``take_over_remote`` so is a claim from another host (whose process cannot be checked from here)."""
        path = self._claim_path(key)
        me = f"{os.getpid()}@{socket.gethostname()}"
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(self.claims, exist_ok=True)
            with open(tmp, "w") as f:  # the claim appears with its holder in it, never empty
                f.write(me)
        except OSError as e:
            _remove(tmp)
            raise UserError(f"cannot claim run {tuple(key)} under {self.claims} ({e.strerror or e})") from None
        try:
            try:
                os.link(tmp, path)
                return None
            except FileExistsError:
                pass
            # Held, or left by a dead process. Taking a dead claim over happens under the folder lock, so two
            # processes that both find it dead cannot both remove it and both run.
            with self.locked():
                holder = self.holder(key, take_over_remote)
                if holder is not None:
                    return holder
                _remove(path)
                try:
                    os.link(tmp, path)
                    return None
                except FileExistsError:  # a fresh claim got in between (fresh claims take no lock)
                    return _read(path) or "another process"
        finally:
            _remove(tmp)

    def holder(self, key: RunKey, take_over_remote: bool = False) -> Optional[str]:
        """Who holds the run's claim now ("pid@host"), or None: unclaimed, its process is gone, its content is
        not a holder, or (``take_over_remote``) it comes from another host."""
        holder = _read(self._claim_path(key))
        if not _is_holder(holder) or _dead(holder) or (take_over_remote and not on_this_host(holder)):
            return None
        return holder

    def release(self, key: RunKey) -> None:
        """Drop this process's claim; if the folder no longer lets it, the claim stays and, its process gone,
        is taken over later."""
        try:
            _remove(self._claim_path(key))
        except OSError:
            pass


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _is_holder(holder: str) -> bool:
    pid, at, host = holder.partition("@")
    return pid.isdigit() and bool(at) and bool(host)


def on_this_host(holder: str) -> bool:
    return holder.partition("@")[2] == socket.gethostname()


def _dead(holder: str) -> bool:
    """Whether the claim's process is gone (only decidable on this host)."""
    if not on_this_host(holder):
        return False
    try:
        os.kill(int(holder.partition("@")[0]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
