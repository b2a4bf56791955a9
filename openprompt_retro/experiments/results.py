"""``results.jsonl``: one row per run, shared safely between processes.

- a run is identified by (task, method, k, seed); a finished run is skipped unless ``overwrite``;
- processes working on one folder claim runs (an exclusive file per run under ``.claims/``), so none is
  done twice; a claim whose process has died is taken over;
- rows are written under a file lock, by rewriting the whole file to a temporary file and renaming it, so a
  crash never leaves a partial line; a partial line found anyway (an older writer) is skipped with a warning.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import warnings
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

RunKey = Tuple[str, str, int, int]


def run_key(row: Dict) -> RunKey:
    return (row["task"], row["method"], int(row["k"]), int(row["seed"]))


def read_rows(path: str) -> List[Dict]:
    """Every well-formed row; a line that is not JSON is skipped with a warning naming file and line."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                run_key(row)
            except (ValueError, KeyError, TypeError) as e:
                warnings.warn(f"{path}, line {n}: skipped a malformed row ({type(e).__name__}: {e})", stacklevel=2)
                continue
            rows.append(row)
    return rows


def dedupe(rows: List[Dict], where: str = "results") -> List[Dict]:
    """One row per (task, method, k, seed): the last one written wins, with a warning naming the duplicates."""
    last: Dict[RunKey, Dict] = {}
    dups = []
    for r in rows:
        key = run_key(r)
        if key in last:
            dups.append(key)
        last[key] = r
    if dups:
        warnings.warn(f"{where}: {len(dups)} duplicate row(s) for the same run, kept the last of each: "
                      f"{sorted(set(dups))[:5]}", stacklevel=2)
    return list(last.values())


class ResultsFile:
    """The results of one output folder."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, "results.jsonl")
        self.claims = os.path.join(folder, ".claims")

    def done(self) -> set:
        return {run_key(r) for r in read_rows(self.path)}

    @contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock on this folder's results (a file lock: across processes)."""
        with open(self.path + ".lock", "a") as lock:
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
                raise FileExistsError(f"{self.path} already holds run {key}; pass overwrite=True to replace it")
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
        return os.path.join(self.claims, "__".join(str(x) for x in key).replace(os.sep, "_"))

    def claim(self, key: RunKey) -> Optional[str]:
        """Take the run for this process; returns None on success, else who holds it ("pid@host")."""
        os.makedirs(self.claims, exist_ok=True)
        path = self._claim_path(key)
        me = f"{os.getpid()}@{socket.gethostname()}"
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:  # the claim appears with its holder in it, never empty
            f.write(me)
        try:
            try:
                os.link(tmp, path)
                return None
            except FileExistsError:
                pass
            # Held, or left by a dead process. Taking a dead claim over happens under the folder lock, so two
            # processes that both find it dead cannot both remove it and both run.
            with self.locked():
                holder = self.holder(key)
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

    def holder(self, key: RunKey) -> Optional[str]:
        """Who holds the run's claim now ("pid@host"), or None: unclaimed, or its process is gone."""
        holder = _read(self._claim_path(key))
        return holder if holder and not _dead(holder) else None

    def release(self, key: RunKey) -> None:
        _remove(self._claim_path(key))


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _dead(holder: str) -> bool:
    """Whether the claim's process is gone (only decidable on this host)."""
    pid, _, host = holder.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
