"""The FastAPI app: wiring, routes, request ids and error accounting, and :func:`serve`.

The service talks to a model only through the model contract every kind implements:
``classes_``, ``input_preprocess()`` (the fixed-size uint8 input), ``forward_uint8(batch)``
(calibrated probabilities, views and temperature inside) and ``describe()``.

Every request gets an id, sent back in the ``X-Request-ID`` header and in JSON error bodies.
Responses are counted by outcome for ``/health``. An exception that escapes a route (a failed
forward pass, a bug) becomes a JSON 500 and one log line naming the request id; the traceback is
logged only at debug level, so one bad model does not flood the log.
"""

import asyncio  # no `from __future__ import annotations`: FastAPI reads the route annotations
import contextlib
import functools
import json
import logging
import os
import platform
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources

import numpy as np

from .. import __version__
from ..errors import StackvisionError
from ..export import input_contract
from ..threads import blas_threads
from .auth import key_dependency, redact_logs
from .batching import Batcher
from .requests import PREDICT_BODY, ApiError, BodyLimit, Limits, prepare, read_images

try:
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # the service is an optional extra
    raise StackvisionError(
        f"the HTTP service needs FastAPI ({exc})", "pip install 'stackvision[serve]'"
    ) from exc

log = logging.getLogger("stackvision.serve")


class ServerError(Exception):
    """A server-side failure the client is told about: ``what`` failed, because of ``cause``."""

    def __init__(self, what: str, cause: BaseException):
        super().__init__(f"{what}: {cause}")
        self.what, self.cause = what, cause


# ---------------------------------------------------------------------- shared state
class Service:
    """What the routes share: the model (through its contract), limits, batcher, counters."""

    def __init__(
        self, model, *, limits, api_key, max_batch, max_wait_ms, model_path, warmup
    ) -> None:
        self.model = model
        self.classes = list(model.classes_)
        self.preprocess = model.input_preprocess()
        self.limits = limits or Limits()
        self.api_key = api_key
        self.model_path = model_path
        self.warmup = warmup
        self.batcher = Batcher(model.forward_uint8, max_batch=max_batch, max_wait_ms=max_wait_ms)
        self.counters = {"requests": 0, "images": 0, "client_errors": 0, "server_errors": 0}
        self.started = time.time()

    def blank_batch(self, n: int = 1) -> np.ndarray:
        s = self.preprocess.input_size
        return np.zeros((n, s, s, 3), np.uint8)

    async def infer(self, arrays: list[np.ndarray], expected=None) -> list[np.ndarray]:
        """Probabilities for each prepared image, through the batcher."""
        # return_exceptions: wait for every image, so no failed future is left unretrieved.
        results = await asyncio.gather(
            *(self.batcher.submit(a, expected) for a in arrays), return_exceptions=True
        )
        for r in results:
            if isinstance(r, Exception):
                raise ServerError("inference failed", r) from r
            if isinstance(r, BaseException):
                raise r
        return results

    def top(self, name: str, proba: np.ndarray, k: int) -> dict:
        order = np.argsort(-proba)[: min(k, len(self.classes))]
        top = [{"class": self.classes[j], "probability": float(proba[j])} for j in order]
        return {"name": name, "top": top}


def _service(request: Request) -> Service:
    return request.app.state.service


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


