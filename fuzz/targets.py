"""The fuzz targets: each takes one generated input and returns the outcome's category.

The contract every target checks: an input gives a result or a clean user error
(:class:`~stackvision.images.ImageDecodeError`, :class:`~stackvision.errors.StackvisionError`,
:class:`~stackvision.serve.ApiError`), never another exception, a hang or a crash. A result is
checked too (an RGB image with pixels; a listing whose paths exist inside the images folder; a
dict manifest; a list of (name, bytes) pairs within the limits). Anything else raises
:class:`Finding`, which the runner records with the input that caused it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile

from stackvision.errors import StackvisionError
from stackvision.images import ImageDecodeError, decode


class Finding(Exception):
    """An input that broke the contract."""


# ---------------------------------------------------------------------- images.decode
def decode_target(data: bytes, min_side: int | None) -> str:
    try:
        img = decode(data, "<fuzz>", min_side=min_side)
    except ImageDecodeError as exc:
        return "too_large" if exc.too_large else "ImageDecodeError"
    if img.mode != "RGB" or min(img.size) < 1:
        raise Finding(f"decode returned mode {img.mode} size {img.size}")
    return "ok"


# ---------------------------------------------------------------------- data.from_csv
class CsvWorkspace:
    """A folder with an images folder holding a few files, where each CSV is written."""

    NAMES = ("a.jpg", "b.png", "c d.jpg", "sub/e.jpg", "é.jpg")

    def __init__(self, root: str | None = None):
        self.root = root or tempfile.mkdtemp(prefix="fuzz-csv-")
        self.images = os.path.join(self.root, "images")
        for name in self.NAMES:
            path = os.path.join(self.images, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(b"\xff\xd8\xff")  # never decoded: from_csv only lists
        with open(os.path.join(self.root, "outside.jpg"), "wb") as fh:
            fh.write(b"x")
        self.csv = os.path.join(self.images, "labels.csv")


def csv_target(ws: CsvWorkspace, data: bytes, id_col, label_col, allow_outside: bool) -> str:
    from stackvision.data import from_csv

    with open(ws.csv, "wb") as fh:
        fh.write(data)
    try:
        ls = from_csv(ws.csv, ws.images, id_col, label_col, allow_outside)
    except StackvisionError:
        return "StackvisionError"
    if len(ls.paths) != len(ls.labels) or not ls.paths:
        raise Finding(f"{len(ls.paths)} paths, {len(ls.labels)} labels")
    images = os.path.realpath(ws.images)
    for p, label in zip(ls.paths, ls.labels):
        if not os.path.exists(p):
            raise Finding(f"listed path does not exist: {p!r}")
        if not label or any(ord(c) < 32 or ord(c) == 127 for c in label):
            raise Finding(f"label with control characters accepted: {label!r}")
        inside = os.path.realpath(p).startswith(images + os.sep)
        if not inside and not allow_outside:
            raise Finding(f"path outside the images folder accepted: {p!r}")
    return "ok"


# ---------------------------------------------------------------------- model_dir.read_manifest
class ManifestWorkspace:
    def __init__(self, root: str | None = None):
        self.root = root or tempfile.mkdtemp(prefix="fuzz-manifest-")
        self.model = os.path.join(self.root, "model")
        os.makedirs(self.model)
        self.path = os.path.join(self.model, "manifest.json")


def manifest_target(ws: ManifestWorkspace, data: bytes, files: dict[str, bytes]) -> str:
    from stackvision.model_dir import read_manifest

    shutil.rmtree(ws.model)
    os.makedirs(ws.model)
    for name, content in files.items():
        path = os.path.join(ws.model, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(content)
    with open(ws.path, "wb") as fh:
        fh.write(data)
    try:
        manifest = read_manifest(ws.model)
    except StackvisionError:
        return "StackvisionError"
    if not isinstance(manifest, dict):
        raise Finding(f"manifest is a {type(manifest).__name__}")
    return "ok"


# ---------------------------------------------------------------------- serve/requests.py
def http_target(body: bytes, content_type: str, chunks: int, limits) -> str:
    """:func:`stackvision.serve.requests.read_images` on a request with ``body`` (streamed in
    ``chunks`` pieces), behind the :class:`BodyLimit` middleware as in the service."""
    return asyncio.run(_http(body, content_type, chunks, limits))


async def _http(body: bytes, content_type: str, chunks: int, limits) -> str:
    from starlette.requests import Request

    from stackvision.serve.requests import ApiError, read_images

    headers = [(b"content-type", content_type.encode("latin-1"))] if content_type else []
    headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers,
             "query_string": b"", "state": {}}  # fmt: skip
    step = max(1, -(-len(body) // max(1, chunks)))
    pieces = [body[i : i + step] for i in range(0, len(body), step)] or [b""]

    async def receive():
        if pieces:
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
        return {"type": "http.disconnect"}

    request = Request(scope, receive)
    try:
        images, top_k = await read_images(request, limits)
    except ApiError as exc:
        if not 400 <= exc.status < 500:
            raise Finding(f"ApiError with status {exc.status}") from None
        return f"ApiError {exc.status}"
    if not images or len(images) > limits.max_images:
        raise Finding(f"{len(images)} images accepted")
    for name, data in images:
        if not isinstance(name, str) or not isinstance(data, bytes):
            raise Finding(f"image entry of types {type(name).__name__}, {type(data).__name__}")
        if not 0 < len(data) <= limits.max_upload_bytes:
            raise Finding(f"image of {len(data)} bytes accepted")
    if top_k is not None and (type(top_k) is not int or top_k < 1):
        raise Finding(f"top_k {top_k!r} accepted")
    return "ok"


def prepare_target(data: bytes, pp, limits) -> str:
    """:func:`stackvision.serve.requests.prepare`: what the service does with each image."""
    from stackvision.serve.requests import ApiError, prepare

    try:
        arr = prepare("<fuzz>", data, pp, limits)
    except ApiError as exc:
        if exc.status not in (400, 413):
            raise Finding(f"ApiError with status {exc.status}") from None
        return f"ApiError {exc.status}"
    if arr.shape != (pp.input_size, pp.input_size, 3) or arr.dtype.name != "uint8":
        raise Finding(f"prepared array {arr.dtype} {arr.shape}")
    return "ok"


def valid_manifest(root: str) -> dict:
    """A real manifest to mutate, read from a model directory if one is given."""
    with open(os.path.join(root, "manifest.json"), encoding="utf-8") as fh:
        return json.load(fh)
