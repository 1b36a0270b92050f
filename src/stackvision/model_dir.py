"""The versioned model directory: written atomically, read with a format check.

Layout of ``MODEL/``::

    manifest.json        format, format_version, kind, versions, classes, backbones, head, metrics
    weights.safetensors  every array the model needs (no pickle anywhere)
    metrics.json         validation / CV metrics (same keys as ``evaluate``)
    history.json         per-epoch training history of each trainable head (may be empty)
    report/              report.html and its plots

``format_version`` is bumped whenever a reader of the previous version would misread the directory.
A reader refuses a newer version with a message to upgrade, and reads every older version it knows.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np

from .errors import StackvisionError

FORMAT = "stackvision-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


def write_json(path: str, obj) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


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
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and not os.path.isdir(path):
        raise StackvisionError(
            f"output path exists and is a file: {path}", "choose a folder name for --out"
        )
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **manifest,
            "weights": WEIGHTS,
        }
        save_file(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(tmp, WEIGHTS)
        )
        for name, obj in (files or {}).items():
            write_json(os.path.join(tmp, name), obj)
        if extra is not None:
            extra(tmp)
        write_json(os.path.join(tmp, MANIFEST), manifest)  # last: its presence marks a complete dir
        old = None
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_manifest(path: str) -> dict:
    """The manifest of the model at ``path``, after checking format and version."""
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
        with open(mpath) as fh:
            manifest = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise StackvisionError(
            f"cannot read {mpath}: {exc}", "the model directory is damaged; train it again"
        ) from None
    if manifest.get("format") != FORMAT:
        raise StackvisionError(
            f"{mpath} is not a stackvision manifest", "pass a stackvision model directory"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise StackvisionError(
            f"model {path} has format version {version}; this stackvision reads version {FORMAT_VERSION}",
            "upgrade stackvision (pip install -U stackvision)"
            if isinstance(version, int) and version > FORMAT_VERSION
            else "retrain the model with this stackvision",
        )
    return manifest


def read_tensors(path: str, manifest: dict) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    wpath = os.path.join(path, manifest.get("weights", WEIGHTS))
    if not os.path.isfile(wpath):
        raise StackvisionError(
            f"model weights missing: {wpath}", "the model directory is damaged; train it again"
        )
    return load_file(wpath)
