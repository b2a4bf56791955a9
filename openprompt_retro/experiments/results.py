"""``results.jsonl``: one row per run (``RunRecord.to_row()``, see ``records.py``), shared safely between processes.

- a run is identified by :class:`RunKey`: task, method, shots, seed, model and ``settings_id`` (a hash of the
  options that change its result); a finished run is skipped unless ``overwrite``;
- processes working on one folder claim runs (an exclusive file per run under ``.claims/``), so none is
  done twice; a claim whose process has died, or an unreadable claim, is taken over. A claim names its holder
  as ``pid@host/start`` (start: the process's start time, read from /proc): a pid alive now but started at
  another time (reused, or a restarted container that gave this process the same pid and host name) holds
  nothing;
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

from ..errors import UserError, json_loads
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
#: option -> its ``run`` default, for every method: where the data comes from (``data_root``: None for the
#: workplace's shared data, else the folder's real path; see :func:`data_identity`)
_DATA_OPTIONS = {"hf_dataset": None, "hf_test_split": None, "hf_text_fields": [], "hf_label_field": "label",
                 "hf_label_map": None, "data_root": None}


def data_identity(data_root, hf_dataset=None):
    """What ``--data-root`` contributes to a run's identity: None when the data come from a Hugging Face dataset
    or from the shared data beside the checkout (the rows written before the option was keyed), else the real
    path of the folder, so a run on other data is another run."""
    from .paths import shared_data_root

    if hf_dataset or not data_root:
        return None
    real = os.path.realpath(os.path.expanduser(str(data_root)))
    return None if real == os.path.realpath(shared_data_root()) else real
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
_NOT_CHOSEN = ("loss", "knn_lambda", "knn_k", "knn_temperature", "lambda_from_dev")


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
    out["data_root"] = data_identity(options.get("data_root"), options.get("hf_dataset"))
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
                row = _upgraded(json_loads(raw.decode("utf-8")))
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
        self._mine: set = set()  # claim files this object took and has not released

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
        me = this_process()
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
                self._mine.add(path)
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
                    self._mine.add(path)
                    return None
                except FileExistsError:  # a fresh claim got in between (fresh claims take no lock)
                    return _read(path) or "another process"
        finally:
            _remove(tmp)

    def holder(self, key: RunKey, take_over_remote: bool = False) -> Optional[str]:
        """Who holds the run's claim now ("pid@host/start"), or None: unclaimed, its process is gone (or its pid
        now belongs to another process), it names this very process but this process never took it (a claim
        left by an earlier process that had the same pid and host name), its content is not a holder, or
        (``take_over_remote``) it comes from another host."""
        path = self._claim_path(key)
        holder = _read(path)
        if not _is_holder(holder) or _dead(holder) or (take_over_remote and not on_this_host(holder)):
            return None
        if _same_pid_here(holder) and path not in self._mine:
            return None
        return holder

    def release(self, key: RunKey) -> None:
        """Drop this process's claim; if the folder no longer lets it, the claim stays and, its process gone,
        is taken over later."""
        path = self._claim_path(key)
        self._mine.discard(path)
        try:
            _remove(path)
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


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (clock ticks after boot, /proc/<pid>/stat field 22), or None where it
    cannot be read (no such process, no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def this_process() -> str:
    """This process as a claim names it: "pid@host/start" (or "pid@host" where the start time is unknown)."""
    start = _process_start(os.getpid())
    return f"{os.getpid()}@{socket.gethostname()}" + (f"/{start}" if start else "")


def _parts(holder: str):
    """(pid, host, start or None) of "pid@host[/start]"."""
    pid, _, rest = holder.partition("@")
    host, _, start = rest.partition("/")
    return pid, host, start or None


def _is_holder(holder: str) -> bool:
    pid, host, start = _parts(holder)
    return pid.isdigit() and "@" in holder and bool(host) and (start is None or start.isdigit())


def on_this_host(holder: str) -> bool:
    return _parts(holder)[1] == socket.gethostname()


def _same_pid_here(holder: str) -> bool:
    return on_this_host(holder) and _parts(holder)[0] == str(os.getpid())


def _dead(holder: str) -> bool:
    """Whether the claim's process is gone (only decidable on this host): no process has its pid, or the one
    that has it started at another time than the claim records (the pid was reused)."""
    if not on_this_host(holder):
        return False
    pid, _, start = _parts(holder)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    if start is not None:
        now = _process_start(int(pid))
        return now is not None and now != start
    return False
