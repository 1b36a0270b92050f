"""The versioned model directory: written atomically, read with a format check.

Layout of ``MODEL/``::

    manifest.json        format, format_version, kind, versions, classes, backbones, head, metrics
    weights.safetensors  every array the model needs (no pickle anywhere)
    metrics.json         validation / CV metrics (same keys as ``evaluate``)
    history.json         per-epoch training history of each trainable head (may be empty)
    report/              report.html and its plots
    training_images.txt  content hashes (blake2b-128, as the feature cache keys images) of the
                         images the model was fitted on, sorted, one a line; optional (models
                         from before it have none). ``ensemble`` leaves a member's images out
                         of its fit (refuses mostly-overlapping data), ``evaluate`` warns

``format_version`` is bumped whenever a reader of the previous version would misread the directory.
A reader refuses a newer version with a message to upgrade, and reads every older version it knows.
Reading validates everything before a kind's ``load`` uses it (:mod:`stackvision.model_schema`):
``read_manifest`` the manifest's keys and types and the paths it names, ``read_tensors`` the weights'
names, shapes and values; a damaged directory raises :class:`StackvisionError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

from .atomic import atomic_dir, write_json
from .errors import StackvisionError
from .model_schema import FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, inside, validate_manifest
from .model_tensors import validate_tensors
from .outputs import is_ours

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "WEIGHTS",
    "read_manifest",
    "read_tensors",
    "write_json",
    "write_model_dir",
]


def write_model_dir(
    path: str,
    manifest: dict,
    tensors: dict[str, np.ndarray],
    files: dict[str, object] | None = None,
    extra: Callable[[str], None] | None = None,
) -> str:
    """Write a complete model directory to ``path`` atomically.

    Everything goes into a sibling temp folder first; only a finished folder is renamed into place
    (an existing model at ``path`` is replaced only then). ``files`` maps names to JSON objects;
    ``extra(tmpdir)`` may add more (the report).
    """
    from safetensors.numpy import save_file

    path = os.path.abspath(path)
    if os.path.lexists(path) and not is_ours(path, "model") and not _empty_dir(path):
        # the library never replaces what it did not write (the CLI says so earlier, with flags)
        raise StackvisionError(
            f"{path} exists and is not a stackvision model directory; it is never replaced",
            "save the model to a new folder",
        )
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "weights": WEIGHTS}
    with atomic_dir(path) as tmp:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(tmp, WEIGHTS)
        )
        for name, obj in (files or {}).items():
            write_json(os.path.join(tmp, name), obj)
        if extra is not None:
            extra(tmp)
        write_json(os.path.join(tmp, MANIFEST), manifest)  # last: its presence marks a complete dir
    return path


def _empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def read_manifest(path: str) -> dict:
    """The manifest of the model at ``path``, after checking format and version, then its keys
    and the paths it names (see :mod:`stackvision.model_schema`); ensemble members recursively."""
    if not os.path.exists(path):
        raise StackvisionError(
            f"model not found: {path}", "pass a folder written by 'stackvision train'"
        )
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise StackvisionError(
            f"{path} is not a stackvision model directory (no {MANIFEST})",
            "pass a folder written by 'stackvision train' or 'stackvision finetune'",
        )
    try:
        with open(mpath, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise StackvisionError(
            f"cannot read {mpath}: {str(exc)[:160]}",
            "the model directory is damaged; train or copy it again",
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StackvisionError(
            f"{mpath} is not a stackvision manifest", "pass a stackvision model directory"
        )
    version = manifest.get("format_version")
    if type(version) is not int or version > FORMAT_VERSION or version < 1:
        raise StackvisionError(
            f"model {path} has format version {version}; this stackvision reads versions 1 to "
            f"{FORMAT_VERSION}",
            "upgrade stackvision (pip install -U stackvision)"
            if isinstance(version, int) and version > FORMAT_VERSION
            else "retrain the model with this stackvision",
        )
    validate_manifest(path, manifest, mpath, read_manifest)
    return manifest


def read_tensors(path: str, manifest: dict) -> dict[str, np.ndarray]:
    """Every array in the model's weights file, checked against ``manifest`` (names, shapes,
    class count, finite values; see :mod:`stackvision.model_schema`)."""
    from safetensors.numpy import load_file

    mpath = os.path.join(path, MANIFEST)
    wpath = inside(path, manifest.get("weights", WEIGHTS), "weights", mpath)
    if not os.path.isfile(wpath):
        raise StackvisionError(
            f"model weights missing: {wpath}", "the model directory is damaged; train it again"
        )
    try:
        tensors = load_file(wpath)
    except Exception as exc:  # safetensors raises its own error type, or OSError/ValueError
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise StackvisionError(
            f"cannot read the weights {wpath}: {reason}",
            "the model directory is damaged (a truncated copy?); train or copy it again",
        ) from None
    validate_tensors(path, manifest, tensors, wpath)
    return tensors


TRAINING_IMAGES = "training_images.txt"


def file_hashes(paths) -> list[str | None]:
    """The feature cache's key of each image file (:func:`stackvision.cache.content_hash` of its
    bytes), in order; None for a file that cannot be read (reported where it is decoded)."""
    from .cache import content_hash

    out: list[str | None] = []
    for p in paths:
        try:
            with open(p, "rb") as fh:
                out.append(content_hash(fh.read()))
        except OSError:
            out.append(None)
    return out


def write_training_hashes(folder: str, hashes) -> None:
    """``training_images.txt`` in ``folder`` (a model directory being written)."""
    with open(os.path.join(folder, TRAINING_IMAGES), "w", encoding="ascii") as fh:
        fh.write("".join(f"{h}\n" for h in sorted(hashes)))


def read_training_hashes(path: str) -> frozenset[str] | None:
    """The content hashes of the images the model at ``path`` was fitted on, or None when the
    directory does not say (older models)."""
    f = os.path.join(path, TRAINING_IMAGES)
    if not os.path.isfile(f):
        return None
    try:
        with open(f, encoding="ascii") as fh:
            hashes = frozenset(line.strip() for line in fh if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise StackvisionError(
            f"cannot read {f}: {exc}", "the model directory is damaged"
        ) from None
    if any(len(h) != 32 or not all(c in "0123456789abcdef" for c in h) for h in hashes):
        raise StackvisionError(
            f"{f} is not a list of image hashes", "the model directory is damaged"
        )
    return hashes


def training_overlap(path: str, images) -> int | None:
    """How many of the image files ``images`` the model at ``path`` was fitted on (by content,
    so a copy or a renamed file counts); None when the directory does not record it."""
    seen = read_training_hashes(path)
    return None if seen is None else sum(h in seen for h in file_hashes(images) if h)
