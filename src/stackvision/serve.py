"""The HTTP prediction service: FastAPI on uvicorn, with dynamic batching.

Routes (OpenAPI at ``/docs`` and ``/openapi.json``):

* ``POST /predict``: one or more images, as multipart field ``file`` (repeatable) or JSON
  ``{"images": ["<base64>", ...]}``; answers the top-k classes per image.
* ``GET /model``: classes, backbones, head, metrics, input contract, versions, serving stats.
* ``GET /health``: liveness and batching counters (never needs the API key).
* ``GET /``: a web page to try the model (drop an image, see the top-5 classes).

Every image is decoded and prepared in a worker thread (:func:`stackvision.export.prepare_image`,
the same input contract as the ONNX export), then queued. One batching task takes whatever is
queued, waits at most ``max_wait_ms`` for more, up to ``max_batch`` images, and runs a single
forward pass for all of them in the inference thread; concurrent requests therefore share backbone
passes instead of each paying for its own.
"""

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from urllib.parse import quote

import numpy as np

from . import __version__
from .errors import StackvisionError

API_KEY_ENV = "STACKVISION_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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

    def body(self) -> dict:
        return {"error": self.problem, "fix": self.fix, "status": self.status}


# ---------------------------------------------------------------------- dynamic batching
class _Item:
    __slots__ = ("array", "future", "t_queued")

    def __init__(self, array, future):
        self.array, self.future, self.t_queued = array, future, time.perf_counter()


