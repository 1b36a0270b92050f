"""Reading images out of a ``/predict`` request, within the limits, and preparing them.

Two body formats: multipart field ``file`` (repeatable) or JSON ``{"images": ["<base64>", ...]}``.
Every limit is checked before the work it protects: the body size while it streams in
(:class:`BodyLimit`), the file size before decoding, the pixel count from the image header before
the pixels are decoded. Each violation is an :class:`ApiError` naming the limit.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np

from ..export import prepare_image
from ..images import ImageDecodeError, probe
from ..preprocess import Preprocess

FORMATS_HINT = "send a JPEG, PNG, WebP, BMP, GIF or TIFF file"


@dataclass(frozen=True)
class Limits:
    """What one request may send. Anything over a limit gets a 413 naming the limit."""

    max_upload_bytes: int = 10 * 1024 * 1024  # per image (encoded)
    max_pixels: int = 40_000_000  # per image (width x height, read from the header)
    max_images: int = 16  # per request

    @property
    def max_request_bytes(self) -> int:
        # base64 inflates by 4/3; multipart adds headers per part.
        return self.max_images * (self.max_upload_bytes * 4 // 3 + 4096) + 65536


class ApiError(Exception):
    """A client error: HTTP status, what is wrong, and what to do."""

    def __init__(self, status: int, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.status, self.problem, self.fix = status, problem, fix

    def body(self, request_id: str | None = None) -> dict:
        return {
            "error": self.problem,
            "fix": self.fix,
            "status": self.status,
            "request_id": request_id,
        }


def too_many(n: int, limits: Limits) -> ApiError:
    return ApiError(
        413,
        f"{n} images in one request, over the limit of {limits.max_images}",
        "split them over several requests",
    )


# ---------------------------------------------------------------------- the body size
class _TooLarge(BaseException):  # BaseException: no handler on the way may swallow it
    pass


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limits.max_request_bytes``, declared in
    Content-Length or streamed (chunked uploads declare nothing), before anything parses it."""

    def __init__(self, app, limits: Limits):
        self.app, self.limit = app, limits.max_request_bytes
        self.error = ApiError(
            413,
            f"request body over the limit of {self.limit} bytes",
            f"send at most {limits.max_images} images of at most {limits.max_upload_bytes} "
            "bytes each",
        )

    async def _reject(self, scope, receive, send):
        from starlette.responses import JSONResponse

        body = self.error.body(scope.get("state", {}).get("request_id"))
        resp = JSONResponse(body, status_code=413, headers={"Connection": "close"})
        await resp(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cl = dict(scope.get("headers") or []).get(b"content-length", b"")
        if cl.isdigit() and int(cl) > self.limit:
            return await self._reject(scope, receive, send)
        total, started = 0, False

        async def limited_receive():
            nonlocal total
            msg = await receive()
            if msg["type"] == "http.request":
                total += len(msg.get("body", b""))
                if total > self.limit:
                    raise _TooLarge()
            return msg

        async def tracked_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._reject(scope, receive, send)


# ---------------------------------------------------------------------- the body formats
async def read_images(request, limits: Limits) -> tuple[list[tuple[str, bytes]], int | None]:
    """(name, encoded bytes) of every image in the request, and the JSON body's ``top_k`` if any."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        images, top_k = await images_from_multipart(request, limits), None
    elif ctype == "application/json":
        images, top_k = await images_from_json(request, limits)
    else:
        raise ApiError(
            415,
            f"unsupported content type '{ctype or 'none'}'",
            "send multipart/form-data with field 'file', or application/json with base64 'images'",
        )
    if not images:
        raise ApiError(400, "no images in the request", "send at least one image")
    return images, top_k


def check_size(name: str, n: int, limits: Limits) -> None:
    if n > limits.max_upload_bytes:
        raise ApiError(
            413,
            f"image {name} is {n} bytes, over the limit of {limits.max_upload_bytes} bytes",
            "send a smaller image (e.g. resized to 1024 px)",
        )
    if n == 0:
        raise ApiError(400, f"image {name} is empty (0 bytes)", "send the image file's bytes")


async def images_from_multipart(request, limits: Limits) -> list[tuple[str, bytes]]:
    try:
        # One more file than allowed, so "too many" is reported as such, not as a parse error.
        form = await request.form(
            max_files=limits.max_images + 1, max_fields=limits.max_images + 16
        )
    except Exception as exc:
        detail = getattr(exc, "detail", None) or str(exc)
        raise ApiError(
            400 if "Too many" not in detail else 413,
            f"cannot read the multipart body: {detail}",
            f"send up to {limits.max_images} images as multipart field 'file'",
        ) from None
    uploads = form.getlist("file")
    if not uploads:
        others = ", ".join(sorted(set(form.keys()))) or "none"
        raise ApiError(
            400,
            f"no 'file' field in the multipart body (fields: {others})",
            "send each image as multipart field 'file', e.g. curl -F file=@dog.jpg",
        )
    if len(uploads) > limits.max_images:
        raise too_many(len(uploads), limits)
    return [await _read_upload(i, up, limits) for i, up in enumerate(uploads)]


async def _read_upload(i: int, up, limits: Limits) -> tuple[str, bytes]:
    if isinstance(up, str):
        raise ApiError(
            400,
            f"multipart field 'file' #{i + 1} is text, not a file",
            "upload the image as a file part (curl -F file=@dog.jpg)",
        )
    name = up.filename or f"#{i + 1}"
    ctype = (up.content_type or "").split(";")[0].strip().lower()
    if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise ApiError(
            415,
            f"file {name} has content type {ctype}, not an image",
            "upload JPEG, PNG, WebP, BMP, GIF or TIFF images",
        )
    data = await up.read(limits.max_upload_bytes + 1)  # one byte over is enough to say "too big"
    check_size(name, len(data), limits)
    return name, data


async def images_from_json(request, limits: Limits) -> tuple[list[tuple[str, bytes]], int | None]:
    try:
        body = await request.json()
    except Exception:
        raise ApiError(400, "the body is not valid JSON", 'send {"images": ["<base64>"]}') from None
    if not isinstance(body, dict) or not isinstance(body.get("images"), list):
        raise ApiError(
            400,
            "the JSON body has no 'images' list",
            'send {"images": ["<base64>", ...]} or [{"name": ..., "data": "<base64>"}]',
        )
    if len(body["images"]) > limits.max_images:
        raise too_many(len(body["images"]), limits)
    images = [_decode_base64(i, item, limits) for i, item in enumerate(body["images"])]
    top_k = body.get("top_k")
    # bool is an int in Python; JSON's true is not a count
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ApiError(400, f"top_k must be a positive integer, got {top_k!r}", "e.g. 5")
    return images, top_k


def _decode_base64(i: int, item, limits: Limits) -> tuple[str, bytes]:
    name = f"#{i + 1}"
    if isinstance(item, dict):
        name = str(item.get("name") or name)
        item = item.get("data")
    if not isinstance(item, str):
        raise ApiError(400, f"image {name} is not a base64 string", "encode it as base64")
    if item.startswith("data:"):
        item = item.split(",", 1)[-1]
    if len(item) > limits.max_upload_bytes * 4 // 3 + 8:  # too big: say so before decoding
        check_size(name, len(item) * 3 // 4, limits)
    try:
        data = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, f"image {name} is not valid base64", "encode the file bytes as base64"
        ) from None
    check_size(name, len(data), limits)
    return name, data


# ---------------------------------------------------------------------- image preparation
def _too_many_pixels(name: str, detail: str, limits: Limits) -> ApiError:
    return ApiError(
        413,
        f"image {name} has {detail} pixels, over the limit of {limits.max_pixels}",
        "send a smaller image (e.g. resized to 1024 px)",
    )


def prepare(name: str, data: bytes, pp: Preprocess, limits: Limits) -> np.ndarray:
    """The model's uint8 (S, S, 3) input for one encoded image (runs in a worker thread).

    400 for an unreadable or unusable image (corrupt, an absurd aspect ratio), 413 for one over a
    size limit, whether the header says so (``limits.max_pixels``, checked before decoding) or the
    decoder does (Pillow's decompression-bomb limit, memory).
    """
    try:
        _, w, h = probe(data, name)
    except ImageDecodeError as exc:
        if exc.too_large:  # too large for Pillow to even open: over any pixel limit
            raise _too_many_pixels(name, "too many", limits) from None
        raise ApiError(
            400,
            f"image {name} is not a readable image (unknown format or corrupt header)",
            FORMATS_HINT,
        ) from None
    if w * h > limits.max_pixels:
        raise _too_many_pixels(name, f"{w}x{h} = {w * h}", limits)
    try:
        return prepare_image(data, pp)
    except ImageDecodeError as exc:
        if exc.too_large:
            raise ApiError(413, f"image {name}: {exc.reason}", "send a smaller image") from None
        raise ApiError(400, f"image {name}: {exc.reason}", "send an intact image file") from None
    except MemoryError:  # resizing: one request must not take the server down
        raise ApiError(
            413, f"image {name} is too large to prepare", "send a smaller image"
        ) from None


# ---------------------------------------------------------------------- OpenAPI description
_BASE64_IMAGE = {
    "oneOf": [
        {"type": "string", "description": "base64 image bytes"},
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "data": {"type": "string"}},
        },
    ]
}

# /predict reads its body by hand (two formats), so OpenAPI is told what it accepts.
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more images (repeat the field)",
                        }
                    },
                    "required": ["file"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": _BASE64_IMAGE},
                        "top_k": {"type": "integer", "minimum": 1},
                    },
                    "required": ["images"],
                }
            },
        },
    }
}
