"""The API key: where the server gets it, where a client may send it, a constant-time check, and
keeping it out of every log line.

The server takes the key from ``$STACKVISION_API_KEY`` or a file (``--api-key-file``); ``--api-key``
still works but shows the key to every account on the machine (``ps``, ``/proc``), so it warns.
With a key set, every route but ``/health`` and the two static pages (``/`` and ``/docs``, which
hold nothing but HTML and send the key from JavaScript as a header) requires it, as the
``X-API-Key`` header, an ``Authorization: Bearer KEY`` header, or, for old clients, the
``api_key`` query parameter. A key in a URL ends up in logs and browser history: the service's
log lines (uvicorn's access log included) show ``api_key=[redacted]`` instead. Without a key, the
server should listen on loopback only.
"""

import hmac  # no `from __future__ import annotations`: FastAPI reads the annotations below
import logging
import os
import re
import stat
from urllib.parse import quote, quote_plus

from ..errors import StackvisionError
from .requests import ApiError

API_KEY_ENV = "STACKVISION_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
HEADER = "X-API-Key"
REDACTED = "[redacted]"


def presented_key(request, header_key: str | None) -> str | None:
    """The key the client sent, in order of preference: header, bearer token, query."""
    if header_key:
        return header_key
    auth = request.headers.get("authorization", "")
    bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    return bearer or request.query_params.get("api_key") or None


def check_key(given: str | None, expected: str) -> None:
    """Raise a 401 :class:`ApiError` unless ``given`` is ``expected``."""
    if not given:
        raise ApiError(
            401, "missing API key", "send it in the X-API-Key header (or Authorization: Bearer KEY)"
        )
    # compare_digest takes as long for a near miss as for a wild guess: no timing oracle.
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "wrong API key", "use the key the server was started with")


def key_dependency(api_key: str | None):
    """A FastAPI dependency enforcing ``api_key`` (no-op without one).

    Declared through :class:`fastapi.security.APIKeyHeader` so OpenAPI shows the scheme (and the
    docs page's "Authorize" button sends it as a header).
    """
    from fastapi import Depends, Request
    from fastapi.security import APIKeyHeader

    scheme = APIKeyHeader(name=HEADER, auto_error=False)

    def require_key(request: Request, header_key: str | None = Depends(scheme)) -> None:
        if api_key:
            check_key(presented_key(request, header_key), api_key)

    return require_key


# ---------------------------------------------------------------------- where the server gets it
def read_key_file(path: str) -> tuple[str, list[str]]:
    """The key in ``path`` (surrounding whitespace dropped), and warnings about the file."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise StackvisionError(f"--api-key-file {path} is not a file", "give a file")
        with open(path, encoding="utf-8") as fh:
            key = fh.read(65536).strip()
    except FileNotFoundError:
        raise StackvisionError(f"--api-key-file {path} not found", "check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StackvisionError(
            f"cannot read --api-key-file {path} ({exc})", "give a readable UTF-8 text file"
        ) from None
    if not key or any(c.isspace() for c in key):
        raise StackvisionError(
            f"--api-key-file {path} holds no key (empty, or more than one word)",
            "write the key alone on one line",
        )
    warnings = []
    if st.st_mode & 0o077:
        warnings.append(
            f"--api-key-file {path} can be read by other accounts (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
        )
    return key, warnings


def resolve_key(
    flag_key: str | None, key_file: str | None, environ=os.environ
) -> tuple[str | None, list[str]]:
    """The server's key from ``--api-key-file``, ``--api-key`` or ``$STACKVISION_API_KEY`` (in
    that order; giving both flags is an error), and the warnings to print."""
    if flag_key and key_file:
        raise StackvisionError(
            "--api-key and --api-key-file both given", "keep --api-key-file (it stays out of ps)"
        )
    if key_file:
        return read_key_file(key_file)
    if flag_key:
        return flag_key, [
            "--api-key is deprecated: any account on this machine can read it in the process "
            f"list (ps); set {API_KEY_ENV} or use --api-key-file PATH instead"
        ]
    return environ.get(API_KEY_ENV) or None, []


# ---------------------------------------------------------------------- keeping it out of logs
_QUERY_KEY = re.compile(r"(?i)(api(?:_|%5f)key=)[^&\s\"']*")


def redact(text: str, key: str | None = None) -> str:
    """``text`` with any ``api_key=...`` query value, and the key itself (plain or URL-encoded),
    replaced by ``[redacted]``."""
    text = _QUERY_KEY.sub(lambda m: m.group(1) + REDACTED, text)
    if key:
        forms = {key, quote(key), quote(key, safe=""), quote_plus(key), quote_plus(key, safe="/")}
        for form in sorted(forms, key=len, reverse=True):  # %-escapes in either case
            pattern = re.sub(r"%[0-9A-F]{2}", lambda m: f"(?i:{m.group(0)})", re.escape(form))
            text = re.sub(pattern, REDACTED, text)
    return text


class RedactKey(logging.Filter):
    """A logging filter that redacts the key from a record's message and its arguments (uvicorn's
    access log passes the request path, query string included, as an argument)."""

    def __init__(self, key: str | None = None):
        super().__init__()
        self.key = key

    def _clean(self, value):
        return redact(value, self.key) if isinstance(value, str) else value

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._clean(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self._clean(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self._clean(v) for k, v in record.args.items()}
        return True


LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "stackvision.serve")


def redact_logs(key: str | None) -> RedactKey:
    """Install :class:`RedactKey` on the service's and uvicorn's loggers and their handlers (a
    handler filter also sees records propagated from child loggers)."""
    filt = RedactKey(key)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, RedactKey) for f in target.filters):
                target.addFilter(filt)
            else:  # a second server in this process: the newest key
                for f in target.filters:
                    if isinstance(f, RedactKey):
                        f.key = key
    return filt