class Batcher:
    """Collects single images from concurrent requests into batches for one forward pass."""

    def __init__(self, predict, max_batch: int = 32, max_wait_ms: float = 5.0):
        self.predict = predict
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.queue: asyncio.Queue[_Item] | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="stackvision-infer")
        self.task: asyncio.Task | None = None
        self.stats = {
            "batches": 0,
            "images": 0,
            "max_batch_seen": 0,
            "batch_sizes": {},
            "inference_seconds": 0.0,
        }

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, array: np.ndarray) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Item(array, fut))
        return await fut

    async def run_now(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch directly in the inference thread (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.predict, batch)

    async def _collect(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        items = [await self.queue.get()]
        deadline = loop.time() + self.max_wait
        while len(items) < self.max_batch:
            try:
                items.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            items = [it for it in items if not it.future.done()]  # client gone
            if not items:
                continue
            t0 = time.perf_counter()
            try:
                batch = np.stack([it.array for it in items])
                proba = await loop.run_in_executor(self.executor, self.predict, batch)
            except Exception as exc:  # reported to every waiting request as a 500
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(exc)
                continue
            n = len(items)
            st = self.stats
            st["batches"] += 1
            st["images"] += n
            st["max_batch_seen"] = max(st["max_batch_seen"], n)
            st["batch_sizes"][str(n)] = st["batch_sizes"].get(str(n), 0) + 1
            st["inference_seconds"] = round(st["inference_seconds"] + time.perf_counter() - t0, 4)
            for it, p in zip(items, proba):
                if not it.future.done():
                    it.future.set_result(p)

    def snapshot(self) -> dict:
        st = dict(self.stats)
        st["batch_sizes"] = dict(sorted(st["batch_sizes"].items(), key=lambda kv: int(kv[0])))
        st["mean_batch"] = round(st["images"] / st["batches"], 3) if st["batches"] else None
        st["queued"] = self.queue.qsize() if self.queue else 0
        st["max_batch"], st["max_wait_ms"] = self.max_batch, self.max_wait * 1000
        return st


# ---------------------------------------------------------------------- the model side
def _predict_fn(model):
    """uint8 (N, S, S, 3) -> probabilities, for any model kind."""
    if hasattr(model, "forward_uint8"):
        return model.forward_uint8
    if hasattr(model, "to_torch_module"):
        import torch

        module = model.to_torch_module().eval()

        def run(batch):
            with torch.inference_mode():
                return module(torch.from_numpy(np.ascontiguousarray(batch))).numpy()

        return run
    raise StackvisionError(
        f"a {type(model).__name__} model cannot be served (no forward_uint8/to_torch_module)",
        "serve a feature stack, a fine-tuned model or an ensemble",
    )


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"stackvision": __version__, "python": platform.python_version()}
    for pkg in ("torch", "timm", "numpy", "fastapi", "uvicorn", "onnxruntime"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _describe(model) -> dict:
    if hasattr(model, "describe"):
        return model.describe()
    manifest = getattr(model, "manifest_", {}) or {}
    return {"kind": manifest.get("kind"), "classes": list(model.classes_)}


def _image_info(data: bytes) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:
        return None


class _TooLarge(BaseException):  # BaseException: no handler on the way may swallow it
    pass


class _BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes, declared or streamed."""

    def __init__(self, app, limit: int, error: ApiError, counters: dict):
        self.app, self.limit, self.error, self.counters = app, limit, error, counters

    async def _reject(self, scope, receive, send):
        from fastapi.responses import JSONResponse

        self.counters["client_errors"] += 1
        resp = JSONResponse(self.error.body(), status_code=413, headers={"Connection": "close"})
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


# ---------------------------------------------------------------------- the app
def create_app(
    model,
    *,
    limits: Limits | None = None,
    api_key: str | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    model_path: str | None = None,
    warmup: bool = True,
):
    """The FastAPI app serving ``model`` (any kind with ``input_preprocess()`` and
    ``forward_uint8()`` or ``to_torch_module()``)."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi.security import APIKeyHeader
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .export import input_contract, prepare_image
    from .images import ImageDecodeError

    limits = limits or Limits()
    pp = model.input_preprocess()
    classes = list(model.classes_)
    batcher = Batcher(_predict_fn(model), max_batch=max_batch, max_wait_ms=max_wait_ms)
    started = time.time()
    counters = {"requests": 0, "images": 0, "client_errors": 0, "server_errors": 0}

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        if warmup:  # build the engines before the first request
            await batcher.run_now(np.zeros((1, pp.input_size, pp.input_size, 3), np.uint8))
        yield
        await batcher.stop()

    app = FastAPI(
        title="stackvision",
        version=__version__,
        description=(
            "Image classification with a stackvision model. POST images to /predict (multipart "
            "field `file`, repeatable, or JSON with base64 images); GET /model describes the "
            "model. When the server has an API key, send it as the `X-API-Key` header (or "
            "`Authorization: Bearer KEY`, or `?api_key=KEY`) on every route but /health."
        ),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False)

    def require_key(request: Request, header_key: str | None = Depends(key_header)) -> None:
        if not api_key:
            return
        given = header_key
        auth = request.headers.get("authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            given = request.query_params.get("api_key")
        if not given:
            raise ApiError(
                401, "missing API key", "send it in the X-API-Key header (or ?api_key=KEY)"
            )
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "wrong API key", "use the key the server was started with")

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        counters["client_errors"] += 1
        headers = {"WWW-Authenticate": "ApiKey"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        counters["client_errors"] += 1
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        msg = f"invalid {where or 'request'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(
            {"error": msg, "fix": "see /docs", "status": 422, "details": jsonable_encoder(errs)},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        counters["client_errors"] += 1
        return JSONResponse(
            {
                "error": str(exc.detail),
                "fix": "see /docs for the routes",
                "status": exc.status_code,
            },
            status_code=exc.status_code,
        )

    # -- request body limit, before any parsing (pure ASGI: counts streamed bytes too)
    too_large = ApiError(
        413,
        f"request body over the limit of {limits.max_request_bytes} bytes",
        f"send at most {limits.max_images} images of at most {limits.max_upload_bytes} bytes each",
    )
    app.add_middleware(
        _BodyLimit, limit=limits.max_request_bytes, error=too_large, counters=counters
    )

    # -- reading images out of the request
    def _check_size(name: str, n: int) -> None:
        if n > limits.max_upload_bytes:
            raise ApiError(
                413,
                f"image {name} is {n} bytes, over the limit of {limits.max_upload_bytes} bytes",
                "send a smaller image (e.g. resized to 1024 px)",
            )
        if n == 0:
            raise ApiError(400, f"image {name} is empty (0 bytes)", "send the image file's bytes")

    async def _images_from_multipart(request: Request) -> list[tuple[str, bytes]]:
        try:
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
            raise ApiError(
                413,
                f"{len(uploads)} images in one request, over the limit of {limits.max_images}",
                "split them over several requests",
            )
        out = []
        for i, up in enumerate(uploads):
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
            data = await up.read(limits.max_upload_bytes + 1)
            _check_size(name, len(data))
            out.append((name, data))
        return out

    async def _images_from_json(request: Request) -> tuple[list[tuple[str, bytes]], int | None]:
        try:
            body = await request.json()
        except Exception:
            raise ApiError(
                400, "the body is not valid JSON", 'send {"images": ["<base64>"]}'
            ) from None
        if not isinstance(body, dict) or not isinstance(body.get("images"), list):
            raise ApiError(
                400,
                "the JSON body has no 'images' list",
                'send {"images": ["<base64>", ...]} or [{"name": ..., "data": "<base64>"}]',
            )
        images = body["images"]
        if len(images) > limits.max_images:
            raise ApiError(
                413,
                f"{len(images)} images in one request, over the limit of {limits.max_images}",
                "split them over several requests",
            )
        out = []
        for i, item in enumerate(images):
            name = f"#{i + 1}"
            if isinstance(item, dict):
                name = str(item.get("name") or name)
                item = item.get("data")
            if not isinstance(item, str):
                raise ApiError(400, f"image {name} is not a base64 string", "encode it as base64")
            if item.startswith("data:"):
                item = item.split(",", 1)[-1]
            if len(item) > limits.max_upload_bytes * 4 // 3 + 8:
                _check_size(name, len(item) * 3 // 4)
            try:
                data = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(
                    400, f"image {name} is not valid base64", "encode the file bytes as base64"
                ) from None
            _check_size(name, len(data))
            out.append((name, data))
        top_k = body.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ApiError(400, f"top_k must be a positive integer, got {top_k!r}", "e.g. 5")
        return out, top_k

    def _prepare(name: str, data: bytes) -> np.ndarray:
        size = _image_info(data)
        if size is None:
            raise ApiError(
                400,
                f"image {name} is not a readable image (unknown format or corrupt header)",
                "send a JPEG, PNG, WebP, BMP, GIF or TIFF file",
            )
        w, h = size
        if w * h > limits.max_pixels:
            raise ApiError(
                413,
                f"image {name} has {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}",
                "send a smaller image",
            )
        try:
            return prepare_image(data, pp)
        except ImageDecodeError as exc:
            raise ApiError(
                400, f"image {name}: {exc.reason}", "send an intact image file"
            ) from None

    # -- routes
    predict_body = {
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
                            "images": {
                                "type": "array",
                                "items": {
                                    "oneOf": [
                                        {"type": "string", "description": "base64 image bytes"},
                                        {
                                            "type": "object",
                                            "properties": {
                                                "name": {"type": "string"},
                                                "data": {"type": "string"},
                                            },
                                        },
                                    ]
                                },
                            },
                            "top_k": {"type": "integer", "minimum": 1},
                        },
                        "required": ["images"],
                    }
                },
            },
        }
    }

    @app.post(
        "/predict",
        dependencies=[Depends(require_key)],
        openapi_extra=predict_body,
        summary="Top-k classes for one or more images",
        responses={
            400: {"description": "bad image or body"},
            401: {"description": "missing or wrong API key"},
            413: {"description": "over a limit"},
            415: {"description": "not an image / unsupported content type"},
        },
    )
    async def predict(
        request: Request,
        top_k: int = Query(5, ge=1, description="classes per image"),
    ):
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            images = await _images_from_multipart(request)
        elif ctype == "application/json":
            images, body_k = await _images_from_json(request)
            top_k = body_k or top_k
        else:
            raise ApiError(
                415,
                f"unsupported content type '{ctype or 'none'}'",
                "send multipart/form-data with field 'file', or application/json with base64 "
                "'images'",
            )
        if not images:
            raise ApiError(400, "no images in the request", "send at least one image")
        arrays = [await run_in_threadpool(_prepare, name, data) for name, data in images]
        t1 = time.perf_counter()
        try:
            probas = await asyncio.gather(*(batcher.submit(a) for a in arrays))
        except Exception as exc:  # a bug or a broken model, not the client's fault
            counters["server_errors"] += 1
            return JSONResponse(
                {"error": f"inference failed: {exc}", "fix": "see the server log", "status": 500},
                status_code=500,
            )
        k = min(top_k, len(classes))
        preds = []
        for (name, _), p in zip(images, probas):
            order = np.argsort(-p)[:k]
            preds.append(
                {
                    "name": name,
                    "top": [{"class": classes[j], "probability": float(p[j])} for j in order],
                }
            )
        counters["requests"] += 1
        counters["images"] += len(images)
        return {
            "predictions": preds,
            "timing_ms": {
                "decode": round((t1 - t0) * 1000, 2),
                "inference": round((time.perf_counter() - t1) * 1000, 2),
            },
        }

    @app.get("/health", summary="Liveness and batching counters (no API key needed)")
    async def health():
        return {
            "status": "ok",
            "uptime_seconds": round(time.time() - started, 1),
            "requests": dict(counters),
            "batching": batcher.snapshot(),
        }

    @app.get("/model", dependencies=[Depends(require_key)], summary="What the model is")
    async def model_info():
        return jsonable_encoder(
            {
                **_describe(model),
                "path": os.path.abspath(model_path) if model_path else None,
                "input": input_contract(model),
                "versions": _versions(),
                "serving": {
                    "limits": asdict(limits) | {"max_request_bytes": limits.max_request_bytes},
                    "api_key_required": bool(api_key),
                    "stats": batcher.snapshot(),
                },
            }
        )

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_key)])
    async def openapi():
        return app.openapi()

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(require_key)])
    async def docs(request: Request):
        q = request.query_params.get("api_key")
        url = "/openapi.json" + (f"?api_key={quote(q, safe='')}" if q else "")
        return get_swagger_ui_html(openapi_url=url, title="stackvision API")

    page = resources.files("stackvision").joinpath("static/index.html").read_text("utf-8")

    @app.get("/", include_in_schema=False, dependencies=[Depends(require_key)])
    async def index():
        return HTMLResponse(page)

    app.state.batcher = batcher
    app.state.counters = counters
    return app


def serve(
    model_path: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: Limits | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    log_level: str = "info",
    **runtime,
) -> None:
    """Load the model at ``model_path`` and serve it until interrupted."""
    import uvicorn

    from .models import load_model

    model = load_model(model_path, **runtime)
    app = create_app(
        model,
        limits=limits,
        api_key=api_key,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        model_path=model_path,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
