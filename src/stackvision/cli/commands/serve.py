"""``stackvision serve``: serve a model over HTTP (JSON API and a web page).

Serve a model over HTTP: POST /predict, GET /model, GET /health, a web page at / and OpenAPI
docs at /docs. Concurrent requests are batched together.
"""

from __future__ import annotations

import sys

from .. import options as opt

#: (flag, type, default, help) of the port and the service's limits
SERVICE_NUMBERS = (
    ("--port", int, 8000, "port"),
    ("--max-batch", int, 32, "most images per forward pass"),
    ("--max-wait-ms", float, 5.0, "how long a batch waits for more requests"),
    ("--max-upload-mb", float, 10.0, "largest image file"),
    ("--max-pixels", int, 40_000_000, "largest image, width x height"),
    ("--max-images", int, 16, "most images per request"),
)


def add_arguments(sv) -> None:
    opt.add_model(sv)
    sv.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)"
    )
    sv.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="require the key in this file (X-API-Key header) on every route but /health "
        "(default: $STACKVISION_API_KEY; none when unset)",
    )
    sv.add_argument(
        "--api-key",
        help="deprecated: the key shows in ps to every account; use $STACKVISION_API_KEY or "
        "--api-key-file",
    )
    opt.add_numbers(sv, SERVICE_NUMBERS)
    sv.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level; tracebacks of server errors are logged at debug (default: info)",
    )
    sv.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    opt.add_weights(sv)


def run(args) -> int:
    from ...serve import API_KEY_ENV, LOOPBACK, Limits, serve
    from ...serve.auth import resolve_key

    api_key, warnings = resolve_key(args.api_key, args.api_key_file)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.host not in LOOPBACK and not api_key:
        print(
            f"warning: serving on {args.host} without an API key: anyone who can reach this "
            f"address can use the model (set {API_KEY_ENV} or --api-key-file)",
            file=sys.stderr,
        )
    limits = Limits(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_images=args.max_images,
    )

    def banner(host: str, port: int) -> None:
        print(
            f"serving {args.model} on http://{host}:{port}/ (API docs: /docs"
            f"{', API key required' if api_key else ''})",
            file=sys.stderr,
            flush=True,
        )

    serve(
        args.model,
        host=args.host,
        port=args.port,
        on_listen=banner,
        api_key=api_key,
        limits=limits,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        log_level=args.log_level,
        weights=dict(args.weights or []),
        device=args.device,
    )
    return 0
