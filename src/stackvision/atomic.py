"""Atomic writes: a file or a folder appears complete or not at all, and a replaced one survives a
crash until its successor is complete.

Everything is written under a temporary name in the destination's own folder (same filesystem, so
the final ``rename`` is atomic) and renamed into place only when complete. ``tempfile`` creates
those private (0600 files, 0700 folders); what is renamed into place gets the permissions a plain
``open``/``mkdir`` would have given it under the user's umask (0644/0755 under umask 022), so
another account can read a model or an ``.onnx`` file as usual.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import numpy as np

from .errors import StackvisionError
from .outputs import unwritable_reason

_umask_lock = threading.Lock()


def umask() -> int:
    """The process umask, read without changing it where Linux says it (``/proc``), else by the
    set-and-restore dance (under a lock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        old = os.umask(0o022)
        os.umask(old)
    return old


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: 0777 less the umask."""
    return 0o777 & ~umask()


@contextlib.contextmanager
def _writable(path: str) -> Iterator[None]:
    """Where the output's folder cannot take a new entry (no permission, read-only file system,
    not a folder), a user error naming ``path`` instead of a traceback."""
    try:
        yield
    except OSError as exc:
        why = unwritable_reason(path) or exc.strerror or str(exc)
        raise StackvisionError(
            f"cannot write {path}: {why}", "choose a folder you can write to"
        ) from None


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    For writers that take a path (``onnx.save``, ``PIL.Image.save``, safetensors). On an
    exception the temporary file is removed and ``path`` is untouched.
    """
    d = os.path.dirname(os.path.abspath(path))
    with _writable(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", suffix=suffix, dir=d)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, file_mode())  # mkstemp made it 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
    """``open`` for writing whose result appears at ``path`` only once closed without error."""
    with atomic_path(path, os.path.splitext(path)[1]) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str, obj) -> None:
    """Write JSON atomically."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, default=_json_default)


def temp_dir_beside(path: str) -> str:
    """A new empty folder beside ``path`` (hidden, same filesystem) to build its successor in."""
    parent = os.path.dirname(os.path.abspath(path))
    with _writable(path):
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    os.chmod(tmp, dir_mode())  # mkdtemp made it 0700; it becomes the output itself
    return tmp


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    kernel, libc or filesystem cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def replace_dir(tmp: str, path: str) -> None:
    """Move the complete folder ``tmp`` to ``path``, replacing a folder there.

    The old folder stays whole until the new one is in place: an atomic exchange where the
    system offers one, else rename-old-aside, rename-new-in (and the old one back if that fails),
    so a crash at any point leaves the old or the new folder at ``path``, or the old one beside it
    under a ``.old-`` name at worst.
    """
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    parent = os.path.dirname(os.path.abspath(path))
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
    os.rmdir(old)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _usual_modes(root: str) -> None:
    """Give everything under ``root`` the umask's usual modes: some writers (safetensors, mkstemp)
    create private 0600 files, which another account could not read once they are an output."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, fmode)


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield an empty folder to fill; on success it replaces ``path`` (see :func:`replace_dir`).
    On an exception it is removed and ``path`` is untouched."""
    tmp = temp_dir_beside(path)
    try:
        yield tmp
        _usual_modes(tmp)
        replace_dir(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
