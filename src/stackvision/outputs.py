"""Where a command may write: never over anything stackvision did not write.

Every ``--out`` is checked by :func:`check_out` before any work starts (including that its
folder, or the nearest existing one above it, can take a new file):

* a path that does not exist (or an empty folder, for folder outputs) is written;
* an existing output of the same kind that stackvision wrote (a model directory whose manifest
  says so, an evaluation folder, an ONNX file with stackvision metadata, a predictions CSV, an
  augmentation preview PNG) is replaced only with ``--overwrite``;
* anything else is refused, always: a non-empty folder or a file that is not ours, ``/``, the home
  folder, the feature cache, and any path that contains or lies inside the command's inputs
  (the data, the labels CSV, the model being read).

Replacing is atomic (:mod:`stackvision.atomic`): the old output stays whole until the new one is
complete.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile

from .errors import StackvisionError

MODEL_FORMAT = "stackvision-model"
EVALUATION_FORMAT = "stackvision-evaluation"
PNG_SOFTWARE = "stackvision augment-preview"
DOCTOR_FORMAT = "stackvision-doctor"  # as doctor_output.DOCTOR_FORMAT
SHARDS_FORMAT = "stackvision-shards-v1"  # as shards.SHARDS_FORMAT (not imported: numpy-free check)

#: kind -> (is a folder, words for messages)
KINDS = {
    "model": (True, "a stackvision model directory"),
    "evaluation": (True, "a stackvision evaluation folder"),
    "onnx": (False, "an ONNX file exported by stackvision"),
    "csv": (False, "a predictions CSV written by stackvision"),
    "png": (False, "an augmentation preview written by stackvision"),
    "shards": (True, "a sharded feature set written by stackvision"),
    "doctor": (True, "a stackvision doctor folder"),
}


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _inside(child: str, parent: str) -> bool:
    """``child`` is ``parent`` or lies below it (both real, absolute paths)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _manifest_format(folder: str, name: str = "manifest.json") -> str | None:
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            m = json.load(fh)
    except (OSError, ValueError):
        return None
    return m.get("format") if isinstance(m, dict) else None


def _is_our_onnx(path: str) -> bool:
    try:
        import onnx

        proto = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - anything onnx cannot parse is not ours
        return False
    return any(p.key == "stackvision.classes" for p in proto.metadata_props)


def _is_our_csv(path: str) -> bool:
    """Our predictions: ``path,class_1,prob_1,...`` or ``id,<class>...`` with probability cells."""
    try:
        with open(path, newline="", encoding="utf-8", errors="strict") as fh:
            rows = []
            for row in csv.reader(fh):
                rows.append(row)
                if len(rows) > 20:
                    break
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    if not rows:
        return False
    header, body = rows[0], rows[1:]
    if header[:3] == ["path", "class_1", "prob_1"]:
        probs = [r[i] for r in body for i in range(2, len(r), 2)]
    elif header[:1] == ["id"] and len(header) >= 3:
        probs = [v for r in body for v in r[1:]]
    else:
        return False
    try:
        return all(0.0 <= float(v) <= 1.0 for v in probs)
    except ValueError:
        return False


def _is_our_png(path: str) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == PNG_SOFTWARE
    except Exception:  # noqa: BLE001 - unreadable means not ours
        return False


def is_ours(path: str, kind: str) -> bool:
    """Whether ``path`` is an existing output of ``kind`` that stackvision wrote."""
    if kind == "model":
        return os.path.isdir(path) and _manifest_format(path) == MODEL_FORMAT
    if kind == "evaluation":
        return os.path.isdir(path) and _manifest_format(path) == EVALUATION_FORMAT
    if kind == "doctor":
        return os.path.isdir(path) and _manifest_format(path, "doctor.json") == DOCTOR_FORMAT
    if kind == "shards":
        return os.path.isdir(path) and _manifest_format(path, "index.json") == SHARDS_FORMAT
    if not os.path.isfile(path):
        return False
    return {"onnx": _is_our_onnx, "csv": _is_our_csv, "png": _is_our_png}[kind](path)


def _refuse(problem: str, fix: str) -> StackvisionError:
    return StackvisionError(problem, fix)


def check_out(
    path: str,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: tuple[str | None, ...] | list[str | None] = (),
    cache_dir: str | None = None,
    flag: str = "--out",
) -> str:
    """Refuse an output path that would destroy something we did not write, or that cannot be
    written (found now, not after an hour of work); returns it absolute.

    ``inputs``: the paths the command reads (data folders, CSVs, images, model directories);
    ``cache_dir``: the feature cache in use. Raises :class:`StackvisionError` (exit 2 in the CLI).
    """
    out = _check_out(path, kind, overwrite, inputs, cache_dir, flag)
    _check_writable(out, flag)
    return out


def unwritable_reason(path: str) -> str | None:
    """Why no new file can be created beside ``path`` (outputs are written beside themselves,
    :mod:`.atomic`; ``path`` need not exist), or None: a probe file is made and removed in its
    folder, or in the nearest folder above it that exists (nothing is created for good)."""
    parent = os.path.dirname(_real(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):  # e.g. --out notes.txt/model
        return f"{parent} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".stackvision-write-test-", dir=parent)
    except OSError as exc:
        return f"{exc.strerror or exc} (in {parent})"
    os.close(fd)
    os.unlink(probe)
    return None


def _check_writable(path: str, flag: str) -> None:
    why = unwritable_reason(path)
    if why:
        raise _refuse(f"{flag} {path} cannot be written: {why}", "choose a folder you can write to")


def _check_out(path, kind, overwrite, inputs, cache_dir, flag) -> str:
    is_dir, words = KINDS[kind]
    if not path:
        raise _refuse(f"{flag} is empty", f"give {flag} a {'folder' if is_dir else 'file'} name")
    real = _real(path)
    home = _real("~")
    if real == os.sep or real == home or _inside(home, real):
        raise _refuse(
            f"{flag} {path} is {'the root folder' if real == os.sep else 'your home folder or above it'}",
            f"give {flag} a new {'folder' if is_dir else 'file'} name",
        )
    for item in inputs:
        if not item:
            continue
        src = _real(item)
        if _inside(real, src) or _inside(src, real):
            where = "is" if real == src else ("is inside" if _inside(real, src) else "contains")
            raise _refuse(
                f"{flag} {path} {where} the input {item}; writing there could destroy or pollute it",
                f"give {flag} a path outside the input data and models",
            )
    if cache_dir:
        cache = _real(cache_dir)
        if _inside(real, cache) or _inside(cache, real):
            raise _refuse(
                f"{flag} {path} {'is inside' if _inside(real, cache) else 'contains'} the feature "
                f"cache {cache_dir}",
                f"give {flag} a path outside the cache",
            )
    if not os.path.lexists(path):
        return os.path.abspath(path)
    if os.path.islink(path) and not os.path.exists(path):
        raise _refuse(
            f"{flag} {path} is a broken symbolic link", "remove it or choose another name"
        )
    if is_dir and os.path.isdir(real) and not os.listdir(real):
        return os.path.abspath(path)  # an empty folder: nothing to lose
    if is_ours(real, kind):
        if overwrite:
            return os.path.abspath(path)
        raise _refuse(
            f"{flag} {path} already exists ({words})",
            f"pass --overwrite to replace it, or choose another {flag}",
        )
    what = "folder" if os.path.isdir(real) else "file" if os.path.isfile(real) else "special file"
    raise _refuse(
        f"{flag} {path} is an existing {what} that stackvision did not write "
        f"(it is not {words}); it is never replaced",
        f"choose a new {'folder' if is_dir else 'file'} name for {flag}",
    )
