"""``serve()``: bind the address, load the model, run uvicorn until interrupted.

The socket is bound before anything else, so a wrong ``--host`` or a port in use is a one-line
error at once, not a log line after the model has loaded; uvicorn is then given that socket, so
``--port 0`` (any free port) is reported with the port the system chose.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from ..errors import StackvisionError
from ..threads import limit_blas_threads
from .app import create_app, log
from .auth import redact_logs
from .requests import Limits


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (not yet listening), or a user error."""
    sock = None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(addr)
    except (OSError, UnicodeError) as exc:
        if sock is not None:
            sock.close()
        why = getattr(exc, "strerror", None) or str(exc)
        raise StackvisionError(
            f"cannot listen on {host}:{port}: {why}",
            "give --host an address of this machine (127.0.0.1 for this machine only, 0.0.0.0 "
            "for all) and a free --port (below 1024 needs root)",
        ) from None
    sock.set_inheritable(True)
    return sock


def _log_to_stderr(level: str) -> None:
    """uvicorn configures only its own loggers; the service's log lines go to stderr alike."""
    from uvicorn.config import LOG_LEVELS
    from uvicorn.logging import DefaultFormatter

    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(LOG_LEVELS.get(level, logging.INFO))
    log.propagate = False  # the handler above prints it; a root handler would print it twice


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
    on_listen: Callable[[str, int], None] | None = None,
    **runtime,
) -> None:
    """Load the model at ``model_path`` and serve it until interrupted; ``on_listen(host, port)``
    is called once the model is loaded, with the port actually bound."""
    import uvicorn

    from ..models import load_model

    sock = listen_socket(host, port)
    try:
        limit_blas_threads(1)  # the engines use the cores; see stackvision.threads
        model = load_model(model_path, **runtime)
        app = create_app(
            model,
            limits=limits,
            api_key=api_key,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            model_path=model_path,
        )
        _log_to_stderr(log_level)
        bound = sock.getsockname()[1]
        config = uvicorn.Config(
            app, host=host, port=bound, log_level=log_level, timeout_graceful_shutdown=5
        )  # configures uvicorn's loggers: the key filter goes on after
        redact_logs(api_key)
        server = uvicorn.Server(config)
        if on_listen is not None:
            on_listen(host, bound)
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:  # uvicorn has logged why
        raise StackvisionError(
            f"the server could not start on {host}:{bound}", "see the message above"
        )
