"""Crash-safe folders: every save of the package (a knowledge store, a run, a CLIP predictor) writes a complete
new folder beside its target and swaps it in (:func:`atomic_folder`); :func:`sha256_file` checksums what was
written. Standard library only."""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence


class SaveFailed(OSError):
    """A save that could not complete (full disk, no permission ...); the folder saved to was not changed."""


def sha256_file(path: str) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_folder(directory: str, markers: Sequence[str] = (),
                  carry: Optional[Callable[[str], bool]] = None) -> Iterator[str]:
    """Yield a new, empty folder beside ``directory``; once the block completes, it replaces ``directory``.

    An existing ``directory`` is replaced only if it is empty or holds one of
    ``markers`` (the files that show it was saved like this before): a folder of
    other files is refused, not wiped. ``carry``: given a file's '/'-separated path relative to the old folder,
    whether it is not the save's own (a user's notes, predictions): such files the block did not write are
    copied into the new folder before the swap, so a save keeps them.

    The new folder (same parent, unique hidden name) is fsynced, then swapped in: in
    one step where the system can (Linux ``renameat2(RENAME_EXCHANGE)``), else the
    old folder is renamed aside, the new one renamed in, and the old one removed.
    If the block fails, the new folder is removed and ``directory`` is untouched; a
    failed write is re-raised as :class:`SaveFailed` (an ``OSError``) saying so. A process killed midway
    leaves ``directory`` as it was (and a ``.NAME.saving-*`` folder beside it, safe to delete).
    """
    target = os.path.realpath(directory)
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"cannot save to {directory!r}: it is a file, not a folder")
    cwd = os.path.realpath(os.getcwd())
    if os.path.commonpath([cwd, target]) == target:
        raise SaveFailed(errno.EINVAL, f"cannot save to {directory!r}: it is the current folder or holds it, and a "
                                       "save replaces the whole folder; save to a folder of its own (e.g. 'run/')")
    if os.path.isdir(target) and os.path.ismount(target):
        raise SaveFailed(errno.EBUSY, f"cannot save to {directory!r}: it is a mount point, which a save cannot "
                                      "replace; save to a folder inside it")
    present = sorted(os.listdir(target)) if os.path.isdir(target) else []
    if present and not set(markers) & set(present):
        raise FileExistsError(f"cannot save to {directory!r}: it holds other files ({present[:8]}), and a save "
                              f"replaces the whole folder; save to a new or empty folder")
    parent, name = os.path.split(target)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name[:64]}.saving-", dir=parent)  # a long name leaves room for the suffix
    except OSError as e:
        raise SaveFailed(e.errno, f"saving to {directory!r} failed ({e.strerror or e}); nothing was changed") \
            from None
    try:
        os.chmod(tmp, os.stat(target).st_mode & 0o7777 if os.path.isdir(target) else _folder_mode())
        yield tmp
        if carry is not None and os.path.isdir(target):
            _carry_over(target, tmp, carry)
        _fsync_tree(tmp)
        _swap_in_folder(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "reason", None) or str(e.strerror or e)  # a nested save's reason, or the OS's
        raise _save_failed(directory, e.errno, reason.replace(tmp, directory)) from (e.__cause__ or e)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError"):
            raise
        # a writer that reports its own way (FAISS: RuntimeError, safetensors: SafetensorError), naming temp paths
        text = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise _save_failed(directory, errno.EIO, f"{type(e).__name__}: {text}".replace(tmp, directory)) from e


    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_failed(directory: str, code, reason: str) -> "SaveFailed":
    err = SaveFailed(code, f"saving to {directory!r} failed ({reason}); nothing was changed: the folder holds "
                           "what it held before")
    err.reason = reason  # an outer save (a run holding this store) reports it under its own folder
    return err


def _carry_over(old: str, new: str, carry: Callable[[str], bool]) -> None:
    """Copy the files of ``old`` that ``carry`` names (and ``new`` lacks) into ``new``, links as links."""
    for folder, _, names in os.walk(old):
        for n in names:
            src = os.path.join(folder, n)
            rel = os.path.relpath(src, old).replace(os.sep, "/")
            dst = os.path.join(new, *rel.split("/"))
            if not carry(rel) or os.path.lexists(dst):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
            else:
                shutil.copy2(src, dst)


def _folder_mode() -> int:
    """The permissions ``os.makedirs`` gives a new folder: 0o777 minus the umask (mkdtemp's are 0o700)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


def _fsync_tree(root: str) -> None:
    """fsync every file and folder under ``root`` (and ``root``): their bytes are on disk before the swap."""
    for folder, _, names in os.walk(root):
        for n in names:
            fd = os.open(os.path.join(folder, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # systems that cannot open folders (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2``); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _swap_in_folder(new: str, target: str) -> None:
    """Put folder ``new`` at ``target``; the folder that was there is removed."""
    parent = os.path.dirname(target)
    if not os.path.exists(target):
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # it holds the old folder now
    else:
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
        os.rmdir(old)  # a unique free name
        os.rename(target, old)
        try:
            os.rename(new, target)
        except OSError:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)