# ---------------------------------------------------------------------- request ids, errors
class RequestContext:
    """ASGI middleware, outermost: a request id for every request, each response counted by
    status, and any exception a route lets escape turned into a JSON 500 and one log line."""

    def __init__(self, app, counters: dict):
        self.app, self.counters = app, counters

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = rid  # request.state.request_id
        status = None

        async def send_with_id(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                self._count(status)
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(msg)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # handled here, so the server logs no second traceback
            _log_failure(scope, rid, exc)
            if status is None:
                await _server_error(exc, rid)(scope, receive, send_with_id)
            elif status < 500:  # broke after the headers went out: still a server failure
                self.counters["server_errors"] += 1

    def _count(self, status: int) -> None:
        if status >= 500:
            self.counters["server_errors"] += 1
        elif status >= 400:
            self.counters["client_errors"] += 1


def _log_failure(scope, rid: str, exc: Exception) -> None:
    cause = exc.cause if isinstance(exc, ServerError) else exc
    what = exc.what if isinstance(exc, ServerError) else "unexpected error"
    line = f"request {rid}: {scope.get('method')} {scope.get('path')} -> 500, {what}: "
    line += " ".join(f"{type(cause).__name__}: {cause}".split())  # one line, whatever the message
    log.error(line, exc_info=exc if log.isEnabledFor(logging.DEBUG) else None)


def _server_error(exc: Exception, rid: str) -> JSONResponse:
    # A ServerError's message is meant for the client; anything else may hold internals.
    problem = str(exc) if isinstance(exc, ServerError) else "internal server error"
    body = {
        "error": problem,
        "fix": f"see the server log for request {rid}",
        "status": 500,
        "request_id": rid,
    }
    return JSONResponse(body, status_code=500)


async def _api_error(request: Request, exc: ApiError):
    headers = {"WWW-Authenticate": "ApiKey"} if exc.status == 401 else None
    return JSONResponse(exc.body(request_id(request)), status_code=exc.status, headers=headers)


async def _validation_error(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
    msg = f"invalid {where or 'request'}: {first.get('msg', 'invalid value')}"
    body = ApiError(422, msg, "see /docs").body(request_id(request))
    return JSONResponse(body | {"details": jsonable_encoder(errs)}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException):
    err = ApiError(exc.status_code, str(exc.detail), "see /docs for the routes")
    return JSONResponse(err.body(request_id(request)), status_code=exc.status_code)


# ---------------------------------------------------------------------- routes
async def predict(
    request: Request,
    top_k: int = Query(5, ge=1, description="classes per image"),
):
    svc = _service(request)
    t0 = time.perf_counter()
    with svc.batcher.expecting(1) as expected:  # a batch being collected waits for this one
        images, body_k = await read_images(request, svc.limits)
        expected.set(len(images))
        top_k = body_k or top_k
        arrays = [
            await run_in_threadpool(prepare, name, data, svc.preprocess, svc.limits)
            for name, data in images
        ]
        t1 = time.perf_counter()
        probas = await svc.infer(arrays, expected)
    svc.counters["requests"] += 1
    svc.counters["images"] += len(images)
    return {
        "predictions": [svc.top(name, p, top_k) for (name, _), p in zip(images, probas)],
        "timing_ms": {
            "decode": round((t1 - t0) * 1000, 2),
            "inference": round((time.perf_counter() - t1) * 1000, 2),
        },
    }


async def health(request: Request):
    svc = _service(request)
    return {
        "status": "ok",
        "uptime_seconds": round(time.time() - svc.started, 1),
        "requests": dict(svc.counters),
        "batching": svc.batcher.snapshot(),
    }


async def model_info(request: Request):
    svc = _service(request)
    limits = svc.limits
    return jsonable_encoder(
        {
            **svc.model.describe(),
            "path": os.path.abspath(svc.model_path) if svc.model_path else None,
            "input": input_contract(svc.preprocess),
            "versions": _versions(),
            "serving": {
                "limits": asdict(limits) | {"max_request_bytes": limits.max_request_bytes},
                "api_key_required": bool(svc.api_key),
                "stats": svc.batcher.snapshot(),
                "blas_threads": blas_threads(),
            },
        }
    )


async def openapi(request: Request):
    return request.app.openapi()


# Swagger UI fetches the (keyed) spec and tries requests with the key the web page stored for this
# tab, as a header; without one it asks once. The key never goes into a URL.
_DOCS_KEY_JS = """url: '/openapi.json',
    requestInterceptor: (req) => {
        let key = sessionStorage.getItem("stackvision-key") || "";
        if (!key && NEED_KEY && !window.__askedKey) {
            window.__askedKey = true;
            key = (prompt("API key for this server") || "").trim();
            if (key) sessionStorage.setItem("stackvision-key", key);
        }
        if (key && !req.headers["X-API-Key"]) req.headers["X-API-Key"] = key;
        return req;
    },"""


async def docs(request: Request):
    page = get_swagger_ui_html(openapi_url="/openapi.json", title="stackvision API")
    need = json.dumps(bool(_service(request).api_key))
    body = page.body.decode().replace(
        "url: '/openapi.json',", _DOCS_KEY_JS.replace("NEED_KEY", need), 1
    )
    return HTMLResponse(body)


async def index():
    return HTMLResponse(_page())


@functools.cache
def _page() -> str:
    return resources.files("stackvision").joinpath("static/index.html").read_text("utf-8")


@functools.cache
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"stackvision": __version__, "python": platform.python_version()}
    for pkg in ("torch", "timm", "numpy", "fastapi", "uvicorn", "onnxruntime"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


PREDICT_RESPONSES = {
    400: {"description": "bad image or body"},
    401: {"description": "missing or wrong API key"},
    413: {"description": "over a limit"},
    415: {"description": "not an image / unsupported content type"},
    500: {"description": "server-side failure; the log names the request id"},
}


def _add_routes(app: FastAPI, require_key) -> None:
    keyed = [Depends(require_key)]
    app.add_api_route(
        "/predict",
        predict,
        methods=["POST"],
        dependencies=keyed,
        openapi_extra=PREDICT_BODY,
        summary="Top-k classes for one or more images",
        responses=PREDICT_RESPONSES,
    )
    app.add_api_route(
        "/health", health, summary="Liveness, request and batching counters (no API key needed)"
    )
    app.add_api_route("/model", model_info, dependencies=keyed, summary="What the model is")
    app.add_api_route("/openapi.json", openapi, include_in_schema=False, dependencies=keyed)
    # Static pages, open: they hold no data and send the key as a header from JavaScript.
    app.add_api_route("/docs", docs, include_in_schema=False)
    app.add_api_route("/", index, include_in_schema=False)


# ---------------------------------------------------------------------- the app
@asynccontextmanager
async def _lifespan(app: FastAPI):
    svc: Service = app.state.service
    await svc.batcher.start()
    try:
        if svc.warmup:  # build the engines before the first request
            await svc.batcher.run_now(svc.blank_batch())
        yield
    finally:
        await svc.batcher.stop()


DESCRIPTION = (
    "Image classification with a stackvision model. POST images to /predict (multipart "
    "field `file`, repeatable, or JSON with base64 images); GET /model describes the "
    "model. When the server has an API key, send it as the `X-API-Key` header (or "
    '`Authorization: Bearer KEY`) on every route but /health ("Authorize" on this page). '
    "`?api_key=KEY` is still accepted but discouraged: URLs end up in logs and histories "
    "(the server's own log shows it as `[redacted]`). "
    "Every response carries an `X-Request-ID` header; error bodies repeat it as `request_id`."
)


def create_app(
    model,
    *,
    limits: Limits | None = None,
    api_key: str | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    model_path: str | None = None,
    warmup: bool = True,
) -> FastAPI:
    """The FastAPI app serving ``model``, any kind implementing the model contract."""
    svc = Service(
        model,
        limits=limits,
        api_key=api_key,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        model_path=model_path,
        warmup=warmup,
    )
    app = FastAPI(
        title="stackvision",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,  # /docs and /openapi.json are added by hand, behind the API key
        redoc_url=None,
        openapi_url=None,
        lifespan=_lifespan,
    )
    app.state.service = svc
    app.state.batcher, app.state.counters = svc.batcher, svc.counters
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # The body limit acts before any parsing; RequestContext, added last, wraps everything, so
    # even a 413 from the body limit carries a request id and is counted.
    app.add_middleware(BodyLimit, limits=svc.limits)
    app.add_middleware(RequestContext, counters=svc.counters)
    _add_routes(app, key_dependency(api_key))
    redact_logs(api_key)  # also when the caller runs uvicorn itself; serve() redoes it after
    return app
